"""Pooling and GlobalAvgPool: shapes, FLOPs, numerics and errors."""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core.layers import pooling
from tests.support import test_utils


@pytest.mark.parametrize('pooling_type,window,stride,padding', [
    ('MAX', 3, 1, 'SAME'), ('MAX', 2, 2, 'SAME'), ('AVG', 3, 2, 'VALID'),
    ('AVG', (3, 2), (1, 2), 'SAME'), ('MAX', (5, 5), 3, 'VALID')])
def test_pooling_matches_tf(pooling_type, window, stride, padding):
  p = pooling.Pooling.Params().Set(name='pool', pooling_type=pooling_type,
                                   window=window, stride=stride,
                                   padding=padding)
  x = tf.random.stateless_normal([2, 9, 8, 3], [1, 2])
  layer, y = test_utils.CheckLayer(p, x)
  fn = tf.nn.max_pool2d if pooling_type == 'MAX' else tf.nn.avg_pool2d
  np.testing.assert_allclose(y.numpy(),
                             fn(x, window, stride, padding).numpy(), rtol=1e-6)
  assert pooling.Pooling.NumParams(p) == 0
  wh, ww = (window, window) if isinstance(window, int) else window
  assert pooling.Pooling.FPropMeta(p, x.shape).flops == np.prod(y.shape) * wh * ww


def test_avg_same_excludes_padding():
  p = pooling.Pooling.Params().Set(name='avg', pooling_type='AVG', window=3)
  y = p.Instantiate().FPropDefaultTheta(tf.ones([1, 4, 4, 2]))
  np.testing.assert_allclose(y.numpy(), np.ones([1, 4, 4, 2]), rtol=1e-6)


def test_bad_names_list_valid_ones():
  p = pooling.Pooling.Params().Set(name='pool', pooling_type='MEAN')
  with pytest.raises(ValueError, match=r"'MEAN'.*MAX, AVG"):
    p.Instantiate()
  with pytest.raises(ValueError, match=r'MAX, AVG'):
    pooling.Pooling.FPropMeta(p, [1, 4, 4, 1])
  p = pooling.Pooling.Params().Set(name='pool', padding='FULL')
  with pytest.raises(ValueError, match=r"'FULL'.*SAME, VALID"):
    p.Instantiate()


@pytest.mark.parametrize('shape', [[2, 5, 7, 3], [3, 6, 4], [2, 2, 3, 4, 5]])
def test_global_avg_pool(shape):
  p = pooling.GlobalAvgPool.Params().Set(name='gap')
  x = tf.random.stateless_normal(shape, [3, 4])
  _, y = test_utils.CheckLayer(p, x)
  axes = tuple(range(1, len(shape) - 1))
  np.testing.assert_allclose(y.numpy(), x.numpy().mean(axis=axes), rtol=1e-5,
                             atol=1e-6)
  assert y.shape.as_list() == [shape[0], shape[-1]]
  assert pooling.GlobalAvgPool.FPropMeta(p, shape).flops == np.prod(shape)
  with pytest.raises(ValueError, match='rank >= 3'):
    pooling.GlobalAvgPool.FPropMeta(p, [2, 3])
