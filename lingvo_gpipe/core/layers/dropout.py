"""Dropout and drop-path, with masks that re-materialization reproduces.

Invariant: a mask is a pure function of (layer path, random_seed, context step,
context micro-batch) through `StatelessSeed`, never of a stateful RNG. So when
the pipeline recomputes a cell's forward in its backward pass, every dropout in
it draws the same mask as in the forward, while masks differ across steps,
micro-batches and layers. Outside training, or at keep_prob 1, both layers are
the identity.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.nested_map import NestedMap

# FLOPs per element in training: the keep/drop select and the 1/keep_prob scale.
_DROP_FLOPS_PER_ELEMENT = 2


def _CheckKeepProb(where: str, keep_prob: Any) -> None:
  if not isinstance(keep_prob, (int, float)) or not 0.0 < keep_prob <= 1.0:
    raise ValueError(f'{where}: keep_prob must be in (0, 1], got {keep_prob!r}.')


def _Drop(inputs: tf.Tensor, keep_prob: Union[float, tf.Tensor],
          noise_shape: Any, seed: tf.Tensor) -> tf.Tensor:
  """Zeroes entries with probability 1 - keep_prob; scales the rest by 1/keep_prob."""
  rate = 1.0 - tf.cast(keep_prob, inputs.dtype)
  return tf.nn.experimental.stateless_dropout(
      inputs, rate=rate, seed=seed, noise_shape=noise_shape)


def _Dims(inputs: tf.Tensor) -> list[Any]:
  """Input dims: Python ints where static, scalar tensors where not."""
  if inputs.shape.rank is None:
    raise ValueError(f'Dropout needs inputs of known rank, got {inputs.shape}.')
  dynamic = tf.shape(inputs)
  return [d if d is not None else dynamic[i]
          for i, d in enumerate(inputs.shape.as_list())]


def _AsShape(dims: Sequence[Any]) -> Any:
  if all(isinstance(d, int) for d in dims):
    return list(dims)
  return tf.stack([tf.cast(d, tf.int32) for d in dims])


def _Meta(p, input_shape) -> NestedMap:
  _CheckKeepProb(p.name, p.keep_prob)
  shape = base_layer.ToShape(input_shape)
  if p.keep_prob == 1.0:
    return base_layer.Meta(0, shape)
  n = shape.num_elements()
  if n is None:
    raise ValueError(f'{p.name}: FLOPs need a fully defined shape, got {shape}.')
  return base_layer.Meta(n * _DROP_FLOPS_PER_ELEMENT, shape)


class Dropout(base_layer.BaseLayer):
  """Inverted dropout: keeps each entry with keep_prob, scaled by 1/keep_prob.

  One keep/drop flag covers a block of entries where the noise shape is 1:
  `noise_shape_broadcast_dims=[1, 2]` on NHWC drops whole channels.
  """

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('keep_prob', 1.0, 'Probability of keeping an entry, in (0, 1].')
    p.Define('noise_shape', None, 'Shape of the keep/drop flags, broadcast '
             'over the input; None or -1 entries take the input dim. None: '
             'the input shape.')
    p.Define('noise_shape_broadcast_dims', None, 'Dims (negative ok) whose '
             'noise shape is 1: one flag shared along them.')
    return p

  def __init__(self, params):
    super().__init__(params)
    _CheckKeepProb(self.path, self.params.keep_prob)

  def _NoiseShape(self, inputs: tf.Tensor) -> Any:
    p = self.params
    dims = _Dims(inputs)
    rank = len(dims)
    if p.noise_shape is not None:
      if len(p.noise_shape) != rank:
        raise ValueError(f'{self.path}: noise_shape {p.noise_shape} has rank '
                         f'{len(p.noise_shape)}, inputs {inputs.shape} have '
                         f'rank {rank}.')
      dims = [d if n in (None, -1) else n for d, n in zip(dims, p.noise_shape)]
    for d in p.noise_shape_broadcast_dims or ():
      if not -rank <= d < rank:
        raise ValueError(f'{self.path}: noise_shape_broadcast_dims has {d}, '
                         f'out of range for inputs of rank {rank}.')
      dims[d] = 1
    return _AsShape(dims)

  def FProp(self, theta: Any, inputs: tf.Tensor) -> tf.Tensor:
    p = self.params
    if not base_layer.CurrentContext().training or p.keep_prob == 1.0:
      return inputs
    return _Drop(inputs, p.keep_prob, self._NoiseShape(inputs),
                 self.StatelessSeed())

  @classmethod
  def FPropMeta(cls, p, input_shape):
    return _Meta(p, input_shape)


class DropPath(base_layer.BaseLayer):
  """Drops whole examples of a branch (AmoebaNet's drop path), scaling by 1/keep.

  One flag per example: the noise shape is [N, 1, ..., 1]. AmoebaNet scales
  keep_prob down with the cell's depth (set per cell in its Params) and, with
  `ramp_steps`, ramps the drop rate linearly from 0 over training steps.
  """

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('keep_prob', 1.0, 'Probability of keeping an example, in (0, 1].')
    p.Define('ramp_steps', 0, 'If > 0, the drop rate is (1 - keep_prob) · '
             'min(1, step / ramp_steps), with the context step; 0: constant.')
    return p

  def __init__(self, params):
    super().__init__(params)
    p = self.params
    _CheckKeepProb(self.path, p.keep_prob)
    if not isinstance(p.ramp_steps, int) or p.ramp_steps < 0:
      raise ValueError(f'{self.path}: ramp_steps must be an int >= 0, got '
                       f'{p.ramp_steps!r}.')

  def _KeepProb(self) -> Union[float, tf.Tensor]:
    p = self.params
    if not p.ramp_steps:
      return p.keep_prob
    step = tf.cast(base_layer.CurrentContext().step, tf.float32)
    ratio = tf.minimum(1.0, step / float(p.ramp_steps))
    return 1.0 - ratio * (1.0 - p.keep_prob)

  def FProp(self, theta: Any, inputs: tf.Tensor) -> tf.Tensor:
    p = self.params
    if not base_layer.CurrentContext().training or p.keep_prob == 1.0:
      return inputs
    dims = _Dims(inputs)
    noise_shape = _AsShape([dims[0]] + [1] * (len(dims) - 1))
    return _Drop(inputs, self._KeepProb(), noise_shape, self.StatelessSeed())

  @classmethod
  def FPropMeta(cls, p, input_shape):
    return _Meta(p, input_shape)
