"""The GPipe paper's Transformer as pipeline-friendly layers (pre-layer-norm).

A decoder-only language model is the flat list

    [TransformerEmbedding, TransformerLayer × L, TransformerSoftmax]

that a PipeliningLayer can cut into cells anywhere. Invariant that makes this
work: every layer takes one NestedMap and returns one NestedMap, replacing only
what it computes (`vec`, or the outputs of the last layer) and passing every
other key through unchanged, so `paddings`, `labels` and, for a decoder, the
encoder's `aux_vec` / `aux_paddings` travel with each micro-batch through every
cell boundary. All leaves are batched along dim 0 (no scalars), so the
pipeline can split and merge any layer's outputs.

Each block is composed from existing layers (LayerNorm, MultiHeadAttention,
Dense, Dropout, Embedding, Softmax, Residual, Sequential), declared once in
each layer's ChildParams, so NumParams and FPropMeta are those of the parts.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.layers import attention
from lingvo_gpipe.core.layers import combinators
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.layers import dropout
from lingvo_gpipe.core.layers import embedding
from lingvo_gpipe.core.layers import normalization
from lingvo_gpipe.core.nested_map import NestedMap


def _DropoutParams(keep_prob: float) -> base_layer.Params:
  return dropout.Dropout.Params().Set(keep_prob=keep_prob)


def _Require(where: str, inputs: Any, key: str, why: str) -> Any:
  if not isinstance(inputs, dict) or key not in inputs:
    keys = sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__
    raise ValueError(f'{where}: inputs need the key {key!r} ({why}); got '
                     f'{keys}.')
  return inputs[key]


def _CheckVecShape(where: str, shape: tf.TensorShape, dim: int,
                   what: str = 'vec') -> None:
  if shape.rank is not None and (shape.rank != 3 or
                                 shape[-1] not in (None, dim)):
    raise ValueError(f'{where}: {what} must be [batch, time, {dim}], got '
                     f'shape {shape}.')


def _Shape(x: Any) -> Optional[tf.TensorShape]:
  return None if x is None else base_layer.ToShape(x)


class TransformerLayer(base_layer.BaseLayer):
  """One pre-LN Transformer block: NestedMap(vec, paddings, ...) -> same, new vec.

    vec ← vec + drop(SelfAtten(LN(vec)))           (causal if `causal`)
    vec ← vec + drop(CrossAtten(LN(vec), aux_vec))  (if has_aux_atten)
    vec ← vec + drop(Dense(d_ff→d)(drop_relu(Dense(d→d_ff, relu)(LN(vec)))))

  Inputs: `vec` [batch, time, model_dim]; `paddings` [batch, time] (1.0 =
  padded; optional), which mask the self-attention keys; with has_aux_atten
  also `aux_vec` [batch, src_time, model_dim] and optionally `aux_paddings`
  [batch, src_time]. Every other key passes through unchanged.
  """

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('model_dim', 0, 'Model dimension d (of vec and aux_vec).')
    p.Define('num_heads', 1, 'Attention heads; divides model_dim.')
    p.Define('hidden_dim', 0, 'Inner dimension d_ff of the feed-forward.')
    p.Define('causal', False, 'Self-attention sees no later position (a '
             'decoder or language model).')
    p.Define('has_aux_atten', False, 'Add a cross-attention sub-block over '
             'aux_vec (a Transformer decoder layer).')
    p.Define('residual_keep_prob', 1.0, 'Dropout keep_prob of each sub-block '
             'output before its residual add.')
    p.Define('atten_keep_prob', 1.0, 'Dropout keep_prob of the attention '
             'probabilities.')
    p.Define('relu_keep_prob', 1.0, 'Dropout keep_prob of the feed-forward '
             'hidden (relu) activations.')
    return p

  @classmethod
  def ChildParams(cls, p) -> NestedMap:
    """Params of the sub-blocks, after checking p."""
    if p.model_dim <= 0 or p.hidden_dim <= 0:
      raise ValueError(f'{p.name}: model_dim and hidden_dim must be > 0, got '
                       f'{p.model_dim} and {p.hidden_dim}.')

    def Block(sub):
      return combinators.Residual.Params().Set(
          pre_norm=normalization.LayerNorm.Params().Set(dim=p.model_dim),
          sub=sub, dropout=_DropoutParams(p.residual_keep_prob))

    def Atten(causal):
      return attention.MultiHeadAttention.Params().Set(
          input_dim=p.model_dim, num_heads=p.num_heads, causal=causal,
          atten_dropout=_DropoutParams(p.atten_keep_prob))

    # FeedForward's Dense → Dense, with the relu dropout between them.
    ffn = combinators.Sequential.Params().Set(sub=[
        dense.Dense.Params().Set(input_dim=p.model_dim,
                                 output_dim=p.hidden_dim, activation='relu'),
        _DropoutParams(p.relu_keep_prob),
        dense.Dense.Params().Set(input_dim=p.hidden_dim,
                                 output_dim=p.model_dim, activation='none'),
    ])
    subs = NestedMap(self_atten=Block(Atten(p.causal)))
    if p.has_aux_atten:
      subs.aux_atten = Block(Atten(False))
    subs.ffn = Block(ffn)
    return subs

  def FProp(self, theta: NestedMap, inputs: NestedMap) -> NestedMap:
    p = self.params
    vec = _Require(self.path, inputs, 'vec', '[batch, time, model_dim]')
    _CheckVecShape(self.path, vec.shape, p.model_dim)
    vec = self.self_atten.FProp(theta.self_atten, vec, None,
                                inputs.get('paddings'))
    if p.has_aux_atten:
      aux_vec = _Require(self.path, inputs, 'aux_vec',
                         'has_aux_atten attends to it')
      _CheckVecShape(self.path, aux_vec.shape, p.model_dim, 'aux_vec')
      vec = self.aux_atten.FProp(theta.aux_atten, vec, aux_vec,
                                 inputs.get('aux_paddings'))
    vec = self.ffn.FProp(theta.ffn, vec)
    out = inputs.copy()
    out.vec = vec
    return out

  @classmethod
  def FPropMeta(cls, p, input_shapes):
    shapes = base_layer.ToShape(input_shapes)
    vec = _Require(p.name, shapes, 'vec', '[batch, time, model_dim]')
    _CheckVecShape(p.name, vec, p.model_dim)
    subs = cls.ChildParams(p)
    flops = combinators.Residual.FPropMeta(
        subs.self_atten, vec, None, _Shape(shapes.get('paddings'))).flops
    if p.has_aux_atten:
      aux_vec = _Require(p.name, shapes, 'aux_vec',
                         'has_aux_atten attends to it')
      _CheckVecShape(p.name, aux_vec, p.model_dim, 'aux_vec')
      flops += combinators.Residual.FPropMeta(
          subs.aux_atten, vec, aux_vec,
          _Shape(shapes.get('aux_paddings'))).flops
    flops += combinators.Residual.FPropMeta(subs.ffn, vec).flops
    return base_layer.Meta(flops, shapes)


def PositionSignal(length: Any, dim: int, dtype: tf.DType = tf.float32,
                   min_timescale: float = 1.0,
                   max_timescale: float = 1.0e4) -> tf.Tensor:
  """Sinusoidal position encoding [length, dim]: [sin | cos] of positions.

  Timescales form a geometric series from min_timescale to max_timescale over
  dim / 2 channels (Vaswani et al. 2017, in Lingvo's and tensor2tensor's
  concatenated rather than interleaved layout).
  """
  if dim % 2:
    raise ValueError(f'PositionSignal: dim must be even ([sin | cos]), got '
                     f'{dim}.')
  num_timescales = dim // 2
  log_increment = math.log(max_timescale / min_timescale) / max(
      num_timescales - 1, 1)
  inv_timescales = min_timescale * tf.exp(
      tf.range(num_timescales, dtype=tf.float32) * -log_increment)
  position = tf.cast(tf.range(length), tf.float32)
  scaled = position[:, tf.newaxis] * inv_timescales[tf.newaxis, :]
  return tf.cast(tf.concat([tf.sin(scaled), tf.cos(scaled)], axis=1), dtype)


class TransformerEmbedding(base_layer.BaseLayer):
  """NestedMap(ids [batch, time] int, paddings, ...) -> NestedMap(vec, paddings, ...).

  vec = dropout(embedding(ids) · [sqrt(d)] + PositionSignal(time, d)). `ids`
  is consumed (not passed on); every other key (paddings, labels, ...) passes
  through unchanged.
  """

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('vocab_size', 0, 'Number of token ids.')
    p.Define('model_dim', 0, 'Model dimension d; even (sin and cos halves).')
    p.Define('scale_sqrt_depth', True, 'Multiply token embeddings by '
             'sqrt(model_dim) before adding the position signal.')
    p.Define('keep_prob', 1.0, 'Dropout keep_prob of the summed embedding.')
    return p

  @classmethod
  def ChildParams(cls, p) -> NestedMap:
    if p.model_dim <= 0 or p.model_dim % 2:
      raise ValueError(f'{p.name}: model_dim must be even and > 0 (the '
                       f'position signal is [sin | cos]), got {p.model_dim}.')
    return NestedMap(
        token_emb=embedding.Embedding.Params().Set(
            vocab_size=p.vocab_size, embedding_dim=p.model_dim,
            scale_sqrt_depth=p.scale_sqrt_depth),
        dropout=_DropoutParams(p.keep_prob))

  def FProp(self, theta: NestedMap, inputs: NestedMap) -> NestedMap:
    p = self.params
    ids = _Require(self.path, inputs, 'ids', 'int token ids [batch, time]')
    _CheckIdsShape(self.path, ids.shape)
    vec = self.token_emb.FProp(theta.token_emb, ids)
    # A function of the time length only: constant-folded when it is static.
    time = ids.shape[1] if ids.shape[1] is not None else tf.shape(ids)[1]
    vec += PositionSignal(time, p.model_dim, vec.dtype)[tf.newaxis]
    out = inputs.copy()
    del out['ids']
    out.vec = self.dropout.FProp(theta.dropout, vec)
    return out

  @classmethod
  def FPropMeta(cls, p, input_shapes):
    shapes = base_layer.ToShape(input_shapes)
    ids = _Require(p.name, shapes, 'ids', 'int token ids [batch, time]')
    _CheckIdsShape(p.name, ids)
    subs = cls.ChildParams(p)
    emb = embedding.Embedding.FPropMeta(subs.token_emb, ids)
    vec = emb.out_shapes[0]
    drop = dropout.Dropout.FPropMeta(subs.dropout, vec)
    out = shapes.copy()
    del out['ids']
    out.vec = vec
    # + the position signal's add (its sin/cos depend on time only).
    return base_layer.Meta(emb.flops + vec.num_elements() + drop.flops, out)


def _CheckIdsShape(where: str, shape: tf.TensorShape) -> None:
  if shape.rank is not None and shape.rank != 2:
    raise ValueError(f'{where}: ids must be [batch, time], got shape {shape}.')


class TransformerSoftmax(base_layer.BaseLayer):
  """NestedMap(vec, paddings, labels, ...) -> NestedMap(logits, per_token_xent, ...).

  The pre-LN stack's final LayerNorm, then the Softmax layer. `vec` is
  replaced by `logits` [batch, time, vocab_size]; given `labels` [batch,
  time] (int) it adds `per_token_xent` (zero where padded) and `weights`
  (1 - paddings), both [batch, time]. Only batched tensors, so micro-batches
  merge; `XentLoss` reduces them to the loss. Other keys pass through.
  """

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('model_dim', 0, 'Model dimension d of vec.')
    p.Define('vocab_size', 0, 'Number of output classes (tokens).')
    p.Define('final_norm', True, 'Apply a LayerNorm to vec first (a pre-LN '
             "stack's last sub-block output is not normalized).")
    p.Define('label_smoothing', 0.0, "The Softmax layer's label_smoothing.")
    return p

  @classmethod
  def ChildParams(cls, p) -> NestedMap:
    subs = NestedMap()
    if p.final_norm:
      subs.final_norm = normalization.LayerNorm.Params().Set(dim=p.model_dim)
    subs.softmax = embedding.Softmax.Params().Set(
        input_dim=p.model_dim, num_classes=p.vocab_size,
        label_smoothing=p.label_smoothing)
    return subs

  def FProp(self, theta: NestedMap, inputs: NestedMap) -> NestedMap:
    p = self.params
    vec = _Require(self.path, inputs, 'vec', '[batch, time, model_dim]')
    _CheckVecShape(self.path, vec.shape, p.model_dim)
    if p.final_norm:
      vec = self.final_norm.FProp(theta.final_norm, vec)
    out = inputs.copy()
    del out['vec']
    labels = inputs.get('labels')
    if labels is None:
      out.logits = self.softmax.FProp(theta.softmax, vec).logits
      return out
    # float32 like the cross-entropy they weigh (precision.py).
    weights = _Weights(inputs.get('paddings'), labels, tf.float32)
    result = self.softmax.FProp(theta.softmax, vec, labels, weights)
    out.logits = result.logits
    out.per_token_xent = result.per_example_xent * weights
    out.weights = weights
    return out

  @classmethod
  def FPropMeta(cls, p, input_shapes):
    shapes = base_layer.ToShape(input_shapes)
    vec = _Require(p.name, shapes, 'vec', '[batch, time, model_dim]')
    _CheckVecShape(p.name, vec, p.model_dim)
    subs = cls.ChildParams(p)
    flops = 0
    if p.final_norm:
      flops += normalization.LayerNorm.FPropMeta(subs.final_norm, vec).flops
    out = shapes.copy()
    del out['vec']
    labels = shapes.get('labels')
    if labels is None:
      meta = embedding.Softmax.FPropMeta(subs.softmax, vec)
      out.logits = meta.out_shapes[0].logits
      return base_layer.Meta(flops + meta.flops, out)
    meta = embedding.Softmax.FPropMeta(subs.softmax, vec, labels, labels)
    out.logits = meta.out_shapes[0].logits
    out.per_token_xent = labels
    out.weights = labels
    rows = labels.num_elements()
    # 1 - paddings, and the masking multiply.
    flops += meta.flops + (rows if 'paddings' in shapes else 0) + rows
    return base_layer.Meta(flops, out)


def _Weights(paddings: Optional[tf.Tensor], labels: tf.Tensor,
             dtype: tf.DType) -> tf.Tensor:
  if paddings is None:
    return tf.ones(tf.shape(labels), dtype)
  return 1.0 - tf.cast(paddings, dtype)


def XentLoss(outputs: NestedMap) -> NestedMap:
  """NestedMap(avg_xent, total_weight) of a TransformerSoftmax output.

  Reduced after the pipeline merges the micro-batches, so avg_xent is the
  mean over all of the mini-batch's non-padded tokens.
  """
  total_weight = tf.reduce_sum(outputs.weights)
  return NestedMap(
      avg_xent=tf.math.divide_no_nan(tf.reduce_sum(outputs.per_token_xent),
                                     total_weight),
      total_weight=total_weight)
