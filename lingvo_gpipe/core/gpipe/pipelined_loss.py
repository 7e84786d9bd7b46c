"""The loss inside the pipeline: each micro-batch's loss on the last cell, as soon as it is out.

Invariant: the metrics, and the gradients of the loss with respect to every
weight and input, are those of a tape around the whole batch whose loss is
the weighted mean of the micro-batches' losses,
    loss = sum_m w_m * loss_m / sum_m w_m,
where a micro-batch's (loss_m, w_m) is what the caller's loss function
returns for it (w_m, e.g. its number of real tokens, takes no gradient).
Every other metric is combined the same way, by its own weight.

Why: a schedule that starts a micro-batch's backward before the last
micro-batch's forward (1F1B, interleaved, zero-bubble) cannot wait for a
loss over the whole batch's outputs. Here the loss of micro-batch m is
computed on the last cell right after its forward, and its gradient,
scaled by w_m, starts that micro-batch's backward; the running sums then
hold sum_m w_m * grad loss_m, divided by sum_m w_m once all are in.

The whole step, forwards and backwards, runs in the pipeline's forward op;
its custom gradient hands out the gradients computed there, times the
gradient that reaches the loss from the caller (1 for a caller minimizing
it, f'(loss) for one differentiating f(loss)). So the caller's ordinary
`GradientTape` around it still gives every gradient, including those of
layers before the pipeline (through the inputs' gradient). Only the loss
takes a gradient: the other metrics are reported, not differentiated.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import tensorflow as tf

from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core.gpipe import accumulate
from lingvo_gpipe.core.gpipe import executor as executor_lib
from lingvo_gpipe.core.gpipe import microbatch
from lingvo_gpipe.core.gpipe import pipeline
from lingvo_gpipe.core.gpipe import placement as placement_lib
from lingvo_gpipe.core.gpipe import schedule as schedule_lib
from lingvo_gpipe.core.nested_map import NestedMap

# loss_fn(outputs of one micro-batch, its targets) -> NestedMap of
# name -> (value, weight), one of them 'loss'.
LossFn = Callable[[Any, Any], NestedMap]


def _Checked(metrics: Any) -> NestedMap:
  """The loss function's metrics as NestedMap name -> (value, weight) scalars."""
  if not isinstance(metrics, dict) or 'loss' not in metrics:
    raise ValueError(
        'The loss function must return a NestedMap of name -> (value, '
        f"weight) with a 'loss' entry; got {metrics!r:.120}.")
  checked = NestedMap()
  for name, pair in metrics.items():
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
      raise ValueError(f'Metric {name!r} must be a (value, weight) pair, got '
                       f'{pair!r:.80}.')
    value = tf.convert_to_tensor(pair[0])
    weight = tf.cast(tf.stop_gradient(pair[1]), value.dtype)
    checked[name] = (value, weight)
  return checked


def _Where(condition: tf.Tensor, value: tf.Tensor) -> tf.Tensor:
  """`value` where `condition` (a scalar) holds, else zeros."""
  return tf.where(condition, value, tf.zeros_like(value))


def Combine(per_micro_batch: Sequence[NestedMap]) -> NestedMap:
  """name -> (sum_m w_m v_m / sum_m w_m, sum_m w_m): the whole batch's metrics."""
  combined = NestedMap()
  for name in per_micro_batch[0]:
    weights = [mb[name][1] for mb in per_micro_batch]
    total = tf.add_n(weights)
    # Weight 0 counts for nothing, even where its value is 0/0.
    weighted = tf.add_n([_Where(w > 0, mb[name][0] * w) for mb, w in
                         zip(per_micro_batch, weights)])
    combined[name] = (tf.math.divide_no_nan(weighted, total), total)
  return combined


def _Scaled(g: Any, scale: tf.Tensor) -> Any:
  """`g` (a tensor, IndexedSlices or None) times `scale`."""
  if g is None:
    return None
  if isinstance(g, tf.IndexedSlices):
    return tf.IndexedSlices(g.values * tf.cast(scale, g.values.dtype),
                            g.indices, g.dense_shape)
  return g * tf.cast(scale, g.dtype)


# As RunPipeline: the schedule is fixed in Python, nothing for autograph.
@tf.autograph.experimental.do_not_convert
def RunPipelineLoss(cells: Sequence[Any],
                    thetas: Sequence[NestedMap],
                    inputs: Any,
                    targets: Any,
                    loss_fn: LossFn,
                    sizes: Sequence[int],
                    placement: placement_lib.Placement,
                    recompute: str = 'always',
                    batch_dim: int = 0,
                    schedule: Optional[schedule_lib.Schedule] = None,
                    executor: str = 'unrolled',
                    jit_compile: bool = False) -> NestedMap:
  """The batch's metrics, `loss_fn` run per micro-batch on the last cell.

  Args:
    cells, thetas, inputs, sizes, placement, recompute, batch_dim,
      jit_compile: as for pipeline.RunPipeline.
    targets: what the loss compares the outputs with (labels, paddings), a
      nested structure batched like `inputs`, cut into the same
      micro-batches on the last cell's device; None if the loss needs none.
    loss_fn: (outputs of one micro-batch, its targets) -> NestedMap of
      name -> (value, weight), with a 'loss' entry.
    schedule: the task order, any the executor lowers (default fill-drain).
    executor: 'unrolled', or 'auto', which runs it unrolled (the loop
      executor does not run the loss inside the pipeline yet).

  Returns:
    NestedMap name -> (value, weight) for the whole batch (module
    docstring); the loss's value is differentiable.
  """
  if executor not in ('unrolled', 'auto'):
    raise hyperparams.ConfigError(
        f"The loss inside the pipeline runs on executor='unrolled' only for "
        f"now, not executor={executor!r}.")
  num_cells = len(cells)
  prepared = pipeline.Prepare(cells, thetas, inputs, sizes, placement,
                              batch_dim, jit_compile, schedule)
  lowered = executor_lib.Executor(prepared.schedule, prepared.runners,
                                  placement, recompute)
  with placement.CellScope(0):
    micro_inputs = microbatch.Split(prepared.inputs, list(sizes), batch_dim)
  with placement.CellScope(num_cells - 1):
    micro_targets = (microbatch.Split(targets, list(sizes), batch_dim)
                     if targets is not None else [None] * len(sizes))

  def MicroBatchLoss(m: int, outputs: Any) -> tuple[NestedMap, Any]:
    flat = tf.nest.flatten(outputs)
    watched = [t for t in flat if accumulate.IsDifferentiable(t)]
    tape = tf.GradientTape(watch_accessed_variables=False)
    with tape:
      tape.watch(watched)
      # The last cell's output structure is known once it has been traced.
      rebuilt = prepared.structures[-1].Rebuild(outputs)
      metrics = _Checked(loss_fn(rebuilt, micro_targets[m]))
      value, weight = metrics.loss
      weighted = value * weight
    grads = iter(tape.gradient(
        weighted, watched, unconnected_gradients=tf.UnconnectedGradients.ZERO))
    # A micro-batch of weight 0 (no real token) adds nothing, though a mean
    # over its nothing made its loss 0/0 and its gradient NaN.
    counts = weight > 0
    return metrics, tf.nest.pack_sequence_as(outputs, [
        _Where(counts, next(grads)) if accumulate.IsDifferentiable(t)
        else tf.zeros_like(t) for t in flat])

  names = []

  @tf.custom_gradient
  def Step(*unused_tokens):
    per_micro_batch, running_sums, dx = lowered.Run(micro_inputs,
                                                    MicroBatchLoss)
    with placement.CellScope(num_cells - 1):
      metrics = Combine(per_micro_batch)
    names.extend(metrics.keys())
    total_weight = metrics.loss[1]
    with placement.CellScope(0):
      input_grads = accumulate.MergeInputGrads(dx, micro_inputs, batch_dim)

    def Backward(*d_flat, variables=None):
      d_loss = d_flat[2 * names.index('loss')]
      for k, grads in enumerate(running_sums):
        with placement.CellScope(k):
          scale = d_loss / total_weight
          prepared.sinks.Fill(f'cell_{k}',
                              [_Scaled(g, scale) for g in grads])
      with placement.CellScope(0):
        prepared.sinks.Fill('inputs', [_Scaled(g, d_loss / total_weight)
                                       for g in input_grads])
      if variables is None:
        return prepared.sinks.TokenGradients()
      return prepared.sinks.TokenGradients(), [None] * len(variables)

    flat = []
    for name in names:
      flat += list(metrics[name])
    return flat, Backward

  with placement.CellScope(num_cells - 1):
    flat = Step(*prepared.sinks.tokens)
  pipeline.HandOverStatistics(prepared.collector)
  return NestedMap({name: (flat[2 * i], flat[2 * i + 1])
                    for i, name in enumerate(names)})
