r"""Step time with jit_compile (XLA-compiled cells) against without, alternating in one process.

For each stack (a Dense stack and a narrow Transformer-L shaped language
model, both from lingvo_gpipe/tools/stacks.py) and each executor, two
pipelines that differ only in PipeliningLayer's jit_compile are built in one
process: K cells on K logical CPU devices, M micro-batches, recompute
always. Each step's first call (trace, graph optimization, XLA compilation,
one run) is timed once; then the stack's four steps run in alternating
rounds, so a machine whose speed drifts slows all alike, and the ratio
jit / no-jit of each round's medians is what to quote.

  python -m bench.jit_compile --write_results
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from bench import tf_setup

tf_setup.Setup()  # before TensorFlow loads: log noise, TensorFlow's own allocator

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import tensorflow as tf

from bench import common
from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe import pipelining_layer
from lingvo_gpipe.core.gpipe import placement
from lingvo_gpipe.tools import stacks

_STACKS = flags.DEFINE_list('stacks', 'dense,transformer', 'Stacks to time: '
                            'dense and/or transformer.')
_EXECUTORS = flags.DEFINE_list('executors', 'unrolled,loop', 'Executors.')
_NUM_PARTITIONS = flags.DEFINE_integer('num_partitions', 4, 'K cells.')
_MICRO_BATCHES = flags.DEFINE_integer('num_micro_batches', 8, 'M.')
_DENSE_LAYERS = flags.DEFINE_integer('dense_layers', 16, 'dense: layers.')
_DENSE_DIM = flags.DEFINE_integer('dense_dim', 512, 'dense: width.')
_DENSE_BATCH = flags.DEFINE_integer('dense_batch', 1024, 'dense: batch.')
_TF_LAYERS = flags.DEFINE_integer('transformer_layers', 4, 'transformer: '
                                  'blocks.')
_TF_DIM = flags.DEFINE_integer('transformer_dim', 128, 'transformer: '
                               'd_model (d_ff = 4 d_model, 4 heads).')
_TF_BATCH = flags.DEFINE_integer('transformer_batch', 16, 'transformer: '
                                 'sequences of 128 tokens, vocabulary 2048.')
_ROUNDS = flags.DEFINE_integer('rounds', 8, 'Alternating rounds.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Steps per variant per round.')
_WRITE_RESULTS = flags.DEFINE_bool('write_results', False, 'Write the table '
                                   'to bench/results/jit_compile.md.')


def _Stack(name: str) -> stacks.Stack:
  if name == 'dense':
    return stacks.DenseStack(_DENSE_LAYERS.value, _DENSE_DIM.value,
                             _DENSE_BATCH.value)
  if name == 'transformer':
    return stacks.TransformerStack(_TF_LAYERS.value, _TF_DIM.value,
                                   _TF_BATCH.value, seq_len=128, num_heads=4,
                                   vocab_size=2048)
  raise app.UsageError(f'Unknown stack {name!r}; valid: dense, transformer.')


def _Describe(name: str) -> str:
  if name == 'dense':
    return (f'{_DENSE_LAYERS.value} × Dense({_DENSE_DIM.value}), batch '
            f'{_DENSE_BATCH.value}')
  return (f'an embedding, {_TF_LAYERS.value} causal Transformer blocks of '
          f'd_model {_TF_DIM.value} (d_ff {4 * _TF_DIM.value}, 4 heads), '
          f'softmax over 2048; batch {_TF_BATCH.value} × 128 tokens')


def _TrainStep(layers: list, loss_fn, executor: str, jit_compile: bool,
               devices: list[str]):
  """The traced training step of bench/common.py, of a pipeline of `layers`."""
  model = pipelining_layer.PipeliningLayer.Params().Set(
      name='stack', layers=layers, num_partitions=_NUM_PARTITIONS.value,
      num_micro_batches=_MICRO_BATCHES.value, recompute='always',
      devices=devices, executor=executor,
      jit_compile=jit_compile).Instantiate()
  variables = model.trainable_variables

  @tf.function
  def Step(x):
    with base_layer.Context(training=True):
      with tf.GradientTape() as tape:
        loss = loss_fn(model.FPropDefaultTheta(x))
      grads = tape.gradient(loss, variables)
    # One scalar that depends on every gradient, so none is pruned.
    return loss, tf.add_n([tf.reduce_sum(tf.convert_to_tensor(g))
                           for g in grads])

  return Step


def _Ratio(on: list[float], off: list[float]) -> str:
  """Median (range) over rounds of on / off, each round's own ratio."""
  ratios = [a / b for a, b in zip(on, off)]
  return (f'{statistics.median(ratios):.2f} '
          f'({min(ratios):.2f}–{max(ratios):.2f})')


def Measure(stack: str, devices: list[str]) -> list[list]:
  """One table row per (executor, jit_compile) of `stack`."""
  layers, x, loss_fn = _Stack(stack)
  variants = [(e, j) for e in _EXECUTORS.value for j in (False, True)]
  steps, first = {}, {}
  for variant in variants:
    steps[variant] = _TrainStep(layers, loss_fn, *variant, devices)
    first[variant] = common.RunOnce(steps[variant], x)[0]
    for _ in range(2):  # warm-up
      common.RunOnce(steps[variant], x)
  walls = {v: [] for v in variants}  # per round, the median step
  cpus = {v: [] for v in variants}
  stolen = common.StolenCpu()
  for _ in range(_ROUNDS.value):
    for variant in variants:
      times = [common.RunOnce(steps[variant], x) for _ in range(_STEPS.value)]
      walls[variant].append(statistics.median(w for w, _ in times))
      cpus[variant].append(statistics.median(c for _, c in times))
  rows = []
  for executor in _EXECUTORS.value:
    off, on = walls[(executor, False)], walls[(executor, True)]
    rows.append([
        stack, executor,
        f'{statistics.median(off) * 1e3:.0f}',
        f'{statistics.median(on) * 1e3:.0f}',
        _Ratio(on, off),
        _Ratio(cpus[(executor, True)], cpus[(executor, False)]),
        f'{first[(executor, False)]:.1f}', f'{first[(executor, True)]:.1f}',
        stolen.Text()])
    print(rows[-1], flush=True)
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  facts = common.MachineFacts()
  devices = placement.SplitCpu(_NUM_PARTITIONS.value)
  start = time.perf_counter()
  rows = []
  for stack in _STACKS.value:
    rows += Measure(stack, devices)
  body = common.MarkdownTable(
      ('stack', 'executor', 'no-jit step ms', 'jit step ms',
       'jit / no-jit wall, median (range)', 'jit / no-jit CPU',
       'no-jit first step s', 'jit first step s', 'CPU stolen'), rows)
  body += (f'\n\nTotal run {time.perf_counter() - start:.0f} s. Step ms: the '
           'median over rounds of each round\'s median step (wall time). '
           'Ratios: per round, jit over no-jit of the medians, wall time and '
           'CPU time (all threads of the process; other processes move it '
           'much less than wall time). First step: the first call (trace, '
           'graph optimization, XLA compilation of every cell for each '
           'micro-batch shape, one run).')
  print(body)
  if _WRITE_RESULTS.value:
    config = {
        'stacks': '; '.join(f'{s}: {_Describe(s)}' for s in _STACKS.value),
        'pipeline': f'K={_NUM_PARTITIONS.value} cells on as many logical CPU '
                    f'devices, one process; M={_MICRO_BATCHES.value}, '
                    'recompute always; executors ' +
                    ', '.join(_EXECUTORS.value),
        'timing': f'{_ROUNDS.value} alternating rounds of {_STEPS.value} '
                  'steps per variant after 2 warm-up steps; a round\'s '
                  'median per variant',
        'load average at end (1, 5, 15 min)': common.LoadAverage(),
        'conditions': f'{os.cpu_count()} cores shared with other workers '
                      'and benchmarks: compare only ratios of one run',
    }
    path = common.WriteResults(
        'jit_compile.md', 'Step time: jit_compile (XLA cells) against without',
        'python -m bench.jit_compile ' + ' '.join(sys.argv[1:]), facts,
        config, body)
    print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
