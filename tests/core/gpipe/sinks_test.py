"""Tests of sinks: a token on its group's device hands the tape the group's gradients."""

import numpy as np
import tensorflow as tf

from lingvo_gpipe.core.gpipe import sinks as sinks_lib


def test_a_token_returns_the_filled_gradients_for_its_tensors():
  a, b = tf.Variable(2.0), tf.Variable([1.0, 1.0])
  sinks = sinks_lib.Sinks()
  with tf.GradientTape() as tape:
    token = sinks.Token('cell_0', [a.read_value(), b.read_value()],
                        tf.device('/device:CPU:1'))
    sinks.Fill('cell_0', [tf.constant(5.0), None])
    out = token * 3.0
  grad_a, grad_b = tape.gradient(out, [a, b])
  assert float(grad_a) == 5.0 and grad_b is None
  assert token.device.endswith('CPU:1')
  assert [float(g) for g in sinks.TokenGradients()] == [0.0]
  np.testing.assert_array_equal(token, 0.0)
