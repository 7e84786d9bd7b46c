"""stacks: the models step_memory and bench/graph_build train, built from plain arguments."""

import numpy as np
import tensorflow as tf

from lingvo_gpipe.core.gpipe import pipelining_layer
from lingvo_gpipe.tools import stacks


def _Model(layers, num_micro_batches=1):
  return pipelining_layer.PipeliningLayer.Params().Set(
      name='stack', layers=layers, num_partitions=1,
      num_micro_batches=num_micro_batches).Instantiate()


def _Loss(layers, inputs, loss_fn, num_micro_batches):
  model = _Model(layers, num_micro_batches)
  return float(loss_fn(model.FPropDefaultTheta(inputs)))


def test_transformer_stack_is_embedding_blocks_softmax_on_shifted_ids():
  layers, inputs, loss_fn = stacks.TransformerStack(
      num_layers=2, dim=8, batch=4, seq_len=3, num_heads=2, vocab_size=16)
  assert [l.name for l in layers] == ['emb', 'layer0', 'layer1', 'softmax']
  assert [l.hidden_dim for l in layers[1:3]] == [32, 32]
  assert all(l.causal for l in layers[1:3])
  assert inputs.ids.shape == (4, 3) and inputs.paddings.shape == (4, 3)
  np.testing.assert_array_equal(inputs.labels.numpy(),
                                np.roll(inputs.ids.numpy(), -1, axis=1))
  # Random logits over 16 ids: cross-entropy near log(16); M does not change it.
  loss = _Loss(layers, inputs, loss_fn, 1)
  assert 1.0 < loss < 6.0
  np.testing.assert_allclose(_Loss(layers, inputs, loss_fn, 2), loss,
                             rtol=1e-5)


def test_stacked_transformer_stack_is_one_repeat_of_the_blocks():
  layers, inputs, loss_fn = stacks.TransformerStack(
      num_layers=3, dim=8, batch=4, seq_len=3, num_heads=2, vocab_size=16,
      stacked=True)
  assert [l.name for l in layers] == ['emb', 'layers', 'softmax']
  assert layers[1].num == 3 and layers[1].sub.causal
  loss = _Loss(layers, inputs, loss_fn, 1)
  assert 1.0 < loss < 6.0
  np.testing.assert_allclose(_Loss(layers, inputs, loss_fn, 2), loss,
                             rtol=1e-5)


def test_dense_stack():
  layers, x, loss_fn = stacks.DenseStack(num_layers=3, dim=5, batch=7)
  assert [l.name for l in layers] == ['fc0', 'fc1', 'fc2']
  assert x.shape == (7, 5)
  assert loss_fn(tf.ones([2, 2])).numpy() == 1.0


def test_dense_stack_with_tanh_adds_activations_not_weights():
  layers, x, loss_fn = stacks.DenseStack(num_layers=2, dim=5, batch=7,
                                         tanh_per_layer=2)
  assert [l.name for l in layers] == ['fc0', 'tanh0_0', 'tanh0_1', 'fc1',
                                      'tanh1_0', 'tanh1_1']
  assert [l.activation for l in layers if l.name.startswith('tanh')] == [
      'tanh'] * 4
  plain, _, _ = stacks.DenseStack(num_layers=2, dim=5, batch=7)
  with_tanh, without = _Model(layers), _Model(plain)
  assert (sum(v.shape.num_elements() for v in with_tanh.trainable_variables)
          == sum(v.shape.num_elements() for v in without.trainable_variables))
  # The output is tanh-squashed: every value in (-1, 1).
  y = with_tanh.FPropDefaultTheta(x * 100.0)
  assert float(tf.reduce_max(tf.abs(y))) < 1.0
  assert float(loss_fn(y)) >= 0.0
