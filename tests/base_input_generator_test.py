"""Tests of BaseInputGenerator batching: static training batches, exact eval."""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe import base_input_generator
from lingvo_gpipe.core.nested_map import NestedMap


class _Range(base_input_generator.BaseInputGenerator):
  """Examples 0..9 with their squares."""

  def _Examples(self, split, training):
    del split, training
    x = tf.range(10)
    return tf.data.Dataset.from_tensor_slices(NestedMap(x=x, y=x * x))


def _Gen(**kw):
  return _Range.Params().Set(batch_size=4, **kw).Instantiate()


def test_training_batches_are_static_shuffled_and_repeat():
  ds = _Gen().Dataset('train', training=True)
  assert ds.element_spec.x.shape.as_list() == [4]
  seen = [b.x.numpy() for b in ds.take(5)]
  flat = np.concatenate(seen)
  assert len(flat) == 20 and set(flat) == set(range(10))
  assert not np.array_equal(flat[:10], np.arange(10))  # shuffled
  again = np.concatenate([b.x.numpy() for b in _Gen().Dataset(
      'train', training=True).take(5)])
  np.testing.assert_array_equal(flat, again)  # from the seed


def test_eval_covers_the_split_once():
  batches = list(_Gen().Dataset('test', training=False))
  assert [len(b.x) for b in batches] == [4, 4, 2]
  assert isinstance(batches[0], NestedMap)
  np.testing.assert_array_equal(batches[2].y, [64, 81])


def test_subclass_must_define_examples():
  with pytest.raises(TypeError, match='must override _Examples'):
    base_input_generator.BaseInputGenerator.Params().Instantiate().Dataset(
        'train', training=True)
