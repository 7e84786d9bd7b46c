"""Token embedding lookup and the softmax output layer with its cross-entropy.

Invariant: `Embedding` maps ids of any shape [...] to [..., embedding_dim], and
`Softmax` maps inputs [..., input_dim] to logits [..., num_classes] with class
ids, weights and per-example losses of shape [...], so both serve [batch] and
[batch, time] the same way.
"""

from __future__ import annotations

import math
from typing import Optional

import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.nested_map import NestedMap

# log_softmax per logit: max, subtract, exp, sum, and the log-sum subtraction.
_LOG_SOFTMAX_FLOPS_PER_LOGIT = 5


class Embedding(base_layer.BaseLayer):
  """ids [...] (int) -> [..., embedding_dim], optionally scaled by sqrt(dim).

  In a 16-bit fprop_dtype it gathers from the float32 table and casts only
  the rows gathered: casting the table would cost its whole size every call
  and make its gradient dense.
  """

  cast_theta_to_fprop_dtype = False

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('vocab_size', 0, 'Number of rows (distinct ids).')
    p.Define('embedding_dim', 0, 'Size of each embedding vector.')
    p.Define('scale_sqrt_depth', False, 'Multiply outputs by '
             'sqrt(embedding_dim), as the Transformer does.')
    return p

  def __init__(self, params):
    super().__init__(params)
    p = self.params
    if p.vocab_size <= 0 or p.embedding_dim <= 0:
      raise ValueError(f'{self.path}: vocab_size and embedding_dim must be '
                       f'> 0, got {p.vocab_size} and {p.embedding_dim}.')
    self.CreateVariable(
        'emb', base_layer.WeightParams([p.vocab_size, p.embedding_dim]))

  def FProp(self, theta: NestedMap, ids: tf.Tensor) -> tf.Tensor:
    p = self.params
    if ids.dtype.is_floating:
      raise TypeError(f'{self.path}: ids must be integers, got {ids.dtype.name}.')
    out = tf.cast(tf.gather(theta.emb, ids), self.fprop_dtype)
    if p.scale_sqrt_depth:
      out *= math.sqrt(p.embedding_dim)
    return out

  @classmethod
  def FPropMeta(cls, p, ids_shape):
    shape = base_layer.ToShape(ids_shape)
    out_shape = shape.concatenate([p.embedding_dim])
    flops = out_shape.num_elements() if p.scale_sqrt_depth else 0
    return base_layer.Meta(flops, out_shape)


class Softmax(base_layer.BaseLayer):
  """Logits = x · w (+ b) over num_classes, and their cross-entropy with labels.

  FProp returns a NestedMap with `logits` and `log_probs` [..., num_classes];
  given class ids it adds `per_example_xent` [...] (unweighted),
  `total_weight` (sum of the label weights) and `avg_xent` (the weighted mean
  of per_example_xent). With label smoothing ε the target distribution is
  (1 - ε)·one_hot + ε / num_classes, as in Szegedy et al. 2016.

  Logits and everything after them are float32 whatever the fprop_dtype (the
  projection itself runs in it): a 16-bit log-softmax over many classes
  loses the small probabilities the loss is made of. Label weights are taken
  as given (not cast to the compute dtype).
  """

  cast_inputs_to_fprop_dtype = False

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('input_dim', 0, 'Size of the last input dimension.')
    p.Define('num_classes', 0, 'Number of classes (vocabulary size for an LM).')
    p.Define('has_bias', True, 'Whether the logits have a bias.')
    p.Define('label_smoothing', 0.0, 'ε in [0, 1): mass spread uniformly '
             'over all classes in the target distribution.')
    return p

  @classmethod
  def _ProjParams(cls, p):
    """The logits projection's Params, after checking p."""
    if p.input_dim <= 0 or p.num_classes <= 0:
      raise ValueError(f'{p.name}: input_dim and num_classes must be > 0, got '
                       f'{p.input_dim} and {p.num_classes}.')
    if not 0.0 <= p.label_smoothing < 1.0:
      raise ValueError(f'{p.name}: label_smoothing is {p.label_smoothing}; it '
                       'must be in [0, 1).')
    return dense.Dense.Params().Set(
        input_dim=p.input_dim, output_dim=p.num_classes, has_bias=p.has_bias,
        activation='none')

  def __init__(self, params):
    super().__init__(params)
    self.CreateChild('proj', self._ProjParams(self.params))

  def Logits(self, theta: NestedMap, inputs: tf.Tensor) -> tf.Tensor:
    """[..., input_dim] -> [..., num_classes], float32."""
    return tf.cast(self.proj.FProp(theta.proj, inputs), tf.float32)

  def FProp(self,
            theta: NestedMap,
            inputs: tf.Tensor,
            class_ids: Optional[tf.Tensor] = None,
            label_weights: Optional[tf.Tensor] = None) -> NestedMap:
    """Logits and, given class ids, the cross-entropy.

    Args:
      theta: this layer's theta.
      inputs: [..., input_dim].
      class_ids: int [...], the target class of each example, or None.
      label_weights: float [...], each example's weight in avg_xent (e.g.
        1 - paddings); None weighs every example 1.

    Returns:
      NestedMap(logits, log_probs[, per_example_xent, total_weight, avg_xent]).
    """
    p = self.params
    logits = self.Logits(theta, inputs)
    log_probs = tf.nn.log_softmax(logits)
    out = NestedMap(logits=logits, log_probs=log_probs)
    if class_ids is None:
      if label_weights is not None:
        raise ValueError(f'{self.path}: label_weights given without class_ids.')
      return out
    _CheckLabelShape(self.path, 'class_ids', logits.shape[:-1], class_ids.shape)
    # Gathering the target log-prob avoids a [..., num_classes] one-hot, which
    # for a 32k-class LM softmax is as big as the logits.
    target = tf.gather(log_probs, class_ids, axis=-1,
                       batch_dims=class_ids.shape.rank)
    xent = -target
    if p.label_smoothing:
      eps = p.label_smoothing
      xent = (1.0 - eps) * xent - eps * tf.reduce_mean(log_probs, axis=-1)
    if label_weights is None:
      weights = tf.ones_like(xent)
    else:
      _CheckLabelShape(self.path, 'label_weights', logits.shape[:-1],
                       label_weights.shape)
      weights = tf.cast(label_weights, xent.dtype)
    out.per_example_xent = xent
    out.total_weight = tf.reduce_sum(weights)
    out.avg_xent = tf.math.divide_no_nan(
        tf.reduce_sum(xent * weights), out.total_weight)
    return out

  @classmethod
  def FPropMeta(cls, p, input_shape, class_ids_shape=None,
                label_weights_shape=None):
    proj = dense.Dense.FPropMeta(cls._ProjParams(p), input_shape)
    logits_shape = proj.out_shapes[0]
    flops = proj.flops + logits_shape.num_elements() * (
        _LOG_SOFTMAX_FLOPS_PER_LOGIT)
    out = NestedMap(logits=logits_shape, log_probs=logits_shape)
    if class_ids_shape is None:
      return base_layer.Meta(flops, out)
    label_shape = logits_shape[:-1]
    _CheckLabelShape(p.name, 'class_ids', label_shape,
                     base_layer.ToShape(class_ids_shape))
    if label_weights_shape is not None:
      _CheckLabelShape(p.name, 'label_weights', label_shape,
                       base_layer.ToShape(label_weights_shape))
    rows = label_shape.num_elements()
    if p.label_smoothing:
      flops += logits_shape.num_elements() + 3 * rows  # mean and the mix
    flops += 4 * rows  # negate, weigh, two sums
    out.per_example_xent = label_shape
    out.total_weight = tf.TensorShape([])
    out.avg_xent = tf.TensorShape([])
    return base_layer.Meta(flops, out)


def _CheckLabelShape(where: str, what: str, expected: tf.TensorShape,
                     actual: tf.TensorShape) -> None:
  if not tf.TensorShape(actual).is_compatible_with(expected):
    raise ValueError(f'{where}: {what} has shape {actual}, but the logits '
                     f'[..., num_classes] need {expected}.')
