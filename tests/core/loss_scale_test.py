"""Tests of dynamic loss scaling: exact unscaling, halving, doubling, modes."""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import loss_scale


def test_unscaled_gradients_equal_the_loss_own_bit_for_bit():
  scale = loss_scale.DynamicLossScale(2.0**15, growth_steps=10)
  w = tf.Variable([[0.3, -1.7], [2.5, 1e-3]])
  x = tf.constant([[1.0, 2.0]])
  with tf.GradientTape(persistent=True) as tape:
    loss = tf.reduce_sum(tf.tanh(x @ w))
    scaled = scale.Scaled(loss)
  plain = tape.gradient(loss, w)
  (unscaled,) = scale.Unscaled([tape.gradient(scaled, w)])
  np.testing.assert_array_equal(unscaled.numpy(), plain.numpy())
  sparse = tf.IndexedSlices(tf.constant([[4.0, 8.0]]), tf.constant([1]))
  (back,) = scale.Unscaled([sparse])
  assert isinstance(back, tf.IndexedSlices)
  np.testing.assert_array_equal(back.values.numpy(), [[4.0 / 2**15,
                                                       8.0 / 2**15]])
  assert scale.Unscaled([None]) == [None]


def test_overflow_halves_the_scale_and_counts_the_skip():
  scale = loss_scale.DynamicLossScale(8.0, growth_steps=3)
  assert bool(scale.Overflowed(tf.constant(False)))
  assert not bool(scale.Overflowed(tf.constant(True)))
  scale.Update(tf.constant(False))
  assert float(scale.scale.numpy()) == 4.0
  assert int(scale.skipped_steps.numpy()) == 1
  for _ in range(5):
    scale.Update(tf.constant(False))
  # Never below MIN_SCALE; there an overflow is no longer a skip.
  assert float(scale.scale.numpy()) == loss_scale.MIN_SCALE
  assert not bool(scale.Overflowed(tf.constant(False)))


def test_scale_doubles_after_growth_steps_without_overflow():
  scale = loss_scale.DynamicLossScale(4.0, growth_steps=3)
  seen = []
  for finite in [True, True, True, True, False, True, True, True]:
    scale.Update(tf.constant(finite))
    seen.append(float(scale.scale.numpy()))
  # 3 good steps double it; an overflow halves it and restarts the count.
  assert seen == [4, 4, 8, 8, 4, 4, 4, 8]


def test_disabled_scale_changes_nothing():
  scale = loss_scale.DynamicLossScale(2.0**15, growth_steps=1, enabled=False)
  loss = tf.constant(3.0)
  assert scale.Scaled(loss) is loss
  assert float(scale.scale.numpy()) == 1.0
  assert not bool(scale.Overflowed(tf.constant(False)))


def test_modes_and_bad_settings():
  assert loss_scale.Needed('auto', ['float32', 'float16'])
  assert not loss_scale.Needed('auto', ['float32', 'bfloat16'])
  assert loss_scale.Needed('dynamic', ['float32'])
  assert not loss_scale.Needed('none', ['float16'])
  with pytest.raises(ValueError, match="loss_scale='dynamc'.*auto, dynamic, "
                     'none'):
    loss_scale.Needed('dynamc', [])
  with pytest.raises(ValueError, match='loss_scale_initial=0.5'):
    loss_scale.DynamicLossScale(0.5, growth_steps=1)
  with pytest.raises(ValueError, match='loss_scale_growth_steps=0'):
    loss_scale.DynamicLossScale(2.0, growth_steps=0)
