"""Dynamic loss scaling: float16 gradients that neither underflow nor stop a run.

Invariant: the gradients the optimizer applies are the loss's own. The
backward runs on the loss times the scale S, a power of two, and its
gradients are divided by S, which in float32 changes no bit; a step whose
scaled gradients overflow (Inf or NaN) applies nothing, halves S and is
counted as skipped, and after `growth_steps` steps in a row without
overflow S doubles.

Why: float16 keeps 5 exponent bits. A gradient below 2^-24 becomes zero in
the 16-bit backward and one above 65504 becomes Inf; multiplying the loss by
S moves every gradient up by S before the backward rounds it, so the small
ones survive, and the doubling finds the largest S that does not overflow.
bfloat16 has float32's exponent range and needs none (precision.py).

A skipped step is not a failure: the trainer logs it, counts it, and goes
on. An overflow at the smallest scale (`MIN_SCALE`) is: the gradients are
non-finite without any scaling, and the trainer stops as for a NaN loss.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import tensorflow as tf

MIN_SCALE = 1.0
MODES = ('auto', 'dynamic', 'none')


def CheckMode(mode: str) -> None:
  """Raises ValueError naming MODES unless `mode` (train.loss_scale) is one."""
  if mode not in MODES:
    raise ValueError(f'train.loss_scale={mode!r}: use one of '
                     f'{", ".join(MODES)}.')


def Needed(mode: str, compute_dtypes: Sequence[Any]) -> bool:
  """Whether a run scales its loss: 'dynamic', or 'auto' with a float16 layer.

  Raises:
    ValueError: `mode` is not one of MODES.
  """
  CheckMode(mode)
  if mode == 'auto':
    return any(tf.as_dtype(d) == tf.float16 for d in compute_dtypes)
  return mode == 'dynamic'


class DynamicLossScale(tf.Module):
  """The scale S and its counters, as variables a checkpoint keeps."""

  def __init__(self, initial: float, growth_steps: int, enabled: bool = True):
    super().__init__(name='loss_scale')
    if not initial >= MIN_SCALE:
      raise ValueError(f'train.loss_scale_initial={initial}: must be >= '
                       f'{MIN_SCALE}.')
    if growth_steps < 1:
      raise ValueError(f'train.loss_scale_growth_steps={growth_steps}: must '
                       'be >= 1.')
    self.enabled = enabled
    self.growth_steps = growth_steps
    with tf.device('/device:CPU:0'):
      self.scale = tf.Variable(float(initial) if enabled else 1.0,
                               dtype=tf.float32, trainable=False, name='scale')
      self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                                    name='good_steps')
      self.skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                                       name='skipped_steps')

  def Scaled(self, loss: tf.Tensor) -> tf.Tensor:
    """The loss the backward starts from: loss · S."""
    if not self.enabled:
      return loss
    return loss * tf.cast(self.scale, loss.dtype)

  def Unscaled(self, grads: Sequence[Optional[Any]]) -> list[Optional[Any]]:
    """The scaled loss's gradients divided by S (sparse ones stay sparse)."""
    if not self.enabled:
      return list(grads)
    inverse = 1.0 / self.scale

    def Divide(g):
      if g is None:
        return None
      if isinstance(g, tf.IndexedSlices):
        return tf.IndexedSlices(g.values * tf.cast(inverse, g.dtype),
                                g.indices, g.dense_shape)
      return g * tf.cast(inverse, g.dtype)

    return [Divide(g) for g in grads]

  def Overflowed(self, grads_finite: tf.Tensor) -> tf.Tensor:
    """Whether this step is one to skip: scaled, overflowed, above MIN_SCALE."""
    if not self.enabled:
      return tf.constant(False)
    return tf.logical_and(tf.logical_not(grads_finite),
                          self.scale > MIN_SCALE)

  def Update(self, grads_finite: tf.Tensor) -> tf.Tensor:
    """Moves S after a step: halved on overflow, doubled after growth_steps."""
    if not self.enabled:
      return tf.no_op()

    def Grow():
      good = self.good_steps + 1
      grow = good >= self.growth_steps
      return tf.group(
          self.scale.assign(tf.where(grow, self.scale * 2.0, self.scale)),
          self.good_steps.assign(tf.where(grow, tf.constant(0, tf.int64),
                                          good)))

    def Shrink():
      return tf.group(
          self.scale.assign(tf.maximum(self.scale / 2.0, MIN_SCALE)),
          self.good_steps.assign(0),
          self.skipped_steps.assign_add(1))

    return tf.cond(grads_finite, Grow, Shrink)

  def Key(self) -> str:
    """What a checkpoint's scale holds for: other settings start it afresh."""
    if not self.enabled:
      return 'loss scaling: none'
    return f'loss scaling: dynamic, growth every {self.growth_steps} steps'
