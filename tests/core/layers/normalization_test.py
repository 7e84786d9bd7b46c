"""BatchNorm and LayerNorm: shapes, numerics, and GPipe's exact merge of micro-batch stats."""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.layers import normalization
from lingvo_gpipe.core.nested_map import NestedMap
from tests.support import test_utils


def _Data(shape, seed=0):
  # Channels with different means and scales, far from the initial (0, 1).
  c = shape[-1]
  x = tf.random.stateless_normal(shape, [seed, 7])
  return x * (1.0 + tf.range(c, dtype=tf.float32)) + 3.0 * tf.range(
      c, dtype=tf.float32) - 2.0


def _BN(dim=4, decay=0.9, name='bn'):
  return normalization.BatchNorm.Params().Set(name=name, dim=dim, decay=decay)


@pytest.mark.parametrize('shape', [[16, 4], [4, 5, 4], [2, 3, 5, 4]])
@pytest.mark.parametrize('training', [False, True])
def test_batch_norm_check_layer(shape, training):
  p = _BN()
  layer, _ = test_utils.CheckLayer(p, _Data(shape), training=training)
  assert normalization.BatchNorm.NumParams(p) == 8  # gamma, beta
  assert not layer.vars.moving_mean.trainable
  assert not layer.vars.moving_variance.trainable
  assert normalization.BatchNorm.FPropMeta(p, shape).flops == 5 * np.prod(shape)


@pytest.mark.parametrize('shape', [[64, 4], [8, 6, 5, 4]])
def test_batch_norm_training_normalizes_per_channel(shape):
  layer = _BN().Instantiate()
  with base_layer.Context(training=True):
    y = layer.FPropDefaultTheta(_Data(shape)).numpy()
  axes = tuple(range(len(shape) - 1))
  np.testing.assert_allclose(y.mean(axis=axes), 0.0, atol=1e-4)
  # epsilon (1e-3) shrinks the unit variance by var / (var + eps).
  np.testing.assert_allclose(y.var(axis=axes), 1.0, atol=2e-3)


def test_batch_norm_inference_uses_moving_stats():
  layer = _BN().Instantiate()
  mean = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
  var = np.array([4.0, 0.25, 1.0, 9.0], np.float32)
  gamma = np.array([1.0, 2.0, 0.5, -1.0], np.float32)
  beta = np.array([0.0, 1.0, -1.0, 2.0], np.float32)
  layer.vars.moving_mean.assign(mean)
  layer.vars.moving_variance.assign(var)
  layer.vars.gamma.assign(gamma)
  layer.vars.beta.assign(beta)
  x = _Data([3, 5, 4])
  y = layer.FPropDefaultTheta(x)  # default context: inference
  expected = (x.numpy() - mean) / np.sqrt(var + 1e-3) * gamma + beta
  np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=1e-5)
  # Inference leaves the moving averages alone.
  np.testing.assert_array_equal(layer.vars.moving_mean.numpy(), mean)


def test_batch_norm_without_collector_updates_at_once():
  layer = _BN(decay=0.9).Instantiate()
  x = _Data([6, 3, 4])
  with base_layer.Context(training=True):
    layer.FPropDefaultTheta(x)
  flat = x.numpy().reshape(-1, 4)
  np.testing.assert_allclose(layer.vars.moving_mean.numpy(),
                             0.1 * flat.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(layer.vars.moving_variance.numpy(),
                             0.9 + 0.1 * flat.var(0), rtol=1e-5)


def test_merged_micro_batch_stats_equal_whole_batch_update():
  """GPipe's definition: 3 unequal micro-batches move the averages as one batch."""
  x = _Data([12, 5, 4])
  sizes = [2, 7, 3]
  whole = _BN(decay=0.8).Instantiate()
  piped = _BN(decay=0.8).Instantiate()
  with base_layer.Context(training=True):
    whole.FPropDefaultTheta(x)
    collector = base_layer.StatsCollector()
    with base_layer.Context(stats_collector=collector):
      for m, part in enumerate(tf.split(x, sizes)):
        with base_layer.Context(micro_batch=m):
          piped.FPropDefaultTheta(part)
  # Nothing moves until the collector applies the merged stats ...
  np.testing.assert_array_equal(piped.vars.moving_mean.numpy(), np.zeros(4))
  np.testing.assert_array_equal(piped.vars.moving_variance.numpy(), np.ones(4))
  assert len(collector.records) == 3
  assert [float(s.count) for _, s in collector.records] == [10.0, 35.0, 15.0]
  collector.ApplyAll()
  # ... and then exactly once, by the whole batch's moments.
  np.testing.assert_allclose(piped.vars.moving_mean.numpy(),
                             whole.vars.moving_mean.numpy(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(piped.vars.moving_variance.numpy(),
                             whole.vars.moving_variance.numpy(), rtol=1e-6)


def test_merge_moments_is_exact():
  x = np.random.RandomState(0).randn(30, 3).astype(np.float64) * 4 + 10
  parts = [x[:4], x[4:21], x[21:]]
  stats = [NestedMap(mean=tf.constant(p.mean(0)), variance=tf.constant(p.var(0)),
                     count=tf.constant(float(len(p)), tf.float64)) for p in parts]
  mean, var = normalization.MergeMoments(stats)
  np.testing.assert_allclose(mean.numpy(), x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(var.numpy(), x.var(0), rtol=1e-12)


def test_batch_norm_in_tf_function_with_gradients():
  layer = _BN(decay=0.5).Instantiate()
  x = _Data([8, 4])

  @tf.function
  def Step(x):
    collector = base_layer.StatsCollector()
    with base_layer.Context(training=True, stats_collector=collector):
      with tf.GradientTape() as tape:
        theta = layer.ReadTheta()
        tape.watch(theta.Flatten())
        loss = tf.reduce_sum(layer.FProp(theta, x) * tf.range(4.0))
      grads = tape.gradient(loss, theta)
      collector.ApplyAll()
    return grads

  grads = Step(x)
  np.testing.assert_allclose(grads.beta.numpy(), 8 * np.arange(4.0), rtol=1e-5)
  assert grads.moving_mean is None  # not used in training
  np.testing.assert_allclose(layer.vars.moving_mean.numpy(),
                             0.5 * x.numpy().mean(0), rtol=1e-5)


def test_batch_norm_errors():
  with pytest.raises(ValueError, match='REQUIRED.*dim'):
    normalization.BatchNorm.Params().Set(name='bn').Instantiate()
  with pytest.raises(ValueError, match='dim must be a positive int'):
    _BN(dim=0).Instantiate()
  layer = _BN(dim=4).Instantiate()
  with pytest.raises(ValueError, match='last dim is 3'):
    layer.FPropDefaultTheta(tf.zeros([2, 3]))
  with pytest.raises(ValueError, match='rank >= 2'):
    normalization.BatchNorm.FPropMeta(_BN(dim=4), [4])


@pytest.mark.parametrize('shape', [[5, 6], [2, 3, 6], [2, 2, 3, 6]])
def test_layer_norm(shape):
  p = normalization.LayerNorm.Params().Set(name='ln', dim=6)
  layer, _ = test_utils.CheckLayer(p, _Data(shape))
  assert normalization.LayerNorm.NumParams(p) == 12
  scale = np.linspace(0.5, 2.0, 6).astype(np.float32)
  bias = np.linspace(-1.0, 1.0, 6).astype(np.float32)
  layer.vars.scale.assign(scale)
  layer.vars.bias.assign(bias)
  x = _Data(shape).numpy()
  y = layer.FPropDefaultTheta(tf.constant(x)).numpy()
  mean = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  expected = (x - mean) / np.sqrt(var + 1e-6) * scale + bias
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('training', [False, True])
def test_fused_4d_path_equals_unfused_path(training):
  """NHWC inputs take one FusedBatchNorm op; the math is the per-channel one.

  The same values as a [N*H*W, C] matrix take the unfused path: outputs,
  gradients and the moving averages they move must agree.
  """
  x4 = _Data([3, 5, 2, 4])
  x2 = tf.reshape(x4, [-1, 4])
  results = []
  for x in (x4, x2):
    layer = _BN(decay=0.5).Instantiate()
    layer.vars.gamma.assign([1.0, 2.0, 0.5, -1.0])
    layer.vars.moving_mean.assign([1.0, -2.0, 0.5, 3.0])
    with base_layer.Context(training=training):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer.FPropDefaultTheta(x)
        loss = tf.reduce_sum(tf.reshape(y, [-1, 4])**2 * [1.0, 2.0, 3.0, 4.0])
    gx, gg, gb = tape.gradient(loss, [x, layer.vars.gamma, layer.vars.beta])
    results.append([tf.reshape(y, [-1, 4]), tf.reshape(gx, [-1, 4]), gg, gb,
                    layer.vars.moving_mean.value(),
                    layer.vars.moving_variance.value()])
  for fused, unfused in zip(*results):
    np.testing.assert_allclose(fused.numpy(), unfused.numpy(), rtol=1e-4,
                               atol=1e-4)
