"""Tests of the partitioner: optimal bottleneck, exact sizes, clear errors."""

import itertools
import random

import pytest

from lingvo_gpipe.core.gpipe import partition


def _OptimalBottleneck(costs, k):
  """Brute force over all contiguous K-way splits."""
  n, best = len(costs), float('inf')
  for cuts in itertools.combinations(range(1, n), k - 1):
    bounds = (0,) + cuts + (n,)
    best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])))
  return best


@pytest.mark.parametrize('seed', range(20))
def test_balance_reaches_the_optimal_bottleneck(seed):
  rng = random.Random(seed)
  n = rng.randint(2, 10)
  k = rng.randint(1, n)
  costs = [rng.choice([0.0, rng.uniform(0, 10), float(rng.randint(1, 5))])
           for _ in range(n)]
  sizes = partition.Balance(costs, k)
  assert len(sizes) == k and sum(sizes) == n and min(sizes) >= 1
  got = max(partition.CellCosts(costs, sizes))
  assert got <= _OptimalBottleneck(costs, k) * (1 + 1e-8) + 1e-12


def test_balance_examples():
  assert partition.Balance([1] * 8, 4) == [2, 2, 2, 2]
  assert partition.Balance([8, 1, 1, 1, 1, 1, 1, 1, 1], 2) == [1, 8]
  assert partition.Balance([0, 0, 0], 3) == [1, 1, 1]


def test_balance_scales_to_giant_models():
  costs = [float(1 + (i % 7)) for i in range(1663)]
  sizes = partition.Balance(costs, 128)
  assert sum(sizes) == 1663 and len(sizes) == 128
  assert max(partition.CellCosts(costs, sizes)) <= sum(costs) / 128 + 7


def test_balance_errors():
  with pytest.raises(ValueError, match='num_partitions=4 exceeds the number of '
                     'layers \\(3\\)'):
    partition.Balance([1, 1, 1], 4)
  with pytest.raises(ValueError, match='>= 1'):
    partition.Balance([1, 1, 1], 0)
  with pytest.raises(ValueError, match='>= 0'):
    partition.Balance([1, -1], 1)


def test_validate_balance():
  assert partition.ValidateBalance([2, 1], 3) == [2, 1]
  with pytest.raises(ValueError, match='sums to 4, but there are 3 layers'):
    partition.ValidateBalance([2, 2], 3)
  with pytest.raises(ValueError, match='positive integer'):
    partition.ValidateBalance([3, 0], 3)
  with pytest.raises(ValueError, match='empty'):
    partition.ValidateBalance([], 3)


def test_units_cut_a_repeat_between_its_iterations():
  # Layers: one unit, a Repeat of 5 units, one unit; 3 cells of 2, 3, 2 units.
  units = [1, 5, 1]
  assert partition.UnitCosts([4.0, 10.0, 4.0], units) == [4.0] + [2.0] * 5 + [4.0]
  segments = partition.CellSegments([2, 3, 2], units)
  assert segments == [
      [partition.Segment(0, 0, 1, True), partition.Segment(1, 0, 1, False)],
      [partition.Segment(1, 1, 4, False)],
      [partition.Segment(1, 4, 5, False), partition.Segment(2, 0, 1, True)]]
  assert partition.PieceSizes(segments, 3) == [[1], [1, 3, 1], [1]]
  whole = partition.CellSegments([1, 6], units)
  assert whole[1][0] == partition.Segment(1, 0, 5, True)
