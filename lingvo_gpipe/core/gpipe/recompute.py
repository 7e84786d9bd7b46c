"""Re-materialization: a cell's backward recomputes its forward from the kept input.

Invariant: a cell's gradients for a micro-batch are those of its forward on
that micro-batch, whether the forward's activations were kept (a tape held
from the forward) or recomputed from the cell's input, and the recomputation
runs in the forward's mode: the same training flag, step and micro-batch
index, so stateless dropout draws the same mask; it records no statistics
(BatchNorm's moments are counted once, by the forward).

TensorFlow's own `tf.recompute_grad` does not serve a pipeline: under one
tape around all micro-batches it keeps every micro-batch's partial weight
gradients alive at once (TensorFlow adds them with one AddN), so the
pipeline takes each micro-batch's gradients itself (accumulate.py).
"""

from __future__ import annotations

from typing import Any, Optional

import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe import accumulate
from lingvo_gpipe.core.gpipe import grad_order
from lingvo_gpipe.core.nested_map import NestedMap

RECOMPUTE_MODES = ('always', 'except_last', 'never')


def CheckMode(mode: str) -> None:
  if mode not in RECOMPUTE_MODES:
    raise ValueError(f'Unknown recompute mode {mode!r}; valid: '
                     f'{", ".join(RECOMPUTE_MODES)}.')


def Recomputes(mode: str, micro_batch: int, num_micro_batches: int) -> bool:
  """Whether `micro_batch`'s backward recomputes the forward (else keeps its tape)."""
  if mode == 'always':
    return True
  if mode == 'except_last':
    # The last micro-batch's backward follows its forward: keep its tape.
    return micro_batch != num_micro_batches - 1
  return False


def _Watched(tape: tf.GradientTape, theta: NestedMap, x: Any) -> None:
  tape.watch([t for t in tf.nest.flatten((theta, x))
              if accumulate.IsDifferentiable(t)])


class CellRunner:
  """Runs one cell's forward and backward passes, one micro-batch at a time."""

  def __init__(self, cell: Any, theta: NestedMap,
               forward_context: base_layer.ExecutionContext,
               collector: base_layer.StatsCollector):
    self.cell = cell
    self.theta = theta
    self.num_theta = len(tf.nest.flatten(theta))
    # The recomputation must run in the forward's mode (training, step)
    # wherever the caller takes the gradient, e.g. outside its Context.
    self._context = forward_context
    self._collector = collector

  def _FProp(self, micro_batch: Any, x: Any, record: bool,
             collector: Optional[base_layer.StatsCollector] = None) -> Any:
    stats = (collector or self._collector) if record else (
        base_layer.StatsCollector())
    with base_layer.Context(training=self._context.training,
                            step=self._context.step, micro_batch=micro_batch,
                            stats_collector=stats):
      return self.cell.FProp(self.theta, x)

  def Forward(self, micro_batch: Any, x: Any, keep: bool,
              collector: Optional[base_layer.StatsCollector] = None
              ) -> tuple[Any, Optional[tf.GradientTape]]:
    """(outputs, the tape that kept the activations if `keep`, else None).

    Statistics the cell records go to `collector` if given, else to the
    pipeline's.
    """
    if not keep:
      return self._FProp(micro_batch, x, record=True,
                         collector=collector), None
    tape = tf.GradientTape(persistent=False, watch_accessed_variables=False)
    with tape:
      _Watched(tape, self.theta, x)
      y = self._FProp(micro_batch, x, record=True)
    return y, tape

  def Specs(self, x_spec: Any) -> tuple[Any, list[tuple[Any, Any]]]:
    """What the cell returns and records for inputs like `x_spec`.

    Returns:
      (the outputs' structure of TensorSpecs, [(layer, its statistics'
      structure of TensorSpecs)] in the order the cell records them).
      Traced in a function of its own that is never run, so nothing is
      added to the graph being built.
    """
    scratch = base_layer.StatsCollector()

    def Trace(x):
      outputs = self._FProp(tf.constant(0), x, record=True,
                            collector=scratch)
      return outputs, [stats for _, stats in scratch.records]

    traced = tf.function(Trace, autograph=False).get_concrete_function(x_spec)
    outputs, stats = tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape, t.dtype), traced.structured_outputs)
    return outputs, [(layer, spec) for (layer, _), spec in
                     zip(scratch.records, stats)]

  def Backward(self, micro_batch: Any, x: Any, dy: Any,
               kept: Optional[tuple[tf.GradientTape, Any]],
               input_grad_first: bool) -> tuple[list, Any]:
    """(theta's gradients, flat; x's gradient) for one micro-batch.

    Args:
      micro_batch: which one (seeds the recomputation as it seeded the forward).
      x: the cell's input (the boundary activation the forward kept).
      dy: the gradient of the loss with respect to the cell's outputs.
      kept: (tape, outputs) the forward kept, or None to recompute.
      input_grad_first: make the weight-gradient ops wait for x's gradient
        (grad_order), so the previous cell gets it sooner.
    """
    if kept is not None:
      tape, y = kept
    else:
      tape = tf.GradientTape(watch_accessed_variables=False)
      with tape:
        _Watched(tape, self.theta, x)
        y = self._FProp(micro_batch, x, record=False)
    pairs = [(a, b) for a, b in zip(tf.nest.flatten(y), tf.nest.flatten(dy))
             if accumulate.IsDifferentiable(a)]
    with grad_order.Capture(input_grad_first) as created:
      grads = tape.gradient(
          [a for a, _ in pairs], tf.nest.flatten((self.theta, x)),
          output_gradients=[b for _, b in pairs],
          unconnected_gradients=tf.UnconnectedGradients.NONE)
    g_x = tf.nest.pack_sequence_as(x, grads[self.num_theta:])
    grad_order.RunAfter(created, g_x)  # nothing if not captured
    return grads[:self.num_theta], g_x
