"""PipeliningLayer: GPipe behind one layer: partition, place, micro-batch, recompute.

Invariant: for any number of cells K, micro-batches M and recompute mode, its
outputs and gradients equal those of running its layers in sequence on each
micro-batch (BatchNorm: statistics per micro-batch in training, moving
averages updated once per mini-batch from all micro-batches). And built from
`layers`, the same layers have the same paths, variable names, initial
weights and checkpoint keys at any K, M and placement: a layer is named by its
place in `layers` (`<path>/layers_<j>`), never by its cell, so a checkpoint
written at one K restores at another. The layer only wires together
single-purpose modules: partition (which layers form cell k), placement
(where cell k runs), microbatch (how the batch is cut), and pipeline (the
fill-drain schedule with its own backward).
"""

from __future__ import annotations

import contextlib
import difflib
import numbers
from typing import Any, Optional, Sequence

import tensorflow as tf
from absl import logging

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core.gpipe import executor_choice
from lingvo_gpipe.core.gpipe import loop_executor
from lingvo_gpipe.core.gpipe import microbatch
from lingvo_gpipe.core.gpipe import partition
from lingvo_gpipe.core.gpipe import pipeline
from lingvo_gpipe.core.gpipe import pipelined_loss
from lingvo_gpipe.core.gpipe import placement as placement_lib
from lingvo_gpipe.core.gpipe import profile
from lingvo_gpipe.core.gpipe import recompute
from lingvo_gpipe.core.gpipe import report as report_lib
from lingvo_gpipe.core.gpipe import schedule as schedule_lib
from lingvo_gpipe.core.layers import combinators
from lingvo_gpipe.core.layers import repeat
from lingvo_gpipe.core.nested_map import NestedMap

PLACEMENT_BACKENDS = ('devices', 'tpu')


def _Refuse(path: str, field: str, value: Any,
            valid: str) -> hyperparams.ConfigError:
  """The error for a bad Params value: the field, the value, what is valid."""
  return hyperparams.ConfigError(f'{path}: {field}={value!r}; valid: {valid}.')


def _CheckInt(path: str, field: str, value: Any, minimum: int,
              what: str) -> int:
  """`value` as an int >= minimum; an integral float (2.0) counts, bools not."""
  number = None
  if not isinstance(value, bool):
    if isinstance(value, numbers.Integral):
      number = int(value)
    elif isinstance(value, numbers.Real) and float(value).is_integer():
      number = int(value)
  if number is None:
    raise hyperparams.ConfigError(f'{path}: {field} must be an integer >= {minimum} '
                                  f'({what}), got {value!r}.')
  if number < minimum:
    raise hyperparams.ConfigError(f'{path}: {field} must be >= {minimum} ({what}), got '
                                  f'{value!r}.')
  return number


def _CheckBool(path: str, field: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise hyperparams.ConfigError(f'{path}: {field} must be True or False, got {value!r}.')


def _CheckChoice(path: str, field: str, value: Any,
                 choices: Sequence[str]) -> None:
  """Refuses a value not in `choices`, suggesting the closest spelling."""
  if isinstance(value, str) and value in choices:
    return
  close = difflib.get_close_matches(str(value), choices, n=1)
  hint = f' Did you mean {close[0]!r}?' if close else ''
  raise hyperparams.ConfigError(f'{path}: {field}={value!r}; valid: '
                                f'{", ".join(choices)}.{hint}')


class Cell(tf.Module):
  """Cell k of a pipeline built from `layers`: a run of layers it does not own.

  The PipeliningLayer owns the layers, so that their names and checkpoint keys
  do not depend on the cut; a cell only chains its run of them, the way a
  combinators.Sequential chains its sub-layers, and takes a theta of the same
  form, NestedMap(sub=[theta of each layer]) (PipeliningLayer.CellTheta).
  """

  def __init__(self, name: str, layers: Sequence[base_layer.BaseLayer]):
    super().__init__(name=name)
    self.sub = list(layers)

  @property
  def vars(self) -> NestedMap:
    """The cell's layers' variables, nested like its theta."""
    return NestedMap(sub=[layer.vars for layer in self.sub])

  @property
  def theta(self) -> NestedMap:
    return self.vars

  def FProp(self, theta: NestedMap, *inputs: Any) -> Any:
    return combinators.ChainFProp(self.sub, theta.sub, inputs)


class PipeliningLayer(base_layer.BaseLayer):
  """Sequential layers split into K cells on K devices, run as a GPipe pipeline."""

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('cell_tpl', None, 'A list of layer Params, one per cell (cell k '
             'feeds cell k+1). Give this or `layers`.')
    p.Define('layers', None, 'A flat list of sequential layer Params, split '
             'into num_partitions cells by partition_method or balance.')
    p.Define('num_partitions', 1, 'K, the number of cells when `layers` is '
             'given.')
    p.Define('partition_method', 'params', 'How `layers` is balanced: '
             "'params' (parameter count), 'flops' (every layer's FPropMeta), "
             "'time' or 'memory' (profiled on the cells' devices; these need "
             'only FProp).')
    p.Define('balance', None, 'Explicit number of layers per cell (overrides '
             'partition_method), e.g. [3, 5].')
    p.Define('input_shapes', None, 'Shapes of FProp inputs (a list, one per '
             'argument, batch included), needed by the flops/time/memory '
             'partition methods and for a static FLOPs report.')
    p.Define('num_micro_batches', 1, 'M, the number of micro-batches a batch '
             'is split into (sizes differ by at most one); an integer >= 1.')
    p.Define('micro_batch_size', None, 'If set, cut the batch into '
             'micro-batches of this size (last may be smaller) instead of M; '
             'then leave num_micro_batches at 1.')
    p.Define('batch_dim', 0, 'The batch dimension of every input and output.')
    p.Define('recompute', 'always', 'Re-materialization: '
             f'{", ".join(recompute.RECOMPUTE_MODES)}.')
    p.Define('input_grads_first', False, 'Speed for memory: in the backward, '
             'each cell computes the gradient the previous cell waits for '
             'before its weight gradients, so that stage starts sooner (2 '
             'worker stages, M=4: a 9% shorter step), but it holds all its '
             "layers' intermediate gradients of a micro-batch until then (a "
             'higher peak; bench/README.md). False: the memory-lean backward.')
    p.Define('schedule', 'gpipe', "The order of each cell's tasks: "
             "'gpipe' (fill-drain: all forwards, then all backwards), "
             "'1f1b' (one forward, one backward: cell k keeps at most "
             'min(M, K-k) micro-batches where fill-drain keeps M, with the '
             "same bubble) or 'zero_bubble_h1' (1F1B with each backward "
             'split: the input gradient the previous cell waits for first, '
             'the weight gradients delayed to fill the drain; a third of '
             "1F1B's bubble when tasks take equal time, at 1F1B's peak of K "
             'micro-batches kept; not with jit_compile). Both start '
             'backwards before the last forward, so they train only with '
             'the loss inside the pipeline, FPropLoss '
             '(task.loss_inside_pipeline=True), on the unrolled executor. '
             'Eval runs the forwards alike.')
    p.Define('cells_per_device', 1, "V, with schedule='interleaved_1f1b': "
             'the partitioner cuts num_partitions x V cells and cell c runs '
             'on device c mod num_partitions, so a micro-batch passes every '
             'device V times and the fill and drain are V times shorter: '
             'with equal task times the bubble is (K-1)/(V*M+K-1) for K = '
             'num_partitions devices, when M is a multiple of K. 1 for every '
             'other schedule.')
    p.Define('executor', 'auto', "How the schedule becomes a graph: "
             "'unrolled' (a copy of each cell per micro-batch; every recompute "
             "mode and schedule), 'loop' (two loops over clocks: build time "
             'and graph do not grow with M; fill-drain, every recompute '
             'mode, input_grads_first with recompute always only, not '
             "with placement_backend='tpu'; loop_executor.py) or 'auto' "
             '(the loop where the unrolled graph would hold more than '
             'max_unrolled_ops ops and the loop runs the pipeline, else '
             'unrolled; executor_choice.py).')
    p.Define('max_unrolled_ops', executor_choice.DEFAULT_MAX_UNROLLED_OPS,
             "executor='auto': the unrolled graph's estimated size (ops) above "
             'which the loop runs; the unrolled trace and first step cost '
             '0.7-1.1 ms an op here (bench/results/graph_build.md, '
             'graph_build_loop.md).')
    p.Define('clocks_per_iteration', 1, "executor='loop': clocks run per "
             'loop iteration; grows the graph as many times and, with '
             'small cells packing their weights (pack_weights), no longer '
             'shortens their step (loop_executor.py).')
    p.Define('skip_bubbles', True, "executor='loop': at a bubble clock a "
             'cell does nothing (a tf.cond) instead of computing on a '
             'one-row spare batch; faster in every case measured '
             '(Transformer blocks, K=8: 0.69x the step at M=8; K=128, M=32: '
             '0.16x; 16 × Dense(64), K=4: 0.57-0.73x) '
             '(bench/results/executor_step_loop_spare_row_vs_loop_*.md).')
    p.Define('pack_weights', True, "executor='loop': a cell in this "
             'process whose weights hold at most 2^20 elements carries them, '
             'and their gradient sums, through the loops as one tensor per '
             'dtype, not one loop variable each (packed_weights.py): the '
             'step 0.51-0.64x as long on 16 × Dense(64), K=4, 0.74-0.84x on '
             'narrow Transformer blocks (bench/results/executor_step_loop_unpacked_'
             'vs_loop_*.md). False: one each.')
    p.Define('jit_compile', False, "XLA compiles each cell's forward and "
             'backward (recomputation and gradients), each run on its '
             "cell's device; both executors, every recompute mode; not with "
             "input_grads_first or placement_backend='tpu' "
             '(bench/results/jit_compile.md).')
    p.Define('placement_backend', 'devices', "'devices' (local or remote "
             "TensorFlow device names) or 'tpu' (logical cores of the current "
             'TPUStrategy; build the layer under strategy.scope()).')
    p.Define('devices', None, 'Device names for cells, e.g. '
             "['/device:GPU:0', '/device:GPU:1'] or "
             "['/job:worker/task:0/device:CPU:0', ...]; None: this process's "
             'GPUs, else its CPU devices. Fewer devices than cells: round robin.')
    return p

  def __init__(self, params):
    super().__init__(params)
    p = self.params
    self._CheckParams()
    # Partition once: the time and memory methods profile every layer.
    self.balance = self.CellBalance(p)
    self.placement = self._MakePlacement(len(self.balance))
    # Refused here, at construction, rather than at the first FProp.
    pipeline.CheckJitCompile(
        p.jit_compile,
        pipeline.MakeSchedule(len(self.balance), 1, p.input_grads_first,
                              p.schedule, p.cells_per_device),
        self.placement)
    if p.cell_tpl is not None:
      # The user cut the model: its cells are its layers.
      cells = []
      for k, cp in enumerate(p.cell_tpl):
        with self.placement.CellScope(k):
          cells.append(self.CreateChild(f'cell_{k}', cp))
    else:
      cells = self._BuildLayersAndCells()
    # Untracked: a checkpoint reaches the layers (or cell_tpl's cells) through
    # their own names; a second path through `cells` could give them
    # cut-dependent keys.
    self.cells = self._no_dependency(cells)
    self._traced_input_shapes = None
    # What executor='auto' chose at the last trace (executor_choice.Choice).
    self.executor_choice: Optional[executor_choice.Choice] = None
    logging.info('%s', report_lib.FormatTable(self.Report()))

  # --- construction ------------------------------------------------------------

  def _BuildLayersAndCells(self) -> list[Cell]:
    """Builds `layers` on their cells' devices; returns the cells that chain them.

    Each layer is named by its place in `layers`: the path seeds its weights
    and dropout and names its variables and checkpoint keys, which must not
    change with the cut. A layer the cut splits (a Repeat cut between
    iterations) is built once, with piece i's weights on the device of the
    i-th cell that holds it; that cell runs `layer.Piece(i)`.
    """
    p = self.params
    self.segments = partition.CellSegments(self.balance,
                                           partition.NumUnits(p.layers))
    pieces = partition.PieceSizes(self.segments, len(p.layers))
    cells_of = [[k for k, cell in enumerate(self.segments)
                 for seg in cell if seg.layer == j]
                for j in range(len(p.layers))]
    layer_params = []
    for j, lp in enumerate(p.layers):
      if len(pieces[j]) > 1:
        lp = lp.Copy().Set(piece_sizes=pieces[j])
      layer_params.append(lp)

    def LayerScope(j: int) -> contextlib.ExitStack:
      stack = contextlib.ExitStack()
      stack.enter_context(self.placement.CellScope(cells_of[j][0]))
      if len(pieces[j]) > 1:
        stack.enter_context(repeat.PieceScopes(
            [lambda k=k: self.placement.CellScope(k) for k in cells_of[j]]))
      return stack

    layers = self.CreateChildren('layers', layer_params, child_scope=LayerScope)
    self._members = [
        [(seg.layer, None if seg.whole else cells_of[seg.layer].index(k))
         for seg in cell]
        for k, cell in enumerate(self.segments)]
    return [Cell(f'cell_{k}', [layers[j] if i is None else layers[j].Piece(i)
                               for j, i in members])
            for k, members in enumerate(self._members)]

  def _CheckParams(self) -> None:
    """Refuses, at construction, every Params value no call could run.

    Each error names the field, the value and what would be valid. Integral
    floats (num_micro_batches=2.0) are accepted and stored as ints.
    """
    p = self.params
    path = self.path
    if (p.cell_tpl is None) == (p.layers is None):
      raise hyperparams.ConfigError(f'{path}: give exactly one of cell_tpl (one Params '
                                    'per cell) and layers (a flat list to partition).')
    chosen = p.cell_tpl if p.cell_tpl is not None else p.layers
    if not isinstance(chosen, (list, tuple)) or not chosen:
      raise hyperparams.ConfigError(f'{path}: cell_tpl/layers must be a non-empty list '
                                    f'of layer Params, got {chosen!r}.')
    _CheckChoice(path, 'recompute', p.recompute, recompute.RECOMPUTE_MODES)
    _CheckChoice(path, 'partition_method', p.partition_method,
                 partition.PARTITION_METHODS)
    _CheckChoice(path, 'executor', p.executor, pipeline.EXECUTORS)
    _CheckChoice(path, 'schedule', p.schedule, tuple(pipeline.SCHEDULES))
    _CheckChoice(path, 'placement_backend', p.placement_backend,
                 PLACEMENT_BACKENDS)
    for field in ('input_grads_first', 'skip_bubbles', 'pack_weights',
                  'jit_compile'):
      _CheckBool(path, field, p.Get(field))
    if p.executor == 'loop' and p.placement_backend == 'tpu':
      raise _Refuse(path, 'executor', p.executor,
                    "'auto' or 'unrolled' with placement_backend='tpu' ("
                    f"{loop_executor.XLA_WHOLE_STEP}; 'auto' runs it "
                    'unrolled)')
    p.num_partitions = _CheckInt(path, 'num_partitions', p.num_partitions, 1,
                                 'the number of cells')
    p.max_unrolled_ops = _CheckInt(path, 'max_unrolled_ops',
                                   p.max_unrolled_ops, 0,
                                   "the unrolled graph's size in ops")
    p.cells_per_device = _CheckInt(path, 'cells_per_device',
                                   p.cells_per_device, 1,
                                   'cells per device (V)')
    if p.cells_per_device > 1:
      if p.schedule != 'interleaved_1f1b':
        raise _Refuse(path, 'cells_per_device', p.cells_per_device,
                      "1, or use schedule='interleaved_1f1b': schedule "
                      f'{p.schedule!r} runs one cell per device')
      if p.cell_tpl is not None:
        raise _Refuse(path, 'cells_per_device', p.cells_per_device,
                      '1 with cell_tpl (cut by hand: one cell per Params); '
                      'the interleaved cut is made from `layers`')
      if p.placement_backend == 'tpu':
        raise _Refuse(path, 'cells_per_device', p.cells_per_device,
                      "1 with placement_backend='tpu' (its cells take one "
                      "core each); use placement_backend='devices'")
    if p.cell_tpl is not None and p.num_partitions not in (1, len(p.cell_tpl)):
      raise _Refuse(path, 'num_partitions', p.num_partitions,
                    f'1 or {len(p.cell_tpl)}: with cell_tpl there is one cell '
                    'per Params, so num_partitions would be ignored')
    if p.balance is not None:
      if p.cell_tpl is not None:
        raise _Refuse(path, 'balance', p.balance,
                      'None with cell_tpl (one cell per Params); balance '
                      'cuts `layers`')
      if not isinstance(p.balance, (list, tuple)) or not p.balance:
        raise _Refuse(path, 'balance', p.balance,
                      'None or a non-empty list of layers per cell, e.g. [3, 5]')
      p.balance = [_CheckInt(path, f'balance[{i}]', b, 1,
                             f'layers in cell {i}; every cell needs one')
                   for i, b in enumerate(p.balance)]
    p.num_micro_batches = _CheckInt(path, 'num_micro_batches',
                                    p.num_micro_batches, 1,
                                    'M, the number of micro-batches')
    if p.micro_batch_size is not None:
      p.micro_batch_size = _CheckInt(
          path, 'micro_batch_size', p.micro_batch_size, 1,
          'examples per micro-batch; or None to use num_micro_batches')
      if p.num_micro_batches != 1:
        raise hyperparams.ConfigError(
            f'{path}: num_micro_batches={p.num_micro_batches} and '
            f'micro_batch_size={p.micro_batch_size} are both set, and one '
            'would be ignored; valid: either num_micro_batches (M '
            'micro-batches, micro_batch_size=None) or micro_batch_size (with '
            'num_micro_batches left at 1).')
    p.batch_dim = _CheckInt(path, 'batch_dim', p.batch_dim, 0,
                            'the batch dimension of every input and output')
    p.clocks_per_iteration = _CheckInt(path, 'clocks_per_iteration',
                                       p.clocks_per_iteration, 1,
                                       'clocks run per loop iteration')
    if p.devices is not None and (
        not isinstance(p.devices, (list, tuple)) or
        not all(isinstance(d, str) for d in p.devices)):
      raise _Refuse(path, 'devices', p.devices,
                    "None or a list of device names, e.g. ['/device:GPU:0']")

  @classmethod
  def CellBalance(cls, p) -> list[int]:
    """Layers per cell: from cell_tpl, balance, or the partition method.

    A Repeat counts as its iterations (partition.py's units), so a cell may
    hold part of one.
    """
    if p.cell_tpl is not None:
      return [1] * len(p.cell_tpl)
    units = partition.NumUnits(p.layers)
    num_cells = cls.NumCells(p)
    cut = (f'num_partitions={p.num_partitions} x cells_per_device='
           f'{p.cells_per_device} = {num_cells} cells' if p.cells_per_device > 1
           else f'num_partitions={p.num_partitions}')
    if p.balance is not None:
      if len(p.balance) != num_cells and p.num_partitions != 1:
        raise hyperparams.ConfigError(f'balance={p.balance} has {len(p.balance)} cells but '
                                      f'{cut}.')
      return partition.ValidateBalance(p.balance, sum(units))
    if num_cells > sum(units):
      raise hyperparams.ConfigError(f'{cut} exceeds the '
                                    f'{sum(units)} layers; each cell needs a layer.')
    costs = partition.UnitCosts(cls.LayerCosts(p), units)
    return partition.Balance(costs, num_cells)

  @staticmethod
  def NumCells(p) -> int:
    """K·V cells: num_partitions devices' worth, cells_per_device each."""
    if p.cell_tpl is not None:
      return len(p.cell_tpl)
    return p.num_partitions * p.cells_per_device

  @classmethod
  def LayerCosts(cls, p) -> list[float]:
    method = p.partition_method
    if method in ('params', 'flops'):
      shapes = None if p.input_shapes is None else tuple(
          base_layer.ToShape(tuple(p.input_shapes)))
      return partition.StaticLayerCosts(p.layers, method, shapes)
    if p.input_shapes is None:
      raise hyperparams.ConfigError(f"partition_method={method!r} profiles each layer and "
                                    'needs input_shapes (one shape per FProp argument).')
    device = (p.devices or placement_lib.LocalDevices())[0]
    return profile.ProfileLayers(p.layers, method, tuple(p.input_shapes),
                                 device=device)

  @classmethod
  def _CellParamsOf(cls, p, balance: Optional[list[int]] = None) -> list:
    """Params of each cell: cell_tpl, or Sequentials over the balanced layers."""
    if p.cell_tpl is not None:
      return list(p.cell_tpl)
    balance = balance or cls.CellBalance(p)
    segments = partition.CellSegments(balance, partition.NumUnits(p.layers))
    return [combinators.Sequential.Params().Set(
        name=f'cell_{k}', sub=[cls._SegmentParams(p, seg) for seg in cell])
            for k, cell in enumerate(segments)]

  @classmethod
  def _SegmentParams(cls, p, seg: partition.Segment):
    """Params of the part of layer seg.layer a cell holds (all, or a piece)."""
    lp = p.layers[seg.layer]
    return lp if seg.whole else lp.cls.PieceParams(lp, seg.start, seg.stop)

  def _MakePlacement(self, num_cells: int) -> placement_lib.Placement:
    p = self.params
    if p.placement_backend == 'tpu':
      strategy = tf.distribute.get_strategy()
      if not isinstance(strategy, tf.distribute.TPUStrategy):
        raise hyperparams.ConfigError(
            f"{self.path}: placement_backend='tpu' needs a "
            'tf.distribute.TPUStrategy scope, found '
            f'{type(strategy).__module__}.{type(strategy).__name__} (the '
            'deprecated tf.distribute.experimental.TPUStrategy is not one). '
            'Build the layer under '
            'placement.MakeTpuStrategy(tpu, num_cells).scope().')
      return placement_lib.TpuPlacement(num_cells, strategy)
    devices = self.CellDevices(p, num_cells) or placement_lib.LocalDevices()
    return placement_lib.DevicePlacement(num_cells, devices)

  @staticmethod
  def CellDevices(p, num_cells: int) -> list[str]:
    """Per cell, its device name ([] if none given): round robin over
    `devices`, and with cells_per_device V > 1, cell c on the device of
    c mod num_partitions."""
    devices = list(p.devices or [])
    if p.cells_per_device > 1 and not devices:
      devices = placement_lib.LocalDevices()
    if not devices:
      return []
    stride = p.num_partitions if p.cells_per_device > 1 else num_cells
    return [devices[(c % stride) % len(devices)] for c in range(num_cells)]

  # --- computation ---------------------------------------------------------------

  def MicroBatchSizes(self, inputs: Any) -> list[int]:
    """Micro-batch sizes for `inputs`; a leaf that is no tensor is named."""
    p = self.params
    batch = microbatch.BatchSize(inputs, p.batch_dim, name='inputs')
    if p.micro_batch_size is not None:
      return microbatch.MicroBatchSizes(batch, micro_batch_size=p.micro_batch_size)
    return microbatch.MicroBatchSizes(batch, num_micro_batches=p.num_micro_batches)

  def CellTheta(self, theta: NestedMap, k: int) -> NestedMap:
    """Cell k's theta (what `cells[k].FProp` takes) from this layer's theta."""
    if self.params.cell_tpl is not None:
      return theta[f'cell_{k}']
    return NestedMap(sub=[
        theta.layers[j] if i is None else
        self.layers[j].PieceTheta(theta.layers[j], i)
        for j, i in self._members[k]])

  def SequentialLayers(self, theta: NestedMap) -> list[tuple[Any, NestedMap, Any]]:
    """(layer, its theta, scope) of each layer FProp runs, in order.

    For running the layers one at a time on the whole batch outside the
    pipeline (inference loops such as step-by-step decoding): run
    `layer.FProp(theta, x)` inside `scope()`, its cell's placement scope, so
    it runs where its weights are; outside it, every call would copy them to
    the default device. A Repeat cut between cells appears once per piece;
    with cell_tpl each cell is one layer.
    """
    out = []
    for k, cell in enumerate(self.cells):
      cell_theta = self.CellTheta(theta, k)
      scope = lambda k=k: self.placement.CellScope(k)
      if self.params.cell_tpl is not None:
        out.append((cell, cell_theta, scope))
      else:
        out += [(layer, layer_theta, scope)
                for layer, layer_theta in zip(cell.sub, cell_theta.sub)]
    return out

  # Nothing here or in what it calls needs autograph (RunPipeline runs the
  # cells unconverted already); converted, its Python helpers cost a traced
  # step in a default tf.function 1.1-2 s (16 x Dense(64), K=4,
  # bench/results/graph_build_autograph.md).
  @tf.autograph.experimental.do_not_convert
  def FProp(self, theta: NestedMap, *inputs: Any) -> Any:
    p = self.params
    # The first layer gets FProp(theta, *inputs), as in a Sequential: one
    # argument that is itself a tuple stays one argument (boundary.py).
    x = (inputs[0] if len(inputs) == 1 and not isinstance(inputs[0], tuple)
         else tuple(inputs))
    sizes = self.MicroBatchSizes(x)  # first: it names a leaf that is no tensor
    self._traced_input_shapes = tuple(tf.nest.map_structure(
        lambda t: None if t is None else t.shape, inputs))
    thetas = [self.CellTheta(theta, k) for k in range(len(self.cells))]
    schedule = self.Schedule(len(sizes))
    if not schedule.RunsAllForwardsFirst():
      if base_layer.CurrentContext().training:
        raise hyperparams.ConfigError(
            f"{self.path}: schedule={p.schedule!r} starts a backward before "
            "the last forward, so a caller's tape around FProp cannot train "
            'it: compute the loss inside the pipeline with FPropLoss (a '
            'task: task.loss_inside_pipeline=True), or use '
            "schedule='gpipe'.")
      # Without training, only the forwards run: their order is fill-drain's.
      schedule = pipeline.MakeSchedule(len(self.cells), len(sizes))
    return pipeline.RunPipeline(self.cells, thetas, x, sizes, self.placement,
                                recompute=p.recompute, batch_dim=p.batch_dim,
                                schedule=schedule,
                                executor=p.executor,
                                clocks_per_iteration=p.clocks_per_iteration,
                                skip_bubbles=p.skip_bubbles,
                                pack_weights=p.pack_weights,
                                jit_compile=p.jit_compile,
                                max_unrolled_ops=p.max_unrolled_ops,
                                on_choice=self.RecordChoice)

  def RecordChoice(self, choice: executor_choice.Choice) -> None:
    """Keeps what executor='auto' chose at the last trace (executor_choice),
    or what the trainer's executor trial kept (executor_trial.py).

    Untracked, as `cells`: a checkpoint holds weights only.
    """
    self.executor_choice = self._no_dependency(choice)

  @tf.autograph.experimental.do_not_convert
  def FPropLoss(self, theta: NestedMap, inputs: Any, targets: Any,
                loss_fn: pipelined_loss.LossFn) -> NestedMap:
    """The batch's metrics, with the loss computed inside the pipeline.

    `loss_fn(outputs, targets)` runs on each micro-batch's outputs (and
    its slice of `targets`, cut like `inputs`) on the last cell, right after
    that micro-batch's forward, and returns NestedMap name -> (value,
    weight) with a 'loss'; the result combines them by weight, and a
    caller's GradientTape around this call gets the gradients of the loss
    (pipelined_loss.py). `inputs` is FProp's single argument (a tuple for
    several).
    """
    p = self.params
    sizes = self.MicroBatchSizes(inputs)
    self._traced_input_shapes = tuple(tf.nest.map_structure(
        lambda t: None if t is None else t.shape, (inputs,)))
    thetas = [self.CellTheta(theta, k) for k in range(len(self.cells))]
    return pipelined_loss.RunPipelineLoss(
        self.cells, thetas, inputs, targets, loss_fn, sizes, self.placement,
        recompute=p.recompute, batch_dim=p.batch_dim,
        schedule=self.Schedule(len(sizes)), executor=p.executor,
        jit_compile=p.jit_compile)

  def Schedule(self, num_micro_batches: int) -> schedule_lib.Schedule:
    """The order in which each cell runs its tasks for M micro-batches.

    The one schedule the executor runs, the report's bubble and the
    TensorBoard picture come from.
    """
    return pipeline.MakeSchedule(len(self.cells), num_micro_batches,
                                 self.params.input_grads_first,
                                 self.params.schedule,
                                 self.params.cells_per_device)

  def OutputScope(self) -> contextlib.AbstractContextManager:
    """The last cell's scope: where the pipeline's outputs are."""
    return self.placement.CellScope(len(self.cells) - 1)

  # --- static size, cost and report --------------------------------------------

  @classmethod
  def _AllLayers(cls, p) -> list:
    return list(p.cell_tpl if p.cell_tpl is not None else p.layers)

  @classmethod
  def NumParams(cls, p) -> int:
    return sum(l.cls.NumParams(l) for l in cls._AllLayers(p))

  @classmethod
  def FPropMeta(cls, p, *input_shapes):
    return combinators.ChainMeta(cls._AllLayers(p), input_shapes)

  @classmethod
  def StaticReport(cls, p, input_shapes: Any = None,
                   balance: Optional[list[int]] = None) -> NestedMap:
    """Where every layer goes, from Params alone: per cell layers, params, FLOPs.

    Parameters per cell are always known. FLOPs need input shapes and every
    layer's FPropMeta; without them they are None from the first cell that
    cannot be counted on, and `flops_unknown` says why. So a pipeline cut by
    'params', 'time' or 'memory' needs only FProp on its layers.

    Args:
      p: PipeliningLayer Params.
      input_shapes: shapes of FProp's inputs (whole batch); default
        p.input_shapes. Without them FLOPs are None.
      balance: layers per cell if already partitioned (else partitions p).
    """
    if input_shapes is None and p.input_shapes is not None:
      input_shapes = tuple(base_layer.ToShape(tuple(p.input_shapes)))
    shapes = None if input_shapes is None else tuple(input_shapes)
    flops_unknown = None if shapes is not None else (
        'no input shapes (set input_shapes, or call FProp once)')
    balance = balance or cls.CellBalance(p)
    devices = cls.CellDevices(p, len(balance)) if p.devices else []
    cells = []
    segments = (None if p.layers is None else partition.CellSegments(
        balance, partition.NumUnits(p.layers)))
    for k, cp in enumerate(cls._CellParamsOf(p, balance)):
      if segments is None:
        names, first, count = [cp.name], k, 1
        parts = [cp]
      else:
        names = [cls._SegmentName(p, seg) for seg in segments[k]]
        first, count = segments[k][0].layer, balance[k]
        parts = [cls._SegmentParams(p, seg) for seg in segments[k]]
      info = NestedMap(cell=k, first_layer=first, num_layers=count,
                       layer_names=names, num_params=cp.cls.NumParams(cp),
                       device=devices[k] if devices else None,
                       flops=None, peak_bytes=None)
      if shapes is not None:
        try:
          meta = partition.LayerMeta(cp, *shapes)
          info.flops = meta.flops
          shapes = tuple(meta.out_shapes)
        except partition.NoMetaError as e:
          flops_unknown = cls._NoMetaLayer(parts, shapes) or e.reason
          shapes = None
      cells.append(info)
    m = p.num_micro_batches if p.micro_batch_size is None else None
    k = len(cells)
    return NestedMap(
        num_cells=k, num_micro_batches=m, recompute=p.recompute,
        schedule=p.schedule, bubble_fraction=None if m is None else pipeline.MakeSchedule(
            k, m, p.input_grads_first, p.schedule,
            p.cells_per_device).TheoreticalBubble(),
        process_peak_bytes=None, flops_unknown=flops_unknown, cells=cells)

  @staticmethod
  def _NoMetaLayer(parts: Sequence[Any], shapes: tuple) -> Optional[str]:
    """Why the first of `parts` (a cell's layers, in turn) has no meta."""
    try:
      for _ in combinators.LayerMetas(
          parts, shapes, lambda i, lp, *s: partition.LayerMeta(lp, *s)):
        pass
    except partition.NoMetaError as e:
      return e.reason
    except ValueError:
      return None
    return None

  @classmethod
  def _SegmentName(cls, p, seg: partition.Segment) -> str:
    name = p.layers[seg.layer].name
    return name if seg.whole else f'{name}[{seg.start}:{seg.stop}]'

  def Report(self) -> NestedMap:
    """StaticReport plus each cell's device and the memory figures.

    FLOPs are per whole batch and need input_shapes or a first FProp. Peak
    memory is per device where the backend can tell (GPUs); logical CPU
    devices share one allocator, so for them only the process's peak is
    known (process_peak_bytes).
    """
    report = self.StaticReport(self.params, self._traced_input_shapes,
                               self.balance)
    for k, cell in enumerate(report.cells):
      cell.device = self.placement.Device(k)
      cell.peak_bytes = self.placement.PeakMemory(k)
    report.process_peak_bytes = placement_lib.AllocatorPeak('CPU:0')
    return report
