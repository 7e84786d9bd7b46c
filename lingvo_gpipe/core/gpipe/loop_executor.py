"""The loop executor: fill-drain as two loops over clocks, a graph that does not grow with M.

Invariant: each cell's forward, and its backward (re-materialization plus
gradients), is built once, however many micro-batches there are, and the
numbers are those of the unrolled executor (executor.py): the same tasks in
the same per-cell order, each backward waiting for the cell's running
gradient sum, so one micro-batch's partial gradients are alive at a time.

How: the forward is a `tf.while_loop` over the M+K-1 clocks of fill-drain;
at clock t every cell k runs micro-batch t-k, reading its input from a
TensorArray and writing its output into the next cell's. The backward is a
second loop over the clocks in reverse, with the running sums as loop
variables. Both run one clock at a time (`parallel_iterations=1`), as
fill-drain has it. At a bubble clock (cell k with no micro-batch t-k) the
cell does nothing: its work sits in a `tf.cond` on the clock, whose other
branch passes the running sums through and yields an empty batch. Every
array has a spare slot M for what bubble clocks read and write, so one
clock's graph serves every clock. `skip_bubbles=False` has bubble clocks
compute on a one-row spare batch instead, whose output gradient is zero.

Where tensors live: each TensorArray on the device of the cell that reads
it, the cell before writing into it there; a cell on a TensorFlow worker
process reads its weights inside the loops, on its own device; the first
cell's inputs, which both loops read, are sliced a micro-batch at a clock
(`_Whole`), not copied into arrays; the last cell's output gradient, which
only the backward reads, is split into an array (`_Split`) so that its
slots can be emptied as they are read.

What each clock runs: each cell is traced once (`TraceCells`), as a
function of (its weights, the micro-batch index, its input); the forward
clocks call that function, the backward clocks its split into a forward
returning residuals and their gradient (kept_forward.py), each inlined
where it runs. Where every micro-batch a cell sees has the same size, the
trace knows it (`_Rows`). A small cell in this process carries its weights,
and in the backward their running sums, packed: one tensor per dtype
(packed_weights.py). `clocks_per_iteration` clocks run in one iteration.

Memory: the running sums of a cell's unpacked weights start empty
(`_StartsEmpty`), and the cell's first micro-batch in the backward, M-1,
starts them. Where bubbles are skipped, the backward empties each slot of
the boundary arrays (cells' inputs, output gradients) once read
(`_Emptied`), as the unrolled executor frees them; the last cell's output
gradient then shrinks by a micro-batch a clock, where the unrolled
executor holds it whole to the end. Statistics layers record (BatchNorm's
moments) are loop variables too, merged a micro-batch at a time
(BaseLayer.MergeStats) and recorded once. Every recompute mode runs: a
micro-batch that keeps its activations (recompute 'never'; under
'except_last' the last one) cannot keep a tape from one loop to the other,
so in the forward loop the cell also returns the tensors its gradient
reads, written into arrays on its device, one slot per micro-batch, and the
backward loop reads them where it would have recomputed, then overwrites
the slot it read with an empty tensor, freeing it (`_Consumed`). The
forward's own inputs (weights, the cell's input) are not stored: the
backward is given them again.

What it does not do yet, and refuses by name: input_grads_first with kept
activations (a kept backward is one function call whose ops cannot be
ordered from outside), layers that record statistics without MergeStats,
activations whose shapes (but the batch) are not known when the graph is
built, a batch dimension other than 0, schedules other than fill-drain,
and TPU placement (XLA compiles a TPU step whole, and these loops do not
compile: their arrays and the empty-started sums change shape).
`Refusal` and `TracedRefusal` say which, so executor='auto' runs those
pipelines unrolled (executor_choice.py).

docs/loop_executor.md gives the measurements behind each of these choices
(speed, build time and memory on this repository's benchmarks) and what was
tried and not kept.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core.gpipe import accumulate
from lingvo_gpipe.core.gpipe import kept_forward
from lingvo_gpipe.core.gpipe import microbatch
from lingvo_gpipe.core.gpipe import packed_weights
from lingvo_gpipe.core.gpipe import placement as placement_lib
from lingvo_gpipe.core.gpipe import recompute as recompute_lib
from lingvo_gpipe.core.gpipe import schedule as schedule_lib


def MicroBatchSpec(t: tf.Tensor) -> tf.TensorSpec:
  """A micro-batch's spec: the batch dimension unknown (micro-batches differ)."""
  return tf.TensorSpec([None] + t.shape.as_list()[1:], t.dtype)


def _InAnotherProcess(device: str) -> bool:
  """Whether `device` names a device of a TensorFlow worker process."""
  try:
    job = tf.DeviceSpec.from_string(device).job
  except ValueError:  # e.g. 'TPU logical core 0'
    return False
  return job not in (None, 'localhost')


def _FillDrain(schedule: schedule_lib.Schedule) -> schedule_lib.FillDrain:
  return schedule_lib.FillDrain(
      schedule.num_cells, schedule.num_micro_batches,
      split_backward=getattr(schedule, 'split_backward', False))


# Why TPU pipelines do not run on this loop, said wherever one is refused.
XLA_WHOLE_STEP = ("XLA compiles a TPU step whole and cannot compile the "
                  "loop's arrays and empty-started sums")


def Refusal(schedule: schedule_lib.Schedule, recompute: str, batch_dim: int,
            placement: placement_lib.Placement) -> Optional[str]:
  """Why this loop cannot run a pipeline of these settings, or None if it can."""
  if isinstance(placement, placement_lib.TpuPlacement):
    # XLA compiles a TPU step whole. It needs each loop variable of one
    # shape (the loop's arrays hold micro-batches of an unknown size, an
    # unpacked cell's running sums start empty) and has no kernel for the
    # TensorList resizes the arrays use (measured under whole-step
    # jit_compile on this CPU; docs/loop_executor.md).
    return ("executor='loop' does not run under placement_backend='tpu': "
            f"{XLA_WHOLE_STEP}; use executor='unrolled' (executor='auto' "
            'does).')
  expected = _FillDrain(schedule)
  if any(schedule.CellOrder(c) != expected.CellOrder(c)
         for c in range(schedule.num_cells)):
    return (f"executor='loop' runs fill-drain only, not schedule "
            f"{schedule.name}; use executor='unrolled'.")
  if recompute != 'always' and expected.split_backward:
    return (f"executor='loop' orders input gradients first only when it "
            f"re-materializes: input_grads_first with recompute={recompute!r} "
            "needs recompute='always' or executor='unrolled'.")
  if batch_dim != 0:
    return (f"executor='loop' cuts micro-batches along dimension 0, not "
            f"batch_dim={batch_dim}; use executor='unrolled'.")
  return None


def Rows(sizes: Sequence[int], skip_bubbles: bool) -> Optional[int]:
  """Rows of every micro-batch a cell's work sees, where that is one number.

  Only where bubble clocks are skipped (a computed bubble sees the spare
  row) and all micro-batches have the same size.
  """
  return sizes[0] if skip_bubbles and len(set(sizes)) == 1 else None


def TraceCells(runners: Sequence[recompute_lib.CellRunner], inputs: Any,
               rows: Optional[int]
               ) -> tuple[list[Any], list[recompute_lib.CellTrace]]:
  """What the loop traces: each cell alone on micro-batches like `inputs`'.

  Args:
    runners: per cell, its CellRunner.
    inputs: the first cell's inputs for the whole batch.
    rows: every micro-batch's rows (`Rows`), or None if they differ.

  Returns:
    (the specs every cell boundary's arrays carry, the batch dimension
    unknown: the first cell's inputs, then each cell's outputs; per cell,
    its trace on micro-batches of `rows`, which the loops call).
  """
  spec = tf.nest.map_structure(
      lambda t: tf.TensorSpec([rows] + t.shape[1:].as_list(), t.dtype), inputs)
  specs = [tf.nest.map_structure(MicroBatchSpec, inputs)]
  traces = []
  for runner in runners:
    traces.append(runner.Specs(spec))
    specs.append(tf.nest.map_structure(MicroBatchSpec, traces[-1].outputs))
    # Micro-batches of differing rows: the next cell is traced on any rows.
    spec = traces[-1].outputs if rows is not None else specs[-1]
  return specs, traces


def TracedRefusal(specs: Sequence[Any],
                  recorded: Sequence[Sequence[tuple[Any, Any]]]
                  ) -> Optional[str]:
  """Why this loop cannot run cells traced alone, or None if it can.

  Args:
    specs: the TensorSpecs the loop keeps in arrays: what each cell but the
      first reads, then what the last one returns.
    recorded: per cell, [(layer, its statistics' specs)] (CellRunner.Specs).
  """
  for spec in specs:
    for s in tf.nest.flatten(spec):
      if not s.shape[1:].is_fully_defined():
        return ("executor='loop' needs every activation's shape but the "
                f'batch dimension known when the graph is built, got '
                f"{s.shape}; use executor='unrolled'.")
  cannot = sorted({layer.path for cell in recorded for layer, _ in cell
                   if type(layer).MergeStats is base_layer.BaseLayer.MergeStats})
  if cannot:
    return (f"executor='loop' keeps a running merge of the statistics layers "
            f'record, and {", ".join(cannot)} cannot merge theirs (no '
            "MergeStats); use executor='unrolled'.")
  return None


@dataclasses.dataclass(frozen=True)
class _Sliced:
  """A whole batch the loops read by slicing it (LoopExecutor._Whole)."""
  batch: Any


class LoopExecutor:
  """Runs `runners` (one per cell) over micro-batches of `sizes` in two loops."""

  def __init__(self, schedule: schedule_lib.Schedule,
               runners: Sequence[recompute_lib.CellRunner],
               placement: placement_lib.Placement, recompute: str,
               sizes: Sequence[int], batch_dim: int,
               collector: base_layer.StatsCollector,
               clocks_per_iteration: int = 1,
               skip_bubbles: bool = True,
               weights: Optional[Sequence[Any]] = None,
               pack_weights: bool = True):
    recompute_lib.CheckMode(recompute)
    refusal = Refusal(schedule, recompute, batch_dim, placement)
    if refusal:
      raise hyperparams.ConfigError(refusal)
    expected = _FillDrain(schedule)
    if clocks_per_iteration < 1:
      raise hyperparams.ConfigError(
          f'clocks_per_iteration must be >= 1, got {clocks_per_iteration}.')
    for name, value in (('skip_bubbles', skip_bubbles),
                        ('pack_weights', pack_weights)):
      if not isinstance(value, bool):
        raise hyperparams.ConfigError(
            f'{name} must be True or False, got {value!r}.')
    self._recompute = recompute
    self._unroll = clocks_per_iteration
    self._skip_bubbles = skip_bubbles
    self._out_spec = None
    self._collector = collector
    self._runners = list(runners)
    self._weights = (list(weights) if weights is not None else
                     [r.theta for r in self._runners])
    self._remote = [_InAnotherProcess(placement.Device(k))
                    for k in range(schedule.num_cells)]
    # A small cell in this process carries its weights and their gradient
    # sums through the loops packed (packed_weights.py); None: unpacked.
    self._packs = [
        packed_weights.PackedWeights(tf.nest.flatten(runner.theta))
        if pack_weights and not remote and packed_weights.Worth(
            tf.nest.flatten(runner.theta))
        else None for runner, remote in zip(self._runners, self._remote)]
    self._packed: list[Optional[list[tf.Tensor]]] = [None] * len(self._packs)
    self._placement = placement
    self._sizes = list(sizes)
    self._split = expected.split_backward
    self._k = schedule.num_cells
    self._m = schedule.num_micro_batches
    self._clocks = self._m + self._k - 1
    self._rows = Rows(self._sizes, skip_bubbles)
    self._traces: list[recompute_lib.CellTrace] = []  # per cell, TraceCells
    self._in_specs: list[Any] = []
    self._inputs: list[list[tf.TensorArray]] = []
    self._no_grad: list[list[bool]] = []
    self._reduces_batch: list[bool] = []
    # Where a micro-batch keeps its activations (recompute 'never',
    # 'except_last'): per cell, its forward split from its backward, and
    # arrays of each micro-batch's residuals (kept_forward.py).
    self._kept: list[Optional[kept_forward.KeptForward]] = [None] * self._k
    self._residuals: list[list[tf.TensorArray]] = [[] for _ in range(self._k)]

  def _Clock(self, t: tf.Tensor) -> list[tuple[tf.Tensor, tf.Tensor]]:
    """Per cell k, (slot, micro-batch index) at clock t.

    Cell k runs micro-batch t-k. At a bubble clock its slot is the spare slot
    M (`_Spare`), which a computed bubble reads as a one-example batch, so
    the cell computes on one row and writes nothing that counts. Looked up
    in a table of every clock (with `clocks_per_iteration` clocks either
    side, which only bubbles fill): one gather and one unstack a clock,
    where computing each cell's took seven small ops, run at every clock
    like any op in a loop.
    """
    pad = self._unroll
    clocks = np.arange(-pad, self._clocks + pad)[:, None]
    m = clocks - np.arange(self._k)[None, :]
    valid = (m >= 0) & (m < self._m)
    slots = np.where(valid, m, self._m).astype(np.int32)
    micro_batches = np.clip(m, 0, self._m - 1).astype(np.int32)
    both = tf.gather(tf.constant(np.stack([slots, micro_batches], -1)),
                     t + pad)
    return [tuple(tf.unstack(cell)) for cell in tf.unstack(both)]

  def _Spare(self, spec: Any) -> Any:
    """Zeros like `spec`: what the spare slot M holds and a skipped bubble yields.

    One row where bubble clocks compute (on it); none where they are skipped,
    since nothing computes on it then, and a row of the last cell's output
    (one sequence's logits, 1 MiB in bench/memory.py's Transformer) held in
    its array and in the bubble's yield was a part of the loop's peak.
    """
    rows = 0 if self._skip_bubbles else 1
    return tf.nest.map_structure(
        lambda s: tf.zeros([rows] + s.shape[1:].as_list(), s.dtype), spec)

  def _Arrays(self, k: int, spec: Any) -> list[tf.TensorArray]:
    """Arrays for micro-batches like `spec` on cell k's device; slot M `_Spare`."""
    arrays = []
    with self._placement.CellScope(k):
      for s in tf.nest.flatten(spec):
        arrays.append(tf.TensorArray(
            s.dtype, size=self._m + 1, infer_shape=False,
            clear_after_read=False,
            element_shape=s.shape).write(self._m, self._Spare(s)))
    return arrays

  def _Split(self, k: int, value: Any) -> list[tf.TensorArray]:
    """`value`'s micro-batches in arrays on cell k's device; slot M `_Spare`.

    The array is split from `value` itself and grown by the spare slot: one
    copy of `value` (the split's), where concatenating the zero row first
    made two (the backward's output gradient, [33, 128, 2048] floats in
    bench/memory.py's Transformer, ran out of memory there on a capped
    worker).
    """
    with self._placement.CellScope(k):
      return [tf.TensorArray(leaf.dtype, size=self._m, dynamic_size=True,
                             infer_shape=False, clear_after_read=False,
                             element_shape=MicroBatchSpec(leaf).shape).split(
                                 leaf, self._sizes).write(
                                     self._m, self._Spare(leaf))
              for leaf in tf.nest.flatten(value)]

  def _Written(self, k: int, arrays: Sequence[tf.TensorArray],
               slot: tf.Tensor, value: Any) -> list[tf.TensorArray]:
    """`arrays` (on cell k's device, their reader's) with `value` at `slot`."""
    with self._placement.CellScope(k):
      return [a.write(slot, leaf)
              for a, leaf in zip(arrays, tf.nest.flatten(value))]

  def _Merge(self, k: int, arrays: Sequence[tf.TensorArray], spec: Any) -> Any:
    """The whole batch from arrays of `_Arrays`: their first M slots, concatenated.

    The spare slot M is dropped from the list (no copy) before the concat,
    so the merge holds the batch and no more.
    """
    with self._placement.CellScope(k):
      return tf.nest.pack_sequence_as(
          spec, [self._FirstSlots(a) for a in arrays])

  def _FirstSlots(self, array: tf.TensorArray) -> tf.Tensor:
    """Slots 0..M-1 of `array`, concatenated."""
    if tf.executing_eagerly():  # an eager array is a list of tensors
      return tf.concat([array.read(m) for m in range(self._m)], 0)
    return tf.raw_ops.TensorListConcatV2(
        input_handle=tf.raw_ops.TensorListResize(input_handle=array.flow,
                                                 size=self._m),
        element_shape=[-1 if d is None else d
                       for d in array.element_shape.as_list()],
        leading_dims=tf.zeros([0], tf.int64),
        element_dtype=array.dtype).tensor

  def _Whole(self, k: int, value: Any) -> Any:
    """What cell k's loops read `value`, a whole batch, from: `_Sliced` or arrays.

    Where bubble clocks are skipped, the loops slice each micro-batch from
    `value` itself (microbatch.Indexed), which shares its buffer: split into
    an array it is copied, and the first cell's inputs are read by both
    loops, so no slot could be emptied early. A bubble clock that computes
    reads the spare row, which only an array has (`_Split`). The identity
    on cell k's device is what the loops capture: a tensor enters a loop on
    its producer's device, and one made elsewhere would be sent to cell k
    at every clock.
    """
    if not self._skip_bubbles:
      return self._Split(k, value)
    with self._placement.CellScope(k):
      return _Sliced(tf.nest.map_structure(tf.identity, value))

  def _Read(self, source: Any, slot: tf.Tensor, micro_batch: tf.Tensor,
            spec: Any) -> Any:
    """A micro-batch from `source`: arrays (read at `slot`) or a whole batch
    (`_Sliced`, sliced at `micro_batch`)."""
    if isinstance(source, _Sliced):
      return microbatch.Indexed(source.batch, self._sizes, micro_batch)
    return tf.nest.pack_sequence_as(spec, [a.read(slot) for a in source])

  def RunForward(self, inputs: Any) -> Any:
    """The last cell's outputs for the whole batch."""
    self._in_specs, self._traces = TraceCells(self._runners, inputs,
                                              self._rows)
    # recorded: per cell, [(layer, the spec of what it records)].
    recorded = [trace.recorded for trace in self._traces]
    refusal = TracedRefusal(self._in_specs[1:], recorded)
    if refusal:
      raise hyperparams.ConfigError(refusal)
    out_spec = self._out_spec = self._in_specs.pop()
    whole = self._Whole(0, inputs)
    arrays = [[]] + [
        self._Arrays(k, self._in_specs[k]) for k in range(1, self._k)]
    outputs = self._Arrays(self._k - 1, out_spec)
    merged = self._NoStatistics(recorded)
    self._reduces_batch = [bool(r) for r in recorded]
    for k, pack in enumerate(self._packs):
      if pack is not None:
        with self._placement.CellScope(k):
          self._packed[k] = pack.Pack(tf.nest.flatten(self._runners[k].theta))
    residuals = self._Residuals()

    def Body(first, arrays, outputs, merged, residuals):
      arrays, merged = [list(a) for a in arrays], [list(m) for m in merged]
      residuals = [list(r) for r in residuals]
      # Last cell first: each reads its array before the cell in front of
      # it writes this clock's micro-batch, so all cells of a clock can run
      # at once. Clocks past the last are bubbles for every cell.
      for t, k in ((first + u, k) for u in range(self._unroll)
                   for k in reversed(range(self._k))):
        if k == self._k - 1:
          clock = self._Clock(t)
        slot, micro_batch = clock[k]
        with self._placement.CellScope(k):
          x = self._Read(arrays[k] if k else whole, slot, micro_batch,
                         self._in_specs[k])
          x = self._placement.Annotate(k, x)
          y, merged[k], residuals[k] = self._CellForward(
              k, micro_batch, slot, x, merged[k], recorded[k], residuals[k])
        if k + 1 < self._k:
          arrays[k + 1] = self._Written(k + 1, arrays[k + 1], slot, y)
        else:
          outputs = self._Written(k, outputs, slot, y)
      return first + self._unroll, arrays, outputs, merged, residuals

    _, arrays, outputs, merged, self._residuals = tf.while_loop(
        lambda t, *_: t < self._clocks, Body,
        (tf.constant(0), arrays, outputs, merged, residuals),
        parallel_iterations=1)
    for cell_records, cell_merged in zip(recorded, merged):
      for (layer, _), stats in zip(cell_records, cell_merged):
        self._collector.Add(layer, stats)
    self._inputs = [whole] + arrays[1:]
    return self._Merge(self._k - 1, outputs, out_spec)

  def _Residuals(self) -> list[list[tf.TensorArray]]:
    """Per cell, empty arrays for its micro-batches' residuals, on its device.

    Only for cells that keep a micro-batch's activations; the cell's
    forward is split from its backward here (traced once, like the cell).
    """
    if self._recompute == 'always':
      return [[] for _ in range(self._k)]
    residuals = []
    for k, runner in enumerate(self._runners):
      with self._placement.CellScope(k):
        self._kept[k] = runner.KeptForward(self._traces[k].inputs)
        # Shapes left open: the backward loop overwrites a slot it has read
        # with an empty tensor (_Consumed), slot M+1 where it read the spare.
        residuals.append([
            tf.TensorArray(s.dtype, size=self._m + 2, infer_shape=False,
                           clear_after_read=False)
            for s in self._kept[k].residual_specs])
    return residuals

  def _Consumed(self, arrays: Sequence[tf.TensorArray], slot: tf.Tensor
                ) -> list[tf.TensorArray]:
    """`arrays` with `slot` overwritten by an empty tensor, freeing what it held.

    An array a loop only reads lives until the loop ends (module
    docstring). The spare slot M, which every bubble clock that computes
    reads, is kept (the write goes to slot M+1).
    A residual that is not a number (a nested loop's accumulator) is left.
    """
    slot = tf.where(slot < self._m, slot, self._m + 1)
    return [a.write(slot, tf.zeros([0], a.dtype))
            if a.dtype.is_numpy_compatible else a for a in arrays]

  def _Emptied(self, arrays: Sequence[tf.TensorArray], slot: tf.Tensor,
               spec: Any) -> list[tf.TensorArray]:
    """`arrays` with `slot` emptied (0 rows) once the backward has read it.

    An array the loop only reads would hold all M micro-batches until the
    loop ends: a cell's inputs and output gradients, which the unrolled
    executor frees after each micro-batch's backward, and the pipeline's
    output gradient, which it holds whole. Where bubble clocks compute, the
    spare slot M keeps its row for them, so nothing is emptied.
    """
    if not self._skip_bubbles:
      return list(arrays)
    return [a.write(slot, tf.zeros([0] + s.shape[1:].as_list(), s.dtype))
            for a, s in zip(arrays, tf.nest.flatten(spec))]

  def _Keeping(self, micro_batch: tf.Tensor, kept: Callable[[], Any],
               recomputed: Callable[[], Any]) -> Any:
    """`kept()` for a micro-batch that keeps its activations, else `recomputed()`."""
    if self._recompute == 'always':
      return recomputed()
    if self._recompute == 'never':
      return kept()
    # 'except_last': the last micro-batch's backward follows its forward.
    return tf.cond(tf.equal(micro_batch, self._m - 1), kept, recomputed)

  def _NoStatistics(self, recorded: list[list[tuple[Any, Any]]]) -> list[list]:
    """Per cell and record, the merge of no micro-batch: zeros, count 0."""
    zeros = []
    for k, cell in enumerate(recorded):
      with self._placement.CellScope(k):
        zeros.append([tf.nest.map_structure(
            lambda s: tf.zeros(s.shape, s.dtype), spec) for _, spec in cell])
    return zeros

  @staticmethod
  def _MergeStatistics(merged: list, records: list[tuple[Any, Any]],
                       valid: tf.Tensor, recorded: list[tuple[Any, Any]]
                       ) -> list:
    """`merged` with this micro-batch's `records` added where it is not a bubble."""
    if len(records) != len(recorded):
      raise ValueError(f'A cell recorded {len(records)} statistics in '
                       f'the loop but {len(recorded)} when traced alone.')
    result = []
    for so_far, (layer, stats) in zip(merged, records):
      both = layer.MergeStats([so_far, stats])
      both = tf.nest.map_structure(lambda b, s: tf.cast(b, s.dtype), both,
                                   so_far)
      result.append(tf.nest.map_structure(
          lambda b, s: tf.where(valid, b, s), both, so_far))
    return result

  def _Rows(self, value: Any) -> Any:
    """`value` with its batch dimension known, where micro-batches are alike.

    What a loop reads from an array has an unknown batch dimension (the
    arrays also hold the spare row). A cell traced on it computes shapes at
    run time: 16 × Dense(64) ran each Dense as a dozen small ops
    (tensordot's Shape, Gather, Prod, Reshape) where a known batch fuses it
    into one matmul. Only where the cell skips bubbles (it then sees real
    micro-batches only) and all micro-batches have the same size.
    """
    if self._rows is None:
      return value
    return tf.nest.map_structure(
        lambda t: tf.ensure_shape(t, [self._rows] + t.shape[1:].as_list()),
        value)

  def _Runner(self, k: int) -> recompute_lib.CellRunner:
    """Cell k's runner; on a worker process, on its weights read in the loop.

    A weight read before the loop enters it on the loop's own device and is
    sent from there to the cell's device at every clock; with the cell on
    another process that is the whole cell's weights over the network every
    clock, and the client holding a copy of them (docs/loop_executor.md). Read
    inside the loop, on the cell's device, only the handle travels. In this
    process the send passes a reference and reading inside was a trade, not
    kept: narrow Transformer blocks (K=4) stepped 0.84x as long, but 16 ×
    Dense(64) 1.08x as long, and 24 × Dense(512) at K=1 peaked 7 MiB higher
    (with Grappler off both peak alike: its rewrites of the loop use the
    weights when they are loop invariants). Call under cell k's device scope.
    """
    if self._packs[k] is not None:
      return self._runners[k].Rebound(tf.nest.pack_sequence_as(
          self._runners[k].theta, self._packs[k].Unpack(self._packed[k])))
    if not self._remote[k]:
      return self._runners[k]
    return self._runners[k].Rebound(tf.nest.map_structure(
        lambda w: tf.convert_to_tensor(w) if isinstance(w, tf.Variable)
        else w, self._weights[k]))

  def _Bubble(self, valid: tf.Tensor, work: Callable[[], Any],
              bubble: Callable[[], Any]) -> Any:
    """`work()`; at a bubble clock (not `valid`) `bubble()` if skipping them."""
    if not self._skip_bubbles:
      return work()
    return tf.cond(valid, work, bubble)

  def _CellForward(self, k: int, micro_batch: tf.Tensor, slot: tf.Tensor,
                   x: Any, merged: list, recorded: list,
                   residuals: list[tf.TensorArray]
                   ) -> tuple[Any, list, list[tf.TensorArray]]:
    """(cell k's outputs at this clock, its statistics merged so far, its
    residual arrays with this micro-batch's written if it keeps them)."""
    valid = slot < self._m
    out_spec = self._in_specs[k + 1] if k + 1 < self._k else self._out_spec

    def Recomputed():
      probe = base_layer.StatsCollector()
      y, _ = self._Runner(k).Forward(micro_batch, self._Rows(x), keep=False,
                                     collector=probe, trace=self._traces[k])
      # A bubble's statistics (of its spare row) are left out.
      return (y, self._MergeStatistics(merged, probe.records, valid, recorded),
              list(residuals))

    def Kept():
      (y, stats), values = self._kept[k].Forward(
          self._Runner(k).theta, recompute_lib.Index(micro_batch),
          self._Rows(x))
      records = [(layer, s) for (layer, _), s in zip(recorded, stats)]
      return (y, self._MergeStatistics(merged, records, valid, recorded),
              [a.write(slot, v) for a, v in zip(residuals, values)])

    def Bubble():
      return self._Spare(out_spec), merged, list(residuals)

    return self._Bubble(
        valid, lambda: self._Keeping(micro_batch, Kept, Recomputed), Bubble)

  def _CellBackward(self, k: int, micro_batch: tf.Tensor, slot: tf.Tensor,
                    x: Any, dy: Any, sums: list,
                    residuals: list[tf.TensorArray]
                    ) -> tuple[list, Any, list[tf.TensorArray]]:
    """(cell k's running sums with this clock's gradients added, x's
    gradient, its residual arrays less what this clock used)."""
    valid = slot < self._m

    def Work():
      runner = self._Runner(k)
      # One micro-batch's partial gradients at a time (accumulate.py).
      gated_x, gated_dy = accumulate.Gated([sums], self._Rows((x, dy)))

      def Recomputed():
        g_theta, g_x = runner.Backward(micro_batch, gated_x, gated_dy, None,
                                       input_grad_first=self._split and k > 0,
                                       trace=self._traces[k])
        return g_theta, g_x, list(residuals)

      def Kept():
        kept = self._kept[k]
        values = [a.read(slot) for a in residuals]
        grads = kept.Backward(
            [runner.theta, recompute_lib.Index(micro_batch), gated_x], values,
            (gated_dy, tf.nest.map_structure(  # statistics: no gradient
                lambda _: None, kept.structured_outputs[1])))
        with tf.control_dependencies(
            [g for g in tf.nest.flatten(grads) if g is not None]):
          left = self._Consumed(residuals, slot)
        return (grads[:runner.num_theta], tf.nest.pack_sequence_as(
            x, grads[runner.num_theta + 1:]), left)

      def Summed(grads):
        g_theta, g_x, left = grads()
        g_x = tf.nest.map_structure(
            lambda g, ref: tf.zeros_like(ref) if g is None else g, g_x, x)
        return (self._Summed(k, micro_batch, sums, g_theta, valid), g_x,
                left)

      return self._Keeping(micro_batch, lambda: Summed(Kept),
                           lambda: Summed(Recomputed))

    def Bubble():
      return (list(sums), tf.nest.map_structure(tf.zeros_like, x),
              list(residuals))

    return self._Bubble(valid, Work, Bubble)

  def _Summed(self, k: int, micro_batch: tf.Tensor, sums: list,
              g_theta: list, valid: tf.Tensor) -> list:
    """Cell k's running `sums` with one micro-batch's `g_theta` added.

    Sums that start empty (`_StartsEmpty`) are started by the cell's first
    micro-batch in the backward, M-1, with its gradients. A bubble clock
    computed before it (`skip_bubbles=False`) also starts them, and
    micro-batch M-1 starts them again.
    """
    for i, g in enumerate(g_theta):
      if g is None:
        self._no_grad[k][i] = True
    if self._packs[k] is not None:
      g_theta = self._packs[k].Pack(g_theta)
    summed = [i for i, g in enumerate(g_theta) if g is not None]
    grads = [tf.convert_to_tensor(g_theta[i]) for i in summed]

    def Added():
      added = []
      for i, g in zip(summed, grads):
        total = sums[i] + g
        # A layer that reduces over the batch (BatchNorm) could make a
        # bubble's gradient 0 · inf; keep the bubble out of the sum.
        added.append(tf.where(valid, total, sums[i])
                     if self._reduces_batch[k] else total)
      return added

    new_sums = list(sums)
    if not summed:
      return new_sums
    if self._StartsEmpty(k):
      totals = tf.cond(tf.equal(micro_batch, self._m - 1),
                       lambda: list(grads), Added)
    else:  # zeros to add to
      totals = Added()
    for i, total in zip(summed, totals):
      new_sums[i] = total
    return new_sums

  def _StartsEmpty(self, k: int) -> bool:
    """Whether cell k's running sums start empty (else as zeros): unless packed.

    Zeros of every weight's shape made before the loop depend on nothing;
    on a worker some were made at the start of the step and were alive at
    the backward's peak (docs/loop_executor.md). Empty sums take a `tf.cond` a
    clock to start, which seemed to lengthen a packed tiny cell's step (16 ×
    Dense(64), K=4, the loop's step against the unrolled one's, medians of
    three alternating runs: 1.86× against 1.66× at M=8, 1.99× against 1.84×
    at M=64, where single runs here vary by ±15%); a packed cell's weights
    are small (packed_weights.Worth), so its sums start as zeros.
    """
    return self._packs[k] is None

  def _StartingSums(self, k: int, like: Sequence[tf.Tensor]
                    ) -> list[tf.Tensor]:
    """Cell k's running sums before any micro-batch (`_StartsEmpty`)."""
    if self._StartsEmpty(k):
      return [tf.zeros([0], t.dtype) for t in like]
    return [tf.zeros_like(t) for t in like]

  def RunBackward(self, dy: Any) -> tuple[list[Optional[list]], list]:
    """(per cell, its flat theta's summed gradients; the inputs' flat gradients)."""
    # The output gradient is split into arrays (a copy), not sliced: its
    # slots are emptied as read, like the boundary arrays', so it shrinks by
    # a micro-batch a clock where a slice would hold all of it to the end.
    # The copy and the whole gradient are both alive only during the first
    # clock, whose running sums do not exist yet (docs/loop_executor.md).
    grads_in = [self._Arrays(k, self._in_specs[k + 1])
                for k in range(self._k - 1)] + [self._Split(self._k - 1, dy)]
    input_grads = self._Arrays(0, self._in_specs[0])
    sums, shapes = [], []
    for k, runner in enumerate(self._runners):
      summed = (self._packed[k] if self._packs[k] is not None
                else tf.nest.flatten(runner.theta))
      shapes.append([t.shape for t in summed])
      with self._placement.CellScope(k):
        sums.append(self._StartingSums(k, summed))
    self._no_grad = [[False] * r.num_theta for r in self._runners]

    # Cells' input arrays (from the forward) as loop variables, so that a
    # slot read for the last time is emptied (`_Emptied`); the first cell's
    # inputs are the batch's own, read where they are.
    inputs = [[]] + [list(a) for a in self._inputs[1:]]

    def Body(done, grads_in, input_grads, sums, residuals, inputs):
      grads_in, sums = [list(g) for g in grads_in], [list(a) for a in sums]
      residuals = [list(r) for r in residuals]
      inputs = [list(a) for a in inputs]
      # First cell first: each reads its output gradient before the cell
      # behind it writes this clock's.
      for t, k in ((self._clocks - 1 - done - u, k)
                   for u in range(self._unroll) for k in range(self._k)):
        if k == 0:
          clock = self._Clock(t)
        slot, micro_batch = clock[k]
        with self._placement.CellScope(k):
          # At a bubble clock both are the spare row, the output gradient
          # zero (or a bubble's zero input gradient): nothing is added.
          x = self._Read(inputs[k] if k else self._inputs[0], slot,
                         micro_batch, self._in_specs[k])
          out_spec = (self._in_specs[k + 1] if k + 1 < self._k else
                      tf.nest.map_structure(MicroBatchSpec, dy))
          dy_k = self._Read(grads_in[k], slot, micro_batch, out_spec)
          if k:
            inputs[k] = self._Emptied(inputs[k], slot, self._in_specs[k])
          grads_in[k] = self._Emptied(grads_in[k], slot, out_spec)
          sums[k], g_x, residuals[k] = self._CellBackward(
              k, micro_batch, slot, x, dy_k, sums[k], residuals[k])
        if k > 0:
          grads_in[k - 1] = self._Written(k - 1, grads_in[k - 1], slot, g_x)
        else:
          input_grads = self._Written(0, input_grads, slot, g_x)
      return (done + self._unroll, grads_in, input_grads, sums, residuals,
              inputs)

    loop_vars = (tf.constant(0), grads_in, input_grads, sums,
                 self._residuals, inputs)
    # Sums that start empty change shape once, to the weights'.
    invariants = tf.nest.map_structure(lambda _: None, loop_vars)
    invariants = invariants[:3] + ([
        [tf.TensorShape(None) if self._StartsEmpty(k) else None] * len(s)
        for k, s in enumerate(sums)],) + invariants[4:]
    _, _, input_grads, sums, _, _ = tf.while_loop(
        lambda s, *_: s < self._clocks, Body, loop_vars,
        shape_invariants=invariants, parallel_iterations=1)
    for k, pack in enumerate(self._packs):
      with self._placement.CellScope(k):
        if self._StartsEmpty(k):
          # A weight with no gradient keeps its empty sum (None below).
          sums[k] = [s if none else tf.ensure_shape(s, shape)
                     for s, shape, none in zip(sums[k], shapes[k],
                                               self._no_grad[k])]
        else:  # packed: a missing gradient was packed as zeros
          sums[k] = pack.Unpack(sums[k])
    sums = [[None if none else g for g, none in zip(cell_sums, no_grad)]
            for cell_sums, no_grad in zip(sums, self._no_grad)]
    merged = tf.nest.flatten(self._Merge(0, input_grads, self._in_specs[0]))
    dx = [g if accumulate.IsDifferentiable(g) else None for g in merged]
    return sums, dx
