"""Tests of the executor: it lowers exactly the schedule's per-cell order."""

import pytest
import tensorflow as tf

from lingvo_gpipe.core.gpipe import executor
from lingvo_gpipe.core.gpipe import placement
from lingvo_gpipe.core.gpipe import schedule


class _RecordingRunner:
  """Stands in for a CellRunner; records what the executor asks of it."""

  def __init__(self, cell, log):
    self.cell, self.log = cell, log

  def Forward(self, micro_batch, x, keep):
    self.log.append(('F', self.cell, micro_batch))
    return tf.add(x, 1.0, name=f'f_{self.cell}_{micro_batch}'), None

  def Backward(self, micro_batch, x, dy, kept, input_grad_first):
    del kept
    kind = 'Bx' if input_grad_first else 'B'
    self.log.append((kind, self.cell, micro_batch))
    return [tf.multiply(dy, x, name=f'w_{self.cell}_{micro_batch}')], dy


class _ForwardOrderBackward(schedule.FillDrain):
  """Fill-drain whose backwards run in forward order: a different task list."""

  name = 'fill_drain_forward_order_backward'

  def CellOrder(self, cell):
    order = super().CellOrder(cell)
    forwards = [t for t in order if t.kind == 'F']
    return forwards + sorted((t for t in order if t.kind != 'F'),
                             key=lambda t: t.micro_batch)


def _Run(sched, k, m):
  log = []
  runners = [_RecordingRunner(c, log) for c in range(k)]
  ex = executor.Executor(sched, runners,
                         placement.DevicePlacement(k, ['/device:CPU:0']),
                         'always')
  outs = ex.RunForward([tf.constant(float(i)) for i in range(m)])
  sums, dx = ex.RunBackward([tf.constant(1.0)] * m)
  return log, outs, sums, dx


@pytest.mark.parametrize('sched', [schedule.FillDrain(3, 4),
                                   _ForwardOrderBackward(3, 4)],
                         ids=['fill_drain', 'forward_order_backward'])
def test_each_cell_runs_its_tasks_in_the_schedules_order(sched):
  log, outs, sums, dx = _Run(sched, 3, 4)
  for cell in range(3):
    ran = [(kind, m) for kind, c, m in log if c == cell]
    assert ran == [(t.kind, t.micro_batch) for t in sched.CellOrder(cell)]
  assert [float(o) for o in outs] == [3.0, 4.0, 5.0, 6.0]  # three +1 cells
  # Cell 0's running sum adds dy * x over micro-batches: sum of inputs.
  assert float(sums[0][0]) == 0.0 + 1.0 + 2.0 + 3.0
  assert [float(d) for d in dx] == [1.0] * 4


def test_split_backward_lowers_each_input_gradient_task_first():
  log, _, _, _ = _Run(schedule.FillDrain(2, 2, split_backward=True), 2, 2)
  # The Bx/Bw pair is one gradient computation whose weight-gradient ops
  # wait for the input gradient; the first cell sends no gradient upstream.
  assert [e for e in log if e[0] != 'F'] == [
      ('Bx', 1, 1), ('B', 0, 1), ('Bx', 1, 0), ('B', 0, 0)]


class _OneForwardOneBackward(schedule.Schedule):
  name = '1f1b_like'

  def CellOrder(self, cell):
    return [schedule.Task(kind, cell, m) for m in range(self.num_micro_batches)
            for kind in ('F', 'B')]


class _WeightGradFirst(schedule.FillDrain):
  name = 'weight_grad_first'

  def CellOrder(self, cell):
    order = schedule.FillDrain(self.num_cells, self.num_micro_batches,
                               split_backward=True).CellOrder(cell)
    return [t for t in order if t.kind != 'Bx'] + [
        t for t in order if t.kind == 'Bx']


class _WeightGradNever(schedule.FillDrain):
  name = 'weight_grad_never'

  def CellOrder(self, cell):
    order = schedule.FillDrain(self.num_cells, self.num_micro_batches,
                               split_backward=True).CellOrder(cell)
    return [t for t in order if t.kind != 'Bw']


@pytest.mark.parametrize('sched,message', [
    (_OneForwardOneBackward(2, 2), 'starts a backward before the last forward'),
    (_WeightGradFirst(2, 2), 'before the input-gradient task of its '
     'micro-batch'),
    (_WeightGradNever(2, 2), r'never runs the weight-gradient task of '
     r'micro-batches \[0, 1\]'),
])
def test_a_schedule_it_cannot_lower_is_refused_by_name(sched, message):
  with pytest.raises(ValueError, match=message) as e:
    _Run(sched, 2, 2)
  assert sched.name in str(e.value)


@pytest.mark.parametrize('one_pass', [False, True])
def test_running_sums_are_made_on_their_cells_device(
    one_pass):
  # Made anywhere else, every micro-batch's weight gradients would travel
  # to that device: with cells on capped workers one ran out of memory.
  k, m = 2, 3
  devices = [f'/device:CPU:{c}' for c in range(k)]
  graph = tf.Graph()
  with graph.as_default():
    runners = [_RecordingRunner(c, []) for c in range(k)]
    ex = executor.Executor(schedule.FillDrain(k, m), runners,
                           placement.DevicePlacement(k, devices), 'always')
    inputs = [tf.constant(float(i)) for i in range(m)]
    if one_pass:
      sums, _ = ex.Run(inputs, lambda mb, y: (None, tf.ones_like(y)))[1:]
    else:
      ex.RunForward(inputs)
      sums, _ = ex.RunBackward([tf.constant(1.0)] * m)
  for c in range(k):
    assert sums[c][0].op.type == 'AddV2'  # the last of m - 1 additions
    assert sums[c][0].device.endswith(f'CPU:{c}'), (c, sums[c][0].device)


def _Ancestors(op):
  """Names (without their task scope) of `op` and every op it waits for."""
  seen, stack = set(), [op]
  while stack:
    o = stack.pop()
    if o.name.split('/')[-1] not in seen:
      seen.add(o.name.split('/')[-1])
      stack.extend([t.op for t in o.inputs] + list(o.control_inputs))
  return seen


def test_a_delayed_weight_gradient_waits_for_the_task_before_it():
  # ZB-H1, K=2, M=4: cell 1 runs F0 Bx0 F1 Bx1 Bw0 ..., its weight
  # gradients one micro-batch late; cell 0 runs each Bw right after its Bx.
  k, m = 2, 4
  graph = tf.Graph()
  with graph.as_default():
    runners = [_RecordingRunner(c, []) for c in range(k)]
    ex = executor.Executor(schedule.ZeroBubbleH1(k, m), runners,
                           placement.DevicePlacement(k, ['/device:CPU:0']),
                           'always')
    ex.Run([tf.constant(float(i)) for i in range(m)],
           lambda mb, y: (None, tf.ones_like(y)))
  # Each task's ops are named under its task scope ('task_Bx_c1_m0/w_1_0').
  by_name = {o.name.split('/')[-1]: o for o in graph.get_operations()}
  op = by_name.__getitem__
  assert op('w_1_0').name == 'task_Bx_c1_m0/w_1_0'
  assert op('f_1_1').name == 'task_F_c1_m1/f_1_1'
  assert {'f_1_1', 'w_1_1'} - _Ancestors(op('w_1_0')) == {'w_1_1'}
  assert 'f_0_2' not in _Ancestors(op('w_0_0'))
  assert 'f_1_2' not in _Ancestors(op('w_1_0'))  # F2 comes after Bw0
