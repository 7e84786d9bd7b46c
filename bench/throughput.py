r"""Pipeline speed-up across worker processes: the thing GPipe exists for.

  python -m bench.throughput --write_results
  python -m bench.throughput \
      --schedules=gpipe,1f1b,interleaved_1f1b,zero_bubble_h1 \
      --micro_batches=4,8 --write_results

Two TensorFlow worker processes, each pinned to its own core, run one
pipeline stage each (cell k on worker k, gradients accumulated and weights
updated on the stage's own worker, the input read where the first stage
runs, the loss and its gradient computed where the last one does, only the
loss returned to the client, input_grads_first on: the pipeline's speed
setting), against one process pinned to one core with
one intra-op and one inter-op thread running the same layers in sequence
with the same update. The
baseline and every (recompute mode, M) alternate within each round, so the
machine's other load touches them alike; the speed-up of a round is the
baseline's step time over the pipeline's. The client's inter-op pool is 2 so
that the stages can overlap (with a pool of 1 they were
measured to run mostly in turn).

Roles: the driver (default) starts the workers and two long-lived children,
`--role=baseline` and `--role=pipeline`, that trace their steps once and then
time `steps` steps per command read from stdin, answering one JSON line each.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
import tensorflow as tf

from bench import common
from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core import cluster
from lingvo_gpipe.core import local_processes
from lingvo_gpipe.core.gpipe import microbatch
from lingvo_gpipe.core.gpipe import pipeline
from lingvo_gpipe.core.gpipe import pipelined_loss
from lingvo_gpipe.core.gpipe import schedule as schedule_lib
from lingvo_gpipe.core.nested_map import NestedMap
from lingvo_gpipe.tools import stacks

_ROLE = flags.DEFINE_enum('role', 'driver', ['driver', 'baseline', 'pipeline'],
                          'What this process does (children are started by '
                          'the driver).')
_NUM_LAYERS = flags.DEFINE_integer('num_layers', 16, 'Dense layers.')
_DIM = flags.DEFINE_integer('dim', 1024, 'Width of every layer.')
_BATCH = flags.DEFINE_integer('batch', 512, 'Examples per step.')
_MICRO_BATCHES = flags.DEFINE_list('micro_batches', ['1', '2', '4', '8'],
                                   'Values of M to time.')
_RECOMPUTE = flags.DEFINE_list('recompute', ['always', 'never'],
                                'Recompute modes of the pipeline to time.')
_SCHEDULES = flags.DEFINE_list(
    'schedules', ['gpipe'], 'Schedules to time (PipeliningLayer.schedule '
    f'names: {", ".join(pipeline.SCHEDULES)}). Other than gpipe alone, '
    'every schedule, gpipe included, computes the loss inside the pipeline '
    '(pipelined_loss.py), so they differ by their order only.')
_CELLS_PER_DEVICE = flags.DEFINE_integer(
    'cells_per_device', 2, 'V of interleaved_1f1b: its 2·V cells (the same '
    'layers, cut finer) go round the two workers V times.')
_ROUNDS = flags.DEFINE_integer('rounds', 6, 'Alternating rounds.')
_STEPS = flags.DEFINE_integer('steps_per_round', 10, 'Steps timed per round.')
_WORKER_HOSTS = flags.DEFINE_string('worker_hosts', None,
                                    'pipeline role: the two workers.')
_WRITE = flags.DEFINE_bool('write_results', False,
                           'Write bench/results/throughput.md.')

_LEARNING_RATE = 1e-4


def _Model(devices, cells_per_device=1):
  """The Dense stack as a PipeliningLayer on 2 `devices`, built here: 2 cells,
  or 2·V for the interleaved schedule."""
  interleaved = dict(schedule='interleaved_1f1b',
                     cells_per_device=cells_per_device)
  return common.BuildPipeline(stacks.DenseLayers(_NUM_LAYERS.value, _DIM.value),
                              2, 1, 'always', devices,
                              **(interleaved if cells_per_device > 1 else {}))


def _MeanSquare(outputs, targets):
  del targets
  return NestedMap(loss=(tf.reduce_mean(outputs * outputs),
                         tf.cast(tf.shape(outputs)[0], tf.float32)))


def _UpdateStep(model, sizes, recompute='always', schedule=None):
  """A traced step: forward, backward, SGD update on each weight's device.

  sizes None runs the cells in sequence under one tape (the baseline);
  otherwise through the pipeline with those micro-batch sizes and recompute
  mode; with a schedule's name, in its order with the loss inside the
  pipeline (the same loss). Returns the loss only, computed on the last
  cell's device.
  """
  variables = model.trainable_variables
  thetas = [model.CellTheta(model.theta, k) for k in range(len(model.cells))]
  with tf.device(model.placement.Device(0)):
    x = tf.Variable(tf.random.stateless_normal([_BATCH.value, _DIM.value],
                                               [1, 2]), trainable=False)

  @tf.function
  def Step():
    with base_layer.Context(training=True):
      with tf.GradientTape() as tape:
        if schedule is not None:
          loss = pipelined_loss.RunPipelineLoss(
              model.cells, thetas, tf.convert_to_tensor(x), None, _MeanSquare,
              sizes, model.placement, recompute=recompute,
              schedule=pipeline.MakeSchedule(
                  len(model.cells), len(sizes), True, schedule,
                  model.params.cells_per_device)).loss[0]
          y = None
        elif sizes is None:
          y = tf.convert_to_tensor(x)
          for cell, theta in zip(model.cells, thetas):
            y = cell.FProp(theta, y)
        else:
          y = pipeline.RunPipeline(model.cells, thetas, tf.convert_to_tensor(x),
                                   sizes, model.placement, recompute=recompute,
                                   input_grads_first=True)
        if y is not None:
          with model.OutputScope():  # the last cell's device
            loss = tf.reduce_mean(y * y)
    with model.OutputScope():  # the loss's gradient ops, where y lives
      grads = tape.gradient(loss, variables)
    for grad, var in zip(grads, variables):
      with tf.device(var.device):
        var.assign_sub(_LEARNING_RATE * grad)
    return loss

  return Step


def _Serve(steps_by_name):
  """Answers 'name steps' lines on stdin with {'seconds': ...} lines."""
  for step in steps_by_name.values():
    step().numpy()  # trace and warm up
    step().numpy()
  print(json.dumps({'ready': True}), flush=True)
  for line in sys.stdin:
    name, count = line.split()
    step = steps_by_name[name]
    start = time.perf_counter()
    for _ in range(int(count)):
      loss = step()
    loss.numpy()
    print(json.dumps({'seconds': time.perf_counter() - start}), flush=True)


def RunBaseline():
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  model = _Model(['/device:CPU:0'])
  _Serve({'plain': _UpdateStep(model, None)})


def RunPipeline():
  tf.config.threading.set_inter_op_parallelism_threads(2)
  devices = cluster.ConnectToWorkers(cluster.ParseHosts(_WORKER_HOSTS.value))
  model = _Model(devices)
  interleaved = (_Model(devices, _CELLS_PER_DEVICE.value)
                 if 'interleaved_1f1b' in _SCHEDULES.value else None)
  inside = _SCHEDULES.value != ['gpipe']
  _Serve({_Name(s, r, m): _UpdateStep(
      interleaved if s == 'interleaved_1f1b' else model,
      microbatch.MicroBatchSizes(_BATCH.value, num_micro_batches=int(m)), r,
      s if inside else None) for s, r, m in _Configs()})


def _Configs() -> list[tuple[str, str, str]]:
  return [(s, r, m) for s in _SCHEDULES.value for r in _RECOMPUTE.value
          for m in _MICRO_BATCHES.value]


def _Name(schedule: str, recompute: str, micro_batches: str) -> str:
  return f'{schedule}/{recompute}/{micro_batches}'


class _Child:
  """A long-lived role process spoken to over stdin/stdout."""

  def __init__(self, command, env):
    self.process = subprocess.Popen(command, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, env=env)
    self._Read('ready')

  def _Read(self, key):
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f'{self.process.args} exited with '
                         f'{self.process.wait()}.')
    return json.loads(line)[key]

  def Time(self, name, steps):
    self.process.stdin.write(f'{name} {steps}\n')
    self.process.stdin.flush()
    return self._Read('seconds') / steps


def RunDriver():
  facts = common.MachineFacts()
  if (os.cpu_count() or 1) < 2:
    raise RuntimeError('The pipeline speed-up needs 2 cores.')
  env = dict(os.environ, PYTHONPATH=common.REPO, TF_CPP_MIN_LOG_LEVEL='2')
  shape = [f'--num_layers={_NUM_LAYERS.value}', f'--dim={_DIM.value}',
           f'--batch={_BATCH.value}',
           f'--micro_batches={",".join(_MICRO_BATCHES.value)}',
           f'--recompute={",".join(_RECOMPUTE.value)}',
           f'--schedules={",".join(_SCHEDULES.value)}',
           f'--cells_per_device={_CELLS_PER_DEVICE.value}']
  for name in _SCHEDULES.value:
    if name not in pipeline.SCHEDULES:
      raise app.UsageError(f'--schedules: unknown schedule {name!r}; valid: '
                           f'{", ".join(pipeline.SCHEDULES)}.')
  me = [sys.executable, '-m', 'bench.throughput']
  hosts, workers = local_processes.StartLocalWorkers(2, pin=True)
  children = []
  try:
    baseline = _Child(['taskset', '-c', '0', *me, '--role=baseline', *shape], env)
    children.append(baseline.process)
    piped = _Child([*me, '--role=pipeline', *shape,
                    f'--worker_hosts={",".join(hosts)}'], env)
    children.append(piped.process)
    times = {name: [] for name in ['plain'] + [
        _Name(*config) for config in _Configs()]}
    run_steal, round_steal, steals = common.StolenCpu(), common.StolenCpu(), []
    for round_index in range(_ROUNDS.value):
      round_steal.Reset()
      for name in times:
        child = baseline if name == 'plain' else piped
        times[name].append(child.Time(name, _STEPS.value))
      steals.append(round_steal.Text())
      print(f'round {round_index}: ' + ', '.join(
          f'{n} {t[-1] * 1e3:.0f} ms' for n, t in times.items()) +
            f'; CPU stolen {steals[-1]}', flush=True)
    facts['CPU stolen by the hypervisor during the rounds'] = (
        f'{run_steal.Text()} (by round: {", ".join(steals)})')
  finally:
    for child in children:
      child.stdin.close()
    local_processes.StopAll(children + workers)
  rows = []
  for name, values in times.items():
    if name == 'plain':
      continue
    speedups = [b / p for b, p in zip(times['plain'], values)]
    median, low, high = common.Spread(speedups)
    schedule, recompute, m = name.split('/')
    v = _CELLS_PER_DEVICE.value if schedule == 'interleaved_1f1b' else 1
    predicted = schedule_lib.Simulate(
        pipeline.MakeSchedule(2 * v, int(m), True, schedule, v),
        [1.0] * 2 * v, [2.0] * 2 * v, input_grad_times=[1.0] * 2 * v,
        weight_grad_times=[1.0] * 2 * v)
    rows.append([schedule, m, recompute,
                 f'{predicted.bubble_fraction:.2f}',
                 f'{statistics.median(values) * 1e3:.0f}',
                 f'{statistics.median(times["plain"]) * 1e3:.0f}',
                 f'{median:.2f}× ({low:.2f}–{high:.2f})'])
  body = common.MarkdownTable(
      ['schedule', 'M', 'recompute', 'predicted bubble',
       'pipeline step (ms, median)',
       'one-core step (ms, median)',
       'speed-up, median (min–max) over rounds'], rows)
  print(body)
  if _WRITE.value:
    path = common.WriteResults(
        'throughput.md' if _SCHEDULES.value == ['gpipe'] else
        'throughput_schedules.md',
        'Pipeline speed-up across two worker processes',
        ' '.join(['python -m bench.throughput'] + sys.argv[1:]), facts,
        {'layers': f'{_NUM_LAYERS.value} × Dense({_DIM.value}), relu, batch '
                   f'{_BATCH.value}, SGD update on each weight\'s device',
         'pipeline': 'K=2 cells, one per worker process, each pinned to its '
                     'own core (taskset); client inter-op 2; '
                     'input_grads_first on (zero_bubble_h1 always splits); '
                     f'interleaved_1f1b: {2 * _CELLS_PER_DEVICE.value} cells, '
                     'cell c on worker c mod 2',
         'schedules': ', '.join(_SCHEDULES.value) + (
             '; the loss inside the pipeline' if _SCHEDULES.value != [
                 'gpipe'] else '') + '; predicted bubble: the simulator with '
                     'equal forward, input-gradient and weight-gradient '
                     'tasks',
         'baseline': 'one process pinned to core 0, 1 intra-op and 1 inter-op '
                     'thread, the same layers in sequence under one tape',
         'rounds': f'{_ROUNDS.value} alternating rounds of '
                   f'{_STEPS.value} steps per configuration'}, body)
    print(f'wrote {path}')


def main(argv):
  del argv
  {'driver': RunDriver, 'baseline': RunBaseline,
   'pipeline': RunPipeline}[_ROLE.value]()


if __name__ == '__main__':
  app.run(main)
