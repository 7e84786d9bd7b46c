"""The schedule as it ran: task intervals from a profiler trace, the bubble, the picture."""

import pytest
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core import timeline_image
from lingvo_gpipe.core.gpipe import measured
from lingvo_gpipe.core.gpipe import pipelining_layer
from lingvo_gpipe.core.gpipe import schedule as schedule_lib
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.nested_map import NestedMap

Task = schedule_lib.Task


def test_ops_are_told_apart_by_their_task_scope():
  assert measured.TaskScope(Task('Bx', 2, 11)) == 'task_Bx_c2_m11'
  assert measured.TaskOf('pipe/task_F_c1_m3/fc0/MatMul') == Task('F', 1, 3)
  # TensorFlow uniquifies a scope used twice in one graph.
  assert measured.TaskOf('task_B_c0_m2_1/grad/Mul') == Task('B', 0, 2)
  assert measured.TaskOf('loss/Mean') is None
  assert measured.TaskOf('task_F_c1_m3x/MatMul') is None
  # A delayed weight gradient's ops are built under its 'Bx' scope.
  measured.NameDelayed(['task_Bx_c1_m0/grad/MatMul_1'], Task('Bw', 1, 0))
  assert measured.TaskOf('task_Bx_c1_m0/grad/MatMul_1') == Task('Bw', 1, 0)
  assert measured.TaskOf('task_Bx_c1_m0/grad/MatMul') == Task('Bx', 1, 0)


def test_task_times_span_their_ops_and_the_bubble_counts_idle_time():
  trace = measured.Trace(ops=[
      ('task_F_c0_m0/a', 0, 2_000_000), ('task_F_c0_m0/b', 1_000_000, 3_000_000),
      ('task_F_c1_m0/a', 3_000_000, 5_000_000), ('other', 0, 9_000_000),
      ('task_B_c1_m0/a', 5_000_000, 7_000_000),
      ('task_B_c0_m0/a', 7_000_000, 8_000_000)])
  times = measured.TaskTimes(trace)
  assert times == {Task('F', 0, 0): (0, 3_000_000),
                   Task('F', 1, 0): (3_000_000, 5_000_000),
                   Task('B', 1, 0): (5_000_000, 7_000_000),
                   Task('B', 0, 0): (7_000_000, 8_000_000)}
  sched = schedule_lib.FillDrain(2, 1)
  boxes = measured.Boxes(times, sched)  # ms from the first start
  assert [(b.row, b.start, b.end) for b in boxes] == [
      (0, 0.0, 3.0), (1, 3.0, 5.0), (1, 5.0, 7.0), (0, 7.0, 8.0)]
  # Busy 4 ms of 8 on each device.
  assert measured.Bubble(boxes, 2) == pytest.approx(0.5)
  # Overlapping tasks of one device count once.
  overlapping = [timeline_image.Box(0, 0.0, 2.0, Task('F', 0, 0)),
                 timeline_image.Box(0, 1.0, 3.0, Task('Bw', 0, 1)),
                 timeline_image.Box(0, 3.0, 4.0, Task('F', 0, 2))]
  assert measured.Bubble(overlapping, 1) == pytest.approx(0.0)
  assert measured.Bubble(overlapping, 2) == pytest.approx(0.5)


def _Pipeline(schedule):
  layers = [dense.Dense.Params().Set(name=f'fc{i}', input_dim=64,
                                     output_dim=64, activation='relu')
            for i in range(4)]
  return pipelining_layer.PipeliningLayer.Params().Set(
      name='pipe', layers=layers, num_partitions=2, num_micro_batches=4,
      schedule=schedule, devices=['/device:CPU:0', '/device:CPU:1']
  ).Instantiate()


@pytest.mark.parametrize('schedule', ['gpipe', 'zero_bubble_h1'])
def test_a_profiled_step_shows_every_task_where_and_when_it_ran(schedule):
  pipe = _Pipeline(schedule)
  x = tf.random.stateless_normal([64, 64], [1, 2])

  @tf.function
  def Step():
    with base_layer.Context(training=True):
      with tf.GradientTape() as tape:
        metrics = pipe.FPropLoss(pipe.theta, x, None, lambda y, _: NestedMap(
            loss=(tf.reduce_mean(y * y), 1.0)))
      return tape.gradient(metrics.loss[0], pipe.trainable_variables)

  Step()  # traced
  with measured.Profiled() as trace:
    Step()
  times = measured.TaskTimes(trace)
  sched = pipe.Schedule(4)
  # Every task but a 'Bw' right after its 'Bx' (the same computation) ran.
  expected = set()
  for device in range(sched.num_devices):
    order = sched.DeviceOrder(device)
    for i, task in enumerate(order):
      adjacent = (task.kind == 'Bw' and order[i - 1] == Task(
          'Bx', task.cell, task.micro_batch))
      if not adjacent:
        expected.add(task)
  assert set(times) == expected
  for (cell, m) in {(t.cell, t.micro_batch) for t in times}:
    forward = times[Task('F', cell, m)]
    backward = times.get(Task('B', cell, m)) or times[Task('Bx', cell, m)]
    assert forward[0] < backward[1]  # a backward needs its forward
    if cell > 0:
      assert times[Task('F', cell - 1, m)][0] < forward[1]
  # A delayed weight gradient starts after the task before it in its
  # device's order started (its ops wait for that task's outputs).
  for device in range(sched.num_devices):
    order = sched.DeviceOrder(device)
    for i, task in enumerate(order):
      if task in times and task.kind == 'Bw':
        assert times[order[i - 1]][0] < times[task][0], task
  boxes = measured.Boxes(times, sched)
  bubble = measured.Bubble(boxes, sched.num_devices)
  assert 0.0 <= bubble < 1.0
  image = measured.Image(boxes, sched, bubble)
  assert image.shape[1] >= 800 and image.shape[2] == 3
