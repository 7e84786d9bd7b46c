r"""Steady step time of two ways to run one pipeline, alternating in one process.

Both pipelines (the same stack, the same K cells on K logical CPU devices,
the same M) are built in one process and their traced training steps run in
alternating rounds, so a machine whose speed drifts slows both alike; the
ratio second / first of each round's medians is what to quote. The ways
(`--variants`): the unrolled executor, the loop executor skipping its bubble
clocks (`loop`, the default), and the loop executor computing them on a
spare row (`loop_spare_row`, skip_bubbles=False).

  python -m bench.executor_step --micro_batches=8,64 --write_results
  python -m bench.executor_step --micro_batches=32 --dim=512 --batch=1024 \\
      --rounds=4 --steps=4 --write_results
  python -m bench.executor_step --variants=loop_spare_row,loop \\
      --stack=transformer --dim=32 --micro_batches=8 --write_results
  python -m bench.executor_step --recompute=never --stack=transformer \\
      --dim=32 --micro_batches=8,32 --write_results
  python -m bench.executor_step --one_device --micro_batches=8,64 \\
      --write_results
  python -m bench.executor_step --one_device --micro_batches=8,64 \\
      --variants=unrolled,loop_unlowered --write_results
  python -m bench.executor_step --micro_batches=64 \\
      --tanh_per_layer=0,4,16,32 --write_results
  python -m bench.executor_step --threads=1 --micro_batches=8,64 \\
      --variants=unrolled,loop_c4 --write_results
  python -m bench.executor_step --stack=amoebanet --num_layers=3 --dim=16 \\
      --num_partitions=2 --micro_batches=4 --write_results
  python -m bench.executor_step --variants=unrolled,trial \\
      --micro_batches=8,64 --write_results
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from typing import Iterator

from bench import tf_setup

tf_setup.Setup()  # before TensorFlow loads: log noise, TensorFlow's own allocator

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import tensorflow as tf

from tensorflow.python.ops import control_flow_util_v2  # pylint: disable=g-direct-tensorflow-import

from bench import common
from lingvo_gpipe.core.gpipe import executor_trial
from lingvo_gpipe.core.gpipe import placement
from lingvo_gpipe.core.gpipe import schedule
from lingvo_gpipe.tools import stacks

# Each way to run the pipeline: its PipeliningLayer settings.
VARIANTS = {
    'unrolled': dict(executor='unrolled'),
    'auto': dict(executor='auto'),  # the default: one of the two per pipeline
    'loop': dict(executor='loop', skip_bubbles=True),
    'loop_spare_row': dict(executor='loop', skip_bubbles=False),
    # Four clocks an iteration, whatever --clocks_per_iteration says.
    'loop_c4': dict(executor='loop', clocks_per_iteration=4),
    'loop_unpacked': dict(executor='loop', pack_weights=False),
    'unrolled_jit': dict(executor='unrolled', jit_compile=True),
    'loop_jit': dict(executor='loop', jit_compile=True),
    # The loop executor with TensorFlow's loops left as functional While ops
    # (each iteration calls the body as a function) instead of lowered to
    # frames; such a loop runs its whole body on one device (--one_device).
    'loop_unlowered': dict(executor='loop'),
    # The trainer's executor trial (core/gpipe/executor_trial.py): 'auto'
    # started on the loop, the unrolled graph tried, the faster kept; run to
    # its decision before the timed rounds.
    'trial': dict(executor='auto'),
}
_UNLOWERED = ('loop_unlowered',)

_VARIANTS = flags.DEFINE_list('variants', 'unrolled,loop', 'Two of '
                              f'{", ".join(VARIANTS)}; the ratio is the '
                              'second over the first.')
_STACK = flags.DEFINE_enum('stack', 'dense',
                           ['dense', 'transformer', 'amoebanet'],
                           'dense: Dense layers on vectors; transformer: the '
                           'narrow Transformer LM, its blocks one Repeat; '
                           'amoebanet: AmoebaNet-D on random images '
                           '(--num_layers cells, --dim filters).')
_NUM_PARTITIONS = flags.DEFINE_integer('num_partitions', 4, 'K cells.')
_MICRO_BATCHES = flags.DEFINE_list('micro_batches', '16,64', 'Values of M.')
_NUM_LAYERS = flags.DEFINE_integer('num_layers', 16, 'Dense layers or '
                                   'Transformer blocks.')
_DIM = flags.DEFINE_integer('dim', 64, 'Width of every layer (d_model).')
_TANH = flags.DEFINE_list('tanh_per_layer', '0', 'dense: values of how many '
                          'tanh activations follow each Dense, so that a '
                          'cell runs more small ops per micro-batch on the '
                          'same weights.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Mini-batch size (sequences).')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 8, 'transformer: tokens a sequence.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 8, 'amoebanet: image side.')
_VOCAB = flags.DEFINE_integer('vocab_size', 256, 'transformer: vocabulary.')
_CLOCKS = flags.DEFINE_integer('clocks_per_iteration', 1, "The loop "
                               "executor's clocks per loop iteration.")
_RECOMPUTE = flags.DEFINE_enum('recompute', 'always',
                               ['always', 'except_last', 'never'],
                               'Re-materialization, both variants.')
_THREADS = flags.DEFINE_integer(
    'threads', 0, "Threads of each of TensorFlow's two pools, the one that "
    "runs a step's nodes and the one an op splits its work over (0: "
    "TensorFlow's default, one per core): 1 runs the step on one thread.")
_ONE_DEVICE = flags.DEFINE_bool('one_device', False, 'Place all K cells on '
                                 "this process's one CPU device instead of K "
                                 'logical ones: whether a cost lies in '
                                 'crossing devices.')
_TRIAL_STEPS = flags.DEFINE_integer('trial_steps', 20, 'trial: timed steps '
                                    'per executor in the trial (the '
                                    "trainer's train.executor_trial_steps).")
_ROUNDS = flags.DEFINE_integer('rounds', 6, 'Alternating rounds.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Steps per variant per round.')
_WRITE_RESULTS = flags.DEFINE_bool('write_results', False, 'Write the table '
                                   'to bench/results/ (executor_step_d<dim>'
                                   '.md for unrolled,loop on Dense; else a '
                                   'name saying the variants and stack).')


def _Tanh() -> list[int]:
  """--tanh_per_layer's values; UsageError naming a bad one."""
  try:
    values = [int(v) for v in _TANH.value]
  except ValueError:
    values = [-1]
  if min(values) < 0:
    raise app.UsageError(f'--tanh_per_layer={",".join(_TANH.value)}: give '
                         'whole numbers of 0 or more, e.g. 0,4,16.')
  return values


def _Stack(tanh: int) -> stacks.Stack:
  if _STACK.value == 'amoebanet':
    return stacks.AmoebaNetStack(_NUM_LAYERS.value, _DIM.value, _BATCH.value,
                                 _IMAGE_SIZE.value)
  if _STACK.value == 'transformer':
    return stacks.TransformerStack(_NUM_LAYERS.value, _DIM.value,
                                   _BATCH.value, _SEQ_LEN.value, 4,
                                   _VOCAB.value, stacked=True)
  return stacks.DenseStack(_NUM_LAYERS.value, _DIM.value, _BATCH.value,
                           tanh)


@contextlib.contextmanager
def _Lowering(lower: bool) -> Iterator[None]:
  """Loops and conds built inside are lowered to frames (TensorFlow's default) or not.

  TensorFlow reads this private switch as it builds each While and If op.
  """
  saved = control_flow_util_v2._DISABLE_LOWER_USING_SWITCH_MERGE  # pylint: disable=protected-access
  control_flow_util_v2._DISABLE_LOWER_USING_SWITCH_MERGE = not lower  # pylint: disable=protected-access
  try:
    yield
  finally:
    control_flow_util_v2._DISABLE_LOWER_USING_SWITCH_MERGE = saved  # pylint: disable=protected-access


def Measure(m: int, devices: list[str], variants: list[str],
            tanh: int = 0) -> dict:
  """Per variant, each round's median step (s); the per-round ratios; per
  variant its first call's seconds (trace and first step); the trial's
  Decision if one ran."""
  steps, first_call, decision = {}, {}, None
  for name in variants:
    layers, x, loss_fn = _Stack(tanh)
    fields = {'clocks_per_iteration': _CLOCKS.value, **VARIANTS[name]}
    model = common.BuildPipeline(
        layers, _NUM_PARTITIONS.value, m, _RECOMPUTE.value, devices,
        **fields)
    step = common.TrainStep(model, plain=False, loss_fn=loss_fn)
    if name == 'trial':
      step = executor_trial.ExecutorTrial(step.python_function,
                                          _TRIAL_STEPS.value)
    steps[name] = (step, x)
    with _Lowering(name not in _UNLOWERED):  # the first call traces
      first_call[name] = common.RunOnce(*steps[name])[0]
      for _ in range(2):  # first step, warm-up
        common.RunOnce(*steps[name])
      while name == 'trial' and step.trying:  # to its decision
        common.RunOnce(*steps[name])
    if name == 'trial':
      decision = step.decision
  medians = {name: [] for name in variants}
  for _ in range(_ROUNDS.value):
    for name in variants:
      times = []
      for _ in range(_STEPS.value):
        start = time.perf_counter()
        common.RunOnce(*steps[name])
        times.append(time.perf_counter() - start)
      medians[name].append(statistics.median(times))
  first, second = variants
  ratios = [b / a for a, b in zip(medians[first], medians[second])]
  return dict(medians=medians, ratios=ratios, first_call=first_call,
              decision=decision)


def _ResultsFile(variants: list[str], tanhs: list[int]) -> str:
  clocks = f'_c{_CLOCKS.value}' if _CLOCKS.value > 1 else ''
  if _ONE_DEVICE.value:
    clocks += '_one_device'
  if _RECOMPUTE.value != 'always':
    clocks += f'_recompute_{_RECOMPUTE.value}'
  if _THREADS.value:
    clocks += f'_threads{_THREADS.value}'
  if any(tanhs):
    clocks += f'_tanh{"_".join(str(t) for t in tanhs)}'
  if (variants == ['unrolled', 'loop'] and _STACK.value == 'dense' and
      _RECOMPUTE.value == 'always'):
    return f'executor_step_d{_DIM.value}{clocks}.md'
  return (f'executor_step_{"_vs_".join(variants)}_{_STACK.value}_d'
          f'{_DIM.value}_k{_NUM_PARTITIONS.value}{clocks}.md')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  variants = list(_VARIANTS.value)
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown or len(variants) != 2 or variants[0] == variants[1]:
    raise app.UsageError(f'--variants={",".join(variants)}: name two '
                         f'different ones of {", ".join(VARIANTS)}.')
  # Checked before anything is built; only the Dense stack has tanh.
  tanhs = _Tanh() if _STACK.value == 'dense' else [0]
  if _THREADS.value < 0:
    raise app.UsageError(f'--threads={_THREADS.value}: give 0 (the default) '
                         'or more threads.')
  # Before any op runs: TensorFlow fixes its pools at the first.
  tf.config.threading.set_inter_op_parallelism_threads(_THREADS.value)
  tf.config.threading.set_intra_op_parallelism_threads(_THREADS.value)
  if set(variants) & set(_UNLOWERED) and not _ONE_DEVICE.value:
    raise app.UsageError(f'--variants={",".join(variants)}: an unlowered loop '
                         'runs its whole body on one device; add --one_device.')
  facts = common.MachineFacts()
  devices = (['/device:CPU:0'] * _NUM_PARTITIONS.value if _ONE_DEVICE.value
             else placement.SplitCpu(_NUM_PARTITIONS.value))
  first, second = variants
  rows, notes = [], []
  # A column for the tanh activations only where some are asked for.
  tanh_column = any(tanhs)
  for tanh in tanhs:
    for m in (int(v) for v in _MICRO_BATCHES.value):
      r = Measure(m, devices, variants, tanh)
      med = {e: statistics.median(v) * 1e3 for e, v in r['medians'].items()}
      k = _NUM_PARTITIONS.value
      bubble = schedule.FillDrain(k, m).TheoreticalBubble()
      rows.append([tanh] * tanh_column + [
          m, f'{bubble:.0%}', f'{med[first]:.1f}', f'{med[second]:.1f}',
          f'{statistics.median(r["ratios"]):.2f} '
          f'({min(r["ratios"]):.2f}–{max(r["ratios"]):.2f})'])
      print(rows[-1], flush=True)
      notes.append(
          f'M={m}: first call (trace and first step) ' + ', '.join(
              f'{name} {r["first_call"][name]:.2f} s' for name in variants) +
          ('' if r['decision'] is None else f'. {r["decision"].Text()}'))
      print(notes[-1], flush=True)
  body = common.MarkdownTable(
      ('tanh per Dense',) * tanh_column + (
          'M', 'bubble (K-1)/(M+K-1)', f'{first} ms', f'{second} ms',
          f'{second} / {first}, median (range)'), rows)
  body += '\n\n' + '\n\n'.join(notes)
  print(body)
  if _WRITE_RESULTS.value:
    if _STACK.value == 'amoebanet':
      model = (f'AmoebaNet-D, {_NUM_LAYERS.value} cells of {_DIM.value} '
               f'filters, BatchNorm; batch {_BATCH.value} random '
               f'{_IMAGE_SIZE.value}×{_IMAGE_SIZE.value} images, recompute '
               f'{_RECOMPUTE.value}')
    elif _STACK.value == 'transformer':
      model = (f'Transformer LM: embedding, {_NUM_LAYERS.value} causal '
               f'blocks (d_model {_DIM.value}, one Repeat), softmax over '
               f'{_VOCAB.value}; batch {_BATCH.value} × {_SEQ_LEN.value} '
               f'tokens, recompute {_RECOMPUTE.value}')
    else:
      tanh = (f', each followed by {" or ".join(str(t) for t in tanhs)} '
              'tanh activations' if tanh_column else '')
      model = (f'{_NUM_LAYERS.value} × Dense({_DIM.value}){tanh}, batch '
               f'{_BATCH.value}, recompute {_RECOMPUTE.value}')
    config = {
        'model': model,
        'pipeline': f'K={_NUM_PARTITIONS.value} cells on ' + (
            'one CPU device' if _ONE_DEVICE.value else
            'as many logical CPU devices') + ', one process; loop executor with '
                    f'{_CLOCKS.value} clock(s) per iteration',
        'variants': '; '.join(
            f'{v}: {VARIANTS[v]}' + (', loops and conds not lowered to frames'
                                     if v in _UNLOWERED else '')
            for v in variants),
        'threads of each pool': (_THREADS.value or
                                 "TensorFlow's default (one per core)"),
        'timing': f'{_ROUNDS.value} alternating rounds of {_STEPS.value} '
                  'steps per variant; a round\'s median per variant',
        'load average at end (1, 5, 15 min)': common.LoadAverage(),
    }
    path = common.WriteResults(
        _ResultsFile(variants, tanhs), f'Steady step: {second} against {first}',
        'python -m bench.executor_step ' + ' '.join(sys.argv[1:]), facts,
        config, body)
    print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
