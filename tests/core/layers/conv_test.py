"""Conv2D, DepthwiseConv2D, SeparableConv2D: sizes, shapes, FLOPs and numerics."""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core.layers import conv
from tests.support import test_utils


def _Input(shape, seed=0):
  return tf.random.stateless_normal(shape, [seed, 1])


@pytest.mark.parametrize('stride,padding,has_bias,activation,hw', [
    ((1, 1), 'SAME', False, 'none', (8, 8)),
    ((2, 2), 'SAME', True, 'relu', (7, 9)),
    ((2, 2), 'VALID', False, 'none', (7, 9)),
    ((2, 1), 'VALID', True, 'relu6', (8, 5)),
    (3, 'SAME', False, 'none', (10, 11)),
])
def test_conv2d_matches_tf(stride, padding, has_bias, activation, hw):
  p = conv.Conv2D.Params().Set(
      name='conv', filter_shape=[3, 2, 4, 6], stride=stride, padding=padding,
      has_bias=has_bias, activation=activation)
  x = _Input([2, *hw, 4])
  layer, y = test_utils.CheckLayer(p, x)
  strides = (stride, stride) if isinstance(stride, int) else stride
  expected = tf.nn.conv2d(x, layer.theta.w, strides=[1, *strides, 1],
                          padding=padding)
  if has_bias:
    layer.theta.b.assign(tf.range(6, dtype=tf.float32) - 2.5)
    y = layer.FPropDefaultTheta(x)
    expected = expected + layer.theta.b
  expected = {'none': tf.identity, 'relu': tf.nn.relu,
              'relu6': tf.nn.relu6}[activation](expected)
  np.testing.assert_allclose(y.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
  assert conv.Conv2D.NumParams(p) == 3 * 2 * 4 * 6 + (6 if has_bias else 0)


def test_conv2d_flops_by_hand():
  # [2, 8, 8, 4] * [3, 3, 4, 8], stride 2, SAME -> [2, 4, 4, 8]: 256 outputs,
  # each 3·3·4 = 36 multiply-adds = 72 FLOPs, plus bias (1) and relu (1).
  p = conv.Conv2D.Params().Set(name='c', filter_shape=[3, 3, 4, 8], stride=2)
  meta = conv.Conv2D.FPropMeta(p, [2, 8, 8, 4])
  assert meta.out_shapes[0].as_list() == [2, 4, 4, 8]
  assert meta.flops == 256 * 72
  p.Set(has_bias=True, activation='relu')
  assert conv.Conv2D.FPropMeta(p, [2, 8, 8, 4]).flops == 256 * 74


def test_output_size_rule():
  # AmoebaNet's stem: 3x3 stride-2 VALID on 224 gives ceil(222 / 2) = 111.
  p = conv.Conv2D.Params().Set(name='stem', filter_shape=[3, 3, 3, 32],
                               stride=2, padding='VALID')
  assert conv.Conv2D.FPropMeta(p, [1, 224, 224, 3]).out_shapes[0].as_list() == [
      1, 111, 111, 32]
  assert conv.OutputSize(7, 3, 2, 'SAME') == 4
  assert conv.OutputSize(7, 3, 2, 'VALID') == 3
  assert conv.OutputSize(None, 3, 2, 'VALID') is None


@pytest.mark.parametrize('stride,padding,mult', [
    (1, 'SAME', 1), (2, 'VALID', 2), ((2, 2), 'SAME', 3)])
def test_depthwise_matches_tf(stride, padding, mult):
  p = conv.DepthwiseConv2D.Params().Set(
      name='dw', filter_shape=[3, 3, 5, mult], stride=stride, padding=padding,
      has_bias=True)
  x = _Input([2, 9, 8, 5])
  layer, y = test_utils.CheckLayer(p, x)
  s = stride if isinstance(stride, int) else stride[0]
  expected = tf.nn.depthwise_conv2d(x, layer.theta.w, [1, s, s, 1], padding)
  np.testing.assert_allclose(y.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
  assert y.shape[-1] == 5 * mult
  meta = conv.DepthwiseConv2D.FPropMeta(p, x.shape)
  positions = np.prod(y.shape[:-1])
  assert meta.flops == positions * (5 * mult) * (2 * 9 + 1)


@pytest.mark.parametrize('kernel,stride,padding,mult', [
    (3, 1, 'SAME', 1), (5, 2, 'SAME', 1), (3, 2, 'VALID', 2)])
def test_separable_matches_tf(kernel, stride, padding, mult):
  p = conv.SeparableConv2D.Params().Set(
      name='sep', filter_shape=[kernel, kernel, 4, 7], stride=stride,
      padding=padding, depth_multiplier=mult)
  x = _Input([2, 11, 10, 4])
  layer, y = test_utils.CheckLayer(p, x)
  expected = tf.nn.separable_conv2d(
      x, layer.theta.depthwise_w, layer.theta.pointwise_w,
      [1, stride, stride, 1], padding)
  np.testing.assert_allclose(y.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
  mid = 4 * mult
  assert conv.SeparableConv2D.NumParams(p) == kernel * kernel * mid + mid * 7
  meta = conv.SeparableConv2D.FPropMeta(p, x.shape)
  positions = np.prod(y.shape[:-1])
  assert meta.flops == positions * 2 * (kernel * kernel * mid + mid * 7)


def test_bad_padding_names_valid_ones():
  p = conv.Conv2D.Params().Set(name='c', filter_shape=[1, 1, 2, 2],
                               padding='same')
  with pytest.raises(ValueError, match=r"'same'.*SAME, VALID"):
    p.Instantiate()
  with pytest.raises(ValueError, match=r'SAME, VALID'):
    conv.Conv2D.FPropMeta(p, [1, 4, 4, 2])


def test_bad_inputs_and_filters():
  p = conv.Conv2D.Params().Set(name='c', filter_shape=[3, 3, 2, 2])
  with pytest.raises(ValueError, match='3 channels'):
    p.Instantiate().FPropDefaultTheta(tf.zeros([1, 4, 4, 3]))
  with pytest.raises(ValueError, match='filter_shape'):
    conv.Conv2D.Params().Set(name='c', filter_shape=[3, 3, 2]).Instantiate()
  with pytest.raises(ValueError, match='stride'):
    conv.Conv2D.Params().Set(name='c', filter_shape=[1, 1, 2, 2],
                             stride=(0, 1)).Instantiate()
  with pytest.raises(ValueError, match='VALID padding needs'):
    conv.Conv2D.FPropMeta(p.Set(padding='VALID'), [1, 2, 2, 2])
