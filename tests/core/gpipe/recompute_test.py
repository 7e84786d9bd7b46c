"""Tests of re-materialization: recomputed gradients equal kept ones, in the forward's mode."""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe import recompute
from lingvo_gpipe.core.layers import combinators
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.layers import dropout


def test_which_micro_batches_recompute():
  assert [recompute.Recomputes('always', m, 3) for m in range(3)] == [True] * 3
  assert [recompute.Recomputes('except_last', m, 3) for m in range(3)] == [
      True, True, False]
  assert not recompute.Recomputes('never', 0, 3)
  with pytest.raises(ValueError, match="'sometimes'; valid: always"):
    recompute.CheckMode('sometimes')


def _Cell():
  return combinators.Sequential.Params().Set(name='cell', sub=[
      dense.Dense.Params().Set(name='fc', input_dim=4, output_dim=4,
                               activation='tanh'),
      dropout.Dropout.Params().Set(name='drop', keep_prob=0.5),
  ]).Instantiate()


def test_recomputed_gradients_equal_kept_ones_with_the_same_dropout_mask():
  cell = _Cell()
  theta = cell.ReadTheta()
  x = tf.random.stateless_normal([3, 4], seed=[1, 2])
  dy = tf.random.stateless_normal([3, 4], seed=[3, 4])
  with base_layer.Context(training=True, step=7):
    runner = recompute.CellRunner(cell, theta, base_layer.CurrentContext(),
                                  base_layer.StatsCollector())
    y, tape = runner.Forward(2, x, keep=True)
    kept = runner.Backward(2, x, dy, (tape, y), input_grad_first=False)
  # Outside the Context, as a caller's tape.gradient would be.
  recomputed = runner.Backward(2, x, dy, None, input_grad_first=False)
  for a, b in zip(tf.nest.flatten(kept), tf.nest.flatten(recomputed)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  other_micro_batch = runner.Backward(3, x, dy, None, input_grad_first=False)
  assert not np.allclose(other_micro_batch[1], recomputed[1])  # new mask
