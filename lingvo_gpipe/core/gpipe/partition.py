"""Partitions a sequence of layers into K contiguous cells of balanced cost.

Invariant: `Balance(costs, K)` returns K positive cell sizes summing to
len(costs) whose most expensive cell costs the least possible (the optimal
bottleneck of a contiguous K-way split, found by bisection to within
`rel_tol`). The slowest (or largest) cell sets the pipeline's pace and memory,
so that is the quantity worth minimizing.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from lingvo_gpipe.core import base_layer

PARTITION_METHODS = ('params', 'flops', 'time', 'memory')


def ValidateBalance(balance: Sequence[int], num_layers: int,
                    source: str = 'balance') -> list[int]:
  """Checks an explicit balance (cell sizes) against the number of layers."""
  balance = list(balance)
  if not balance:
    raise ValueError(f'{source} is empty; give one layer count per cell.')
  bad = [b for b in balance if not isinstance(b, int) or b < 1]
  if bad:
    raise ValueError(f'{source}={balance}: every cell needs a positive integer '
                     f'number of layers, got {bad}.')
  if sum(balance) != num_layers:
    raise ValueError(f'{source}={balance} sums to {sum(balance)}, but there are '
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
    raise ValueError(f'num_partitions must be >= 1, got {num_partitions}.')
  if num_partitions > n:
    raise ValueError(f'num_partitions={num_partitions} exceeds the number of '
                     f'layers ({n}); each cell needs at least one layer.')
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


def CellCosts(costs: Sequence[float], sizes: Sequence[int]) -> list[float]:
  """Summed cost of each cell."""
  return [float(sum(costs[cell])) for cell in CellSlices(sizes)]


def StaticLayerCosts(layer_params: Sequence[base_layer.Params], method: str,
                     input_shapes: Any = None) -> list[float]:
  """Per-layer cost from Params alone: 'params' (NumParams) or 'flops'.

  'flops' chains FPropMeta through the layers, starting from `input_shapes`
  (the shapes one micro-batch gives the first layer, as a tuple of FProp
  arguments).
  """
  if method == 'params':
    return [float(p.cls.NumParams(p)) for p in layer_params]
  if method == 'flops':
    if input_shapes is None:
      raise ValueError("partition_method='flops' needs the input shapes of the "
                       'first layer (Params field input_shapes).')
    costs, shapes = [], tuple(input_shapes)
    for p in layer_params:
      meta = p.cls.FPropMeta(p, *shapes)
      costs.append(float(meta.flops))
      shapes = tuple(meta.out_shapes)
    return costs
  raise ValueError(f'StaticLayerCosts handles params and flops, not '
                   f'{method!r}; time and memory are profiled on a device.')
