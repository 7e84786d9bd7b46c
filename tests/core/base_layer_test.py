"""Tests of BaseLayer: building from Params, theta, determinism, context, sizes."""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.nested_map import NestedMap


class _Stack(base_layer.BaseLayer):
  """Two Dense children and a list of them, plus a variable of its own."""

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('dim', 4, 'Width.')
    p.Define('num_extra', 2, 'Length of the child list.')
    return p

  def __init__(self, params):
    super().__init__(params)
    p = self.params
    fc = dense.Dense.Params().Set(input_dim=p.dim, output_dim=p.dim)
    self.CreateChild('first', fc)
    self.CreateChildren('extra', [fc] * p.num_extra)
    self.CreateVariable('scale', base_layer.WeightParams(
        [p.dim], init=base_layer.WeightInit.Constant(2.0)))

  def FProp(self, theta, x):
    x = self.first.FProp(theta.first, x)
    for layer, layer_theta in zip(self.extra, theta.extra):
      x = layer.FProp(layer_theta, x)
    return x * theta.scale


class _Recorder(base_layer.BaseLayer):
  """Records the batch mean as a statistic; counts how often it was applied."""

  def __init__(self, params):
    super().__init__(params)
    self.applied = []

  def FProp(self, theta, x):
    self.RecordStats(NestedMap(mean=tf.reduce_mean(x)))
    return x

  def ApplyStats(self, stats_list):
    self.applied.append(len(stats_list))


def test_theta_mirrors_variables_and_children():
  layer = _Stack.Params().Set(name='stack').Instantiate()
  theta = layer.theta
  assert sorted(theta.keys()) == ['extra', 'first', 'scale']
  assert sorted(theta.first.keys()) == ['b', 'w']
  assert len(theta.extra) == 2 and theta.extra[1].w.shape == (4, 4)
  assert layer.extra[1].path == 'stack/extra_1'
  assert layer.first.path == 'stack/first'
  assert len(layer.trainable_variables) == 7


def test_fprop_reads_only_theta():
  layer = _Stack.Params().Instantiate()
  x = tf.ones([3, 4])
  default = layer.FPropDefaultTheta(x)
  zero_theta = layer.theta.Transform(tf.zeros_like)
  assert np.all(layer.FProp(zero_theta, x).numpy() == 0)
  np.testing.assert_allclose(layer.FProp(layer.ReadTheta(), x), default)


def test_same_params_give_same_weights_and_seed_changes_them():
  p = _Stack.Params()
  a, b = p.Instantiate(), p.Instantiate()
  for va, vb in zip(a.vars.Flatten(), b.vars.Flatten()):
    np.testing.assert_array_equal(va.numpy(), vb.numpy())
  # Different paths get different values; a different seed changes them.
  assert not np.array_equal(a.extra[0].vars.w.numpy(), a.extra[1].vars.w.numpy())
  c = p.Copy().Set(random_seed=7).Instantiate()
  assert not np.array_equal(a.first.vars.w.numpy(), c.first.vars.w.numpy())


def test_children_inherit_dtype_and_seed_unless_set():
  p = _Stack.Params().Set(dtype=tf.float64, random_seed=3)
  layer = p.Instantiate()
  assert layer.first.vars.w.dtype == tf.float64
  assert layer.first.params.random_seed == 3


def test_gradients_reach_every_variable_through_a_plain_tape():
  layer = _Stack.Params().Instantiate()
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(layer.FPropDefaultTheta(tf.ones([2, 4])) ** 2)
  grads = tape.gradient(loss, layer.trainable_variables)
  assert all(g is not None for g in grads)


def test_duplicate_names_raise():

  class Bad(base_layer.BaseLayer):

    def __init__(self, params):
      super().__init__(params)
      self.CreateVariable('w', base_layer.WeightParams([1]))
      self.CreateVariable('w', base_layer.WeightParams([1]))

  with pytest.raises(ValueError, match="'w' is already"):
    Bad.Params().Instantiate()


class _Declared(base_layer.BaseLayer):
  """_Stack's children declared once in ChildParams, plus an optional one."""

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('dim', 4, 'Width.')
    p.Define('num_extra', 2, 'Length of the child list.')
    p.Define('has_last', False, 'Whether to add the child `last`.')
    return p

  @classmethod
  def ChildParams(cls, p):
    if p.dim <= 0:
      raise ValueError(f'{p.name}: dim must be > 0, got {p.dim}.')
    fc = dense.Dense.Params().Set(input_dim=p.dim, output_dim=p.dim)
    return NestedMap(first=fc, extra=[fc] * p.num_extra,
                     last=fc if p.has_last else None)

  def __init__(self, params):
    super().__init__(params)
    self.built_before_body = sorted(self.children_layers)
    self.CreateVariable('scale', base_layer.WeightParams(
        [self.params.dim], init=base_layer.WeightInit.Constant(2.0)))

  def FProp(self, theta, x):
    return _Stack.FProp(self, theta, x)


def test_child_params_declares_the_children_once(tmp_path):
  p = _Declared.Params().Set(name='stack')
  layer = p.Instantiate()
  # Built by BaseLayer.__init__, before the subclass's body; None: no child.
  assert layer.built_before_body == ['extra', 'first']
  assert list(layer.children_layers) == ['first', 'extra']
  assert layer.extra[1].path == 'stack/extra_1'
  # The same variables, values and checkpoint keys as children created by
  # hand in __init__ (_Stack).
  by_hand = _Stack.Params().Set(name='stack').Instantiate()
  assert sorted(v.name for v in layer.variables) == sorted(
      v.name for v in by_hand.variables)
  for a, b in zip(layer.vars.Flatten(), by_hand.vars.Flatten()):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  x = tf.ones([3, 4])
  np.testing.assert_allclose(layer(x), by_hand(x))
  saved = tf.train.Checkpoint(layer=layer).write(str(tmp_path / 'ckpt'))
  tf.train.Checkpoint(layer=by_hand).read(saved).assert_consumed()
  assert _Declared.NumParams(p) == _Stack.NumParams(_Stack.Params())
  assert 'last' in p.Copy().Set(has_last=True).Instantiate().children_layers
  with pytest.raises(ValueError, match='dim must be > 0'):
    p.Copy().Set(dim=0).Instantiate()


def test_fprop_and_meta_must_be_overridden():
  layer = base_layer.BaseLayer.Params().Instantiate()
  with pytest.raises(TypeError, match='must override FProp'):
    layer.FPropDefaultTheta(tf.ones([1]))
  with pytest.raises(TypeError, match='must override FPropMeta'):
    base_layer.BaseLayer.FPropMeta(base_layer.BaseLayer.Params(), [1])


def test_num_params_allocates_nothing():
  # 10^10 floats would need 40 GB; the abstract build sizes it in no time.
  p = dense.Dense.Params().Set(input_dim=100_000, output_dim=100_000)
  assert dense.Dense.NumParams(p) == 100_000 * 100_000 + 100_000


def test_num_params_counts_only_trainable():
  class WithStats(base_layer.BaseLayer):

    def __init__(self, params):
      super().__init__(params)
      self.CreateVariable('w', base_layer.WeightParams([3, 2]))
      self.CreateVariable('m', base_layer.WeightParams([5], trainable=False))

  assert WithStats.NumParams(WithStats.Params()) == 6


def test_weight_init_methods():
  for init, check in [
      (base_layer.WeightInit.Constant(0.5), lambda v: np.all(v == 0.5)),
      (base_layer.WeightInit.Uniform(0.1), lambda v: np.abs(v).max() <= 0.1),
      (base_layer.WeightInit.Gaussian(0.01), lambda v: v.std() < 0.02),
      (base_layer.WeightInit.TruncatedGaussian(1.0),
       lambda v: np.abs(v).max() <= 2.0),
      (base_layer.WeightInit.He(), lambda v: 0.05 < v.std() < 0.2),
      (base_layer.WeightInit.Xavier(), lambda v: np.abs(v).max() <= np.sqrt(
          6 / 400)),
  ]:
    p = dense.Dense.Params().Set(input_dim=200, output_dim=200,
                                 params_init=init)
    assert check(p.Instantiate().vars.w.numpy()), init.method
  bad = dense.Dense.Params().Set(input_dim=2, output_dim=2,
                                 params_init=base_layer.WeightInit.Constant())
  bad.params_init.method = 'glorot'
  with pytest.raises(ValueError, match="'glorot'.*xavier"):
    bad.Instantiate()


def test_context_nests_and_restores():
  assert not base_layer.CurrentContext().training
  with base_layer.Context(training=True, step=5):
    with base_layer.Context(micro_batch=2) as inner:
      assert inner.training and inner.step == 5 and inner.micro_batch == 2
    assert base_layer.CurrentContext().micro_batch == 0
  assert base_layer.CurrentContext() == base_layer.ExecutionContext()


def test_stateless_seed_repeats_in_context_and_varies_otherwise():
  layer = _Stack.Params().Instantiate()

  def Seed(layer, step, mb):
    with base_layer.Context(step=step, micro_batch=mb):
      return tuple(layer.StatelessSeed().numpy())

  assert Seed(layer, 3, 1) == Seed(layer, 3, 1)
  assert Seed(layer, 3, 1) != Seed(layer, 4, 1)
  assert Seed(layer, 3, 1) != Seed(layer, 3, 2)
  assert Seed(layer, 3, 1) != Seed(layer.first, 3, 1)


def test_stats_apply_at_once_or_through_a_collector():
  layer = _Recorder.Params().Instantiate()
  layer.FPropDefaultTheta(tf.ones([2]))
  assert layer.applied == [1]
  collector = base_layer.StatsCollector()
  with base_layer.Context(stats_collector=collector):
    for _ in range(3):
      layer.FPropDefaultTheta(tf.ones([2]))
  assert layer.applied == [1]
  collector.ApplyAll()
  assert layer.applied == [1, 3]


def test_to_shape_maps_nested_structures():
  shapes = base_layer.ToShape(
      NestedMap(a=[2, 3], b=(tf.zeros([1]), tf.TensorSpec([None, 4]))))
  assert shapes.a == tf.TensorShape([2, 3])
  assert shapes.b[1].as_list() == [None, 4]
  with pytest.raises(TypeError, match='Cannot read a shape'):
    base_layer.ToShape('abc')


def test_sizing_is_memoized_per_configuration_not_per_name():
  calls = []

  class Counted(base_layer.BaseLayer):

    @classmethod
    def Params(cls):
      p = super().Params()
      p.Define('dim', 2, '')
      return p

    def __init__(self, params):
      super().__init__(params)
      calls.append(1)
      self.CreateVariable('w', base_layer.WeightParams([self.params.dim] * 2))

  p = Counted.Params()
  assert [Counted.NumParams(p.Copy().Set(name=n)) for n in 'abc'] == [4] * 3
  assert len(calls) == 1
  assert Counted.NumParams(p.Copy().Set(dim=3)) == 9
  assert len(calls) == 2
  # A Params mutated after sizing is not confused with its old self.
  p.dim = 5
  assert Counted.NumParams(p) == 25
