r"""Step-time overhead of PipeliningLayer at K=1 against the plain layer stack.

One process, one training step per configuration (see bench/common.py), run in
alternating rounds so that load from other processes hits every configuration
alike:
  plain          the layers in sequence under one tape;
  never          PipeliningLayer K=1, M=1, recompute='never' (goal <= 1.05x);
  always         PipeliningLayer K=1, M=1, recompute='always' (goal <= 1.40x);
  always, M=8    K=1, M=8, recompute='always' (for information).
Each round runs `--steps_per_round` steps of every configuration, the starting
configuration rotating from round to round. Reported per configuration: the
step's wall time and CPU time (all threads of this process), and their ratios
to plain taken within each round, as median (min-max) over rounds. Other
processes on a shared machine stretch wall time by up to 2x from round to
round; CPU time counts the work this process did and moves much less, so the
goals are judged on the median CPU ratio (wall shown alongside).

  python -m bench.overhead --write_results
"""

from __future__ import annotations

import statistics
import sys

from bench import tf_setup

tf_setup.Setup()  # before TensorFlow loads: log noise, TensorFlow's own allocator

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import tensorflow as tf

from bench import common
from lingvo_gpipe.core import precision
from lingvo_gpipe.tools import stacks

_NUM_LAYERS = flags.DEFINE_integer('num_layers', 24, 'Dense layers in the stack.')
_DIM = flags.DEFINE_integer('dim', 512, 'Width of every layer.')
_BATCH = flags.DEFINE_integer('batch', 4096, 'Mini-batch size.')
_INFO_MICRO_BATCHES = flags.DEFINE_integer(
    'info_micro_batches', 8, 'M of the informational recompute=always config.')
_WARMUP_STEPS = flags.DEFINE_integer('warmup_steps', 2, 'Unmeasured steps of '
                                     'each configuration after its trace.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Measured rounds.')
_STEPS_PER_ROUND = flags.DEFINE_integer('steps_per_round', 3, 'Steps of each '
                                        'configuration per round.')
_FPROP_DTYPE = flags.DEFINE_enum(
    'fprop_dtype', 'float32', list(precision.FPROP_DTYPES),
    'The dtype every configuration computes in (variables float32); '
    'bfloat16 or float16 writes overhead_<dtype>.md.')
_WRITE_RESULTS = flags.DEFINE_bool('write_results', False, 'Write the table '
                                   'to bench/results/overhead.md.')

# (label, plain, num_micro_batches or None for the info flag, recompute, goal)
_CONFIGS = (
    ('plain', True, 1, 'never', None),
    ('K=1 M=1 never', False, 1, 'never', 1.05),
    ('K=1 M=1 always', False, 1, 'always', 1.40),
    ('K=1 M={m} always', False, None, 'always', None),
)


def _Cell(values: list[float], scale: float = 1e3, fmt: str = '.0f') -> str:
  med, lo, hi = common.Spread(values)
  return f'{med * scale:{fmt}} ({lo * scale:{fmt}}–{hi * scale:{fmt}})'


def Run() -> tuple[list[list], dict]:
  """Measures every configuration; returns table rows and the config."""
  layers = stacks.DenseLayers(_NUM_LAYERS.value, _DIM.value)
  x = tf.random.stateless_normal([_BATCH.value, _DIM.value], [0, 1])
  configs = []
  for label, plain, m, recompute, goal in _CONFIGS:
    m = m or _INFO_MICRO_BATCHES.value
    model = common.BuildPipeline(layers, 1, m, recompute,
                                 fprop_dtype=_FPROP_DTYPE.value)
    configs.append((label.format(m=m), common.TrainStep(model, plain), goal))
  for label, step, _ in configs:
    trace, _ = common.RunOnce(step, x)
    warm = [common.RunOnce(step, x)[0] for _ in range(_WARMUP_STEPS.value)]
    print(f'{label}: trace+first step {trace:.2f}s, warm-up '
          f'{", ".join(f"{t:.3f}" for t in warm)}s', flush=True)

  n = len(configs)
  # [config][round] -> median over the round's steps, of wall and CPU time.
  wall = [[] for _ in range(n)]
  cpu = [[] for _ in range(n)]
  for r in range(_ROUNDS.value):
    for j in range(n):
      i = (r + j) % n
      steps = [common.RunOnce(configs[i][1], x)
               for _ in range(_STEPS_PER_ROUND.value)]
      wall[i].append(statistics.median(w for w, _ in steps))
      cpu[i].append(statistics.median(c for _, c in steps))
    print(f'round {r}: ' + ', '.join(
        f'{configs[i][0]} {wall[i][-1]:.3f}s wall {cpu[i][-1]:.3f}s CPU'
        for i in range(n)), flush=True)

  rows = []
  for i, (label, _, goal) in enumerate(configs):
    wall_ratios = [a / b for a, b in zip(wall[i], wall[0])]
    cpu_ratios = [a / b for a, b in zip(cpu[i], cpu[0])]
    verdict = ''
    if goal is not None:
      verdict = f'≤ {goal:.2f}×: ' + ' / '.join(
          'met' if statistics.median(r) <= goal else 'MISSED'
          for r in (cpu_ratios, wall_ratios))
    rows.append([label, _Cell(wall[i]), _Cell(wall_ratios, 1, '.3f'),
                 _Cell(cpu[i]), _Cell(cpu_ratios, 1, '.3f'), verdict])
  config = {
      'model': f'{_NUM_LAYERS.value} × Dense({_DIM.value}→{_DIM.value}, relu), '
               f'batch {_BATCH.value}, variables float32, computing in '
               f'{_FPROP_DTYPE.value}',
      'step': 'tf.function: plain GradientTape around the model, loss = '
              'mean(y²), gradients of all variables',
      'schedule': f'{_WARMUP_STEPS.value} warm-up steps each, then '
                  f'{_ROUNDS.value} rounds × {_STEPS_PER_ROUND.value} steps of '
                  'each configuration, starting configuration rotating',
      'cells': 'median over rounds (min–max over rounds); a round\'s value is '
               'the median of its steps; ratios are taken within a round',
      'load average at end (1, 5, 15 min)': common.LoadAverage(),
  }
  return rows, config


HEADER = ('configuration', 'wall step ms', 'wall ratio to plain',
          'CPU step ms', 'CPU ratio to plain', 'goal (CPU / wall)')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  facts = common.MachineFacts()
  rows, config = Run()
  table = common.MarkdownTable(HEADER, rows)
  print(table)
  if _WRITE_RESULTS.value:
    command = 'python -m bench.overhead ' + ' '.join(sys.argv[1:])
    name = ('overhead.md' if _FPROP_DTYPE.value == 'float32' else
            f'overhead_{_FPROP_DTYPE.value}.md')
    path = common.WriteResults(
        name, 'PipeliningLayer overhead at K=1 vs the plain stack',
        command, facts, config, table)
    print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
