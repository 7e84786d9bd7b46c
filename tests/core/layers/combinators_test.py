"""Tests of Sequential, Residual and Parallel: each equals its sub-layers
composed by hand, and its estimates equal those of the layers it builds."""


import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.layers import attention
from lingvo_gpipe.core.layers import combinators
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.layers import dropout
from lingvo_gpipe.core.layers import normalization
from lingvo_gpipe.core.nested_map import NestedMap
from tests.support import test_utils


class _DenseOnX(base_layer.BaseLayer):
  """NestedMap(x, paddings) -> NestedMap(x=dense(x), paddings): a NestedMap layer."""

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('dim', 4, 'Size of x.')
    return p

  def __init__(self, params):
    super().__init__(params)
    self.CreateChild('fc', _Dense(self.params.dim, self.params.dim))

  def FProp(self, theta, inputs):
    return NestedMap(x=self.fc.FProp(theta.fc, inputs.x),
                     paddings=inputs.paddings)

  @classmethod
  def FPropMeta(cls, p, shapes):
    meta = dense.Dense.FPropMeta(_Dense(p.dim, p.dim), shapes.x)
    return base_layer.Meta(meta.flops, NestedMap(x=meta.out_shapes[0],
                                                 paddings=shapes.paddings))


class _Split(base_layer.BaseLayer):
  """x -> (x, 2x): a layer returning a tuple."""

  def FProp(self, theta, x):
    return x, 2.0 * x

  @classmethod
  def FPropMeta(cls, p, shape):
    shape = base_layer.ToShape(shape)
    return base_layer.Meta(shape.num_elements(), shape, shape)


class _Mul(base_layer.BaseLayer):
  """(a, b) -> a * b: a layer taking two inputs."""

  def FProp(self, theta, a, b):
    return a * b

  @classmethod
  def FPropMeta(cls, p, a, b):
    a = base_layer.ToShape(a)
    return base_layer.Meta(a.num_elements(), a)


def _Dense(i, o, act='relu'):
  return dense.Dense.Params().Set(input_dim=i, output_dim=o, activation=act)


def _X(shape, seed=1):
  return tf.random.stateless_normal(shape, [seed, 7])


def _Close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# --- Sequential --------------------------------------------------------------


def test_sequential_equals_layers_by_hand():
  p = combinators.Sequential.Params().Set(
      sub=[_Dense(4, 8), _Dense(8, 3, 'none')])
  x = _X([2, 4])
  layer, y = test_utils.CheckLayer(p, x)
  a, b = layer.sub
  _Close(y, b.FPropDefaultTheta(a.FPropDefaultTheta(x)))
  meta = combinators.Sequential.FPropMeta(p, [2, 4])
  assert meta.flops == (dense.Dense.FPropMeta(_Dense(4, 8), [2, 4]).flops +
                        dense.Dense.FPropMeta(_Dense(8, 3, 'none'), [2, 8]).flops)
  traced = tf.function(lambda v: layer.FProp(layer.theta, v))
  _Close(traced(x), y)


def test_sequential_splats_tuples_and_passes_nested_maps():
  p = combinators.Sequential.Params().Set(
      sub=[_Split.Params(), _Mul.Params()])
  x = _X([2, 3])
  _, y = test_utils.CheckLayer(p, x)
  _Close(y, 2.0 * x * x)

  p = combinators.Sequential.Params().Set(
      sub=[_DenseOnX.Params(), _DenseOnX.Params()])
  inputs = NestedMap(x=_X([2, 4]), paddings=tf.zeros([2]))
  layer, out = test_utils.CheckLayer(p, inputs)
  assert isinstance(out, NestedMap)
  _Close(out.x, layer.sub[1].fc.FPropDefaultTheta(
      layer.sub[0].fc.FPropDefaultTheta(inputs.x)))
  assert out.paddings is inputs.paddings


def test_sequential_errors():
  with pytest.raises(ValueError, match=r"Sequential 'sequential': sub must be "
                     r'a non-empty list of layer Params, got \[\]'):
    combinators.Sequential.Params().Instantiate()
  with pytest.raises(ValueError, match='non-empty'):
    combinators.Sequential.FPropMeta(combinators.Sequential.Params(), [2, 4])
  p = combinators.Sequential.Params().Set(sub=[_Dense(4, 8), _Dense(6, 2)])
  with pytest.raises(ValueError, match=r"sub\[1\] \(Dense 'dense'\).*last dim "
                     'is 8, but input_dim is 6'):
    combinators.Sequential.FPropMeta(p, [2, 4])
  with pytest.raises(ValueError, match='sub_1: input last dim is 8, but '
                     'input_dim is 6'):
    p.Instantiate().FPropDefaultTheta(_X([2, 4]))


# --- Residual ----------------------------------------------------------------


def test_residual_pre_norm_and_dropout_by_hand():
  p = combinators.Residual.Params().Set(
      pre_norm=normalization.LayerNorm.Params().Set(dim=4),
      sub=dense.FeedForward.Params().Set(input_dim=4, hidden_dim=8),
      dropout=dropout.Dropout.Params().Set(keep_prob=0.5))
  x = _X([2, 3, 4])
  layer, y = test_utils.CheckLayer(p, x)
  normed = layer.pre_norm.FPropDefaultTheta(x)
  _Close(y, x + layer.sub.FPropDefaultTheta(normed))
  with base_layer.Context(training=True, step=5):
    y_train = layer.FPropDefaultTheta(x)
    branch = layer.dropout.FPropDefaultTheta(layer.sub.FPropDefaultTheta(normed))
  _Close(y_train, x + branch)
  assert not np.allclose(y_train.numpy(), y.numpy())
  assert combinators.Residual.NumParams(p) == test_utils.CountTrainable(layer)
  meta = combinators.Residual.FPropMeta(p, [2, 3, 4])
  parts = [(normalization.LayerNorm, p.pre_norm), (dense.FeedForward, p.sub),
           (dropout.Dropout, p.dropout)]
  assert meta.flops == sum(c.FPropMeta(q, [2, 3, 4]).flops
                           for c, q in parts) + 2 * 3 * 4


def test_residual_passes_extra_inputs_to_sub():
  p = combinators.Residual.Params().Set(
      sub=attention.MultiHeadAttention.Params().Set(input_dim=4, num_heads=2))
  x = _X([2, 3, 4])
  paddings = tf.constant([[0, 0, 1], [0, 0, 0]], tf.float32)
  layer, y = test_utils.CheckLayer(
      p, x, None, paddings, meta_inputs=(x.shape, None, paddings.shape))
  _Close(y, x + layer.sub.FPropDefaultTheta(x, None, paddings))


def test_residual_adds_nested_maps():
  p = combinators.Residual.Params().Set(sub=_DenseOnX.Params())
  inputs = NestedMap(x=_X([2, 4]), paddings=tf.ones([2]))
  layer, out = test_utils.CheckLayer(p, inputs)
  _Close(out.x, inputs.x + layer.sub.fc.FPropDefaultTheta(inputs.x))
  _Close(out.paddings, 2.0 * inputs.paddings)


def test_residual_shape_mismatch():
  p = combinators.Residual.Params().Set(sub=_Dense(4, 3))
  with pytest.raises(ValueError, match=r'branch output has shape \(2, 3\), but '
                     r'its input has shape \(2, 4\)'):
    combinators.Residual.FPropMeta(p, [2, 4])
  with pytest.raises(ValueError, match=r'branch output has shape \(2, 3\)'):
    p.Instantiate().FPropDefaultTheta(_X([2, 4]))


# --- Parallel ----------------------------------------------------------------


@pytest.mark.parametrize('merge', ['concat', 'sum', 'tuple'])
def test_parallel_merges(merge):
  p = combinators.Parallel.Params().Set(
      sub=[_Dense(4, 3), _Dense(4, 3, 'tanh')], merge=merge)
  x = _X([2, 4])
  layer, y = test_utils.CheckLayer(p, x)
  a, b = (s.FPropDefaultTheta(x) for s in layer.sub)
  if merge == 'concat':
    _Close(y, tf.concat([a, b], -1))
  elif merge == 'sum':
    _Close(y, a + b)
  else:
    assert isinstance(y, tuple) and len(y) == 2
    _Close(y[0], a)
    _Close(y[1], b)
  traced = tf.function(lambda v: layer.FProp(layer.theta, v))
  tf.nest.map_structure(_Close, traced(x), y)
  assert combinators.Parallel.NumParams(p) == 2 * (4 * 3 + 3)


def test_parallel_errors():
  p = combinators.Parallel.Params().Set(sub=[_Dense(4, 3)], merge='cat')
  with pytest.raises(ValueError, match="merge is 'cat'. Did you mean 'concat'"
                     r"\? Valid: 'concat', 'sum', 'tuple'"):
    p.Instantiate()
  with pytest.raises(ValueError, match="merge is 'cat'"):
    combinators.Parallel.FPropMeta(p, [2, 4])
  p = combinators.Parallel.Params().Set(sub=[_Dense(4, 3), _Dense(4, 5)],
                                        merge='sum')
  with pytest.raises(ValueError, match='cannot sum outputs of different shapes'):
    combinators.Parallel.FPropMeta(p, [2, 4])
  with pytest.raises(ValueError, match='non-empty'):
    combinators.Parallel.Params().Instantiate()
