"""Runs cells over micro-batches as a pipeline, and owns the pipeline's backward.

Invariants:
- Loss and gradients equal those of running the cells one after another on
  each micro-batch: the pipeline reorders work, never changes the math.
- The backward pass is the pipeline's own (`tf.custom_gradient`), so a
  caller's single GradientTape around it sees one op, not the per-micro-batch
  work (that tape would add all M partial gradients of a weight at once).
- Statistics that layers record in training (BatchNorm moments) are collected
  over all micro-batches' forward passes and applied once; recomputation
  records nothing.

The parts, each in a module of its own: the schedule says in what order each
cell runs its tasks (schedule.py); the executor lowers it (executor.py);
re-materialization runs a cell's forward and backward for one micro-batch
(recompute.py); gradient accumulation keeps one micro-batch's partial
gradients alive at a time (accumulate.py); sinks keep every tensor on its
cell's device (sinks.py); placement says which device that is
(placement.py); microbatch.py cuts and joins the batch; boundary.py says
what crosses from one cell to the next (what passes between two layers of a
Sequential). pipelined_loss.py runs the same parts with the loss inside the
pipeline, from `Prepare`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core.gpipe import accumulate
from lingvo_gpipe.core.gpipe import boundary
from lingvo_gpipe.core.gpipe import executor as executor_lib
from lingvo_gpipe.core.gpipe import executor_choice
from lingvo_gpipe.core.gpipe import loop_executor
from lingvo_gpipe.core.gpipe import microbatch
from lingvo_gpipe.core.gpipe import placement as placement_lib
from lingvo_gpipe.core.gpipe import recompute as recompute_lib
from lingvo_gpipe.core.gpipe import schedule as schedule_lib
from lingvo_gpipe.core.gpipe import sinks as sinks_lib
from lingvo_gpipe.core.nested_map import NestedMap

# 'unrolled': a copy of each cell per micro-batch, every schedule the
# executor lowers; 'loop': two loops over clocks, a graph that does not grow
# with M (loop_executor.py says what it does not run yet); 'auto': the loop
# where the unrolled graph would be large and the loop runs the pipeline,
# else unrolled (executor_choice.py).
EXECUTORS = ('auto', 'unrolled', 'loop')


# PipeliningLayer's `schedule` names -> the schedule classes.
SCHEDULES = {'gpipe': schedule_lib.FillDrain, '1f1b': schedule_lib.OneFOneB,
             'interleaved_1f1b': schedule_lib.Interleaved1F1B,
             'zero_bubble_h1': schedule_lib.ZeroBubbleH1}


def MakeSchedule(num_cells: int, num_micro_batches: int,
                 input_grads_first: bool = False,
                 name: str = 'gpipe',
                 cells_per_device: int = 1) -> schedule_lib.Schedule:
  """The schedule a pipeline of these settings runs (default fill-drain).

  `cells_per_device` (V) > 1 is the interleaved schedule's: its K cells run
  on K/V devices, cell c on device c mod (K/V).
  """
  if name not in SCHEDULES:
    raise hyperparams.ConfigError(f'Unknown schedule {name!r}; valid: '
                                  f'{", ".join(SCHEDULES)}.')
  if name == 'interleaved_1f1b':
    if num_cells % cells_per_device:
      raise hyperparams.ConfigError(
          f'{num_cells} cells cannot run {cells_per_device} per device; the '
          'interleaved schedule needs a multiple of cells_per_device.')
    return schedule_lib.Interleaved1F1B(
        num_cells, num_micro_batches, split_backward=input_grads_first,
        num_devices=num_cells // cells_per_device)
  if cells_per_device != 1:
    raise hyperparams.ConfigError(
        f'cells_per_device={cells_per_device} needs '
        f"schedule='interleaved_1f1b'; schedule {name!r} runs one cell per "
        'device.')
  return SCHEDULES[name](num_cells, num_micro_batches,
                         split_backward=input_grads_first)


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
                input_grads_first: bool = False,
                schedule: Optional[schedule_lib.Schedule] = None,
                executor: str = 'unrolled',
                clocks_per_iteration: int = 1,
                skip_bubbles: bool = True,
                pack_weights: bool = True,
                jit_compile: bool = False,
                max_unrolled_ops: int = (
                    executor_choice.DEFAULT_MAX_UNROLLED_OPS),
                on_choice: Optional[Callable[[executor_choice.Choice], None]]
                = None) -> Any:
  """Runs `cells` in sequence over micro-batches of `inputs`; differentiable.

  Args:
    cells: K layers (or a PipeliningLayer's Cells: anything with
      FProp(theta, *inputs)); cell k's outputs are cell k+1's inputs, as
      between two layers of a Sequential (boundary.py): a tuple is spread
      over the positional arguments, None leaves pass through.
    thetas: K NestedMaps of tensors (or variables), cell k's theta.
    inputs: a tensor or nested structure of tensors (None leaves allowed),
      batched along batch_dim; a tuple is the first cell's positional
      arguments.
    sizes: micro-batch sizes, summing to the batch size.
    placement: where each cell runs.
    recompute: 'always', 'except_last' or 'never' (see RECOMPUTE_MODES).
    batch_dim: the batch dimension of every input and output leaf.
    input_grads_first: in the backward, each cell but the first computes the
      gradient it sends to the previous cell before its weight gradients, so
      the previous stage's drain starts sooner, at the cost of holding the
      cell's intermediate gradients of a micro-batch until then (grad_order).
    schedule: the task order; default MakeSchedule(K, M, input_grads_first).
    executor: how the schedule is lowered, one of EXECUTORS.
    clocks_per_iteration: with executor 'loop', clocks run per loop
      iteration (loop_executor.py).
    skip_bubbles: with executor 'loop', a cell skips its bubble clocks
      (`tf.cond`) instead of computing on a one-row spare batch there.
    pack_weights: with executor 'loop', small cells carry their weights and
      gradient sums through the loops packed (packed_weights.py).
    jit_compile: XLA compiles each cell's forward and backward, run on the
      cell's device (recompute.py); not with TPU placement or schedules
      that split the backward (input_grads_first).
    max_unrolled_ops: with executor 'auto', the estimated size of the
      unrolled graph above which the loop runs (executor_choice.py).
    on_choice: with executor 'auto', called with what it chose and why
      (also logged).

  Returns:
    The last cell's outputs for the whole batch (micro-batches merged).
  """
  recompute_lib.CheckMode(recompute)
  if executor not in EXECUTORS:
    raise hyperparams.ConfigError(f'Unknown executor {executor!r}; valid: '
                                  f'{", ".join(EXECUTORS)}.')
  num_cells = len(cells)
  prepared = Prepare(cells, thetas, inputs, sizes, placement, batch_dim,
                     jit_compile, schedule, input_grads_first)
  schedule = prepared.schedule
  structures, inputs, thetas = (prepared.structures, prepared.inputs,
                                prepared.thetas)
  weights, collector, runners = (prepared.weights, prepared.collector,
                                 prepared.runners)
  if executor == 'auto':
    choice = executor_choice.Choose(schedule, runners, placement, inputs,
                                    sizes, recompute, batch_dim,
                                    max_unrolled_ops, skip_bubbles)
    executor_choice.Log(choice)
    if on_choice is not None:
      on_choice(choice)
    executor = choice.executor
  if executor == 'loop':
    lowered = loop_executor.LoopExecutor(schedule, runners, placement,
                                         recompute, sizes, batch_dim,
                                         collector, clocks_per_iteration,
                                         skip_bubbles, weights,
                                         pack_weights)
  else:
    lowered = _Unrolled(executor_lib.Executor(schedule, runners, placement,
                                              recompute), sizes, batch_dim,
                        placement)
  sinks = prepared.sinks
  output_structure = []

  @tf.custom_gradient
  def Forward(*unused_tokens):
    outputs = lowered.RunForward(inputs)
    output_structure.append(outputs)

    def Backward(*flat_dy, variables=None):
      dy = tf.nest.pack_sequence_as(outputs, list(flat_dy))
      running_sums, input_grads = lowered.RunBackward(dy)
      for k, grads in enumerate(running_sums):
        sinks.Fill(f'cell_{k}', grads)
      sinks.Fill('inputs', input_grads)
      if variables is None:
        return sinks.TokenGradients()
      # The loop executor reads a worker cell's weights inside its loops;
      # their gradients reach the variables through the tokens (the same
      # weights read outside), so these reads add none.
      return sinks.TokenGradients(), [None] * len(variables)

    return tf.nest.flatten(outputs), Backward

  with placement.CellScope(num_cells - 1):
    flat_out = Forward(*sinks.tokens)
  if not isinstance(flat_out, (list, tuple)):
    flat_out = [flat_out]
  HandOverStatistics(collector)
  return structures[-1].Rebuild(
      tf.nest.pack_sequence_as(output_structure[0], list(flat_out)))


class Prepared(NamedTuple):
  """What every way to run the pipeline starts from."""
  schedule: schedule_lib.Schedule  # the task order, checked against sizes
  structures: list  # boundary.Structure per cell boundary
  inputs: Any  # the first cell's inputs, tensors only
  weights: list  # per cell, its theta as given (variables or tensors)
  thetas: list  # per cell, its theta as tensors
  collector: base_layer.StatsCollector  # statistics of the forwards
  runners: list  # per cell, its recompute.CellRunner
  sinks: sinks_lib.Sinks  # a token per cell's theta, then one for the inputs


def Prepare(cells: Sequence[Any], thetas: Sequence[NestedMap], inputs: Any,
            sizes: Sequence[int], placement: placement_lib.Placement,
            batch_dim: int, jit_compile: bool,
            schedule: Optional[schedule_lib.Schedule] = None,
            input_grads_first: bool = False) -> Prepared:
  """The schedule, cells, runners and gradient sinks for running `cells` on `inputs`.

  `schedule` defaults to MakeSchedule(K, M, input_grads_first); it must have
  as many micro-batches as `sizes`, and what jit_compile cannot run is
  refused by name.
  """
  if schedule is None:
    schedule = MakeSchedule(len(cells), len(sizes), input_grads_first)
  if schedule.num_micro_batches != len(sizes):
    raise ValueError(f'Schedule {schedule.name} has '
                     f'{schedule.num_micro_batches} micro-batches; the batch '
                     f'is cut into {len(sizes)}.')
  CheckJitCompile(jit_compile, schedule, placement)
  cells, structures = boundary.Cells(cells, inputs, batch_dim)
  inputs = boundary.Structure.Tensors(inputs)
  weights = list(thetas)
  thetas = [tf.nest.map_structure(tf.convert_to_tensor, t) for t in thetas]
  collector = base_layer.StatsCollector()
  forward_context = base_layer.CurrentContext()
  runners = [recompute_lib.CellRunner(cell, theta, forward_context, collector,
                                      jit_compile=jit_compile)
             for cell, theta in zip(cells, thetas)]
  sinks = sinks_lib.Sinks()
  for k, theta in enumerate(thetas):
    sinks.Token(f'cell_{k}', tf.nest.flatten(theta), placement.CellScope(k))
  sinks.Token('inputs', tf.nest.flatten(inputs), placement.CellScope(0))
  return Prepared(schedule, structures, inputs, weights, thetas, collector,
                  runners, sinks)


def HandOverStatistics(collector: base_layer.StatsCollector) -> None:
  """Statistics of all micro-batches (BatchNorm's) move the averages once.

  A caller that installed its own collector (the trainer, which applies them
  only when the step's loss is finite) gets the records instead.
  """
  outer = base_layer.CurrentContext().stats_collector
  if outer is not None:
    for layer, stats in collector.records:
      outer.Add(layer, stats)
  else:
    collector.ApplyAll()


def CheckJitCompile(jit_compile: bool, schedule: schedule_lib.Schedule,
                    placement: placement_lib.Placement) -> None:
  """Refuses, by name, what XLA-compiled cells cannot run."""
  if not isinstance(jit_compile, bool):
    raise hyperparams.ConfigError(
        f'jit_compile must be True or False, got {jit_compile!r}.')
  if not jit_compile:
    return
  if isinstance(placement, placement_lib.TpuPlacement):
    raise hyperparams.ConfigError(
        "jit_compile=True compiles cells for TensorFlow devices; with "
        "placement_backend='tpu' XLA already compiles the whole step: use "
        "jit_compile=False there (jit_compile=True needs placement_backend="
        "'devices').")
  if any(t.kind == schedule_lib.INPUT_GRAD for c in range(schedule.num_cells)
         for t in schedule.CellOrder(c)):
    raise hyperparams.ConfigError(
        f'jit_compile=True runs a cell\'s backward as one XLA computation, '
        'which cannot hand out the input gradient before the weight '
        f'gradients as schedule {schedule.name} asks (input_grads_first, '
        "or schedule='zero_bubble_h1'): with jit_compile=True use "
        "input_grads_first=False and schedule 'gpipe' or '1f1b'.")


class _Unrolled:
  """The unrolled executor behind whole-batch inputs and outputs.

  Splits where the first cell runs and merges where the last one does, so
  that micro-batches do not travel through whichever device the caller's
  default is (a remote cell would pay a round trip per micro-batch).
  """

  def __init__(self, executor: executor_lib.Executor, sizes: Sequence[int],
               batch_dim: int, placement: placement_lib.Placement):
    self._executor = executor
    self._sizes = list(sizes)
    self._batch_dim = batch_dim
    self._placement = placement
    self._micro_inputs = None

  def RunForward(self, inputs: Any) -> Any:
    with self._placement.CellScope(0):
      self._micro_inputs = microbatch.Split(inputs, self._sizes,
                                            self._batch_dim)
    last = self._executor.RunForward(self._micro_inputs)
    with self._placement.CellScope(self._placement.num_cells - 1):
      return microbatch.Merge(last, self._batch_dim)

  def RunBackward(self, dy: Any) -> tuple[list, list]:
    with self._placement.CellScope(self._placement.num_cells - 1):
      micro_dys = microbatch.Split(dy, self._sizes, self._batch_dim)
    running_sums, dx = self._executor.RunBackward(micro_dys)
    with self._placement.CellScope(0):
      return running_sums, accumulate.MergeInputGrads(
          dx, self._micro_inputs, self._batch_dim)
