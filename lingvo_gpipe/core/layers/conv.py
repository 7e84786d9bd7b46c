"""2-D convolutions on NHWC inputs: Conv2D, DepthwiseConv2D, SeparableConv2D.

Invariant: one function gives the output spatial size of a window sliding with
a stride under a padding, and every conv (and pooling) layer's FProp and
FPropMeta go through the same TensorFlow padding rule it encodes: 'SAME' gives
ceil(in / stride), 'VALID' gives ceil((in - k + 1) / stride).

FLOPs count a multiply-add as 2 and every kernel tap of every output position,
padded taps included (the usual convention; TF computes them too).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core.layers import activations
from lingvo_gpipe.core.nested_map import NestedMap

PADDINGS = ('SAME', 'VALID')


def CheckPadding(where: str, padding: Any) -> str:
  """Returns `padding` if it is a valid name, else a ValueError naming the valid ones."""
  if padding not in PADDINGS:
    raise ValueError(f'{where}: unknown padding {padding!r}; valid: '
                     f'{", ".join(PADDINGS)}.')
  return padding


def Pair(where: str, field: str, value: Any) -> tuple[int, int]:
  """(h, w) from an int or a pair of positive ints."""
  pair = (value, value) if isinstance(value, int) else tuple(value)
  if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
    raise ValueError(f'{where}: {field} must be a positive int or a pair of '
                     f'positive ints (h, w), got {value!r}.')
  return pair


def OutputSize(size: Optional[int], window: int, stride: int, padding: str,
               where: str = '') -> Optional[int]:
  """Output length of a `window` sliding over `size` with `stride` (None stays None)."""
  if size is None:
    return None
  if padding == 'SAME':
    return -(-size // stride)
  if size < window:
    raise ValueError(f'{where}: VALID padding needs input size >= window, '
                     f'got input {size} and window {window}.')
  return -(-(size - window + 1) // stride)


def OutputShape(where: str, input_shape: Any, window: Sequence[int],
                stride: Sequence[int], padding: str,
                channels: Optional[int]) -> tf.TensorShape:
  """NHWC output shape of a windowed op; `channels` None keeps the input's."""
  shape = base_layer.ToShape(input_shape)
  if shape.rank != 4:
    raise ValueError(f'{where}: expects NHWC inputs of rank 4, got shape {shape}.')
  n, h, w, c = shape.as_list()
  return tf.TensorShape([
      n, OutputSize(h, window[0], stride[0], padding, where),
      OutputSize(w, window[1], stride[1], padding, where),
      c if channels is None else channels])


def NumElements(where: str, shape: tf.TensorShape) -> int:
  """Elements of a fully defined shape; a clear error if a dim is unknown."""
  n = shape.num_elements()
  if n is None:
    raise ValueError(f'{where}: FLOPs need a fully defined shape, got {shape}.')
  return n


def _CheckInputChannels(where: str, shape: Any, expected: int) -> None:
  shape = tf.TensorShape(shape)
  if shape.rank != 4:
    raise ValueError(f'{where}: expects NHWC inputs of rank 4, got shape {shape}.')
  if shape[-1] is not None and shape[-1] != expected:
    raise ValueError(f'{where}: input has {shape[-1]} channels, but filter_shape '
                     f'says {expected} (input shape {shape}).')


def _CheckFilterShape(where: str, filter_shape: Any, what: str) -> list[int]:
  fs = list(filter_shape) if isinstance(filter_shape, (list, tuple)) else []
  if len(fs) != 4 or not all(isinstance(d, int) and d > 0 for d in fs):
    raise ValueError(f'{where}: filter_shape must be 4 positive ints '
                     f"{what.rstrip('.')}, got {filter_shape!r}.")
  return fs


class _ConvBase(base_layer.BaseLayer):
  """Params and checks shared by the three convolutions."""

  _FILTER_DOC = '[h, w, in, out].'

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('filter_shape', hyperparams.REQUIRED,
             f'Kernel shape {cls._FILTER_DOC}')
    p.Define('stride', (1, 1), 'Stride (h, w), or one int for both.')
    p.Define('padding', 'SAME', f'One of {PADDINGS}.')
    p.Define('has_bias', False, 'Whether to add a bias per output channel.')
    p.Define('activation', 'none', f'One of {activations.Names()}.')
    return p

  @classmethod
  def _Checked(cls, p) -> tuple[list[int], tuple[int, int]]:
    """(filter_shape, stride) of valid Params; errors name the bad field."""
    fs = _CheckFilterShape(p.name, p.filter_shape, cls._FILTER_DOC)
    stride = Pair(p.name, 'stride', p.stride)
    CheckPadding(p.name, p.padding)
    activations.GetFn(p.activation)
    return fs, stride

  @classmethod
  def _OutChannels(cls, p) -> int:
    return p.filter_shape[3]

  def __init__(self, params):
    super().__init__(params)
    _, stride = self._Checked(self.params)
    self._strides = [1, *stride, 1]

  def _BiasAndActivation(self, theta: NestedMap, out: tf.Tensor) -> tf.Tensor:
    if self.params.has_bias:
      out = tf.nn.bias_add(out, theta.b)
    return activations.GetFn(self.params.activation)(out)

  def _CreateBias(self) -> None:
    if self.params.has_bias:
      self.CreateVariable('b', base_layer.WeightParams(
          [self._OutChannels(self.params)],
          init=base_layer.WeightInit.Constant(0.0)))

  @classmethod
  def _MacsPerPosition(cls, p) -> int:
    """Multiply-adds per output (n, y, x) position, all output channels."""
    raise NotImplementedError

  @classmethod
  def FPropMeta(cls, p, input_shape):
    fs, stride = cls._Checked(p)
    _CheckInputChannels(p.name, base_layer.ToShape(input_shape), fs[2])
    out_shape = OutputShape(p.name, input_shape, fs[:2], stride, p.padding,
                            cls._OutChannels(p))
    per_channel = ((1 if p.has_bias else 0) +
                   activations.FlopsPerElement(p.activation))
    per_position = 2 * cls._MacsPerPosition(p) + cls._OutChannels(p) * per_channel
    return base_layer.Meta(
        NumElements(p.name, out_shape[:-1]) * per_position, out_shape)


class Conv2D(_ConvBase):
  """y = activation(conv2d(x, w) + b) on NHWC inputs; w is [h, w, in, out]."""

  def __init__(self, params):
    super().__init__(params)
    self.CreateVariable('w', base_layer.WeightParams(self.params.filter_shape))
    self._CreateBias()

  def FProp(self, theta: NestedMap, inputs: tf.Tensor) -> tf.Tensor:
    p = self.params
    _CheckInputChannels(self.path, inputs.shape, p.filter_shape[2])
    out = tf.nn.conv2d(inputs, theta.w, strides=self._strides,
                       padding=p.padding)
    return self._BiasAndActivation(theta, out)

  @classmethod
  def _MacsPerPosition(cls, p) -> int:
    h, w, cin, cout = p.filter_shape
    return h * w * cin * cout


class DepthwiseConv2D(_ConvBase):
  """Per-channel conv: w is [h, w, in, multiplier]; output has in·multiplier channels."""

  _FILTER_DOC = '[h, w, in, channel_multiplier].'

  @classmethod
  def _OutChannels(cls, p) -> int:
    return p.filter_shape[2] * p.filter_shape[3]

  def __init__(self, params):
    super().__init__(params)
    self.CreateVariable('w', base_layer.WeightParams(self.params.filter_shape))
    self._CreateBias()

  def FProp(self, theta: NestedMap, inputs: tf.Tensor) -> tf.Tensor:
    p = self.params
    _CheckInputChannels(self.path, inputs.shape, p.filter_shape[2])
    out = tf.nn.depthwise_conv2d(
        inputs, theta.w, strides=self._strides,
        padding=p.padding)
    return self._BiasAndActivation(theta, out)

  @classmethod
  def _MacsPerPosition(cls, p) -> int:
    return math.prod(p.filter_shape)


class SeparableConv2D(_ConvBase):
  """AmoebaNet's separable conv: depthwise k×k (strided), then pointwise 1×1.

  Variables: `depthwise_w` [h, w, in, depth_multiplier] and `pointwise_w`
  [1, 1, in·depth_multiplier, out]. No batch norm inside: it is composed
  around the layer, as AmoebaNet applies BN after the pointwise conv.
  """

  _FILTER_DOC = '[h, w, in, out]: depthwise h×w, pointwise to out.'

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('depth_multiplier', 1, 'Depthwise channel multiplier.')
    return p

  @classmethod
  def _Checked(cls, p):
    checked = super()._Checked(p)
    if not isinstance(p.depth_multiplier, int) or p.depth_multiplier <= 0:
      raise ValueError(f'{p.name}: depth_multiplier must be a positive int, '
                       f'got {p.depth_multiplier!r}.')
    return checked

  def __init__(self, params):
    super().__init__(params)
    p = self.params
    h, w, cin, cout = p.filter_shape
    mid = cin * p.depth_multiplier
    self.CreateVariable('depthwise_w', base_layer.WeightParams(
        [h, w, cin, p.depth_multiplier]))
    self.CreateVariable('pointwise_w', base_layer.WeightParams(
        [1, 1, mid, cout]))
    self._CreateBias()

  def FProp(self, theta: NestedMap, inputs: tf.Tensor) -> tf.Tensor:
    p = self.params
    _CheckInputChannels(self.path, inputs.shape, p.filter_shape[2])
    out = tf.nn.separable_conv2d(
        inputs, theta.depthwise_w, theta.pointwise_w,
        strides=self._strides, padding=p.padding)
    return self._BiasAndActivation(theta, out)

  @classmethod
  def _MacsPerPosition(cls, p) -> int:
    h, w, cin, cout = p.filter_shape
    mid = cin * p.depth_multiplier
    return h * w * mid + mid * cout
