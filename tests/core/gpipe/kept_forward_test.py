"""Tests of kept_forward: a forward split from its backward gives the tape's gradients."""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core.gpipe import kept_forward


def _Cell(theta, x):
  """Outputs of two kinds (a float to differentiate, an int) and a statistic."""
  h = tf.nn.relu(tf.matmul(x, theta['w']) + theta['b'])
  return {'y': tf.tanh(h), 'rows': tf.shape(x)[0]}, [tf.reduce_mean(h, 0)]


_SPECS = [{'w': tf.TensorSpec([4, 3]), 'b': tf.TensorSpec([3])},
          tf.TensorSpec([None, 4])]


def _Theta():
  return {'w': tf.random.stateless_normal([4, 3], [1, 2]),
          'b': tf.random.stateless_normal([3], [3, 4])}


def test_gradients_from_residuals_equal_the_tapes():
  kept = kept_forward.KeptForward(_Cell, _SPECS)
  theta, x = _Theta(), tf.random.stateless_normal([5, 4], [5, 6])

  @tf.function
  def Split():
    (outputs, stats), residuals = kept.Forward(theta, x)
    dy = 2.0 * outputs['y']  # d/dy of sum(y²)
    grads = kept.Backward([theta, x], residuals,
                          ({'y': dy, 'rows': None}, [None]))
    return outputs['y'], outputs['rows'], stats, grads

  with tf.GradientTape() as tape:
    tape.watch([theta, x])
    (outputs, stats) = _Cell(theta, x)
    loss = tf.reduce_sum(outputs['y'] ** 2)
  expected = tape.gradient(loss, [theta['b'], theta['w'], x])
  y, rows, split_stats, grads = Split()
  np.testing.assert_allclose(y, outputs['y'], rtol=1e-6)
  assert int(rows) == 5
  np.testing.assert_allclose(split_stats[0], stats[0], rtol=1e-6)
  assert len(grads) == 3  # flat args: b, w (sorted keys), x
  for g, e in zip(grads, expected):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)


def test_the_forwards_inputs_are_not_kept_as_residuals():
  # relu's and tanh's gradients read their outputs; matmul's reads x and w,
  # which Backward is given again, so no residual has their shapes.
  kept = kept_forward.KeptForward(_Cell, _SPECS)
  shapes = [s.shape.as_list() for s in kept.residual_specs]
  assert [4, 3] not in shapes and [None, 4] not in shapes, shapes
  assert [None, 3] in shapes, shapes


def test_a_wrong_number_of_arguments_or_output_gradients_is_refused():
  kept = kept_forward.KeptForward(_Cell, _SPECS)
  theta, x = _Theta(), tf.ones([2, 4])
  with pytest.raises(ValueError, match='Traced with 3 tensors, called with 2'):
    kept.Forward(theta['w'], x)
  _, residuals = kept.Forward(theta, x)
  with pytest.raises(ValueError, match='3 output gradients expected, got 1'):
    kept.Backward([theta, x], residuals, [tf.ones([2, 3])])


def test_a_traced_function_already_differentiated_splits_the_same():
  # An eager call under a tape splits the function itself, appending its
  # residuals to the graph's outputs; splitting it again must not take them
  # for the function's own outputs.
  traced = tf.function(_Cell, autograph=False).get_concrete_function(*_SPECS)
  theta, x = _Theta(), tf.random.stateless_normal([5, 4], [5, 6])
  with tf.GradientTape() as tape:
    tape.watch(x)
    eager = tf.reduce_sum(traced(theta, x)[0]['y'])
  tape.gradient(eager, x)
  with pytest.raises(ValueError, match='takes no arg_specs'):
    kept_forward.KeptForward(traced, _SPECS)
  kept = kept_forward.KeptForward(traced)
  (outputs, stats), residuals = kept.Forward(theta, x)
  expected, expected_stats = _Cell(theta, x)
  np.testing.assert_allclose(outputs['y'], expected['y'], rtol=1e-6)
  np.testing.assert_allclose(stats[0], expected_stats[0], rtol=1e-6)
  assert len(residuals) == len(kept.residual_specs) > 0
