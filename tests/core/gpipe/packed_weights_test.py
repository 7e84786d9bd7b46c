"""Tests of packed weights: one loop variable per dtype for a small cell, the same numbers."""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe import packed_weights
from lingvo_gpipe.core.gpipe.pipelining_layer import PipeliningLayer
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.layers import embedding

_DEVICES = [f'/device:CPU:{k}' for k in range(4)]


def test_unpack_returns_what_was_packed_grouped_by_dtype():
  leaves = [tf.reshape(tf.range(6.), [2, 3]), tf.constant([7, 8]),
            tf.constant([9.]), tf.constant([[10., 11.]], tf.float64)]
  packing = packed_weights.PackedWeights(leaves)
  packed = packing.Pack(leaves)
  assert packing.num_packed == 3  # float32, int32, float64
  assert [p.shape.as_list() for p in packed] == [[7], [2], [2]]
  for got, want in zip(packing.Unpack(packed), leaves):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_a_missing_gradient_packs_as_zeros():
  leaves = [tf.ones([2, 2]), tf.ones([3])]
  packing = packed_weights.PackedWeights(leaves)
  packed, = packing.Pack([None, tf.constant([1., 2., 3.])])
  np.testing.assert_array_equal(packed, [0, 0, 0, 0, 1, 2, 3])


def test_a_sparse_gradient_packs_dense():
  leaves = [tf.ones([3, 2]), tf.ones([2])]
  sparse = tf.IndexedSlices(tf.constant([[1., 2.]]), tf.constant([2]),
                            tf.constant([3, 2]))
  packed, = packed_weights.PackedWeights(leaves).Pack([sparse, tf.ones([2])])
  np.testing.assert_array_equal(packed, [0, 0, 0, 0, 1, 2, 1, 1])


def test_the_wrong_count_is_refused():
  packing = packed_weights.PackedWeights([tf.ones([2]), tf.ones([3])])
  with pytest.raises(ValueError, match='Packing 1 tensors; this cell has 2'):
    packing.Pack([tf.ones([2])])
  with pytest.raises(ValueError, match='Unpacking 2 tensors; this cell packs '
                     'into 1'):
    packing.Unpack([tf.ones([5]), tf.ones([5])])


def test_only_small_cells_of_known_shapes_are_worth_packing():
  limit = packed_weights.PACK_AT_MOST_ELEMENTS
  assert packed_weights.Worth([tf.ones([2, 2]), tf.ones([2])])
  assert not packed_weights.Worth([tf.ones([2, 2])])  # nothing to save
  assert not packed_weights.Worth([tf.ones([limit]), tf.ones([1])])
  assert packed_weights.Worth([tf.ones([limit - 1]), tf.ones([1])])
  worth = []
  tf.function(lambda t: worth.append(packed_weights.Worth(
      [t, tf.ones([2])]))).get_concrete_function(tf.TensorSpec([None, 2]))
  assert worth == [False]  # a batch-sized weight cannot be split by sizes


class _Lookup(base_layer.BaseLayer):
  """Looks ids up in a table (a sparse gradient); a float64 scale; a weight never used."""

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('dim', 4, '')
    return p

  def __init__(self, params):
    super().__init__(params)
    p = self.params
    self.CreateChild('emb', embedding.Embedding.Params().Set(
        vocab_size=5, embedding_dim=p.dim))
    self.CreateVariable('scale', base_layer.WeightParams([p.dim],
                                                          dtype=tf.float64))
    self.CreateVariable('unused', base_layer.WeightParams([p.dim]))

  def FProp(self, theta, ids):
    return self.emb.FProp(theta.emb, ids) * tf.cast(theta.scale, tf.float32)


def _Layers():
  return [_Lookup.Params().Set(name='lookup')] + [
      dense.Dense.Params().Set(name=f'fc{i}', input_dim=4, output_dim=4,
                               activation='tanh') for i in range(5)]


def _Pipeline(executor, pack_weights=True, layers=None, k=3):
  return PipeliningLayer.Params().Set(
      name='pipe', layers=layers or _Layers(), num_partitions=k,
      num_micro_batches=4, devices=_DEVICES, executor=executor,
      pack_weights=pack_weights).Instantiate()


def _Gradients(pipe, ids):

  @tf.function
  def Step():
    with base_layer.Context(training=True):
      with tf.GradientTape() as tape:
        loss = tf.reduce_sum(pipe.FPropDefaultTheta(ids) ** 2)
    return loss, tape.gradient(loss, pipe.vars)

  return Step()


@pytest.mark.parametrize('pack_weights', [True, False])
def test_packed_cells_compute_the_unrolled_executors_gradients(pack_weights):
  ids = tf.constant([0, 3, 4, 1, 1, 2, 0])  # ragged: 2, 2, 2, 1
  unrolled = _Pipeline('unrolled')
  loop = _Pipeline('loop', pack_weights)
  for a, b in zip(unrolled.vars.Flatten(), loop.vars.Flatten()):
    b.assign(a)
  loss, grads = _Gradients(unrolled, ids)
  loop_loss, loop_grads = _Gradients(loop, ids)
  np.testing.assert_allclose(loop_loss, loss, rtol=1e-6)
  for (path, g), (_, got) in zip(grads.FlattenItems(),
                                 loop_grads.FlattenItems()):
    if 'unused' in path:
      # No gradient, not a zero one: an optimizer must skip the weight.
      assert g is None and got is None, path
      continue
    np.testing.assert_allclose(tf.convert_to_tensor(got),
                               tf.convert_to_tensor(g), rtol=1e-5, atol=1e-7,
                               err_msg=path)


def _LoopVariables(pipe):
  """Loop variables of the traced step's While ops, the forward's first."""

  @tf.function
  def Step(x):
    with base_layer.Context(training=True):
      with tf.GradientTape() as tape:
        loss = tf.reduce_sum(pipe.FPropDefaultTheta(x))
    return tape.gradient(loss, pipe.trainable_variables)

  graph = Step.get_concrete_function(tf.TensorSpec([8, 4])).graph
  counts = []

  def Walk(g):
    for op in g.get_operations():
      if op.type in ('While', 'StatelessWhile'):
        counts.append(len(op.inputs))
    for f in getattr(g, '_functions', {}).values():
      if hasattr(f, 'graph'):
        Walk(f.graph)

  Walk(graph)
  return counts


def _Dense(n):
  return [dense.Dense.Params().Set(name=f'fc{i}', input_dim=4, output_dim=4)
          for i in range(n)]


def test_a_packed_cell_carries_as_many_loop_variables_whatever_its_depth():
  packed = {n: _LoopVariables(_Pipeline('loop', True, _Dense(n), k=2))
            for n in (2, 8)}
  unpacked = {n: _LoopVariables(_Pipeline('loop', False, _Dense(n), k=2))
              for n in (2, 8)}
  assert len(packed[2]) == 2, packed  # the forward and the backward loop
  assert packed[8] == packed[2], packed
  # Unpacked, each weight (2 per Dense, 3 more layers per cell) enters both
  # loops, and the backward carries its running sum too.
  assert [b - a for a, b in zip(unpacked[2], unpacked[8])] == [
      2 * 2 * 3, 2 * 2 * 3 * 2], unpacked
