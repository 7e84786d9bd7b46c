"""Pooling on NHWC inputs: windowed max/average, and global average.

Invariant: windowed pooling sizes its output with the same padding rule as the
convolutions (`conv.OutputShape`), so a pooling branch and a conv branch of an
AmoebaNet cell given the same window, stride and padding always agree in shape.
Neither layer has variables.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.layers import conv

POOLING_TYPES = ('MAX', 'AVG')


class Pooling(base_layer.BaseLayer):
  """Max or average pooling over an (h, w) window.

  'AVG' with 'SAME' padding averages only the real (unpadded) inputs under
  the window, as tf.nn.avg_pool does.
  """

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('pooling_type', 'MAX', f'One of {POOLING_TYPES}.')
    p.Define('window', (3, 3), 'Window (h, w), or one int for both.')
    p.Define('stride', (1, 1), 'Stride (h, w), or one int for both.')
    p.Define('padding', 'SAME', f'One of {conv.PADDINGS}.')
    return p

  @classmethod
  def _Checked(cls, p) -> tuple[tuple[int, int], tuple[int, int]]:
    if p.pooling_type not in POOLING_TYPES:
      raise ValueError(f'{p.name}: unknown pooling_type {p.pooling_type!r}; '
                       f'valid: {", ".join(POOLING_TYPES)}.')
    conv.CheckPadding(p.name, p.padding)
    return conv.Pair(p.name, 'window', p.window), conv.Pair(
        p.name, 'stride', p.stride)

  def __init__(self, params):
    super().__init__(params)
    self._window, self._stride = self._Checked(self.params)

  def FProp(self, theta: Any, inputs: tf.Tensor) -> tf.Tensor:
    p = self.params
    conv.OutputShape(self.path, inputs.shape, self._window, self._stride,
                     p.padding, None)  # rank and VALID-size checks
    pool = tf.nn.max_pool2d if p.pooling_type == 'MAX' else tf.nn.avg_pool2d
    return pool(inputs, ksize=self._window, strides=self._stride,
                padding=p.padding)

  @classmethod
  def FPropMeta(cls, p, input_shape):
    window, stride = cls._Checked(p)
    out_shape = conv.OutputShape(p.name, input_shape, window, stride,
                                 p.padding, None)
    # One compare (MAX) or add (AVG) per window tap, counting AVG's divide as
    # the first tap's add.
    flops = conv.NumElements(p.name, out_shape) * window[0] * window[1]
    return base_layer.Meta(flops, out_shape)


class GlobalAvgPool(base_layer.BaseLayer):
  """Averages over all spatial dims: [N, ..., C] (rank >= 3) -> [N, C]."""

  def FProp(self, theta: Any, inputs: tf.Tensor) -> tf.Tensor:
    _CheckRank(self.path, inputs.shape)
    return tf.reduce_mean(inputs, axis=list(range(1, inputs.shape.rank - 1)))

  @classmethod
  def FPropMeta(cls, p, input_shape):
    shape = base_layer.ToShape(input_shape)
    _CheckRank(p.name, shape)
    return base_layer.Meta(
        conv.NumElements(p.name, shape), tf.TensorShape([shape[0], shape[-1]]))


def _CheckRank(where: str, shape: tf.TensorShape) -> None:
  if shape.rank is None or shape.rank < 3:
    raise ValueError(f'{where}: GlobalAvgPool needs inputs [N, ..., C] of rank '
                     f'>= 3, got shape {shape}.')
