"""Tests of Repeat: N layers with stacked weights, one body in the graph, run by a loop."""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core import optimizer
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core import stacked_variable
from lingvo_gpipe.core.layers import attention
from lingvo_gpipe.core.layers import combinators
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.layers import dropout
from lingvo_gpipe.core.layers import normalization
from lingvo_gpipe.core.layers import repeat
from tests.support import binaries
from tests.support import test_utils


def _Dense(i, o, act='tanh'):
  return dense.Dense.Params().Set(input_dim=i, output_dim=o, activation=act)


def _X(shape, seed=0):
  return tf.random.stateless_normal(shape, [seed, 1])


def _TransformerLayer(d=8, heads=2, d_ff=16):
  attend = combinators.Residual.Params().Set(
      pre_norm=normalization.LayerNorm.Params().Set(dim=d),
      sub=attention.MultiHeadAttention.Params().Set(
          input_dim=d, num_heads=heads, causal=True),
      dropout=dropout.Dropout.Params().Set(keep_prob=0.9))
  ffn = combinators.Residual.Params().Set(
      pre_norm=normalization.LayerNorm.Params().Set(dim=d),
      sub=dense.FeedForward.Params().Set(input_dim=d, hidden_dim=d_ff),
      dropout=dropout.Dropout.Params().Set(keep_prob=0.9))
  return combinators.Sequential.Params().Set(sub=[attend, ffn])


def _ByHand(layer, theta, x):
  """The Sequential a Repeat stands for: iteration t's slice of every weight."""
  h = x
  stacked = theta.body[0]
  for t in range(layer.params.num):
    theta_t = stacked.Transform(lambda w, t=t: w[t])
    with base_layer.Context(repeat_iterations=(t,)):
      h = layer.body.FProp(theta_t, h)
  return h


def test_repeat_equals_its_layers_by_hand_with_gradients():
  p = repeat.Repeat.Params().Set(name='rep', sub=_Dense(4, 4), num=3)
  x = _X([2, 4])
  layer, y = test_utils.CheckLayer(p, x)
  w = layer.vars.body[0].w
  assert w.shape == [3, 4, 4] and len(layer.trainable_variables) == 2
  assert not np.allclose(w[0].numpy(), w[1].numpy())  # each its own weights
  theta = layer.vars
  with tf.GradientTape(persistent=True) as tape:
    looped = tf.reduce_sum(layer.FProp(theta, x) ** 2)
    by_hand = tf.reduce_sum(_ByHand(layer, theta, x) ** 2)
  variables = theta.Flatten()
  for a, b in zip(tape.gradient(looped, variables),
                  tape.gradient(by_hand, variables)):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(y.numpy(), _ByHand(layer, theta, x).numpy(),
                             rtol=1e-6)
  assert repeat.Repeat.NumParams(p) == 3 * (4 * 4 + 4)
  assert (repeat.Repeat.FPropMeta(p, [2, 4]).flops ==
          3 * dense.Dense.FPropMeta(_Dense(4, 4), [2, 4]).flops)


def test_weights_are_deterministic_and_independent_of_the_cut():
  p = repeat.Repeat.Params().Set(name='rep', sub=_Dense(4, 4), num=5)
  whole = p.Instantiate().vars.body[0].w.numpy()
  again = p.Instantiate().vars.body[0].w.numpy()
  cut = p.Copy().Set(piece_sizes=[2, 3]).Instantiate().vars.body
  np.testing.assert_array_equal(whole, again)
  np.testing.assert_array_equal(
      whole, np.concatenate([cut[0].w.numpy(), cut[1].w.numpy()]))


def test_the_graph_holds_the_body_once_whatever_num():
  def Ops(num):
    layer = repeat.Repeat.Params().Set(name='rep', sub=_TransformerLayer(),
                                       num=num).Instantiate()
    fn = tf.function(lambda x: layer.FPropDefaultTheta(x))
    graph = fn.get_concrete_function(tf.TensorSpec([2, 3, 8])).graph
    return len(graph.get_operations()), sum(
        len(f.definition.node_def) for f in graph._functions.values())  # pylint: disable=protected-access
  assert Ops(2) == Ops(50)


def test_a_body_not_inlined_computes_the_same_as_one_inlined():
  x = _X([2, 3, 8])
  results = {}
  for inline in (True, False):
    layer = repeat.Repeat.Params().Set(
        name='rep', sub=_TransformerLayer(), num=3,
        inline_body=inline).Instantiate()

    @tf.function
    def Step():
      with base_layer.Context(training=True, step=2):  # dropout on
        with tf.GradientTape() as tape:
          loss = tf.reduce_sum(layer.FPropDefaultTheta(x) ** 2)  # pylint: disable=cell-var-from-loop
      return loss, tape.gradient(loss, layer.trainable_variables)  # pylint: disable=cell-var-from-loop

    noinline = [f.definition.attr['_noinline'].b for f in
                Step.get_concrete_function().graph._functions.values()]  # pylint: disable=protected-access
    # The body and its gradient, and only they, are kept out of line.
    assert noinline.count(True) == (0 if inline else 2), noinline
    results[inline] = Step()
  (loss, grads), (ref_loss, ref_grads) = results[False], results[True]
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for g, r in zip(grads, ref_grads):
    # Inlined ops are optimized (fused) differently: float rounding only.
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_dropout_draws_per_iteration_and_repeats_under_recompute():
  body = dropout.Dropout.Params().Set(keep_prob=0.5)
  layer = repeat.Repeat.Params().Set(name='rep', sub=body,
                                     num=2).Instantiate()
  x = tf.ones([4, 64])
  with base_layer.Context(training=True, step=3, micro_batch=1):
    y = layer.FPropDefaultTheta(x)
    again = layer.FPropDefaultTheta(x)
    expected = _ByHand(layer, layer.vars, x)
    with base_layer.Context(repeat_iterations=(0,)):
      first = layer.body.FProp(layer.vars.body[0], x)
    with base_layer.Context(repeat_iterations=(1,)):
      second = layer.body.FProp(layer.vars.body[0], x)
  np.testing.assert_array_equal(y.numpy(), again.numpy())
  np.testing.assert_array_equal(y.numpy(), expected.numpy())
  assert not np.array_equal(first.numpy(), second.numpy())
  with base_layer.Context(training=True, step=3, micro_batch=2):
    other_micro_batch = layer.FPropDefaultTheta(x)
  assert not np.array_equal(y.numpy(), other_micro_batch.numpy())


def test_repeat_of_transformer_layers_sized_without_building():
  layer_p = _TransformerLayer()
  one = test_utils.CountTrainable(layer_p.Instantiate())
  p = repeat.Repeat.Params().Set(sub=layer_p, num=2)
  test_utils.CheckLayer(p, _X([2, 3, 8]), training=True)
  big = p.Copy().Set(num=1663)
  assert repeat.Repeat.NumParams(big) == 1663 * one
  meta = repeat.Repeat.FPropMeta(big, [2, 3, 8])
  assert meta.flops == 1663 * combinators.Sequential.FPropMeta(
      layer_p, [2, 3, 8]).flops
  assert repeat.Repeat.NumUnits(big) == 1663


def test_a_checkpoint_restores_under_another_cut_with_the_same_keys(tmp_path):
  p = repeat.Repeat.Params().Set(name='rep', sub=_Dense(4, 4), num=5)
  whole = p.Copy().Set(random_seed=1).Instantiate()
  path = tf.train.Checkpoint(model=whole).save(str(tmp_path / 'ckpt'))
  cut = p.Copy().Set(piece_sizes=[1, 4]).Instantiate()
  tf.train.Checkpoint(model=cut).restore(path).assert_consumed()
  np.testing.assert_array_equal(
      whole.vars.body[0].w.numpy(),
      np.concatenate([v.w.numpy() for v in cut.vars.body]))
  again = tf.train.Checkpoint(model=cut).save(str(tmp_path / 'again'))
  assert ({n: s for n, s in tf.train.list_variables(path)} ==
          {n: s for n, s in tf.train.list_variables(again)})
  assert isinstance(cut.body._var_w, stacked_variable.StackedVariable)  # pylint: disable=protected-access


def test_optimizer_slots_are_stacked_and_checkpoint_under_any_cut(tmp_path):
  train = hyperparams.Params()
  train.Define('optimizer', 'adam', '')
  train.Define('learning_rate', 0.1, '')
  train.Define('beta1', 0.9, '')
  train.Define('beta2', 0.999, '')
  train.Define('epsilon', 1e-7, '')
  p = repeat.Repeat.Params().Set(name='rep', sub=_Dense(4, 4), num=4)

  def Trained(piece_sizes):
    layer = p.Copy().Set(piece_sizes=piece_sizes).Instantiate()
    opt = optimizer.Adam(train)
    variables = layer.trainable_variables
    opt.Build(variables)
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(layer.FPropDefaultTheta(_X([2, 4])) ** 2)
    opt.Apply(tape.gradient(loss, variables), variables, tf.constant(0.1))
    return layer, opt

  whole, whole_opt = Trained(None)
  cut, cut_opt = Trained([3, 1])
  np.testing.assert_allclose(
      whole.vars.body[0].w.numpy(),
      np.concatenate([v.w.numpy() for v in cut.vars.body]), rtol=1e-6)
  assert len(cut_opt.SlotVariables()) == 2 * len(whole_opt.SlotVariables())
  path = tf.train.Checkpoint(opt=cut_opt, model=cut).save(
      str(tmp_path / 'ckpt'))
  fresh, fresh_opt = p.Instantiate(), optimizer.Adam(train)
  fresh_opt.Build(fresh.trainable_variables)
  tf.train.Checkpoint(opt=fresh_opt, model=fresh).restore(
      path).assert_consumed()
  for a, b in zip(fresh_opt.SlotVariables(), whole_opt.SlotVariables()):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)


def test_repeat_errors():
  with pytest.raises(ValueError, match="Repeat 'repeat': num is 0; it must be "
                     'an int >= 1'):
    repeat.Repeat.Params().Set(sub=_Dense(2, 2), num=0).Instantiate()
  with pytest.raises(ValueError, match='sub is None'):
    repeat.Repeat.NumParams(repeat.Repeat.Params())
  with pytest.raises(ValueError, match=r'piece_sizes=\[1, 1\] must be '
                     'positive ints summing to num=3'):
    repeat.Repeat.Params().Set(sub=_Dense(2, 2), num=3,
                               piece_sizes=[1, 1]).Instantiate()
  with pytest.raises(ValueError, match=r"Repeat 'repeat': its body output has "
                     r'shape \(2, 3\), but its input has shape \(2, 4\); they '
                     r'must match \(a loop carries it\)'):
    repeat.Repeat.FPropMeta(
        repeat.Repeat.Params().Set(sub=_Dense(4, 3), num=2), [2, 4])
  with pytest.raises(ValueError, match='its body output has shape'):
    repeat.Repeat.Params().Set(sub=_Dense(4, 3), num=2).Instantiate()(
        _X([2, 4]))
  with pytest.raises(ValueError, match='A Repeat inside a Repeat'):
    repeat.Repeat.Params().Set(sub=repeat.Repeat.Params().Set(
        sub=_Dense(2, 2), num=2), num=2).Instantiate()
  bn = repeat.Repeat.Params().Set(
      name='rep', num=2, sub=normalization.BatchNorm.Params().Set(dim=4))
  with pytest.raises(ValueError, match=r'rep: its body records training '
                     r'statistics \(BatchNorm rep/body\)'):
    with base_layer.Context(training=True):
      bn.Instantiate()(_X([3, 4]))


def _StepPeakMiB(*flags):
  """One training step's peak memory (BFC allocator) in a process of its own."""
  return binaries.StepMemory(
      '--stack=transformer', '--plain', '--num_layers=8', '--dim=128',
      '--batch=16', '--seq_len=64', '--vocab_size=512',
      *flags)['peak_bytes'] / 2**20


@pytest.mark.heavy
def test_the_backward_keeps_each_iterations_input_not_its_intermediates():
  # 8 Transformer blocks under one tape, no pipeline. Listed, the tape keeps
  # every block's intermediates (about 73 MiB at the peak); a Repeat keeps
  # each iteration's input and recomputes one iteration at a time (about
  # 24 MiB; TensorFlow's own while-loop gradient kept all intermediates,
  # 87 MiB).
  listed = _StepPeakMiB('--nostack_layers')
  stacked = _StepPeakMiB('--stack_layers')
  print(f'peak MiB: listed {listed:.0f}, stacked {stacked:.0f}')
  assert listed > 50, listed  # the measurement itself works
  assert stacked < 0.5 * listed, (stacked, listed)
