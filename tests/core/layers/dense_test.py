"""Tests of Dense, FeedForward and activations: numerics and static estimates."""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core.layers import activations
from lingvo_gpipe.core.layers import dense
from tests.support import test_utils


@pytest.mark.parametrize('shape,has_bias,act', [
    ([3, 5], True, 'relu'), ([2, 4, 5], False, 'none'), ([1, 2, 3, 5], True,
                                                         'gelu')])
def test_dense_matches_numpy_and_meta(shape, has_bias, act):
  p = dense.Dense.Params().Set(input_dim=5, output_dim=7, has_bias=has_bias,
                               activation=act)
  x = tf.random.stateless_normal(shape, [1, 2])
  layer, y = test_utils.CheckLayer(p, x)
  expected = np.tensordot(x.numpy(), layer.vars.w.numpy(), axes=1)
  if has_bias:
    expected += layer.vars.b.numpy()
  expected = activations.GetFn(act)(tf.constant(expected)).numpy()
  np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_dense_flops_by_hand():
  p = dense.Dense.Params().Set(input_dim=5, output_dim=7, activation='relu')
  # 8 rows × 7 outputs × (5 multiply-adds·2 + 1 bias + 1 relu).
  assert dense.Dense.FPropMeta(p, [2, 4, 5]).flops == 8 * 7 * 12


def test_dense_rejects_wrong_input_dim_and_bad_activation():
  p = dense.Dense.Params().Set(input_dim=5, output_dim=7)
  with pytest.raises(ValueError, match='last dim is 6, but input_dim is 5'):
    p.Instantiate().FPropDefaultTheta(tf.ones([2, 6]))
  with pytest.raises(ValueError, match='last dim is 6'):
    dense.Dense.FPropMeta(p, [2, 6])
  with pytest.raises(ValueError, match="'rleu'.*Did you mean: relu"):
    p.Copy().Set(activation='rleu').Instantiate()
  with pytest.raises(ValueError, match='must be > 0'):
    dense.Dense.Params().Instantiate()


def test_feed_forward_composes_two_dense_layers():
  p = dense.FeedForward.Params().Set(input_dim=4, hidden_dim=16)
  x = tf.random.stateless_normal([2, 3, 4], [3, 4])
  layer, y = test_utils.CheckLayer(p, x)
  manual = layer.outer.FPropDefaultTheta(layer.inner.FPropDefaultTheta(x))
  np.testing.assert_allclose(y.numpy(), manual.numpy())
  assert dense.FeedForward.NumParams(p) == 4 * 16 + 16 + 16 * 4 + 4
  # The children of ChildParams, under the names checkpoints hold.
  assert list(layer.children_layers) == ['inner', 'outer']
  named = dense.FeedForward.Params().Set(name='ff', input_dim=4,
                                         hidden_dim=16).Instantiate()
  assert sorted(v.name for v in named.variables) == [
      'ff.inner.b:0', 'ff.inner.w:0', 'ff.outer.b:0', 'ff.outer.w:0']


def test_activation_layer():
  p = activations.Activation.Params().Set(activation='relu6')
  _, y = test_utils.CheckLayer(p, tf.constant([[-1.0, 3.0, 9.0]]))
  assert y.numpy().tolist() == [[0.0, 3.0, 6.0]]
  with pytest.raises(ValueError, match='Valid: gelu, none, relu'):
    activations.GetFn('bogus')
