r"""What a pipeline step runs, node by node, after Grappler: the loop's bookkeeping counted.

Builds one pipeline, runs its traced step once with TensorFlow's run metadata
on, and counts the nodes of the partition graphs TensorFlow actually runs
(after Grappler, lowering and partitioning) by role: the cells' arithmetic,
and what the executor adds around it (loop and cond control flow, sends
between devices, array reads and writes, weight packing, constants). For the
loop executor the counts are per loop and per cell-clock (a loop's nodes run
once an iteration, K cells at each of its clocks); for the unrolled executor
per cell micro-batch (K·M of them). They are one part of why the loop's step
is longer on cells of a few tiny layers; the other is how busy each
executor keeps a second core (docs/loop_executor.md, "Where a tiny cell's
step goes").

  python -m bench.loop_census --micro_batches=64 --write_results
  python -m bench.loop_census --micro_batches=64 --clocks_per_iteration=4 \\
      --write_results
"""

from __future__ import annotations

import collections
import sys

from bench import tf_setup

tf_setup.Setup()  # before TensorFlow loads: log noise, TensorFlow's own allocator

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from tensorflow.python.eager import context  # pylint: disable=g-direct-tensorflow-import

from bench import common
from bench import node_roles
from lingvo_gpipe.core.gpipe import placement
from lingvo_gpipe.tools import stacks

_NUM_PARTITIONS = flags.DEFINE_integer('num_partitions', 4, 'K cells.')
_MICRO_BATCHES = flags.DEFINE_integer('micro_batches', 64, 'M.')
_NUM_LAYERS = flags.DEFINE_integer('num_layers', 16, 'Dense layers.')
_DIM = flags.DEFINE_integer('dim', 64, 'Width of every layer.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Mini-batch size.')
_TANH = flags.DEFINE_integer('tanh_per_layer', 0, 'tanh activations after '
                             'each Dense (stacks.DenseLayers).')
_CLOCKS = flags.DEFINE_integer('clocks_per_iteration', 1, "The loop "
                               "executor's clocks per loop iteration.")
_WRITE_RESULTS = flags.DEFINE_bool('write_results', False, 'Write the tables '
                                   'to bench/results/loop_census*.md.')


def Census(executor: str) -> dict[str, collections.Counter]:
  """Per part of the step ('step' or a loop's name), nodes by role."""
  loop_fields = ({'clocks_per_iteration': _CLOCKS.value}
                 if executor == 'loop' else {})
  devices = placement.SplitCpu(_NUM_PARTITIONS.value)
  layers, x, loss_fn = stacks.DenseStack(_NUM_LAYERS.value, _DIM.value,
                                         _BATCH.value, _TANH.value)
  model = common.BuildPipeline(layers, _NUM_PARTITIONS.value,
                               _MICRO_BATCHES.value, 'always', devices,
                               executor=executor, **loop_fields)
  step = common.TrainStep(model, plain=False, loss_fn=loss_fn)
  ctx = context.context()
  ctx.enable_run_metadata()  # records each function's graphs as it is built
  try:
    common.RunOnce(step, x)
    metadata = ctx.export_run_metadata()
  finally:
    ctx.disable_run_metadata()
  counts = collections.defaultdict(collections.Counter)
  for function in metadata.function_graphs:
    for graph in function.partition_graphs:
      for node in graph.node:
        part = node_roles.Loop(node.name) or 'step'
        counts[part][node_roles.Role(node.op, node.name)] += 1
  return counts


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  k, m = _NUM_PARTITIONS.value, _MICRO_BATCHES.value
  loop = Census('loop')
  if sorted(loop) != ['step', 'while', 'while_1']:
    raise RuntimeError(f'Expected the step and two loops, found {sorted(loop)}.')
  unrolled = Census('unrolled')['step']
  per_clock = [loop['while'], loop['while_1']]
  rows = []
  # An iteration runs K cells at each of its clocks.
  cell_clocks = k * _CLOCKS.value
  for role in node_roles.ROLES + ('all',):
    def Of(counter, role=role):
      return sum(counter.values()) if role == 'all' else counter[role]
    rows.append([role, f'{Of(per_clock[0]) / cell_clocks:.1f}',
                 f'{Of(per_clock[1]) / cell_clocks:.1f}',
                 f'{Of(unrolled) / (k * m):.1f}'])
  body = common.MarkdownTable(
      ('role', 'loop: forward, per cell-clock', 'loop: backward, per '
       'cell-clock', 'unrolled: whole step, per cell micro-batch'), rows)
  print(body)
  if _WRITE_RESULTS.value:
    tanh = (f', each followed by {_TANH.value} tanh activations'
            if _TANH.value else '')
    config = {
        'model': f'{_NUM_LAYERS.value} × Dense({_DIM.value}){tanh}, batch '
                 f'{_BATCH.value}, recompute always',
        'pipeline': f'K={k} cells on as many logical CPU devices, M={m}, one '
                    'process; executors loop (bubbles skipped, weights '
                    f'packed, {_CLOCKS.value} clock(s) per iteration) and '
                    'unrolled',
        'counted': 'nodes of the partition graphs TensorFlow runs (after '
                   'Grappler), from the run metadata of the first step; a '
                   "loop's nodes run once an iteration but for its enters "
                   'and exits',
    }
    name = (f'loop_census_d{_DIM.value}' +
            (f'_tanh{_TANH.value}' if _TANH.value else '') +
            (f'_c{_CLOCKS.value}' if _CLOCKS.value > 1 else '') + '.md')
    path = common.WriteResults(
        name, 'Nodes a step runs, by role, after Grappler',
        'python -m bench.loop_census ' + ' '.join(sys.argv[1:]),
        common.MachineFacts(), config, body)
    print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
