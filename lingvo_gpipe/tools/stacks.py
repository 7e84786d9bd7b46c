"""The layer stacks the measuring tools train: layers' Params, an input batch, a loss.

`lingvo_gpipe.tools.step_memory` (one step's peak memory) and
`bench/graph_build.py` (trace and step time) build their stacks here, so both
measure the same models. Each builder returns (layers, inputs, loss_fn):
the Params of the layers in order, for PipeliningLayer's `layers`; a batch of
random inputs; and the scalar loss of the last layer's output.
"""

import importlib
from typing import Any, Callable

import tensorflow as tf

from lingvo_gpipe.core.layers import activations
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.layers import repeat
from lingvo_gpipe.core.layers import transformer
from lingvo_gpipe.core.nested_map import NestedMap

Stack = tuple[list, Any, Callable[[Any], tf.Tensor]]

# AmoebaNet is the application's (tasks/), found by name as model_registry
# finds params/: the library imports neither (layering_test.py).
AMOEBANET_MODULE = 'tasks.image.amoebanet'


class NotOnPath(ImportError):
  """The application's module a stack needs is not importable from here."""


def DenseLayers(num_layers: int, dim: int, tanh_per_layer: int = 0) -> list:
  """Params of `num_layers` Dense(dim→dim, relu) layers.

  Each followed by `tanh_per_layer` tanh activations: more small ops for a
  cell to run per micro-batch, with the same weights (bench/executor_step.py
  measures what an op costs each executor with them).
  """
  layers = []
  for i in range(num_layers):
    layers.append(dense.Dense.Params().Set(name=f'fc{i}', input_dim=dim,
                                           output_dim=dim))
    layers += [activations.Activation.Params().Set(
        name=f'tanh{i}_{j}', activation='tanh') for j in range(tanh_per_layer)]
  return layers


def DenseStack(num_layers: int, dim: int, batch: int,
               tanh_per_layer: int = 0) -> Stack:
  """DenseLayers on random vectors; loss mean(y²)."""
  x = tf.random.stateless_normal([batch, dim], [0, 1])
  return (DenseLayers(num_layers, dim, tanh_per_layer), x,
          lambda y: tf.reduce_mean(y * y))


def TransformerStack(num_layers: int, dim: int, batch: int, seq_len: int,
                     num_heads: int, vocab_size: int,
                     stacked: bool = False,
                     inline_body: bool = True) -> Stack:
  """A Transformer-L shaped language model on random token ids.

  An embedding, `num_layers` causal Transformer blocks of width `dim`
  (d_ff = 4 dim) and an untied softmax over `vocab_size`; the labels are
  the ids shifted by one, the loss their average cross-entropy.

  Args:
    num_layers: Transformer blocks.
    dim: d_model.
    batch: sequences.
    seq_len: tokens per sequence.
    num_heads: attention heads.
    vocab_size: vocabulary of the embedding and the softmax.
    stacked: the blocks as one Repeat layer (stacked weights, one block in
      the graph) instead of listed one by one.
    inline_body: stacked: the Repeat's inline_body.
  """
  layers = [transformer.TransformerEmbedding.Params().Set(
      name='emb', vocab_size=vocab_size, model_dim=dim)]
  block = transformer.TransformerLayer.Params().Set(
      model_dim=dim, num_heads=num_heads, hidden_dim=4 * dim, causal=True)
  if stacked:
    layers.append(repeat.Repeat.Params().Set(name='layers', sub=block,
                                             num=num_layers,
                                             inline_body=inline_body))
  else:
    layers += [block.Copy().Set(name=f'layer{i}') for i in range(num_layers)]
  layers.append(transformer.TransformerSoftmax.Params().Set(
      name='softmax', model_dim=dim, vocab_size=vocab_size))
  shape = [batch, seq_len]
  ids = tf.random.stateless_uniform(shape, [0, 2], maxval=vocab_size,
                                    dtype=tf.int32)
  inputs = NestedMap(ids=ids, labels=tf.roll(ids, -1, axis=1),
                     paddings=tf.zeros(shape))
  return layers, inputs, lambda out: transformer.XentLoss(out).avg_xent


def AmoebaNetStack(num_cells: int, num_filters: int, batch: int,
                   image_size: int) -> Stack:
  """AmoebaNet-D (num_cells normal cells, num_filters filters, the small-image
  stem) on random images of 10 classes; loss the mean cross-entropy.

  Raises:
    NotOnPath: tasks.image.amoebanet cannot be imported (run from the
      repository root); a missing dependency of it raises its own error.
  """
  try:
    amoebanet = importlib.import_module(AMOEBANET_MODULE)
  except ModuleNotFoundError as e:
    if e.name not in ('tasks', 'tasks.image', AMOEBANET_MODULE):
      raise
    raise NotOnPath(f'the amoebanet stack needs {AMOEBANET_MODULE} on '
                    f'sys.path (run from the repository root): {e}') from e
  p = amoebanet.AmoebaNet.Params().Set(
      num_cells=num_cells, num_filters=num_filters, genotype='D',
      num_classes=10, image_size=image_size, stem_type='basic')
  inputs = NestedMap(
      image=tf.random.stateless_normal([batch, image_size, image_size, 3],
                                       [0, 3]),
      label=tf.random.stateless_uniform([batch], [0, 4], maxval=10,
                                        dtype=tf.int32))

  def Loss(out):
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        out.label, out.logits))

  return amoebanet.AmoebaNet.Layers(p), inputs, Loss
