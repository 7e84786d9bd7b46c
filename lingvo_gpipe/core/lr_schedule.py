"""Learning-rate schedules: the base rate times a factor of the global step.

Invariant: a schedule is Params (`model_params.LrScheduleParams()`, at
`train.lr_schedule` of every experiment) and `Factor(p, step)` is a pure function of the step, so a
resumed run continues exactly where it stopped and the trainer can log the
rate it applies.

Types:
  constant      1 (after the warmup, if any).
  exponential   decay_rate ** (step / decay_steps), floored or not (staircase),
                as in the AmoebaNet and GPipe image experiments.
  cosine        half a cosine from 1 to min_ratio over decay_steps.
  rsqrt         the Transformer's rsqrt(max(step, warmup)) / rsqrt(warmup).
Every type first ramps linearly from 0 over `warmup_steps` (rsqrt has its own
warmup shape) and never goes below `min_ratio`.
"""

from __future__ import annotations

import difflib

import tensorflow as tf

from lingvo_gpipe.core import hyperparams

TYPES = ('constant', 'exponential', 'cosine', 'rsqrt')


def Validate(p: hyperparams.Params) -> None:
  """Raises ValueError naming the bad field and what is valid."""
  if p.type not in TYPES:
    close = difflib.get_close_matches(str(p.type), TYPES, n=1)
    hint = f' Did you mean {close[0]!r}?' if close else ''
    raise hyperparams.ConfigError(f'train.lr_schedule.type={p.type!r} is not a schedule; '
                                  f'valid: {", ".join(TYPES)}.{hint}')
  if p.warmup_steps < 0:
    raise hyperparams.ConfigError('train.lr_schedule.warmup_steps must be >= 0, got '
                                  f'{p.warmup_steps}.')
  if p.type == 'rsqrt' and p.warmup_steps < 1:
    raise hyperparams.ConfigError("train.lr_schedule.type='rsqrt' needs warmup_steps >= 1.")
  if p.type in ('exponential', 'cosine') and p.decay_steps < 1:
    raise hyperparams.ConfigError(f'train.lr_schedule.decay_steps must be >= 1 for '
                                  f'{p.type!r}, got {p.decay_steps}.')
  if not 0.0 <= p.min_ratio <= 1.0:
    raise hyperparams.ConfigError(f'train.lr_schedule.min_ratio must be in [0, 1], got '
                                  f'{p.min_ratio}.')


def Factor(p: hyperparams.Params, step: tf.Tensor) -> tf.Tensor:
  """The multiplier of the base learning rate at `step` (float32 scalar)."""
  Validate(p)
  step = tf.cast(step, tf.float32)
  warmup = float(p.warmup_steps)
  if p.type == 'rsqrt':
    factor = tf.math.rsqrt(tf.maximum(step + 1.0, warmup)) * warmup**0.5
    factor *= tf.minimum(1.0, (step + 1.0) / warmup)
  else:
    if p.type == 'constant':
      factor = tf.constant(1.0)
    elif p.type == 'exponential':
      exponent = (step - warmup) / float(p.decay_steps)
      if p.staircase:
        exponent = tf.floor(exponent)
      factor = tf.pow(float(p.decay_rate), tf.maximum(exponent, 0.0))
    else:  # cosine
      progress = tf.clip_by_value((step - warmup) / float(p.decay_steps), 0., 1.)
      cosine = 0.5 * (1.0 + tf.cos(3.141592653589793 * progress))
      factor = p.min_ratio + (1.0 - p.min_ratio) * cosine
    if warmup > 0:
      factor *= tf.minimum(1.0, (step + 1.0) / warmup)
  return tf.maximum(factor, float(p.min_ratio)) if p.min_ratio else factor
