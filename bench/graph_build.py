r"""Graph-build cost of the pipeline as K·M grows: trace, first step, steady step.

The pipeline unrolls its fill-drain schedule into the traced graph: K cells
times M micro-batches of forward, recomputation and gradient ops. This
measures what that costs on a small stack (compute is negligible, so graph
size dominates): K=4 cells on 4 logical CPU devices, M in --micro_batches.
Each point runs in a process of its own (fresh TensorFlow, no cached traces or
kernels), recording
  trace         `get_concrete_function` of the training step (autograph,
                Python graph building, the custom gradient's backward);
  first step    the first call (Grappler, partitioning across devices,
                executor creation) plus one run;
  ops           `len(concrete_function.graph.get_operations())`;
  steady step   median wall and CPU time of later steps.
A plain row (the same cells in sequence under one tape, no pipeline) gives
the floor.

  python -m bench.graph_build --write_results
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import tensorflow as tf

from bench import common
from lingvo_gpipe.core.gpipe import pipeline
from lingvo_gpipe.core.gpipe import placement
from lingvo_gpipe.core.gpipe import recompute

_NUM_PARTITIONS = flags.DEFINE_integer('num_partitions', 4, 'K cells, each on '
                                       'its own logical CPU device.')
_MICRO_BATCHES = flags.DEFINE_list('micro_batches', '1,2,4,8,16,32,64',
                                   'Values of M, one point (process) each.')
_NUM_LAYERS = flags.DEFINE_integer('num_layers', 8, 'Dense layers.')
_DIM = flags.DEFINE_integer('dim', 256, 'Width of every layer.')
_BATCH = flags.DEFINE_integer('batch', 256, 'Mini-batch size.')
_RECOMPUTE = flags.DEFINE_enum('recompute', 'always',
                               list(recompute.RECOMPUTE_MODES),
                               'Re-materialization mode.')
_EXECUTOR = flags.DEFINE_enum('executor', 'unrolled', list(pipeline.EXECUTORS),
                              "The pipeline's executor (loop: a graph that "
                              'does not grow with M).')
_STEADY_STEPS = flags.DEFINE_integer('steady_steps', 10, 'Measured steps after '
                                     'two warm-up steps.')
_TIMEOUT = flags.DEFINE_integer('timeout', 300, 'Seconds allowed per point.')
_WRITE_RESULTS = flags.DEFINE_bool('write_results', False, 'Write the table '
                                   'to bench/results/graph_build.md.')
_POINT = flags.DEFINE_integer('point', None, 'Internal: measure one point in '
                              'this process (M, or 0 for plain) and print '
                              'one JSON line.')

# Flags a point's process inherits from the driver.
_SHARED_FLAGS = (_NUM_PARTITIONS, _NUM_LAYERS, _DIM, _BATCH, _RECOMPUTE,
                 _STEADY_STEPS, _EXECUTOR)


def MeasurePoint(m: int) -> dict:
  """One point in this process; m=0 runs the plain stack."""
  k = _NUM_PARTITIONS.value
  devices = placement.SplitCpu(k)  # before any op runs
  layers = common.DenseStack(_NUM_LAYERS.value, _DIM.value)
  model = common.BuildPipeline(layers, k, max(m, 1), _RECOMPUTE.value, devices,
                               executor=_EXECUTOR.value)
  step = common.TrainStep(model, plain=(m == 0))
  x = tf.random.stateless_normal([_BATCH.value, _DIM.value], [0, 1])

  wall, cpu = time.perf_counter(), time.process_time()
  graph = step.get_concrete_function(x).graph
  trace = (time.perf_counter() - wall, time.process_time() - cpu)
  first = common.RunOnce(step, x)
  for _ in range(2):
    common.RunOnce(step, x)
  steady = [common.RunOnce(step, x) for _ in range(_STEADY_STEPS.value)]
  return dict(micro_batches=m, ops=len(graph.get_operations()),
              trace_seconds=trace[0], trace_cpu_seconds=trace[1],
              first_step_seconds=first[0], first_step_cpu_seconds=first[1],
              steady_wall_seconds=statistics.median(w for w, _ in steady),
              steady_cpu_seconds=statistics.median(c for _, c in steady))


def RunPoint(m: int) -> dict:
  """Measures one point in a fresh process."""
  argv = [sys.executable, '-m', 'bench.graph_build', f'--point={m}']
  argv += [f'--{f.name}={f.value}' for f in _SHARED_FLAGS]
  env = dict(os.environ, PYTHONPATH=common.REPO)
  out = subprocess.run(argv, cwd=common.REPO, env=env, capture_output=True,
                       text=True, timeout=_TIMEOUT.value)
  if out.returncode:
    raise RuntimeError(f'Point M={m} exited with {out.returncode}:\n'
                       f'{out.stderr[-2000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


HEADER = ('M', 'K·M', 'micro-batch', 'graph ops', 'trace s', 'first step s',
          'trace + first s', 'steady step ms')


def _WallCpu(r: dict, key: str, scale: float = 1, fmt: str = '.2f') -> str:
  wall = r[f'{key}_seconds' if key != 'steady' else 'steady_wall_seconds']
  cpu = r[f'{key}_cpu_seconds']
  return f'{wall * scale:{fmt}} / {cpu * scale:{fmt}}'


def Run() -> tuple[str, dict]:
  k = _NUM_PARTITIONS.value
  points = [0] + [int(m) for m in _MICRO_BATCHES.value]
  results = []
  for m in points:
    r = RunPoint(m)
    results.append(r)
    print(f'M={m or "plain"}: {json.dumps(r)}', flush=True)
  rows = []
  for r in results:
    m = r['micro_batches']
    rows.append([
        m or 'plain', k * m if m else '–',
        _BATCH.value // m if m else _BATCH.value, r['ops'],
        _WallCpu(r, 'trace'), _WallCpu(r, 'first_step'),
        f'{r["trace_seconds"] + r["first_step_seconds"]:.2f} / '
        f'{r["trace_cpu_seconds"] + r["first_step_cpu_seconds"]:.2f}',
        _WallCpu(r, 'steady', 1e3, '.1f')])
  body = common.MarkdownTable(HEADER, rows)
  piped = [r for r in results if r['micro_batches']]
  if len({r['ops'] for r in piped}) == 1:
    body += (f'\n\nThe graph has {piped[0]["ops"]} ops at every M: it does '
             'not grow with the micro-batches.')
  elif len(piped) >= 2:
    # Least-squares slopes over the pipelined points: cost per graph op.
    ops = [r['ops'] for r in piped]
    mean_ops = statistics.fmean(ops)
    var = sum((o - mean_ops) ** 2 for o in ops)

    def Slope(key):
      ys = [r[key] for r in piped]
      mean_y = statistics.fmean(ys)
      return sum((o - mean_ops) * (y - mean_y) for o, y in zip(ops, ys)) / var

    per_km = [(r['ops'] - piped[0]['ops']) / (k * (r['micro_batches'] -
                                                   piped[0]['micro_batches']))
              for r in piped[1:]]
    body += (
        f'\n\nGraph ops grow by {statistics.median(per_km):.0f} per cell '
        f'micro-batch (K·M). Least-squares cost per graph op over the '
        f'pipelined points: trace {Slope("trace_cpu_seconds") * 1e6:.0f} µs '
        f'and first step {Slope("first_step_cpu_seconds") * 1e6:.0f} µs of '
        f'CPU, steady step {Slope("steady_wall_seconds") * 1e6:.1f} µs of '
        'wall time. Cells show wall / CPU time (CPU: all threads of the '
        'point\'s process; tracing is single-threaded Python, so its CPU '
        'time stays near its unloaded wall time when other processes '
        'compete for the cores).')
  config = {
      'model': f'{_NUM_LAYERS.value} × Dense({_DIM.value}→{_DIM.value}, relu), '
               f'batch {_BATCH.value}, fp32',
      'pipeline': f'K={k} cells on {k} logical CPU devices '
                  f'(placement.SplitCpu), recompute={_RECOMPUTE.value}, '
                  f'executor={_EXECUTOR.value}',
      'step': 'tf.function: plain GradientTape around the model, loss = '
              'mean(y²), gradients of all variables',
      'per point': 'its own process; trace = get_concrete_function; first '
                   'step = first call; steady = median of '
                   f'{_STEADY_STEPS.value} steps after 2 warm-up steps',
      'load average at end (1, 5, 15 min)': common.LoadAverage(),
  }
  return body, config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _POINT.value is not None:
    print(json.dumps(MeasurePoint(_POINT.value)))
    return
  facts = common.MachineFacts()
  body, config = Run()
  print(body)
  if _WRITE_RESULTS.value:
    command = 'python -m bench.graph_build ' + ' '.join(sys.argv[1:])
    name = ('graph_build.md' if _EXECUTOR.value == 'unrolled' else
            f'graph_build_{_EXECUTOR.value}.md')
    path = common.WriteResults(
        name, f'Graph build and step time as K·M grows, executor '
        f'{_EXECUTOR.value}', command,
        facts, config, body)
    print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
