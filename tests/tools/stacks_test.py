"""stacks: the models step_memory and bench/graph_build train, built from plain arguments."""

import numpy as np
import tensorflow as tf

from lingvo_gpipe.core.gpipe import pipelining_layer
from lingvo_gpipe.tools import stacks


def _Loss(layers, inputs, loss_fn, num_micro_batches):
  p = pipelining_layer.PipeliningLayer.Params().Set(
      name='stack', layers=layers, num_partitions=1,
      num_micro_batches=num_micro_batches)
  model = p.Instantiate()
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
