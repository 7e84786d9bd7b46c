"""Kept activations that cross loop clocks: a cell's forward split from its backward.

Invariant: the gradients `Backward` computes from the residuals `Forward`
returned are exactly those a tape around the forward gives, with nothing
recomputed.

Why: without re-materialization (recompute 'never', and the last
micro-batch under 'except_last') a cell's backward uses the activations its
forward made. The unrolled executor keeps a tape between the two. The loop
executor cannot: its forward and backward are two loops, and a tape does not
outlive a loop iteration. So the cell's forward is traced once as a
function and split the way TensorFlow differentiates any function call: a
forward that also returns the intermediate tensors its gradient reads (the
residuals), and a backward that takes them with the outputs' gradients. The
executor stores each micro-batch's residuals in arrays between the loops.

A residual that is an input of the forward (a weight, the cell's input) is
not returned: `Backward` takes it from the arguments it is given again, so
the weights are not stored once per micro-batch.

The split is TensorFlow's own (`ConcreteFunction`'s delayed-rewrite
gradient functions, a private API). requirements.txt pins the TensorFlow
minor version, and tests/core/gpipe/kept_forward_test.py fails if the API
changes.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import tensorflow as tf


def _Trainable(t: tf.Tensor) -> bool:
  """Whether an output takes a gradient (TensorFlow's rule for function outputs)."""
  return (t.dtype.is_floating or t.dtype.is_complex or
          t.dtype in (tf.resource, tf.variant))


class KeptForward:
  """One cell's forward, traced once, and the backward from its residuals."""

  def __init__(self, fn: Callable[..., Any], arg_specs: Sequence[Any] = ()):
    """Traces `fn(*args)` for args like `arg_specs`.

    A tf.function is traced as is; a function already traced (a
    ConcreteFunction, `arg_specs` empty) is split without tracing again.
    """
    if isinstance(fn, tf.types.experimental.ConcreteFunction):
      if arg_specs:
        raise ValueError('A traced function takes no arg_specs.')
      traced = fn
    else:
      if not hasattr(fn, 'get_concrete_function'):
        fn = tf.function(fn, autograph=False)
      traced = fn.get_concrete_function(*arg_specs)
    graph = traced.graph
    self.structured_outputs = traced.structured_outputs
    # fn's own outputs, before the residuals the split appends to the
    # graph's (an eager call under a tape may have split it already).
    self._outputs = list(graph.outputs[:len([
        t for t in tf.nest.flatten(traced.structured_outputs,
                                   expand_composites=True) if t is not None])])
    self._captured = list(traced.captured_inputs)
    self._num_args = len(graph.inputs) - len(self._captured)
    # pylint: disable=protected-access
    self._forward, self._backward = (
        traced._delayed_rewrite_functions.forward_backward())
    # pylint: enable=protected-access
    inputs = {id(t): i for i, t in enumerate(graph.inputs)}
    # The forward's outputs past fn's: per position, its residual number, or
    # None where it is one of the forward's inputs (not stored).
    self._extra: list = []
    residual_index = {}
    self.residual_specs: list[tf.TensorSpec] = []
    for t in graph.outputs[len(self._outputs):]:
      if id(t) in inputs:
        self._extra.append(None)
      else:
        residual_index[id(t)] = len(self.residual_specs)
        self._extra.append(len(self.residual_specs))
        self.residual_specs.append(tf.TensorSpec(t.shape, t.dtype))
    # What the backward reads, in its order: ('input', i), ('residual', r),
    # or ('outer', tensor) for one it captured from outside the forward.
    self._backward_reads = []
    for t in self._backward.captured_inputs:
      if id(t) in inputs:
        self._backward_reads.append(('input', inputs[id(t)]))
      elif id(t) in residual_index:
        self._backward_reads.append(('residual', residual_index[id(t)]))
      else:
        self._backward_reads.append(('outer', t))

  def _FlatArgs(self, args: Sequence[Any]) -> list[tf.Tensor]:
    flat = [tf.convert_to_tensor(a) for a in
            tf.nest.flatten(list(args), expand_composites=True)]
    if len(flat) != self._num_args:
      raise ValueError(f'Traced with {self._num_args} tensors, called with '
                       f'{len(flat)}.')
    return flat + self._captured

  def Forward(self, *args: Any) -> tuple[Any, list[tf.Tensor]]:
    """(fn's outputs, the residuals its backward needs) for `args`."""
    values = self._forward.call_flat(*self._FlatArgs(args))
    n = len(self._outputs)
    outputs = tf.nest.pack_sequence_as(self.structured_outputs,
                                       list(values[:n]),
                                       expand_composites=True)
    residuals = [None] * len(self.residual_specs)
    for r, value in zip(self._extra, values[n:]):
      if r is not None:
        residuals[r] = value
    return outputs, residuals

  def Backward(self, args: Sequence[Any], residuals: Sequence[tf.Tensor],
               output_grads: Any) -> list[Any]:
    """Gradients of the flat `args` (None where unconnected).

    Args:
      args: the arguments the forward was given (its inputs are read again
        from them rather than stored).
      residuals: what `Forward` returned for them.
      output_grads: gradients of fn's outputs, structured as they are; a
        None leaf counts as zero (for an output of a shape fully known).
    """
    flat_args = self._FlatArgs(args)
    flat_grads = tf.nest.flatten(output_grads, expand_composites=True)
    if len(flat_grads) != len(self._outputs):
      raise ValueError(f'{len(self._outputs)} output gradients expected, got '
                       f'{len(flat_grads)}.')
    grads = [tf.zeros(t.shape, t.dtype) if g is None else
             tf.convert_to_tensor(g)
             for t, g in zip(self._outputs, flat_grads) if _Trainable(t)]
    reads = [flat_args[what] if kind == 'input' else
             residuals[what] if kind == 'residual' else what
             for kind, what in self._backward_reads]
    # pylint: disable=protected-access
    result = self._backward._call_flat(grads, reads)
    # pylint: enable=protected-access
    return list(tf.nest.flatten(result, expand_composites=False))[
        :self._num_args]
