"""Tests of Embedding and Softmax: lookups, cross-entropy, label smoothing, estimates."""

import math

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core.layers import embedding
from tests.support import test_utils


@pytest.mark.parametrize('ids_shape,scale', [([3], False), ([2, 4], True)])
def test_embedding_gathers_rows(ids_shape, scale):
  p = embedding.Embedding.Params().Set(vocab_size=11, embedding_dim=6,
                                       scale_sqrt_depth=scale)
  ids = tf.random.stateless_uniform(ids_shape, [1, 2], 0, 11, dtype=tf.int32)
  layer, y = test_utils.CheckLayer(p, ids)
  expected = layer.vars.emb.numpy()[ids.numpy()] * (math.sqrt(6) if scale else 1)
  np.testing.assert_allclose(y.numpy(), expected, rtol=1e-6)
  assert embedding.Embedding.NumParams(p) == 66
  flops = embedding.Embedding.FPropMeta(p, ids_shape).flops
  assert flops == (np.prod(ids_shape) * 6 if scale else 0)


def test_embedding_errors():
  with pytest.raises(ValueError, match='must be > 0, got 0 and 4'):
    embedding.Embedding.Params().Set(embedding_dim=4).Instantiate()
  layer = embedding.Embedding.Params().Set(vocab_size=3,
                                           embedding_dim=2).Instantiate()
  with pytest.raises(TypeError, match='ids must be integers, got float32'):
    layer.FPropDefaultTheta(tf.constant([1.0]))


def _SoftmaxParams(**kwargs):
  return embedding.Softmax.Params().Set(input_dim=5, num_classes=7, **kwargs)


def _NumpyLogits(layer, x):
  logits = np.tensordot(x.numpy(), layer.vars.proj.w.numpy(), axes=1)
  if layer.params.has_bias:
    logits += layer.vars.proj.b.numpy()
  return logits


@pytest.mark.parametrize('batch_shape,has_bias,weighted', [
    ([4], True, False), ([2, 3], False, True)])
def test_softmax_xent_matches_tf(batch_shape, has_bias, weighted):
  p = _SoftmaxParams(has_bias=has_bias)
  x = tf.random.stateless_normal(batch_shape + [5], [3, 4])
  ids = tf.random.stateless_uniform(batch_shape, [5, 6], 0, 7, dtype=tf.int32)
  weights = (tf.random.stateless_uniform(batch_shape, [7, 8])
             if weighted else None)
  layer, out = test_utils.CheckLayer(p, x, ids, *([weights] if weighted else []))
  np.testing.assert_allclose(out.logits.numpy(), _NumpyLogits(layer, x),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.log_probs.numpy(),
                             tf.nn.log_softmax(out.logits).numpy(), rtol=1e-6)
  want = tf.nn.sparse_softmax_cross_entropy_with_logits(ids, out.logits).numpy()
  np.testing.assert_allclose(out.per_example_xent.numpy(), want, rtol=1e-5)
  w = np.ones(batch_shape) if weights is None else weights.numpy()
  np.testing.assert_allclose(out.total_weight.numpy(), w.sum(), rtol=1e-6)
  np.testing.assert_allclose(out.avg_xent.numpy(), (want * w).sum() / w.sum(),
                             rtol=1e-5)


def test_softmax_label_smoothing_value():
  eps = 0.2
  p = _SoftmaxParams(label_smoothing=eps)
  x = tf.random.stateless_normal([4, 5], [1, 1])
  ids = tf.constant([0, 3, 6, 2])
  layer, out = test_utils.CheckLayer(p, x, ids)
  log_probs = out.log_probs.numpy()
  target = np.full([4, 7], eps / 7)
  target[np.arange(4), ids.numpy()] += 1 - eps
  want = -(target * log_probs).sum(-1)
  np.testing.assert_allclose(out.per_example_xent.numpy(), want, rtol=1e-5)
  keras = tf.keras.losses.categorical_crossentropy(
      tf.one_hot(ids, 7), out.logits, from_logits=True, label_smoothing=eps)
  np.testing.assert_allclose(out.per_example_xent.numpy(), keras.numpy(),
                             rtol=1e-5)


def test_softmax_logits_only_and_in_tf_function():
  p = _SoftmaxParams()
  x = tf.random.stateless_normal([3, 5], [2, 2])
  layer, out = test_utils.CheckLayer(p, x)
  assert sorted(out) == ['log_probs', 'logits']
  np.testing.assert_allclose(layer.Logits(layer.theta, x).numpy(),
                             out.logits.numpy())
  ids = tf.constant([1, 2, 3])
  traced = tf.function(lambda a, b: layer.FPropDefaultTheta(a, b).avg_xent)
  np.testing.assert_allclose(traced(x, ids).numpy(),
                             layer.FPropDefaultTheta(x, ids).avg_xent.numpy(),
                             rtol=1e-6)


def test_softmax_flops_and_params():
  p = _SoftmaxParams()
  assert embedding.Softmax.NumParams(p) == 5 * 7 + 7
  meta = embedding.Softmax.FPropMeta(p, [4, 5])
  # 4 rows × 7 classes × (2·5 + 1 bias), plus log_softmax at 5 per logit.
  assert meta.flops == 4 * 7 * 11 + 4 * 7 * 5


def test_softmax_errors():
  with pytest.raises(ValueError, match='label_smoothing is 1.0'):
    _SoftmaxParams(label_smoothing=1.0).Instantiate()
  layer = _SoftmaxParams().Instantiate()
  with pytest.raises(ValueError, match=r'class_ids has shape \(3,\).*need \(4,\)'):
    layer.FPropDefaultTheta(tf.ones([4, 5]), tf.constant([0, 1, 2]))
  with pytest.raises(ValueError, match='last dim is 6, but input_dim is 5'):
    embedding.Softmax.FPropMeta(_SoftmaxParams(), [4, 6])
