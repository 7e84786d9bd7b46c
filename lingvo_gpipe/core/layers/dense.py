"""Fully connected layers: Dense and the Transformer's position-wise FeedForward.

Invariant: both act on the last dimension of inputs of any rank >= 2, so the
same layer serves [batch, dim] and [batch, time, dim] inputs.
"""

from __future__ import annotations

import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.layers import activations
from lingvo_gpipe.core.nested_map import NestedMap


def _CheckLastDim(layer_name: str, shape: tf.TensorShape, expected: int):
  if shape.rank is not None and shape[-1] is not None and shape[-1] != expected:
    raise ValueError(f'{layer_name}: input last dim is {shape[-1]}, but '
                     f'input_dim is {expected} (input shape {shape}).')


class Dense(base_layer.BaseLayer):
  """y = activation(x · w + b) over the last dimension."""

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('input_dim', 0, 'Size of the last input dimension.')
    p.Define('output_dim', 0, 'Size of the last output dimension.')
    p.Define('activation', 'relu', f'One of {activations.Names()}.')
    p.Define('has_bias', True, 'Whether to add a bias.')
    return p

  def __init__(self, params):
    super().__init__(params)
    p = self.params
    if p.input_dim <= 0 or p.output_dim <= 0:
      raise ValueError(f'{self.path}: input_dim and output_dim must be > 0, '
                       f'got {p.input_dim} and {p.output_dim}.')
    activations.GetFn(p.activation)
    self.CreateVariable('w', base_layer.WeightParams([p.input_dim, p.output_dim]))
    if p.has_bias:
      self.CreateVariable('b', base_layer.WeightParams(
          [p.output_dim], init=base_layer.WeightInit.Constant(0.0)))

  def FProp(self, theta: NestedMap, inputs: tf.Tensor) -> tf.Tensor:
    p = self.params
    _CheckLastDim(self.path, inputs.shape, p.input_dim)
    out = tf.tensordot(inputs, theta.w, axes=[[-1], [0]])
    if p.has_bias:
      # BiasAdd, not +: its gradient is one op (BiasAddGrad) where +'s is a
      # Sum, a Reshape and their shape constants, run at every clock of the
      # loop executor (16 × Dense(64), K=4: its step 0.92x as long).
      out = (tf.nn.bias_add(out, theta.b) if (out.shape.rank or 0) >= 2
             else out + theta.b)
    return activations.GetFn(p.activation)(out)

  @classmethod
  def FPropMeta(cls, p, input_shape):
    shape = base_layer.ToShape(input_shape)
    _CheckLastDim(p.name, shape, p.input_dim)
    out_shape = shape[:-1].concatenate([p.output_dim])
    rows = shape[:-1].num_elements()
    per_out = 2 * p.input_dim + (1 if p.has_bias else 0) + (
        activations.FlopsPerElement(p.activation))
    return base_layer.Meta(rows * p.output_dim * per_out, out_shape)


class FeedForward(base_layer.BaseLayer):
  """The Transformer's position-wise feed-forward: Dense(d→d_ff, act) → Dense(d_ff→d).

  Layer norm, dropout and the residual connection are composed around it with
  combinators, so each piece stays one idea.
  """

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('input_dim', 0, 'Model dimension d.')
    p.Define('hidden_dim', 0, 'Inner dimension d_ff.')
    p.Define('activation', 'relu', 'Activation of the inner layer.')
    return p

  @classmethod
  def ChildParams(cls, p) -> NestedMap:
    return NestedMap(
        inner=Dense.Params().Set(input_dim=p.input_dim,
                                 output_dim=p.hidden_dim,
                                 activation=p.activation),
        outer=Dense.Params().Set(input_dim=p.hidden_dim,
                                 output_dim=p.input_dim, activation='none'))

  def FProp(self, theta: NestedMap, inputs: tf.Tensor) -> tf.Tensor:
    hidden = self.inner.FProp(theta.inner, inputs)
    return self.outer.FProp(theta.outer, hidden)

  @classmethod
  def FPropMeta(cls, p, input_shape):
    children = cls.ChildParams(p)
    m1 = Dense.FPropMeta(children.inner, input_shape)
    m2 = Dense.FPropMeta(children.outer, m1.out_shapes[0])
    return base_layer.Meta(m1.flops + m2.flops, *m2.out_shapes)
