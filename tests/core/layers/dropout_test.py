"""Dropout and DropPath: reproducible masks, keep rate, identity outside training."""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.layers import dropout
from tests.support import test_utils


def _Dropout(keep_prob=0.5, name='dropout', **kwargs):
  return dropout.Dropout.Params().Set(name=name, keep_prob=keep_prob,
                                      **kwargs).Instantiate()


def _Run(layer, x, **context):
  with base_layer.Context(training=True, **context):
    return layer.FPropDefaultTheta(x).numpy()


X = tf.ones([8, 16, 4])


@pytest.mark.parametrize('cls', [dropout.Dropout, dropout.DropPath])
def test_check_layer_and_meta(cls):
  p = cls.Params().Set(name='d', keep_prob=0.8)
  test_utils.CheckLayer(p, tf.ones([4, 3, 5, 2]), training=True)
  assert cls.NumParams(p) == 0
  assert cls.FPropMeta(p, [4, 3, 5, 2]).flops == 2 * 120
  assert cls.FPropMeta(p.Set(keep_prob=1.0), [4, 3, 5, 2]).flops == 0


def test_identity_at_inference_and_keep_one():
  x = tf.random.stateless_normal([4, 6], [0, 1])
  assert _Dropout(0.5).FPropDefaultTheta(x) is x
  assert _Run(_Dropout(1.0), x).tolist() == x.numpy().tolist()
  assert dropout.DropPath.Params().Set(
      name='dp', keep_prob=0.5).Instantiate().FPropDefaultTheta(x) is x


def test_same_mask_under_recompute_different_across_contexts():
  layer = _Dropout(0.5)
  first = _Run(layer, X, step=3, micro_batch=1)
  np.testing.assert_array_equal(first, _Run(layer, X, step=3, micro_batch=1))
  assert not np.array_equal(first, _Run(layer, X, step=3, micro_batch=2))
  assert not np.array_equal(first, _Run(layer, X, step=4, micro_batch=1))
  # Another layer (another path) in the same context draws its own mask.
  assert not np.array_equal(first, _Run(_Dropout(0.5, name='other'), X,
                                        step=3, micro_batch=1))


def test_keep_rate_and_scale():
  y = _Run(_Dropout(0.7), tf.ones([200, 500]))
  kept = y != 0
  assert abs(kept.mean() - 0.7) < 0.01
  np.testing.assert_allclose(y[kept], 1 / 0.7, rtol=1e-6)


def test_inside_tf_function_with_tensor_step():
  layer = _Dropout(0.5)

  @tf.function
  def F(step, micro_batch):
    with base_layer.Context(training=True, step=step, micro_batch=micro_batch):
      return layer.FPropDefaultTheta(X)

  a = F(tf.constant(5), tf.constant(0)).numpy()
  np.testing.assert_array_equal(a, F(tf.constant(5), tf.constant(0)).numpy())
  assert not np.array_equal(a, F(tf.constant(6), tf.constant(0)).numpy())
  assert not np.array_equal(a, F(tf.constant(5), tf.constant(1)).numpy())
  # Traced with tensors, eager with ints: the same mask.
  np.testing.assert_array_equal(a, _Run(layer, X, step=5, micro_batch=0))


def test_noise_shape_broadcast_dims():
  y = _Run(_Dropout(0.5, noise_shape_broadcast_dims=[1, 2]),
           tf.ones([6, 3, 5, 8]))
  # One flag per (example, channel): constant over the spatial dims.
  assert (y == y[:, :1, :1, :]).all()
  assert 0 < (y != 0).mean() < 1
  y = _Run(_Dropout(0.5, noise_shape=[-1, 1, None]), tf.ones([6, 3, 8]))
  assert (y == y[:, :1, :]).all()


def test_drop_path_drops_whole_examples():
  p = dropout.DropPath.Params().Set(name='dp', keep_prob=0.6)
  y = _Run(p.Instantiate(), tf.ones([400, 3, 3, 2]))
  per_example = y.reshape(400, -1)
  assert (per_example == per_example[:, :1]).all()
  kept = per_example[:, 0] != 0
  np.testing.assert_allclose(per_example[kept], 1 / 0.6, rtol=1e-6)
  assert abs(kept.mean() - 0.6) < 0.08


def test_drop_path_ramp():
  layer = dropout.DropPath.Params().Set(
      name='dp', keep_prob=0.5, ramp_steps=100).Instantiate()
  x = tf.ones([2000, 2])
  np.testing.assert_array_equal(_Run(layer, x, step=0), x.numpy())
  half = (_Run(layer, x, step=50)[:, 0] != 0).mean()  # drop rate 0.25
  full = (_Run(layer, x, step=500)[:, 0] != 0).mean()  # drop rate 0.5
  assert abs(half - 0.75) < 0.04 and abs(full - 0.5) < 0.04


def test_errors():
  with pytest.raises(ValueError, match=r'keep_prob must be in \(0, 1\]'):
    _Dropout(0.0)
  with pytest.raises(ValueError, match='out of range'):
    _Run(_Dropout(0.5, noise_shape_broadcast_dims=[3]), X)
