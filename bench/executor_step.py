r"""Steady step time of the loop executor against the unrolled one, alternating in one process.

Both pipelines (the same Dense stack, the same K cells on K logical CPU
devices, the same M) are built in one process and their traced training
steps run in alternating rounds, so a machine whose speed drifts slows both
alike; the ratio loop / unrolled of each round's medians is what to quote.

  python -m bench.executor_step --micro_batches=8,64 --write_results
  python -m bench.executor_step --micro_batches=32 --dim=512 --batch=1024 \\
      --rounds=4 --steps=4 --write_results
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import tensorflow as tf

from bench import common
from lingvo_gpipe.core.gpipe import placement
from lingvo_gpipe.tools import stacks

_NUM_PARTITIONS = flags.DEFINE_integer('num_partitions', 4, 'K cells.')
_MICRO_BATCHES = flags.DEFINE_list('micro_batches', '16,64', 'Values of M.')
_NUM_LAYERS = flags.DEFINE_integer('num_layers', 16, 'Dense layers.')
_DIM = flags.DEFINE_integer('dim', 64, 'Width of every layer.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Mini-batch size.')
_CLOCKS = flags.DEFINE_integer('clocks_per_iteration', 1, "The loop "
                               "executor's clocks per loop iteration.")
_ROUNDS = flags.DEFINE_integer('rounds', 6, 'Alternating rounds.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Steps per executor per round.')
_WRITE_RESULTS = flags.DEFINE_bool('write_results', False, 'Write the table '
                                   'to bench/results/executor_step_d<dim>.md.')

_EXECUTORS = ('unrolled', 'loop')


def Measure(m: int, devices: list[str]) -> dict:
  """Per executor, each round's median step (s); and the per-round ratios."""
  x = tf.random.stateless_normal([_BATCH.value, _DIM.value], [0, 1])
  steps = {}
  for executor in _EXECUTORS:
    model = common.BuildPipeline(
        stacks.DenseLayers(_NUM_LAYERS.value, _DIM.value),
        _NUM_PARTITIONS.value, m, 'always', devices, executor=executor,
        clocks_per_iteration=_CLOCKS.value)
    steps[executor] = common.TrainStep(model, plain=False)
    for _ in range(3):  # trace, first step, warm-up
      common.RunOnce(steps[executor], x)
  medians = {e: [] for e in _EXECUTORS}
  for _ in range(_ROUNDS.value):
    for executor in _EXECUTORS:
      times = []
      for _ in range(_STEPS.value):
        start = time.perf_counter()
        common.RunOnce(steps[executor], x)
        times.append(time.perf_counter() - start)
      medians[executor].append(statistics.median(times))
  ratios = [l / u for l, u in zip(medians['loop'], medians['unrolled'])]
  return dict(medians=medians, ratios=ratios)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  facts = common.MachineFacts()
  devices = placement.SplitCpu(_NUM_PARTITIONS.value)
  rows = []
  for m in (int(v) for v in _MICRO_BATCHES.value):
    r = Measure(m, devices)
    med = {e: statistics.median(v) * 1e3 for e, v in r['medians'].items()}
    rows.append([m, f'{med["unrolled"]:.1f}', f'{med["loop"]:.1f}',
                 f'{statistics.median(r["ratios"]):.2f} '
                 f'({min(r["ratios"]):.2f}–{max(r["ratios"]):.2f})'])
    print(rows[-1], flush=True)
  body = common.MarkdownTable(
      ('M', 'unrolled ms', 'loop ms', 'loop / unrolled, median (range)'), rows)
  print(body)
  if _WRITE_RESULTS.value:
    config = {
        'model': f'{_NUM_LAYERS.value} × Dense({_DIM.value}), batch '
                 f'{_BATCH.value}, recompute always',
        'pipeline': f'K={_NUM_PARTITIONS.value} cells on as many logical '
                    'CPU devices, one process; loop executor with '
                    f'{_CLOCKS.value} clock(s) per iteration',
        'timing': f'{_ROUNDS.value} alternating rounds of {_STEPS.value} '
                  'steps per executor; a round\'s median per executor',
        'load average at end (1, 5, 15 min)': common.LoadAverage(),
    }
    path = common.WriteResults(
        f'executor_step_d{_DIM.value}' +
        (f'_c{_CLOCKS.value}' if _CLOCKS.value > 1 else '') + '.md',
        'Steady step: loop executor against unrolled',
        'python -m bench.executor_step ' + ' '.join(sys.argv[1:]), facts,
        config, body)
    print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
