"""Tests of NestedMap: attribute access, structure ops, and tf.nest compatibility."""

import pytest
import tensorflow as tf

from lingvo_gpipe.core.nested_map import NestedMap


def _Sample():
  return NestedMap(b=NestedMap(y=2, x=1), a=[3, (4, 5)], c=6)


def test_attribute_access_and_assignment():
  m = NestedMap(a=1)
  m.b = NestedMap(c=2)
  assert m.a == 1 and m['b'].c == 2
  del m.a
  assert 'a' not in m
  with pytest.raises(AttributeError, match="no key 'zz'.*keys are \\['b'\\]"):
    _ = m.zz


@pytest.mark.parametrize('key', ['1a', 'a-b', 'keys', 'class', 3])
def test_invalid_keys_are_rejected(key):
  with pytest.raises(ValueError, match='key'):
    NestedMap({key: 1})


def test_flatten_items_sorted_with_indices():
  assert _Sample().FlattenItems() == [
      ('a[0]', 3), ('a[1][0]', 4), ('a[1][1]', 5), ('b.x', 1), ('b.y', 2),
      ('c', 6)]


def test_flatten_matches_tf_nest_and_pack_round_trips():
  m = _Sample()
  assert m.Flatten() == tf.nest.flatten(m)
  packed = m.Pack([10 * v for v in m.Flatten()])
  assert isinstance(packed, NestedMap) and isinstance(packed.b, NestedMap)
  assert packed.a[1] == (40, 50) and packed.b.y == 20
  rebuilt = tf.nest.pack_sequence_as(m, m.Flatten())
  assert isinstance(rebuilt, NestedMap) and rebuilt == m


def test_pack_wrong_count_raises():
  with pytest.raises(ValueError, match='Pack got 2 leaves; this NestedMap has 6'):
    _Sample().Pack([1, 2])


def test_transform_and_tf_nest_map_structure_agree():
  m = _Sample()
  assert m.Transform(lambda v: v + 1) == tf.nest.map_structure(
      lambda v: v + 1, m)


def test_filter_drops_empty_branches():
  m = _Sample()
  kept = m.Filter(lambda v: v % 2 == 0)
  assert kept == NestedMap(a=[(4,)], b=NestedMap(y=2), c=6)
  assert m.Filter(lambda v: False) == NestedMap()


def test_deep_copy_shares_leaves_not_structure():
  m = _Sample()
  c = m.DeepCopy()
  c.b.x = 99
  assert m.b.x == 1
  assert isinstance(m.copy(), NestedMap)


def test_tensors_in_tf_function():
  @tf.function
  def F(m):
    return m.Transform(lambda t: t * 2)

  out = F(NestedMap(ids=tf.constant([1, 2]), paddings=tf.constant([0., 1.])))
  assert isinstance(out, NestedMap)
  assert out.ids.numpy().tolist() == [2, 4]


def test_debug_string_names_paths_and_shapes():
  m = NestedMap(x=tf.zeros([2, 3]), n=NestedMap(k=7))
  assert m.DebugString().splitlines() == [
      'n.k  7', 'x  EagerTensor(shape=[2, 3], dtype=float32)']


def test_is_compatible():
  assert _Sample().IsCompatible(_Sample().Transform(str))
  assert not _Sample().IsCompatible(NestedMap(a=1))
