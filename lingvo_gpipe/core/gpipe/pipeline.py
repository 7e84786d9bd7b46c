"""Runs cells over micro-batches with GPipe's fill-drain schedule, and owns its backward.

Invariants:
- Loss and gradients equal those of running the cells one after another on
  each micro-batch: the pipeline reorders work, never changes the math.
- The backward pass is the pipeline's own (`tf.custom_gradient`), so a
  caller's single GradientTape around it sees one op, not the per-micro-batch
  work (that tape would add all M partial gradients of a weight at once).
- No tensor leaves its cell's device for the tape's sake. A custom gradient
  passes all its arguments through one IdentityN op; given every cell's
  weights it would copy them all to one device each step (across worker
  processes, the whole model over the network). So the pipeline op takes one
  scalar token per cell instead, made by a sink op on that cell's device from
  the cell's theta; the sink's gradient hands the tape the theta gradients
  that the pipeline's backward computed there (and likewise for the inputs,
  on the first cell's device).
- Memory: the forward keeps only each cell's input per micro-batch (unless
  recompute is off); the backward re-materializes one micro-batch of a cell at
  a time and adds its gradients into a running sum, each step gated on the
  previous sum, so one micro-batch's partial gradients live at a time per cell
  (shared/TF_FACTS.md: gating on the running sum keeps Grappler from merging
  the chain into one AddN over all micro-batches).
- Speed, if asked for (input_grads_first): within a micro-batch's backward, a
  cell computes the gradient the previous cell waits for before its own
  weight gradients (grad_order), so the stages' drains overlap by that much
  more; the price is memory, so it is off by default.
- Statistics that layers record in training (BatchNorm moments) are collected
  over all micro-batches' forward passes and applied once; recomputation
  records nothing.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe import grad_order
from lingvo_gpipe.core.gpipe import microbatch
from lingvo_gpipe.core.gpipe import placement as placement_lib
from lingvo_gpipe.core.gpipe import schedule as schedule_lib
from lingvo_gpipe.core.nested_map import NestedMap

RECOMPUTE_MODES = ('always', 'except_last', 'never')


def _Recomputes(mode: str, micro_batch: int, num_micro_batches: int) -> bool:
  if mode == 'always':
    return True
  if mode == 'except_last':
    # The last micro-batch's backward follows its forward: keep its tape.
    return micro_batch != num_micro_batches - 1
  return False


def _IsDifferentiable(t: tf.Tensor) -> bool:
  return t.dtype.is_floating or t.dtype.is_complex


def _Gated(deps: Sequence[Any], value: Any) -> Any:
  """`value` passed through identities that wait for `deps`."""
  deps = [d for d in tf.nest.flatten(deps) if d is not None]
  if not deps:
    return value
  with tf.control_dependencies(deps):
    return tf.nest.map_structure(tf.identity, value)


def _Add(a: Any, b: Any) -> Any:
  """a + b; sparse gradients (e.g. of an embedding table) stay sparse."""
  if isinstance(a, tf.IndexedSlices) and isinstance(b, tf.IndexedSlices):
    return tf.IndexedSlices(tf.concat([a.values, b.values], 0),
                            tf.concat([a.indices, b.indices], 0),
                            a.dense_shape)
  return tf.convert_to_tensor(a) + tf.convert_to_tensor(b)


def _AddGrads(acc: Optional[list], grads: list) -> list:
  if acc is None:
    return list(grads)
  return [a if g is None else (g if a is None else _Add(a, g))
          for a, g in zip(acc, grads)]


# The schedule is fixed in Python and never branches on tensor values, so
# autograph has nothing to convert here; letting it re-process every cell call
# K*M times made tracing 2-4x slower (bench/results/graph_build.md).
@tf.autograph.experimental.do_not_convert
def RunPipeline(cells: Sequence[Any],
                thetas: Sequence[NestedMap],
                inputs: Any,
                sizes: Sequence[int],
                placement: placement_lib.Placement,
                recompute: str = 'always',
                batch_dim: int = 0,
                input_grads_first: bool = False) -> Any:
  """Runs `cells` in sequence over micro-batches of `inputs`; differentiable.

  Args:
    cells: K layers (or a PipeliningLayer's Cells: anything with
      FProp(theta, *inputs)); cell k's outputs are cell k+1's inputs.
    thetas: K NestedMaps of tensors (or variables), cell k's theta.
    inputs: a tensor or nested structure of tensors, batched along batch_dim.
    sizes: micro-batch sizes, summing to the batch size.
    placement: where each cell runs.
    recompute: 'always', 'except_last' or 'never' (see RECOMPUTE_MODES).
    batch_dim: the batch dimension of every input and output leaf.
    input_grads_first: in the backward, each cell but the first computes the
      gradient it sends to the previous cell before its weight gradients, so
      the previous stage's drain starts sooner, at the cost of holding the
      cell's intermediate gradients of a micro-batch until then (grad_order).

  Returns:
    The last cell's outputs for the whole batch (micro-batches merged).
  """
  if recompute not in RECOMPUTE_MODES:
    raise ValueError(f'Unknown recompute mode {recompute!r}; valid: '
                     f'{", ".join(RECOMPUTE_MODES)}.')
  num_cells, num_mb = len(cells), len(sizes)
  clocks = schedule_lib.FillDrain(num_cells, num_mb).Clocks()
  forward_clocks = [c for c in clocks if c[0].kind == 'F']
  backward_clocks = [c for c in clocks if c[0].kind == 'B']

  thetas = [tf.nest.map_structure(tf.convert_to_tensor, t) for t in thetas]
  flat_thetas = [tf.nest.flatten(t) for t in thetas]
  flat_inputs = tf.nest.flatten(inputs)
  theta_counts = [len(f) for f in flat_thetas]
  collector = base_layer.StatsCollector()
  output_structure = []

  # The recomputation in Backward must run in the forward's mode (training,
  # step) wherever the caller takes the gradient, e.g. outside its Context.
  forward_context = base_layer.CurrentContext()

  def CellForward(k: int, m: int, theta: NestedMap, x: Any, record: bool):
    stats = collector if record else base_layer.StatsCollector()
    with base_layer.Context(training=forward_context.training,
                            step=forward_context.step, micro_batch=m,
                            stats_collector=stats):
      return cell_fprop[k](theta, x)

  cell_fprop = [c.FProp for c in cells]

  # Gradients the pipeline's backward computed, by sink: 'cell_k' or 'inputs'.
  sink_grads = {}

  def Sink(key: str, k: int, flat: list) -> tf.Tensor:
    """A scalar token standing for `flat` on cell k's device (see Invariants)."""

    @tf.custom_gradient
    def Token(*args):
      del args  # only their gradients matter, returned from sink_grads
      return tf.zeros([]), lambda unused_dtoken: list(sink_grads[key])

    with placement.CellScope(k):
      return Token(*flat)

  tokens = [Sink(f'cell_{k}', k, flat) for k, flat in enumerate(flat_thetas)]
  tokens.append(Sink('inputs', 0, flat_inputs))

  @tf.custom_gradient
  def Forward(*unused_tokens):
    # cell_in[k][m] / cell_out[k][m]: cell k's input / output, micro-batch m.
    # The inputs are the boundary activations the forward keeps.
    cell_in = [[None] * num_mb for _ in range(num_cells)]
    cell_out = [[None] * num_mb for _ in range(num_cells)]
    # Split where the first cell runs and merge where the last one does, so
    # that micro-batches do not travel through whichever device the caller's
    # default is (a remote cell would pay a round trip per micro-batch).
    with placement.CellScope(0):
      split_inputs = microbatch.Split(inputs, list(sizes), batch_dim)
    tapes = {}
    for clock in forward_clocks:
      for task in clock:
        k, m = task.cell, task.micro_batch
        with placement.CellScope(k):
          received = split_inputs[m] if k == 0 else cell_out[k - 1][m]
          # Run a cell's micro-batches in order, one after another.
          x = _Gated(cell_out[k][m - 1] if m else [],
                     placement.Annotate(k, received))
          cell_in[k][m] = x
          if _Recomputes(recompute, m, num_mb):
            y = CellForward(k, m, thetas[k], x, record=True)
          else:
            tape = tf.GradientTape(persistent=False,
                                   watch_accessed_variables=False)
            with tape:
              tape.watch([t for t in tf.nest.flatten((thetas[k], x))
                          if _IsDifferentiable(t)])
              y = CellForward(k, m, thetas[k], x, record=True)
            tapes[(k, m)] = tape
          cell_out[k][m] = y
    with placement.CellScope(num_cells - 1):
      outputs = microbatch.Merge(cell_out[num_cells - 1], batch_dim)
    output_structure.append(outputs)

    def Backward(*flat_dy):
      dy_all = tf.nest.pack_sequence_as(outputs, list(flat_dy))
      # dys[k][m]: gradient of the loss w.r.t. cell k's output, micro-batch m.
      dys = [[None] * num_mb for _ in range(num_cells)]
      with placement.CellScope(num_cells - 1):
        dys[num_cells - 1] = microbatch.Split(dy_all, list(sizes), batch_dim)
      dx = [None] * num_mb
      acc = [None] * num_cells
      for clock in backward_clocks:
        for task in clock:
          k, m = task.cell, task.micro_batch
          with placement.CellScope(k):
            # Recompute only once this micro-batch's output gradient is there
            # and the previous one's gradients are summed: one at a time.
            x, dy = _Gated([acc[k], dys[k][m]], (cell_in[k][m], dys[k][m]))
            if (k, m) in tapes:
              x = cell_in[k][m]  # the tensor the forward's tape watched
              sources = (thetas[k], x)
              tape = tapes.pop((k, m))
              y = cell_out[k][m]
            else:
              sources = (thetas[k], x)
              tape = tf.GradientTape(watch_accessed_variables=False)
              with tape:
                tape.watch([t for t in tf.nest.flatten(sources)
                            if _IsDifferentiable(t)])
                y = CellForward(k, m, thetas[k], x, record=False)
            flat_y = tf.nest.flatten(y)
            flat_dy_km = tf.nest.flatten(dy)
            pairs = [(a, b) for a, b in zip(flat_y, flat_dy_km)
                     if _IsDifferentiable(a)]
            flat_sources = tf.nest.flatten(sources)
            with grad_order.Capture(input_grads_first and k > 0) as created:
              grads = tape.gradient(
                  [a for a, _ in pairs], flat_sources,
                  output_gradients=[b for _, b in pairs],
                  unconnected_gradients=tf.UnconnectedGradients.NONE)
            g_theta = grads[:theta_counts[k]]
            g_x = tf.nest.pack_sequence_as(x, grads[theta_counts[k]:])
            grad_order.RunAfter(created, g_x)  # nothing if not captured
            acc[k] = _AddGrads(acc[k], g_theta)
            if k > 0:
              dys[k - 1][m] = tf.nest.map_structure(
                  lambda g, ref: tf.zeros_like(ref) if g is None else g,
                  g_x, cell_in[k][m])
            else:
              dx[m] = g_x
      for k in range(num_cells):
        sink_grads[f'cell_{k}'] = acc[k]
      with placement.CellScope(0):
        sink_grads['inputs'] = _MergeInputGrads(dx, split_inputs, batch_dim)
      return [tf.zeros([]) for _ in tokens]

    return tf.nest.flatten(outputs), Backward

  with placement.CellScope(num_cells - 1):
    flat_out = Forward(*tokens)
  if not isinstance(flat_out, (list, tuple)):
    flat_out = [flat_out]
  # BatchNorm statistics of all micro-batches move the moving averages once. A
  # caller that installed its own collector (the trainer, which applies them
  # only when the step's loss is finite) gets the records instead.
  outer = base_layer.CurrentContext().stats_collector
  if outer is not None:
    for layer, stats in collector.records:
      outer.Add(layer, stats)
  else:
    collector.ApplyAll()
  return tf.nest.pack_sequence_as(output_structure[0], list(flat_out))


def _MergeInputGrads(dx: list, micro_inputs: list, batch_dim: int) -> list:
  """Per-leaf input gradients of the whole batch (None where not float)."""
  per_mb = [tf.nest.flatten(d) for d in dx]
  flat_refs = [tf.nest.flatten(x) for x in micro_inputs]
  merged = []
  for i, ref in enumerate(flat_refs[0]):
    parts = [p[i] for p in per_mb]
    if not _IsDifferentiable(ref) or all(p is None for p in parts):
      merged.append(None)
      continue
    parts = [tf.zeros_like(flat_refs[m][i]) if p is None else p
             for m, p in enumerate(parts)]
    merged.append(parts[0] if len(parts) == 1 else tf.concat(parts, batch_dim))
  return merged
