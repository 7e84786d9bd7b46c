"""Tests of MultiHeadAttention against a plain numpy implementation and its masks."""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.layers import attention
from lingvo_gpipe.core.layers import dropout
from tests.support import test_utils

MHA = attention.MultiHeadAttention


def _Params(**kwargs):
  return MHA.Params().Set(**kwargs)


def _NumpyAttention(layer, query, key_value=None, paddings=None):
  """Heads one at a time, with explicit loops over the masks."""
  p = layer.params
  v = layer.vars.Transform(lambda t: t.numpy())
  q_in = query.numpy()
  kv_in = q_in if key_value is None else key_value.numpy()

  def Proj(x, name):
    out = x @ v[name].w
    return out + v[name].b if p.use_bias else out

  q, k, val = Proj(q_in, 'query'), Proj(kv_in, 'key'), Proj(kv_in, 'value')
  batch, q_time, hidden = q.shape
  kv_time = k.shape[1]
  dh = hidden // p.num_heads
  context = np.zeros_like(q)
  for b in range(batch):
    for n in range(p.num_heads):
      heads = slice(n * dh, (n + 1) * dh)
      for t in range(q_time):
        logits = np.array([q[b, t, heads] @ k[b, s, heads] / np.sqrt(dh)
                           for s in range(kv_time)])
        seen = np.ones(kv_time, bool)
        if paddings is not None:
          seen &= paddings.numpy()[b] < 0.5
        if p.causal:
          seen &= np.arange(kv_time) <= t
        weights = np.where(seen, np.exp(logits - logits[seen].max()), 0.0)
        weights /= weights.sum()
        context[b, t, heads] = weights @ val[b, :, heads]
  return Proj(context, 'post')


@pytest.mark.parametrize('kwargs', [
    dict(input_dim=8, num_heads=2),
    dict(input_dim=6, num_heads=3, hidden_dim=12, use_bias=False),
    dict(input_dim=8, num_heads=4, causal=True),
])
def test_self_attention_matches_numpy(kwargs):
  p = _Params(**kwargs)
  x = tf.random.stateless_normal([2, 5, p.input_dim], [1, 2])
  paddings = tf.constant([[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]], tf.float32)
  layer, y = test_utils.CheckLayer(
      p, x, None, paddings, meta_inputs=(x.shape, None, paddings.shape))
  np.testing.assert_allclose(y.numpy(), _NumpyAttention(layer, x, None, paddings),
                             rtol=1e-4, atol=1e-5)
  _, y_nopad = test_utils.CheckLayer(p, x)
  np.testing.assert_allclose(y_nopad.numpy(), _NumpyAttention(layer, x),
                             rtol=1e-4, atol=1e-5)


def test_cross_attention_matches_numpy():
  p = _Params(input_dim=4, num_heads=2, hidden_dim=8)
  q = tf.random.stateless_normal([3, 2, 4], [3, 4])
  kv = tf.random.stateless_normal([3, 6, 4], [5, 6])
  paddings = tf.constant([[0, 0, 0, 0, 0, 1], [0, 1, 0, 1, 1, 1],
                          [0, 0, 0, 0, 0, 0]], tf.float32)
  layer, y = test_utils.CheckLayer(p, q, kv, paddings)
  assert y.shape == [3, 2, 4]
  np.testing.assert_allclose(y.numpy(), _NumpyAttention(layer, q, kv, paddings),
                             rtol=1e-4, atol=1e-5)


def test_padded_keys_get_zero_weight():
  layer = _Params(input_dim=4, num_heads=2).Instantiate()
  q = tf.random.stateless_normal([2, 3, 4], [1, 1])
  kv = tf.random.stateless_normal([2, 5, 4], [2, 2])
  paddings = tf.constant([[0, 0, 1, 0, 1], [0, 0, 0, 0, 1]], tf.float32)
  noise = 100.0 * tf.random.stateless_normal([2, 5, 4], [3, 3])
  kv_changed = kv + noise * paddings[:, :, None]
  np.testing.assert_allclose(
      layer.FPropDefaultTheta(q, kv, paddings).numpy(),
      layer.FPropDefaultTheta(q, kv_changed, paddings).numpy(), rtol=1e-5)


def test_causal_position_ignores_later_positions():
  layer = _Params(input_dim=4, num_heads=2, causal=True).Instantiate()
  x = tf.random.stateless_normal([1, 6, 4], [1, 1])
  t = 2
  later = tf.concat([tf.zeros([1, t + 1, 4]),
                     tf.random.stateless_normal([1, 6 - t - 1, 4], [9, 9])], 1)
  y, y_changed = (layer.FPropDefaultTheta(x).numpy(),
                  layer.FPropDefaultTheta(x + later).numpy())
  np.testing.assert_allclose(y[:, :t + 1], y_changed[:, :t + 1], rtol=1e-5)
  assert not np.allclose(y[:, t + 1:], y_changed[:, t + 1:])


def test_num_params_and_flops_by_hand():
  p = _Params(input_dim=8, num_heads=2)
  assert MHA.NumParams(p) == 4 * 8 * 8 + 4 * 8
  assert MHA.NumParams(p.Copy().Set(hidden_dim=4, use_bias=False)) == 4 * 8 * 4
  b, t, s, d = 2, 3, 5, 8
  proj = 2 * d + 1  # per output element: d multiply-adds and the bias
  want = (b * t * d * proj + 2 * b * s * d * proj  # q, and k and v
          + b * t * d  # scale q
          + 2 * 2 * b * t * s * d  # q·kᵀ and probs·v
          + b * 2 * t * s * (1 + 5)  # mask select, softmax
          + b * t * d * proj)  # post
  assert MHA.FPropMeta(p, [b, t, d], [b, s, d], [b, s]).flops == want


def test_attention_dropout_on_probs_only_in_training():
  p = _Params(input_dim=4, num_heads=2,
              atten_dropout=dropout.Dropout.Params().Set(keep_prob=0.5))
  x = tf.random.stateless_normal([2, 3, 4], [1, 2])
  layer, _ = test_utils.CheckLayer(p, x, training=True)
  plain = _Params(input_dim=4, num_heads=2).Instantiate()
  np.testing.assert_allclose(plain.FProp(layer.theta, x).numpy(),
                             layer.FPropDefaultTheta(x).numpy(), rtol=1e-6)
  with base_layer.Context(training=True, step=3):
    a, b = layer.FPropDefaultTheta(x), layer.FPropDefaultTheta(x)
  np.testing.assert_allclose(a.numpy(), b.numpy())  # same mask on recompute
  assert not np.allclose(a.numpy(), layer.FPropDefaultTheta(x).numpy())
  meta_no_drop = MHA.FPropMeta(_Params(input_dim=4, num_heads=2), [2, 3, 4])
  assert MHA.FPropMeta(p, [2, 3, 4]).flops == meta_no_drop.flops + 2 * 2 * 3 * 3 * 2


def test_in_tf_function():
  layer = _Params(input_dim=4, num_heads=2, causal=True).Instantiate()
  x = tf.random.stateless_normal([2, 3, 4], [1, 2])
  paddings = tf.constant([[0, 0, 1], [0, 0, 0]], tf.float32)
  traced = tf.function(lambda a, pad: layer.FProp(layer.theta, a, None, pad))
  np.testing.assert_allclose(traced(x, paddings).numpy(),
                             layer.FPropDefaultTheta(x, None, paddings).numpy(),
                             rtol=1e-5, atol=1e-6)
  # Unknown batch and time dims trace too.
  spec = tf.TensorSpec([None, None, 4])
  concrete = tf.function(lambda a: layer.FPropDefaultTheta(a)).get_concrete_function(spec)
  assert concrete.structured_outputs.shape.as_list() == [None, None, 4]


def test_errors_name_bad_values():
  with pytest.raises(ValueError, match='hidden_dim 6 is not divisible by num_heads 4'):
    _Params(input_dim=6, num_heads=4).Instantiate()
  with pytest.raises(ValueError, match='must be > 0'):
    _Params(num_heads=2).Instantiate()
  p = _Params(input_dim=4, num_heads=2)
  with pytest.raises(ValueError, match=r'paddings have shape \(2, 4\).*needs \(2, 3\)'):
    MHA.FPropMeta(p, [2, 3, 4], None, [2, 4])
  with pytest.raises(ValueError, match='query must have rank 3'):
    p.Instantiate().FPropDefaultTheta(tf.ones([2, 4]))
  with pytest.raises(ValueError, match='last dim is 5, but input_dim is 4'):
    MHA.FPropMeta(p, [2, 3, 5])
