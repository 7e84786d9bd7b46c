"""Partitions a sequence of layers into K contiguous cells of balanced cost.

Invariant: `Balance(costs, K)` returns K positive cell sizes summing to
len(costs) whose most expensive cell costs the least possible (the optimal
bottleneck of a contiguous K-way split, found by bisection to within
`rel_tol`). The slowest (or largest) cell sets the pipeline's pace and memory,
so that is the quantity worth minimizing.

What is cut is a sequence of units: a layer is one unit, except a layer
that declares `NumUnits(p) > 1` (a Repeat: its iterations), which may be cut
between any two of its units and costs 1/NumUnits of its cost per unit. So
a Repeat of 1663 Transformer blocks spreads over 128 cells like 1663 listed
blocks would. `CellSegments` says which (layer, units) each cell holds.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core.layers import combinators

PARTITION_METHODS = ('params', 'flops', 'time', 'memory')


class NoMetaError(hyperparams.ConfigError):
  """A layer's FPropMeta gave no meta; `reason` names the layer and why."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def LayerMeta(p: base_layer.Params, *input_shapes: Any) -> Any:
  """p's FPropMeta, or NoMetaError naming the layer if it has none.

  Only the FLOPs figures and the 'flops' method need FPropMeta; 'params',
  'time' and 'memory' need only FProp, so callers can degrade on NoMetaError.
  A layer without its own FPropMeta inherits BaseLayer's, which raises
  TypeError; one may also raise NotImplementedError.
  """
  try:
    return p.cls.FPropMeta(p, *input_shapes)
  except (NotImplementedError, TypeError) as e:
    own = getattr(p.cls.FPropMeta, '__func__', None)
    if own is base_layer.BaseLayer.FPropMeta.__func__:
      reason = f'layer {p.name!r} ({p.cls.__name__}) has no FPropMeta'
    else:
      reason = (f'FPropMeta of layer {p.name!r} ({p.cls.__name__}) raised '
                f'{type(e).__name__}: {e}')
    raise NoMetaError(reason) from e


def ValidateBalance(balance: Sequence[int], num_layers: int,
                    source: str = 'balance') -> list[int]:
  """Checks an explicit balance (cell sizes) against the number of layers."""
  balance = list(balance)
  if not balance:
    raise hyperparams.ConfigError(
        f'{source} is empty; give one layer count per cell.')
  bad = [b for b in balance if not isinstance(b, int) or b < 1]
  if bad:
    raise hyperparams.ConfigError(
        f'{source}={balance}: every cell needs a positive integer number of '
        f'layers, got {bad}.')
  if sum(balance) != num_layers:
    raise hyperparams.ConfigError(
        f'{source}={balance} sums to {sum(balance)}, but there are '
        f'{num_layers} layers; the sizes must sum to {num_layers}.')
  return balance


def _Greedy(costs: Sequence[float], cap: float) -> Optional[list[int]]:
  """Fewest contiguous cells with cost <= cap each (None if a layer exceeds it)."""
  sizes, current, count = [], 0.0, 0
  for c in costs:
    if c > cap:
      return None
    if count and current + c > cap:
      sizes.append(count)
      current, count = 0.0, 0
    current += c
    count += 1
  sizes.append(count)
  return sizes


def _SplitToCount(sizes: list[int], k: int) -> list[int]:
  """Splits cells until there are k (never raises any cell's cost)."""
  sizes = list(sizes)
  while len(sizes) < k:
    i = max(range(len(sizes)), key=lambda j: sizes[j])
    half = sizes[i] // 2
    sizes[i:i + 1] = [sizes[i] - half, half]
  return sizes


def Balance(costs: Sequence[float], num_partitions: int,
            rel_tol: float = 1e-9) -> list[int]:
  """Cell sizes that minimize the largest cell's summed cost.

  Args:
    costs: a non-negative cost per layer, in order.
    num_partitions: K, the number of cells; 1 <= K <= len(costs).
    rel_tol: bisection stops when the bound is this close to the optimum.

  Returns:
    K positive sizes summing to len(costs).
  """
  n = len(costs)
  if num_partitions < 1:
    raise hyperparams.ConfigError(
        f'num_partitions must be >= 1, got {num_partitions}.')
  if num_partitions > n:
    raise hyperparams.ConfigError(
        f'num_partitions={num_partitions} exceeds the number of layers '
        f'({n}); each cell needs at least one layer.')
  if any(c < 0 for c in costs):
    raise ValueError(f'Layer costs must be >= 0, got {list(costs)}.')
  lo, hi = max(costs), float(sum(costs))
  best = _Greedy(costs, hi)
  while hi - lo > rel_tol * max(hi, 1e-30):
    mid = (lo + hi) / 2
    sizes = _Greedy(costs, mid)
    if sizes is not None and len(sizes) <= num_partitions:
      hi, best = mid, sizes
    else:
      lo = mid
  # The bisection's bound may sit a hair below the optimum; take the feasible
  # split found for `hi`, which is within rel_tol of it.
  final = _Greedy(costs, hi)
  if final is not None and len(final) <= num_partitions:
    best = final
  return _SplitToCount(best, num_partitions)


def CellSlices(sizes: Sequence[int]) -> list[slice]:
  """Which layers each cell holds: cell k is layers[CellSlices(sizes)[k]]."""
  out, start = [], 0
  for s in sizes:
    out.append(slice(start, start + s))
    start += s
  return out


def NumUnits(layer_params: Sequence[base_layer.Params]) -> list[int]:
  """Units of each layer: its NumUnits(p) (a Repeat's iterations), else 1."""
  return [int(p.cls.NumUnits(p)) for p in layer_params]


def UnitCosts(layer_costs: Sequence[float],
              units: Sequence[int]) -> list[float]:
  """Per-unit costs: layer j's cost split evenly over its units[j] units."""
  return [float(c) / u for c, u in zip(layer_costs, units) for _ in range(u)]


class Segment(NamedTuple):
  """Units [start, stop) of layer `layer`, held by one cell; whole: all of them."""
  layer: int
  start: int
  stop: int
  whole: bool


def CellSegments(sizes: Sequence[int],
                 units: Sequence[int]) -> list[list[Segment]]:
  """Per cell, the runs of units it holds: cell k gets sizes[k] units in order.

  Args:
    sizes: units per cell (from Balance over UnitCosts), summing to
      sum(units).
    units: units per layer (NumUnits).
  """
  owner = [(j, t) for j, u in enumerate(units) for t in range(u)]
  cells = []
  for cell in CellSlices(sizes):
    segments: list[Segment] = []
    for j, t in owner[cell]:
      if segments and segments[-1].layer == j:
        segments[-1] = segments[-1]._replace(stop=t + 1)
      else:
        segments.append(Segment(j, t, t + 1, False))
    cells.append([seg._replace(whole=seg.stop - seg.start == units[seg.layer])
                  for seg in segments])
  return cells


def PieceSizes(segments: Sequence[Sequence[Segment]],
               num_layers: int) -> list[list[int]]:
  """Per layer, the sizes of the pieces the cells cut it into, in order."""
  pieces: list[list[int]] = [[] for _ in range(num_layers)]
  for cell in segments:
    for seg in cell:
      pieces[seg.layer].append(seg.stop - seg.start)
  return pieces


def CellCosts(costs: Sequence[float], sizes: Sequence[int]) -> list[float]:
  """Summed cost of each cell."""
  return [float(sum(costs[cell])) for cell in CellSlices(sizes)]


def StaticLayerCosts(layer_params: Sequence[base_layer.Params], method: str,
                     input_shapes: Any = None) -> list[float]:
  """Per-layer cost from Params alone: 'params' (NumParams) or 'flops'.

  'flops' chains FPropMeta through the layers, starting from `input_shapes`
  (the shapes one micro-batch gives the first layer, as a tuple of FProp
  arguments); a layer without FPropMeta is refused by name.
  """
  if method == 'params':
    return [float(p.cls.NumParams(p)) for p in layer_params]
  if method == 'flops':
    if input_shapes is None:
      raise hyperparams.ConfigError(
          "partition_method='flops' needs the input shapes of the first "
          'layer (Params field input_shapes).')
    try:
      return [float(meta.flops) for meta in combinators.LayerMetas(
          layer_params, input_shapes,
          lambda i, p, *shapes: LayerMeta(p, *shapes))]
    except NoMetaError as e:
      raise NoMetaError(
          f"partition_method='flops' counts FLOPs with each layer's "
          f"FPropMeta, but {e.reason}. Use partition_method='params', "
          "'time' or 'memory' instead: they need only FProp.") from e
  raise ValueError(f'StaticLayerCosts handles params and flops, not '
                   f'{method!r}; time and memory are profiled on a device.')
