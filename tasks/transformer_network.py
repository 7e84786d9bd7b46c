"""TransformerNetwork: the fields and blocks a Transformer LM and MT model share.

Invariant: both pipelined Transformers (tasks/lm, tasks/mt) take their width,
depth and dropout from the same fields, checked the same way, and build
their blocks with one function, so a config reads alike for both.
"""

from __future__ import annotations

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe import pipelined_network
from lingvo_gpipe.core.layers import repeat
from lingvo_gpipe.core.layers import transformer


class TransformerNetwork(pipelined_network.PipelinedNetwork):
  """Base of pipelined Transformers: model_dim, heads, d_ff, num_layers, dropout."""

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('model_dim', 512, 'd_model.')
    p.Define('num_heads', 8, 'Attention heads; divides model_dim.')
    p.Define('hidden_dim', 2048, 'd_ff of each feed-forward.')
    p.Define('num_layers', 6, 'TransformerLayers (per stack).')
    p.Define('dropout', 0.0, 'Drop probability of embeddings, residual '
             'branches, attention probabilities and feed-forward activations.')
    p.Define('stack_layers', False, 'True: each stack of num_layers '
             'identical blocks is one Repeat layer (one weight of shape '
             '[num_layers, ...] per block weight, one block in the graph, cut '
             'between blocks by the pipeline as K needs): for deep stacks, '
             'whose listed blocks take minutes to build. False: the blocks '
             'listed one by one, which build faster when shallow (2+2 blocks: '
             'first step 11 s listed, 20 s stacked) and is how checkpoints '
             'written before Repeat name them.')
    p.Define('inline_stacked_body', True, "stack_layers: the Repeat's "
             'inline_body. False keeps the block out of line, one function '
             'instance per device: a smaller graph to optimize and hold for '
             'very deep pipelines (1663 blocks on K=128: a 6.4 GiB peak RSS '
             'against 7.8), for slower steps (4-19% here).')
    return p

  @classmethod
  def KeepProb(cls, p) -> float:
    """1 - dropout, after checking the fields every Transformer shares."""
    if not 0.0 <= p.dropout < 1.0:
      raise ValueError(f'{p.name}: dropout is {p.dropout}; it must be in '
                       '[0, 1).')
    if p.num_layers < 1:
      raise ValueError(f'{p.name}: num_layers must be >= 1, got '
                       f'{p.num_layers}.')
    return 1.0 - p.dropout

  @classmethod
  def Stack(cls, p, name: str, causal: bool,
            cross_attention: bool) -> list[base_layer.Params]:
    """num_layers blocks: one Repeat `name` (stack_layers), or `name_i` each."""
    block = cls.Block(p, name, causal, cross_attention)
    if p.stack_layers:
      return [repeat.Repeat.Params().Set(name=name, sub=block,
                                         num=p.num_layers,
                                         inline_body=p.inline_stacked_body)]
    return [block.Copy().Set(name=f'{name}_{i}') for i in range(p.num_layers)]

  @classmethod
  def Block(cls, p, name: str, causal: bool,
            cross_attention: bool) -> base_layer.Params:
    """One TransformerLayer (decoders: causal; MT decoders: cross-attention)."""
    keep = cls.KeepProb(p)
    return transformer.TransformerLayer.Params().Set(
        name=name, model_dim=p.model_dim, num_heads=p.num_heads,
        hidden_dim=p.hidden_dim, causal=causal, has_aux_atten=cross_attention,
        residual_keep_prob=keep, atten_keep_prob=keep, relu_keep_prob=keep)
