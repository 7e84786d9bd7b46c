"""Fixed-length sequences: framing with EOS/SOS, padding, truncation."""

import numpy as np
import tensorflow as tf

from tasks.text import sequence


def test_with_eos_pads_to_static_length():
  out = sequence.WithEos(tf.constant([5, 6, 7]), 6)
  np.testing.assert_array_equal(out.ids, [5, 6, 7, 1, 0, 0])
  np.testing.assert_array_equal(out.paddings, [0, 0, 0, 0, 1, 1])
  assert out.ids.dtype == tf.int32 and out.paddings.dtype == tf.float32


def test_with_sos_and_eos_shifts_labels_by_one():
  out = sequence.WithSosAndEos(tf.constant([5, 6, 7], tf.int64), 5)
  np.testing.assert_array_equal(out.ids, [2, 5, 6, 7, 0])
  np.testing.assert_array_equal(out.labels, [5, 6, 7, 1, 0])
  np.testing.assert_array_equal(out.paddings, [0, 0, 0, 0, 1])


def test_long_sequences_are_truncated_and_fits_says_so():
  tokens = tf.constant([5, 6, 7, 8])
  assert bool(sequence.Fits(tokens, 5)) and not bool(sequence.Fits(tokens, 4))
  out = sequence.WithSosAndEos(tokens, 3)
  np.testing.assert_array_equal(out.ids, [2, 5, 6])
  np.testing.assert_array_equal(out.labels, [5, 6, 1])
  np.testing.assert_array_equal(out.paddings, [0, 0, 0])
  np.testing.assert_array_equal(sequence.WithEos(tokens, 3).ids, [5, 6, 1])


def test_static_shapes_in_tf_data():
  ds = tf.data.Dataset.from_tensor_slices(tf.ragged.constant([[5], [6, 7]]))
  ds = ds.map(lambda t: sequence.WithSosAndEos(t, 4))
  assert ds.element_spec.ids.shape.as_list() == [4]
  assert ds.element_spec.paddings.shape.as_list() == [4]
