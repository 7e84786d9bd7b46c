"""Graph optimization: which of TensorFlow's Grappler passes a traced step gets.

Invariant: every mode computes the same numbers; they differ only in how long
a traced step's first run spends rewriting its graph, and in how fast the
rewritten graph steps.

Before a traced function first runs, TensorFlow's Grappler rewrites its
graph: by default two rounds of a dozen passes over the whole step, with the
function calls inlined and the loops lowered. For a giant pipeline that is
most of the first step: 1663 Transformer blocks on K=128 logical CPUs spent
138 s of a 235 s first step in it, on 137,000-228,000 nodes
(bench/results/graph_optimization.md). There the second round removed 0.6% of
the nodes in 32 s, and the layout optimizer, whose work is converting
convolutions' layouts for GPUs, changed nothing in 10.6 s.

Modes:
  'lean' (the default): one round of TensorFlow's default passes, and no
    layout optimizer where no GPU is visible. The passes that shrink a
    pipeline's graph (pruning, common subexpressions, constant folding,
    dependencies) and the ones that fuse kernels (remapper) all run.
  'full': TensorFlow's default.
  'off': no Grappler: the first step starts soonest, each step is slower.

TensorFlow's public switches turn single passes on or off but not the number
of rounds, so 'lean' sets the eager context's base configuration, which every
thread's function calls are configured from. Set the mode once, before
anything is traced: TensorFlow optimizes a function again if the setting
changes.
"""

from __future__ import annotations

import difflib

import tensorflow as tf
from absl import logging
from tensorflow.core.protobuf import config_pb2  # pylint: disable=g-direct-tensorflow-import
from tensorflow.core.protobuf import rewriter_config_pb2  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.eager import context  # pylint: disable=g-direct-tensorflow-import

MODES = ('lean', 'full', 'off')

_RewriterConfig = rewriter_config_pb2.RewriterConfig


def CheckMode(mode: str) -> None:
  """Raises ValueError naming `mode` and the valid ones (did-you-mean)."""
  if mode in MODES:
    return
  hint = ''
  if isinstance(mode, bool):
    hint = f" (it was a bool: use {'full' if mode else 'off'!r})"
  elif isinstance(mode, str):
    close = difflib.get_close_matches(mode.lower(), MODES, n=1)
    if mode.lower() in ('false', 'no', '0'):
      hint = " (graph optimization off is 'off')"
    elif mode.lower() in ('true', 'yes', '1'):
      hint = " (TensorFlow's default is 'full')"
    elif close:
      hint = f'; did you mean {close[0]!r}?'
  raise ValueError(f'train.graph_optimization: Unknown graph optimization '
                   f'{mode!r}; valid: {", ".join(MODES)}{hint}')


def _RoundsAndLayout(mode: str) -> tuple[int, int]:
  """(meta_optimizer_iterations, layout_optimizer) for `mode`."""
  if mode == 'lean':
    layout = (_RewriterConfig.DEFAULT if tf.config.list_physical_devices('GPU')
              else _RewriterConfig.OFF)
    return _RewriterConfig.ONE, layout
  return _RewriterConfig.DEFAULT_NUM_ITERS, _RewriterConfig.DEFAULT


def Configure(mode: str) -> None:
  """Makes every traced function this process runs from now on get `mode`."""
  CheckMode(mode)
  ctx = context.context()
  base = config_pb2.ConfigProto()
  if ctx._config is not None:  # pylint: disable=protected-access
    base.CopyFrom(ctx._config)  # pylint: disable=protected-access
  rounds, layout = _RoundsAndLayout(mode)
  base.graph_options.rewrite_options.meta_optimizer_iterations = rounds
  base.graph_options.rewrite_options.layout_optimizer = layout
  ctx._config = base  # pylint: disable=protected-access
  # Also drops this thread's function-call configuration, so it is made
  # anew from the base above (other threads make theirs when they first
  # call a function).
  tf.config.optimizer.set_experimental_options(
      {'disable_meta_optimizer': mode == 'off'})
  logging.info('Graph optimization (Grappler): %s.', mode)


def Current() -> str:
  """The mode function calls on this thread get now."""
  rewrite = config_pb2.ConfigProto.FromString(
      context.context().function_call_options.config_proto_serialized
  ).graph_options.rewrite_options
  if rewrite.disable_meta_optimizer:
    return 'off'
  if rewrite.meta_optimizer_iterations == _RewriterConfig.ONE:
    return 'lean'
  return 'full'
