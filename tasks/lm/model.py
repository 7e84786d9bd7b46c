"""Transformer language model: a decoder-only flat list of pipelinable layers.

The network is a PipeliningLayer over

    [TransformerEmbedding 'emb', TransformerLayer 'layer_i' (causal) × L,
     TransformerSoftmax 'softmax']

through which NestedMap(ids, paddings) flows: 'emb' turns ids into vec, each
layer replaces vec, 'softmax' replaces vec by logits; paddings pass through
(they mask the attention keys). LmTask scores the merged logits against the
batch's labels. `TransformerLParams` is GPipe's Transformer-L (Huang et al.
2019, Table 1): d_model 2048, d_ff 8192, 32 heads, a 32k vocabulary, untied
embedding and softmax; L = 3, 13, 103, 415, 1663 give 282.2M ... 83.9B
parameters, which NumParams reports from Params alone in well under a second.

With stack_layers=True (TransformerLParams' default) the L blocks are one
Repeat: the graph holds one block whatever L, and the pipeline cuts the
Repeat between blocks. Checkpoint variables: block weights are
stacked, `<task>.network.pipeline.layers_1.body.*` of shape [L, ...] (the
softmax is layers_2), instead of one `layers_<1+i>.*` per block (what
stack_layers=False gives, and what checkpoints written before Repeat hold).
"""

from __future__ import annotations

from typing import Any

from lingvo_gpipe import base_task
from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.layers import transformer
from lingvo_gpipe.core.nested_map import NestedMap
from tasks import metrics
from tasks import transformer_network


class TransformerLm(transformer_network.TransformerNetwork):
  """A pre-LN decoder-only Transformer LM, pipelined.

  Its layers: TransformerEmbedding, num_layers causal TransformerLayers (one
  Repeat if stack_layers), TransformerSoftmax; NestedMap(ids, paddings) in,
  (logits, paddings) out.
  """

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('vocab_size', 32000, 'Vocabulary (embedding and softmax, '
             'untied).')
    return p

  @classmethod
  def Layers(cls, p) -> list:
    keep = cls.KeepProb(p)
    return ([transformer.TransformerEmbedding.Params().Set(
        name='emb', vocab_size=p.vocab_size, model_dim=p.model_dim,
        keep_prob=keep)] +
            cls.Stack(p, 'layer', causal=True, cross_attention=False) +
            [transformer.TransformerSoftmax.Params().Set(
                name='softmax', model_dim=p.model_dim,
                vocab_size=p.vocab_size)])


def TransformerLmParams(vocab_size: int,
                        model_dim: int,
                        num_heads: int,
                        hidden_dim: int,
                        num_layers: int,
                        dropout: float = 0.0,
                        stack_layers: bool = False,
                        num_partitions: int = 1,
                        num_micro_batches: int = 1,
                        name: str = 'lm',
                        **pipeline_params: Any) -> base_layer.Params:
  """TransformerLm Params; pipeline_params are other PipeliningLayer fields
  (devices, recompute, partition_method, balance, input_shapes, ...)."""
  p = TransformerLm.Params().Set(
      name=name, vocab_size=vocab_size, model_dim=model_dim,
      num_heads=num_heads, hidden_dim=hidden_dim, num_layers=num_layers,
      dropout=dropout, stack_layers=stack_layers)
  p.pipeline.Set(num_partitions=num_partitions,
                 num_micro_batches=num_micro_batches, **pipeline_params)
  return p


def TransformerLParams(num_layers: int, **kwargs: Any) -> base_layer.Params:
  """GPipe Table 1's Transformer-L with `num_layers` layers.

  d_model 2048, d_ff 8192, 32 heads, vocabulary 32000, the blocks stacked in
  one Repeat (its depth goes to 1663 blocks); any argument of
  TransformerLmParams (dropout, num_partitions, num_micro_batches, devices,
  ...) may be given or overridden in kwargs.
  """
  table_1 = dict(vocab_size=32000, model_dim=2048, num_heads=32,
                 hidden_dim=8192, name='transformer_l', stack_layers=True)
  table_1.update(kwargs)
  return TransformerLmParams(num_layers=num_layers, **table_1)


class LmTask(base_task.BaseTask):
  """Language modelling: batches NestedMap(ids, labels, paddings), each [b, T].

  Metrics, each weighted by the number of non-padded tokens: loss
  (cross-entropy, label-smoothed if asked), log_pplx (negative
  log-likelihood per token; perplexity is its exp), token_accuracy.
  """

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('label_smoothing', 0.0, 'ε in [0, 1) of the loss; log_pplx is '
             'always unsmoothed.')
    return p

  def NetworkInputs(self, batch: NestedMap) -> NestedMap:
    return NestedMap(ids=batch.ids, paddings=batch.paddings)

  def OutputMetrics(self, outputs: NestedMap, batch: NestedMap) -> NestedMap:
    return metrics.SequenceMetrics(outputs.logits, batch.labels,
                                   batch.paddings, self.params.label_smoothing)
