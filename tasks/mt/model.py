"""Transformer translation: an encoder-decoder as one flat, pipelinable list.

The network is a PipeliningLayer over the flat list

    [TransformerEmbedding 'src_emb',
     TransformerLayer 'enc_i' × num_layers,
     EncoderToDecoder 'enc_dec',
     TransformerLayer 'dec_i' (causal, cross-attention) × num_layers,
     TransformerSoftmax 'softmax']

so GPipe may cut it anywhere, encoder and decoder alike. With
stack_layers=True each stack of blocks is one Repeat ('enc', 'dec'; the
pipeline cuts a Repeat between blocks) holding its blocks' weights stacked:
variables `<task>.network.pipeline.layers_1.body.*` (encoder) and
`layers_3.body.*` (decoder) of shape [num_layers, ...], instead of one
`layers_<j>` per block. Invariant: one
NestedMap flows through every layer, each replacing only what it computes and
passing every other key through, so the target side rides along with each
micro-batch through the encoder's cells and the encoder output rides along
through the decoder's:

    src_emb   NestedMap(ids, paddings, tgt=NestedMap(ids, paddings))
              -> (vec, paddings, tgt)                        [ids consumed]
    enc_i     (vec, paddings, tgt) -> same keys, new vec
    enc_dec   -> (vec, paddings, aux_vec, aux_paddings)       [tgt consumed:
              aux_vec = LayerNorm(encoder vec), aux_paddings = source paddings,
              vec = target embedding of tgt.ids, paddings = tgt.paddings]
    dec_i     -> same keys, new vec
    softmax   -> (logits, paddings, aux_vec, aux_paddings)   [vec consumed]

The loss is computed by MtTask from the merged logits against tgt.labels.
Greedy decoding (an eval-only path) runs the same layers without the
pipeline, one after another on the whole batch, with the pipeline's own
theta, each layer on its cell's device (where its weights are).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import tensorflow as tf

from lingvo_gpipe import base_task
from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe import pipelined_network
from lingvo_gpipe.core.gpipe import pipelining_layer
from lingvo_gpipe.core.layers import combinators
from lingvo_gpipe.core.layers import normalization
from lingvo_gpipe.core.layers import transformer
from lingvo_gpipe.core.nested_map import NestedMap
from tasks import metrics
from tasks import transformer_network

PAD_ID, EOS_ID, SOS_ID = 0, 1, 2


def _Require(where: str, inputs: Any, key: str, why: str) -> Any:
  if not isinstance(inputs, dict) or key not in inputs:
    keys = sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__
    raise ValueError(f'{where}: inputs need the key {key!r} ({why}); got '
                     f'{keys}.')
  return inputs[key]


class EncoderToDecoder(base_layer.BaseLayer):
  """The encoder's end and the decoder's start, as one pipelinable layer.

  NestedMap(vec, paddings, tgt=NestedMap(ids, paddings, ...), ...) ->
  NestedMap(vec, paddings, aux_vec, aux_paddings, ...):
  aux_vec = LayerNorm(vec) (the pre-LN encoder stack's final norm) and
  aux_paddings = paddings; then `tgt` goes through a TransformerEmbedding and
  its outputs (vec from tgt.ids, tgt.paddings, any other tgt keys) become the
  top-level keys. Other keys pass through unchanged.
  """

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('model_dim', 0, 'Model dimension d of encoder and decoder.')
    p.Define('tgt_vocab_size', 0, 'Target vocabulary size (embedding rows).')
    p.Define('final_norm', True, 'LayerNorm the encoder output (a pre-LN '
             "stack's last sub-block output is not normalized).")
    p.Define('scale_sqrt_depth', True, 'Scale target embeddings by '
             'sqrt(model_dim).')
    p.Define('keep_prob', 1.0, 'Dropout keep_prob of the target embedding.')
    return p

  @classmethod
  def ChildParams(cls, p) -> NestedMap:
    subs = NestedMap()
    if p.final_norm:
      subs.enc_norm = normalization.LayerNorm.Params().Set(dim=p.model_dim)
    subs.tgt_emb = transformer.TransformerEmbedding.Params().Set(
        vocab_size=p.tgt_vocab_size, model_dim=p.model_dim,
        scale_sqrt_depth=p.scale_sqrt_depth, keep_prob=p.keep_prob)
    return subs

  def FProp(self, theta: NestedMap, inputs: NestedMap) -> NestedMap:
    vec = _Require(self.path, inputs, 'vec', 'the encoder output')
    tgt = _Require(self.path, inputs, 'tgt',
                   'NestedMap(ids, paddings) of the target side')
    _Require(self.path, tgt, 'ids', 'target token ids [batch, tgt_time]')
    out = self._Source(inputs)
    if self.params.final_norm:
      vec = self.enc_norm.FProp(theta.enc_norm, vec)
    out.aux_vec = vec
    out.update(self.tgt_emb.FProp(theta.tgt_emb, NestedMap(tgt)))
    return out

  @staticmethod
  def _Source(inputs: Any) -> NestedMap:
    """inputs without vec and tgt; paddings renamed aux_paddings."""
    out = NestedMap(inputs)
    del out['vec'], out['tgt']
    if 'paddings' in out:
      out.aux_paddings = out.pop('paddings')
    return out

  @classmethod
  def FPropMeta(cls, p, input_shapes):
    shapes = base_layer.ToShape(input_shapes)
    vec = _Require(p.name, shapes, 'vec', 'the encoder output')
    tgt = _Require(p.name, shapes, 'tgt', 'NestedMap(ids, paddings)')
    subs = cls.ChildParams(p)
    out = cls._Source(shapes)
    flops = 0
    if p.final_norm:
      flops += normalization.LayerNorm.FPropMeta(subs.enc_norm, vec).flops
    out.aux_vec = vec
    emb = transformer.TransformerEmbedding.FPropMeta(subs.tgt_emb,
                                                     NestedMap(tgt))
    out.update(emb.out_shapes[0])
    return base_layer.Meta(flops + emb.flops, out)


class Transformer(transformer_network.TransformerNetwork):
  """A pre-LN Transformer encoder-decoder, pipelined as one flat layer list."""

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('src_vocab_size', 32000, 'Source vocabulary size.')
    p.Define('tgt_vocab_size', 32000, 'Target vocabulary size (untied from '
             'the source).')
    p.Set(dropout=0.1)
    return p

  @classmethod
  def Layers(cls, p) -> list:
    keep = cls.KeepProb(p)
    return ([transformer.TransformerEmbedding.Params().Set(
        name='src_emb', vocab_size=p.src_vocab_size, model_dim=p.model_dim,
        keep_prob=keep)] +
            cls.Stack(p, 'enc', causal=False, cross_attention=False) +
            [EncoderToDecoder.Params().Set(
                name='enc_dec', model_dim=p.model_dim,
                tgt_vocab_size=p.tgt_vocab_size, keep_prob=keep)] +
            cls.Stack(p, 'dec', causal=True, cross_attention=True) +
            [transformer.TransformerSoftmax.Params().Set(
                name='softmax', model_dim=p.model_dim,
                vocab_size=p.tgt_vocab_size)])


def TransformerParams(src_vocab_size: int,
                      tgt_vocab_size: int,
                      model_dim: int = 512,
                      num_heads: int = 8,
                      hidden_dim: int = 2048,
                      num_layers: int = 6,
                      dropout: float = 0.1,
                      stack_layers: bool = False,
                      num_partitions: int = 1,
                      num_micro_batches: int = 1,
                      name: str = 'transformer',
                      **pipeline_params: Any) -> base_layer.Params:
  """Transformer Params; pipeline_params are other PipeliningLayer fields
  (devices, recompute, partition_method, balance, input_shapes, ...)."""
  p = Transformer.Params().Set(
      name=name, src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size,
      model_dim=model_dim, num_heads=num_heads, hidden_dim=hidden_dim,
      num_layers=num_layers, dropout=dropout, stack_layers=stack_layers)
  p.pipeline.Set(num_partitions=num_partitions,
                 num_micro_batches=num_micro_batches, **pipeline_params)
  return p


def NetworkInputShapes(batch_size: int, src_len: int,
                       tgt_len: int) -> NestedMap:
  """Shapes of NetworkInputs for a batch, e.g. for the pipeline's input_shapes."""
  return NestedMap(ids=[batch_size, src_len], paddings=[batch_size, src_len],
                   tgt=NestedMap(ids=[batch_size, tgt_len],
                                 paddings=[batch_size, tgt_len]))


def NetworkInputs(batch: NestedMap) -> NestedMap:
  """The network's input from an MT batch: source and target ids and paddings.

  tgt.labels stay out of the network: MtTask scores the logits against them.
  """
  return NestedMap(ids=batch.src.ids, paddings=batch.src.paddings,
                   tgt=NestedMap(ids=batch.tgt.ids,
                                 paddings=batch.tgt.paddings))


def SequentialLayers(layer: base_layer.BaseLayer, theta: NestedMap,
                     scope: Callable[[], Any] = contextlib.nullcontext
                     ) -> list[tuple[Any, Any, Callable[[], Any]]]:
  """(layer, theta, scope) of each layer a network runs, in turn.

  A PipeliningLayer's layers come with their cell's placement scope
  (PipeliningLayer.SequentialLayers), a Sequential's with its own; run each
  as `with scope(): layer.FProp(theta, x)` (RunLayers).
  """
  if isinstance(layer, pipelined_network.PipelinedNetwork):
    return SequentialLayers(layer.pipeline, theta.pipeline, scope)
  if isinstance(layer, pipelining_layer.PipeliningLayer):
    return [triple for sub, sub_theta, sub_scope in layer.SequentialLayers(theta)
            for triple in SequentialLayers(sub, sub_theta, sub_scope)]
  if isinstance(layer, combinators.Sequential):
    return [triple for sub, sub_theta in zip(layer.sub, theta.sub)
            for triple in SequentialLayers(sub, sub_theta, scope)]
  return [(layer, theta, scope)]


def RunLayers(layers: list[tuple[Any, Any, Callable[[], Any]]], x: Any) -> Any:
  """Runs (layer, theta, scope) triples in turn, each inside its scope."""
  for layer, layer_theta, scope in layers:
    with scope():
      x = layer.FProp(layer_theta, x)
  return x


class MtTask(base_task.BaseTask):
  """Translation of NestedMap(src=(ids, paddings), tgt=(ids, labels, paddings)).

  Metrics (each weighted by the number of non-padded target tokens): loss
  (label-smoothed cross-entropy), log_pplx (negative log-likelihood per
  token), token_accuracy. Decode: greedy decoding; CreateDecodeMetrics:
  corpus BLEU on token ids and sequence accuracy (exact match).
  """

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('label_smoothing', 0.0, 'ε in [0, 1) of the token '
             'cross-entropy loss (0.1 in the Transformer paper).')
    p.Define('max_decode_len', 64, 'Tokens greedy decoding emits at most, '
             'EOS included.')
    p.Define('sos_id', SOS_ID, 'Id that starts every target (tgt.ids[:, 0]).')
    p.Define('eos_id', EOS_ID, 'Id that ends every target; decoding stops '
             'there and metrics strip it and all after it.')
    return p

  def __init__(self, params):
    if params.max_decode_len < 1:
      raise ValueError(f'{params.name}: max_decode_len must be >= 1, got '
                       f'{params.max_decode_len}.')
    super().__init__(params)

  def NetworkInputs(self, batch: NestedMap) -> NestedMap:
    return NetworkInputs(batch)

  def OutputMetrics(self, outputs: NestedMap, batch: NestedMap) -> NestedMap:
    return metrics.SequenceMetrics(outputs.logits, batch.tgt.labels,
                                   batch.tgt.paddings,
                                   self.params.label_smoothing)

  def Decode(self, theta: NestedMap, batch: NestedMap) -> NestedMap:
    """NestedMap(hyp_ids [b, max_decode_len], ref_ids [b, T]) for BLEU."""
    hyp_ids = self.GreedyDecode(theta, batch.src)
    labels = batch.tgt.labels
    ref_ids = tf.where(batch.tgt.paddings > 0.5, tf.zeros_like(labels), labels)
    return NestedMap(hyp_ids=hyp_ids, ref_ids=ref_ids)

  def CreateDecodeMetrics(self) -> metrics.SequenceDecodeMetrics:
    return metrics.SequenceDecodeMetrics(eos_id=self.params.eos_id,
                                         pad_id=PAD_ID)

  def GreedyDecode(self, theta: NestedMap, src: NestedMap) -> tf.Tensor:
    """Greedy decoding of src NestedMap(ids, paddings): [b, max_decode_len].

    int32; row i holds the argmax tokens y_1, y_2, ... up to and including
    the first EOS, then padding (0). Eval only and not pipelined: the encoder
    layers run once, then each step runs EncoderToDecoder and the decoder
    layers on the whole fixed-length target buffer [SOS, y_1, ..., 0, ...]
    (causal attention makes position t depend on y_≤t only) and reads
    position t's logits; the loop ends when every row has emitted EOS. Each
    layer runs in its pipeline cell's scope, where its weights are: only the
    activations cross devices, never the weights.
    """
    p = self.params
    layers = SequentialLayers(self.network, theta.network)
    starts = [i for i, (layer, _, _) in enumerate(layers)
              if isinstance(layer, EncoderToDecoder)]
    if len(starts) != 1:
      raise ValueError(f'{self.path}: greedy decoding needs exactly one '
                       f'EncoderToDecoder layer in the network, found '
                       f'{len(starts)}.')
    encoder, decoder = layers[:starts[0]], layers[starts[0]:]
    length = p.max_decode_len
    ids = src.ids
    batch_size = ids.shape[0] if ids.shape[0] is not None else tf.shape(ids)[0]

    with base_layer.Context(training=False):
      source = RunLayers(encoder, NestedMap(ids=ids, paddings=src.paddings))
      last_scope = decoder[-1][2]

      def Write(buffer, position, values):
        # one_hot of an index past the end is all zeros: nothing written.
        return buffer + tf.one_hot(position, length, dtype=tf.int32) * (
            values[:, tf.newaxis])

      def Step(t, targets, hyp, done):
        x = source.copy()
        x.tgt = NestedMap(ids=targets,
                          paddings=tf.zeros(tf.shape(targets), tf.float32))
        x = RunLayers(decoder, x)
        with last_scope():  # where the logits are: only ids leave it
          next_ids = tf.argmax(tf.gather(x.logits, t, axis=1), axis=-1,
                               output_type=tf.int32)
        next_ids = tf.where(done, tf.zeros_like(next_ids), next_ids)
        return (t + 1, Write(targets, t + 1, next_ids), Write(hyp, t, next_ids),
                tf.logical_or(done, tf.equal(next_ids, p.eos_id)))

      def NotFinished(t, targets, hyp, done):
        del targets, hyp
        return tf.logical_and(t < length,
                              tf.logical_not(tf.reduce_all(done)))

      targets = Write(tf.zeros([batch_size, length], tf.int32), 0,
                      tf.fill([batch_size], tf.constant(p.sos_id, tf.int32)))
      _, _, hyp, _ = tf.while_loop(
          NotFinished, Step,
          (tf.constant(0), targets, tf.zeros([batch_size, length], tf.int32),
           tf.zeros([batch_size], tf.bool)))
    return hyp
