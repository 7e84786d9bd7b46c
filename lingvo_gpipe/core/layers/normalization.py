"""Normalization over the last (channel) dimension: BatchNorm and LayerNorm.

Invariant (BatchNorm, as GPipe defines it): in training each micro-batch is
normalized with its own moments, and the moving averages move once per
mini-batch, by the moments of the union of its micro-batches. Merging
per-micro-batch (mean, variance, count) with `ApplyStats` is exact, so the
moving averages after a pipelined step equal those after one update with the
whole batch's moments, whatever the number and sizes of the micro-batches.

Both layers accept inputs of any rank >= 2: [N, C], [N, T, C], [N, H, W, C].
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core import precision
from lingvo_gpipe.core.nested_map import NestedMap

# FLOPs per element: moments (an add for the mean, a subtract-square-add for
# the variance: 3) plus the normalize, scale and shift folded into one
# multiply-add (2). BatchNorm counts its training cost; at inference it is 2.
_NORM_FLOPS_PER_ELEMENT = 5


def _CheckInput(where: str, shape: tf.TensorShape, dim: int) -> None:
  if shape.rank is not None and shape.rank < 2:
    raise ValueError(f'{where}: needs inputs of rank >= 2 with channels last, '
                     f'got shape {shape}.')
  if shape.rank is not None and shape[-1] is not None and shape[-1] != dim:
    raise ValueError(f'{where}: input last dim is {shape[-1]}, but dim is '
                     f'{dim} (input shape {shape}).')


def _CheckDim(where: str, dim: int) -> None:
  if not isinstance(dim, int) or dim <= 0:
    raise ValueError(f'{where}: dim must be a positive int, got {dim!r}.')


def _Meta(p, input_shape) -> NestedMap:
  shape = base_layer.ToShape(input_shape)
  _CheckInput(p.name, shape, p.dim)
  n = shape.num_elements()
  if n is None:
    raise ValueError(f'{p.name}: FLOPs need a fully defined shape, got {shape}.')
  return base_layer.Meta(n * _NORM_FLOPS_PER_ELEMENT, shape)


def MergeMoments(stats_list: Sequence[NestedMap]) -> tuple[tf.Tensor, tf.Tensor]:
  """(mean, variance) of the union of groups, each NestedMap(mean, variance, count).

  Exact: variance is the count-weighted mean of (var_i + (mean_i - mean)²),
  which equals E[x²] - mean² over the union without its cancellation.
  """
  if not stats_list:
    raise ValueError('MergeMoments needs at least one group of statistics.')
  # At least float32: a bfloat16 count or mean would round away exactness.
  dtype = tf.float64 if stats_list[0].mean.dtype == tf.float64 else tf.float32
  counts = [tf.cast(s.count, dtype) for s in stats_list]
  means = [tf.cast(s.mean, dtype) for s in stats_list]
  total = tf.add_n(counts)
  mean = tf.add_n([c * m for c, m in zip(counts, means)]) / total
  variance = tf.add_n([
      c * (tf.cast(s.variance, dtype) + tf.square(m - mean))
      for c, m, s in zip(counts, means, stats_list)
  ]) / total
  return mean, variance


def _CanFuse(inputs: tf.Tensor) -> bool:
  """Whether FusedBatchNorm takes `inputs`: NHWC images of a float type it has."""
  return inputs.shape.rank == 4 and inputs.dtype in (tf.float32, tf.float16,
                                                     tf.bfloat16)


class BatchNorm(base_layer.BaseLayer):
  """Batch normalization over all dims but the last.

  Training: normalizes with the batch's own moments and records them with
  `RecordStats` (applied at once, or by the context's StatsCollector after
  all micro-batches). Inference: normalizes with the moving averages. In a
  16-bit fprop_dtype the statistics are float32: FusedBatchNorm computes
  them so for images; other inputs are normalized in float32 and cast back.
  """

  cast_theta_to_fprop_dtype = False

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('dim', hyperparams.REQUIRED,
             'Number of channels (the last input dim).')
    p.Define('decay', 0.997, 'Moving average decay: new = decay·old + '
             '(1 - decay)·batch, once per mini-batch.')
    p.Define('epsilon', 1e-3, 'Added to the variance before the rsqrt.')
    return p

  def __init__(self, params):
    super().__init__(params)
    p = self.params
    _CheckDim(self.path, p.dim)
    if not 0.0 <= p.decay <= 1.0:
      raise ValueError(f'{self.path}: decay must be in [0, 1], got {p.decay}.')
    zeros = base_layer.WeightInit.Constant(0.0)
    ones = base_layer.WeightInit.Constant(1.0)
    self.CreateVariable('beta', base_layer.WeightParams([p.dim], init=zeros))
    self.CreateVariable('gamma', base_layer.WeightParams([p.dim], init=ones))
    self.CreateVariable('moving_mean', base_layer.WeightParams(
        [p.dim], init=zeros, trainable=False))
    self.CreateVariable('moving_variance', base_layer.WeightParams(
        [p.dim], init=ones, trainable=False))

  def FProp(self, theta: NestedMap, inputs: tf.Tensor) -> tf.Tensor:
    _CheckInput(self.path, inputs.shape, self.params.dim)
    if _CanFuse(inputs):
      # FusedBatchNorm takes 16-bit images with float32 scale and offset and
      # computes the statistics in float32 itself; its gradient keeps the
      # 16-bit input, where casting it up first kept a float32 copy.
      return self._FusedFProp(theta, inputs,
                              base_layer.CurrentContext().training)
    return precision.InFloat32(functools.partial(self._Normalize, theta),
                               inputs)

  def _Normalize(self, theta: NestedMap, inputs: tf.Tensor) -> tf.Tensor:
    p = self.params
    training = base_layer.CurrentContext().training
    if training:
      axes = list(range(inputs.shape.rank - 1))
      mean, variance = tf.nn.moments(inputs, axes)
      self._RecordMoments(inputs, mean, variance)
    else:
      mean, variance = theta.moving_mean, theta.moving_variance
    return tf.nn.batch_normalization(inputs, mean, variance, theta.beta,
                                     theta.gamma, p.epsilon)

  def _FusedFProp(self, theta: NestedMap, inputs: tf.Tensor,
                  training: bool) -> tf.Tensor:
    """One FusedBatchNorm op (and one for its gradient) instead of ~20.

    Same math as the unfused path; it keeps the traced graph of a conv net
    small, which is most of its tracing and first-step time.
    """
    p = self.params
    if training:
      outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
          inputs, theta.gamma, theta.beta, epsilon=p.epsilon, is_training=True)
      # The op returns the Bessel-corrected variance; the moments are n-based.
      count = self._Count(inputs)
      variance *= (count - 1.0) / tf.maximum(count, 1.0)
      self._RecordMoments(inputs, mean, variance)
      return outputs
    outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
        inputs, theta.gamma, theta.beta, mean=theta.moving_mean,
        variance=theta.moving_variance, epsilon=p.epsilon, is_training=False)
    return outputs

  @staticmethod
  def _Count(inputs: tf.Tensor) -> tf.Tensor:
    """Elements per channel, as float32: static when the shape is known."""
    static = inputs.shape[:-1].num_elements()
    if static is not None:
      return tf.constant(float(static))
    count = tf.size(inputs, out_type=tf.int64) // tf.shape(
        inputs, out_type=tf.int64)[-1]
    return tf.cast(count, tf.float32)

  def _RecordMoments(self, inputs: tf.Tensor, mean: tf.Tensor,
                     variance: tf.Tensor) -> None:
    self.RecordStats(NestedMap(
        mean=tf.stop_gradient(mean), variance=tf.stop_gradient(variance),
        count=self._Count(inputs)))

  def ApplyStats(self, stats_list: Sequence[NestedMap]) -> None:
    """Moves the moving averages once, by the merged moments of `stats_list`."""
    mean, variance = MergeMoments(stats_list)
    rate = 1.0 - self.params.decay
    for var, value in ((self.vars.moving_mean, mean),
                       (self.vars.moving_variance, variance)):
      var.assign_sub((var - tf.cast(value, var.dtype)) * rate)

  def MergeStats(self, stats_list: Sequence[NestedMap]) -> NestedMap:
    """The exact moments and count of the union of the groups."""
    mean, variance = MergeMoments(stats_list)
    count = tf.add_n([tf.cast(s.count, mean.dtype) for s in stats_list])
    return NestedMap(mean=mean, variance=variance, count=count)

  def CrossReplicaStats(self, stats_list: Sequence[NestedMap],
                        cross_replica_sum: Callable[[Any], Any]
                        ) -> list[NestedMap]:
    """The moments of all replicas' examples: exact, in two all-reduces."""
    mean, variance = MergeMoments(stats_list)
    count = tf.add_n([tf.cast(s.count, mean.dtype) for s in stats_list])
    total, weighted = cross_replica_sum([count, count * mean])
    global_mean = weighted / total
    spread = cross_replica_sum(count * (variance + tf.square(mean - global_mean)))
    return [NestedMap(mean=global_mean, variance=spread / total, count=total)]

  @classmethod
  def FPropMeta(cls, p, input_shape):
    return _Meta(p, input_shape)


@tf.custom_gradient
def _LayerNorm16(x: tf.Tensor, scale: tf.Tensor, bias: tf.Tensor,
                 epsilon: float) -> tf.Tensor:
  """LayerNorm of 16-bit `x` computed in float32, the result cast back.

  Its gradient keeps only `x` (16-bit) and the per-position statistics, and
  recomputes the normalized float32 values from them: TensorFlow's own
  gradient of the float32 computation would keep a float32 copy of the
  input and of the normalized values, twice the float32 model's memory for
  the tensor and most of what bfloat16 saves on a Transformer layer.
  """
  x32 = tf.cast(x, tf.float32)
  mean, variance = tf.nn.moments(x32, axes=[-1], keepdims=True)
  rstd = tf.math.rsqrt(variance + epsilon)
  y = tf.cast((x32 - mean) * rstd * scale + bias, x.dtype)

  def Backward(grad):
    g = tf.cast(grad, tf.float32)
    normalized = (tf.cast(x, tf.float32) - mean) * rstd
    outer = list(range(len(x.shape) - 1))
    d_scale = tf.reduce_sum(g * normalized, axis=outer)
    d_bias = tf.reduce_sum(g, axis=outer)
    dn = g * scale
    dx = rstd * (dn - tf.reduce_mean(dn, axis=-1, keepdims=True) -
                 normalized * tf.reduce_mean(dn * normalized, axis=-1,
                                             keepdims=True))
    return tf.cast(dx, x.dtype), d_scale, d_bias, None  # none for epsilon

  return y, Backward


class LayerNorm(base_layer.BaseLayer):
  """Normalizes each position over the last dim, then scales and shifts.

  In a 16-bit fprop_dtype it normalizes in float32 and casts the result back.
  """

  cast_theta_to_fprop_dtype = False

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('dim', hyperparams.REQUIRED, 'Size of the last input dim.')
    p.Define('epsilon', 1e-6, 'Added to the variance before the rsqrt.')
    return p

  def __init__(self, params):
    super().__init__(params)
    p = self.params
    _CheckDim(self.path, p.dim)
    self.CreateVariable('scale', base_layer.WeightParams(
        [p.dim], init=base_layer.WeightInit.Constant(1.0)))
    self.CreateVariable('bias', base_layer.WeightParams(
        [p.dim], init=base_layer.WeightInit.Constant(0.0)))

  def FProp(self, theta: NestedMap, inputs: tf.Tensor) -> tf.Tensor:
    p = self.params
    _CheckInput(self.path, inputs.shape, p.dim)

    if inputs.dtype in (tf.float32, tf.float64):
      mean, variance = tf.nn.moments(inputs, axes=[-1], keepdims=True)
      return tf.nn.batch_normalization(inputs, mean, variance, theta.bias,
                                       theta.scale, p.epsilon)
    return _LayerNorm16(inputs, tf.convert_to_tensor(theta.scale),
                        tf.convert_to_tensor(theta.bias), p.epsilon)

  @classmethod
  def FPropMeta(cls, p, input_shape):
    return _Meta(p, input_shape)
