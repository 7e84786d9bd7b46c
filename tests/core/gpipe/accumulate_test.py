"""Tests of gradient accumulation: running sums, gating, sparse sums, input gradients."""

import numpy as np
import tensorflow as tf

from lingvo_gpipe.core.gpipe import accumulate


def test_add_grads_keeps_none_and_sparse():
  dense = tf.ones([2])
  sparse = tf.IndexedSlices(tf.ones([1, 3]), tf.constant([1]),
                            tf.constant([4, 3]))
  first = accumulate.AddGrads(None, [dense, None, sparse])
  total = accumulate.AddGrads(first, [dense, None, sparse])
  np.testing.assert_array_equal(total[0], [2.0, 2.0])
  assert total[1] is None
  assert isinstance(total[2], tf.IndexedSlices)  # never densified
  np.testing.assert_array_equal(tf.convert_to_tensor(total[2])[1], [2.0] * 3)


def test_gated_waits_for_its_dependencies():

  @tf.function
  def Graph():
    dep = tf.constant(1.0) * 2.0
    out = accumulate.Gated([dep, None], tf.constant(3.0))
    return [c.name for c in out.op.control_inputs], dep.op.name

  controls, dep = Graph()
  assert [c.numpy().decode() for c in controls] == [dep.numpy().decode()]
  assert accumulate.Gated([None], 5.0) == 5.0  # nothing to wait for


def test_merge_input_grads_fills_missing_micro_batches_with_zeros():
  micro = [dict(x=tf.ones([2, 1]), ids=tf.constant([1, 2])),
           dict(x=tf.ones([1, 1]), ids=tf.constant([3]))]
  dx = [dict(x=tf.fill([2, 1], 5.0), ids=None), dict(x=None, ids=None)]
  # tf.nest flattens a dict by sorted key: ids, then x.
  merged = dict(zip(sorted(micro[0]), accumulate.MergeInputGrads(dx, micro, 0)))
  assert merged['ids'] is None
  np.testing.assert_array_equal(merged['x'][:, 0], [5.0, 5.0, 0.0])
