"""Multi-head scaled dot-product attention (Vaswani et al. 2017).

Invariant: a query position gives exactly zero weight to every key that is
padded (paddings 1.0) and, when `causal`, to every key after it; the mask is
applied by replacing those logits before the softmax, never by adding to them,
so it cannot overflow in any dtype.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core import precision
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.nested_map import NestedMap

# softmax per logit: max, subtract, exp, sum, divide.
_SOFTMAX_FLOPS_PER_LOGIT = 5


class MultiHeadAttention(base_layer.BaseLayer):
  """query [b, tq, d], key_value [b, tk, d] -> [b, tq, d].

  Four projections, each with a bias when `use_bias`: query, key and value
  (d -> hidden_dim) and post (hidden_dim -> d), so 4·d·h weights and 3·h + d
  biases (4·d² + 4·d at the default hidden_dim = d).
  """

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('input_dim', 0, 'Model dimension d of queries, keys and values.')
    p.Define('num_heads', 1, 'Number of attention heads; divides hidden_dim.')
    p.Define('hidden_dim', 0, 'Total size of all heads; 0 means input_dim.')
    p.Define('use_bias', True, 'Whether the four projections have biases.')
    p.Define('causal', False, 'Whether query position t ignores keys after t '
             '(a decoder or language model).')
    p.Define('atten_dropout', None, 'Dropout layer Params applied to the '
             'attention probabilities; None means no dropout.')
    return p

  @classmethod
  def _Dims(cls, p) -> tuple[int, int]:
    """(hidden_dim, per-head dim), checking p."""
    hidden = p.hidden_dim or p.input_dim
    if p.input_dim <= 0 or hidden <= 0 or p.num_heads <= 0:
      raise ValueError(f'{p.name}: input_dim, hidden_dim and num_heads must be '
                       f'> 0, got {p.input_dim}, {p.hidden_dim} and '
                       f'{p.num_heads}.')
    if hidden % p.num_heads:
      raise ValueError(f'{p.name}: hidden_dim {hidden} is not divisible by '
                       f'num_heads {p.num_heads}.')
    return hidden, hidden // p.num_heads

  @classmethod
  def _ProjParams(cls, p) -> NestedMap:
    hidden, _ = cls._Dims(p)

    def Proj(input_dim, output_dim):
      return dense.Dense.Params().Set(input_dim=input_dim,
                                      output_dim=output_dim,
                                      has_bias=p.use_bias, activation='none')

    return NestedMap(query=Proj(p.input_dim, hidden),
                     key=Proj(p.input_dim, hidden),
                     value=Proj(p.input_dim, hidden),
                     post=Proj(hidden, p.input_dim))

  def __init__(self, params):
    super().__init__(params)
    p = self.params
    for name, proj in self._ProjParams(p).items():
      self.CreateChild(name, proj)
    if p.atten_dropout is not None:
      self.CreateChild('atten_dropout', p.atten_dropout)

  def FProp(self,
            theta: NestedMap,
            query: tf.Tensor,
            key_value: Optional[tf.Tensor] = None,
            paddings: Optional[tf.Tensor] = None) -> tf.Tensor:
    """Attends from `query` to `key_value` (to `query` itself when None).

    Args:
      theta: this layer's theta.
      query: [batch, q_time, input_dim].
      key_value: [batch, kv_time, input_dim], or None for self-attention.
      paddings: [batch, kv_time], 1.0 where a key is padding, or None.

    Returns:
      [batch, q_time, input_dim].
    """
    p = self.params
    _, head_dim = self._Dims(p)
    if key_value is None:
      key_value = query
    _CheckRank(self.path, 'query', query.shape, 3)
    _CheckRank(self.path, 'key_value', key_value.shape, 3)

    def Heads(x):  # [b, t, h] -> [b, t, n, h/n]
      return tf.reshape(x, tf.concat(
          [tf.shape(x)[:-1], [p.num_heads, head_dim]], axis=0))

    q = Heads(self.query.FProp(theta.query, query)) * (head_dim**-0.5)
    k = Heads(self.key.FProp(theta.key, key_value))
    v = Heads(self.value.FProp(theta.value, key_value))
    # Logits and their softmax in float32 whatever the compute dtype
    # (precision.py); the probabilities go back to it for the context.
    logits = tf.cast(tf.einsum('BTNH,BSNH->BNTS', q, k), tf.float32)
    valid = self._ValidMask(query, key_value, paddings)
    if valid is not None:
      logits = tf.where(valid, logits, tf.cast(-0.7 * logits.dtype.max,
                                               logits.dtype))
    probs = precision.Softmax(logits, v.dtype)
    if p.atten_dropout is not None:
      probs = self.atten_dropout.FProp(theta.atten_dropout, probs)
    context = tf.einsum('BNTS,BSNH->BTNH', probs, v)
    context = tf.reshape(context, tf.concat(
        [tf.shape(context)[:2], [p.num_heads * head_dim]], axis=0))
    return self.post.FProp(theta.post, context)

  def _ValidMask(self, query: tf.Tensor, key_value: tf.Tensor,
                 paddings: Optional[tf.Tensor]) -> Optional[tf.Tensor]:
    """Bool, broadcastable to [b, n, tq, tk]: True where a key may be seen."""
    valid = None
    if paddings is not None:
      _CheckPaddings(self.path, paddings.shape, key_value.shape)
      valid = (paddings < 0.5)[:, tf.newaxis, tf.newaxis, :]
    if self.params.causal:
      q_time, kv_time = tf.shape(query)[1], tf.shape(key_value)[1]
      lower = tf.linalg.band_part(tf.ones([q_time, kv_time], tf.bool), -1, 0)
      valid = lower if valid is None else tf.logical_and(valid, lower)
    return valid

  @classmethod
  def FPropMeta(cls, p, query_shape, key_value_shape=None,
                paddings_shape=None):
    hidden, _ = cls._Dims(p)
    query_shape = base_layer.ToShape(query_shape)
    kv_shape = (query_shape if key_value_shape is None else
                base_layer.ToShape(key_value_shape))
    _CheckRank(p.name, 'query', query_shape, 3)
    _CheckRank(p.name, 'key_value', kv_shape, 3)
    if paddings_shape is not None:
      _CheckPaddings(p.name, base_layer.ToShape(paddings_shape), kv_shape)
    projs = cls._ProjParams(p)
    flops = (dense.Dense.FPropMeta(projs.query, query_shape).flops +
             dense.Dense.FPropMeta(projs.key, kv_shape).flops +
             dense.Dense.FPropMeta(projs.value, kv_shape).flops)
    batch, q_time, kv_time = query_shape[0], query_shape[1], kv_shape[1]
    probs_shape = tf.TensorShape([batch, p.num_heads, q_time, kv_time])
    num_logits = probs_shape.num_elements()
    flops += batch * q_time * hidden  # scaling q by head_dim^-0.5
    flops += 2 * batch * q_time * kv_time * hidden  # q·kᵀ
    if paddings_shape is not None or p.causal:
      flops += num_logits  # the select
    flops += _SOFTMAX_FLOPS_PER_LOGIT * num_logits
    if p.atten_dropout is not None:
      flops += p.atten_dropout.cls.FPropMeta(p.atten_dropout, probs_shape).flops
    flops += 2 * batch * q_time * kv_time * hidden  # probs·v
    post = dense.Dense.FPropMeta(projs.post, [batch, q_time, hidden])
    return base_layer.Meta(flops + post.flops, *post.out_shapes)


def _CheckRank(where: str, what: str, shape: tf.TensorShape, rank: int):
  if shape.rank is not None and shape.rank != rank:
    raise ValueError(f'{where}: {what} must have rank {rank} ([batch, time, '
                     f'dim]), got shape {shape}.')


def _CheckPaddings(where: str, paddings_shape: tf.TensorShape,
                   kv_shape: tf.TensorShape):
  if not tf.TensorShape(paddings_shape).is_compatible_with(kv_shape[:2]):
    raise ValueError(f'{where}: paddings have shape {paddings_shape}, but '
                     f'key_value [batch, time, dim] {kv_shape} needs '
                     f'{kv_shape[:2]}.')
