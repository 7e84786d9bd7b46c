"""Tests of micro-batch splitting and merging."""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core.gpipe import microbatch
from lingvo_gpipe.core.nested_map import NestedMap


@pytest.mark.parametrize('batch,m,expected', [
    (8, 4, [2, 2, 2, 2]), (10, 4, [3, 3, 2, 2]), (5, 5, [1] * 5), (7, 1, [7])])
def test_sizes_by_count(batch, m, expected):
  assert microbatch.MicroBatchSizes(batch, num_micro_batches=m) == expected


@pytest.mark.parametrize('batch,s,expected', [
    (8, 4, [4, 4]), (10, 4, [4, 4, 2]), (3, 5, [3])])
def test_sizes_by_size(batch, s, expected):
  assert microbatch.MicroBatchSizes(batch, micro_batch_size=s) == expected


def test_size_errors_name_the_bad_values():
  with pytest.raises(ValueError, match='exactly one'):
    microbatch.MicroBatchSizes(8)
  with pytest.raises(ValueError, match='num_micro_batches=9 exceeds the batch '
                     'size 8'):
    microbatch.MicroBatchSizes(8, num_micro_batches=9)
  with pytest.raises(ValueError, match='micro_batch_size must be >= 1'):
    microbatch.MicroBatchSizes(8, micro_batch_size=0)


def test_split_merge_round_trip_nested_and_batch_dim():
  x = NestedMap(ids=tf.reshape(tf.range(30), [10, 3]),
                paddings=tf.reshape(tf.range(10, dtype=tf.float32), [10, 1]))
  sizes = microbatch.MicroBatchSizes(10, num_micro_batches=4)
  parts = microbatch.Split(x, sizes)
  assert [p.ids.shape[0] for p in parts] == [3, 3, 2, 2]
  assert isinstance(parts[0], NestedMap)
  merged = microbatch.Merge(parts)
  np.testing.assert_array_equal(merged.ids, x.ids)
  y = tf.reshape(tf.range(24), [2, 6, 2])
  parts = microbatch.Split((y,), [4, 2], batch_dim=1)
  assert parts[1][0].shape == (2, 2, 2)
  np.testing.assert_array_equal(microbatch.Merge(parts, batch_dim=1)[0], y)


def test_indexed_reads_the_micro_batch_split_cuts():
  x = NestedMap(ids=tf.reshape(tf.range(30), [10, 3]),
                paddings=tf.reshape(tf.range(10, dtype=tf.float32), [10, 1]))
  sizes = microbatch.MicroBatchSizes(10, num_micro_batches=4)
  parts = microbatch.Split(x, sizes)

  @tf.function
  def Read(index):
    return microbatch.Indexed(x, sizes, index)

  for m, part in enumerate(parts):
    got = Read(tf.constant(m))
    assert isinstance(got, NestedMap)
    np.testing.assert_array_equal(got.ids, part.ids)
    np.testing.assert_array_equal(got.paddings, part.paddings)


def test_batch_size_checks_leaves():
  assert microbatch.BatchSize((tf.zeros([4, 2]), tf.zeros([4]))) == 4
  with pytest.raises(ValueError, match='disagree on the batch size'):
    microbatch.BatchSize((tf.zeros([4, 2]), tf.zeros([3])))
  with pytest.raises(ValueError, match='no batch dimension'):
    microbatch.BatchSize(tf.zeros([]))
  with pytest.raises(ValueError, match='not statically known'):
    microbatch.BatchSize(tf.TensorSpec([None, 3]))


def test_batch_size_names_a_leaf_that_is_no_tensor():
  with pytest.raises(ValueError, match=r"inputs\[1\] is a str \('abc'\)"):
    microbatch.BatchSize((tf.zeros([4, 2]), 'abc'))
  with pytest.raises(ValueError, match=r'x.count is a int \(3\), not a tensor'):
    microbatch.BatchSize(NestedMap(vec=tf.zeros([4, 2]), count=3), name='x')
  with pytest.raises(ValueError, match=r"inputs\['a'\]\[0\] is a float"):
    microbatch.BatchSize({'a': [1.5], 'b': tf.zeros([4])})
  with pytest.raises(ValueError, match='holds no tensor'):
    microbatch.BatchSize(())
