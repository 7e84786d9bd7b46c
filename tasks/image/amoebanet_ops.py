"""AmoebaNet's operations, as chains of core layers, and its factorized reduction.

Invariant: one function, `OpLayers(op, in_dim, out_dim, stride)`, gives the
layers of an operation; a composite declares its children once, in its
`ChildParams`, and builds its variables, counts its parameters (`NumParams`)
and sizes its outputs (`FPropMeta`) from those same Params. So the static counts of a 1.8B-parameter AmoebaNet are those of the
layers it would build, found without building it.

Order inside an operation follows the public AmoebaNet code (tensorflow/tpu
`models/official/amoeba_net`): ReLU, conv (no bias), BatchNorm; pooling
takes no ReLU, and its 1×1 conv + BN only appears when channels change.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core.layers import activations
from lingvo_gpipe.core.layers import combinators
from lingvo_gpipe.core.layers import conv
from lingvo_gpipe.core.layers import normalization
from lingvo_gpipe.core.layers import pooling
from lingvo_gpipe.core.nested_map import NestedMap

Params = hyperparams.Params

# name -> (pooling type, window) of the pooling operations.
_POOLS = {'max2': ('MAX', 2), 'max3': ('MAX', 3), 'avg3': ('AVG', 3)}
# name -> kernel of the separable operations, each applied twice.
_SEPARABLES = {'sep3x3_2': 3, 'sep5x5_2': 5}
# name -> the convolutions between a bottleneck's 1×1s: (kernel, stride axes).
_BOTTLENECKS = {'3x3': [((3, 3), (0, 1))],
                '1x7_7x1': [((1, 7), (1,)), ((7, 1), (0,))]}
OPS = ('none', '1x1', *_BOTTLENECKS, *_SEPARABLES, *_POOLS)


def Relu(name: str = 'relu') -> Params:
  return activations.Activation.Params().Set(name=name, activation='relu')


def Identity(name: str = 'identity') -> Params:
  """A layer with no variables that returns its input ('none' activation)."""
  return activations.Activation.Params().Set(name=name, activation='none')


def Conv(name: str, kernel: Sequence[int], in_dim: int, out_dim: int,
         stride: Any = 1, padding: str = 'SAME') -> Params:
  """A bias-free convolution, as every AmoebaNet conv is."""
  return conv.Conv2D.Params().Set(
      name=name, filter_shape=[*kernel, in_dim, out_dim], stride=stride,
      padding=padding)


def BatchNorm(name: str, dim: int, decay: float) -> Params:
  return normalization.BatchNorm.Params().Set(name=name, dim=dim, decay=decay)


def ReluConvBN(name: str, kernel: Sequence[int], in_dim: int, out_dim: int,
               stride: Any, bn_decay: float) -> list[Params]:
  return [Relu(f'{name}_relu'), Conv(name, kernel, in_dim, out_dim, stride),
          BatchNorm(f'{name}_bn', out_dim, bn_decay)]


def _CheckOp(op: str) -> None:
  if op not in OPS:
    raise ValueError(f'Unknown AmoebaNet operation {op!r}; valid: '
                     f'{", ".join(OPS)}.')


def OpLayers(op: str, in_dim: int, out_dim: int, stride: int = 1,
             bn_decay: float = 0.997) -> list[Params]:
  """The layers of operation `op`, applied in order; [] is the identity.

  Args:
    op: one of OPS.
    in_dim: channels of the hidden state the operation reads.
    out_dim: F, the cell's filters.
    stride: 2 when the op reads an input of a reduction cell, else 1.
    bn_decay: moving-average decay of every BatchNorm.
  """
  _CheckOp(op)
  if op == 'none':
    if stride == 1 and in_dim == out_dim:
      return []
    return ReluConvBN('conv1x1', (1, 1), in_dim, out_dim, stride, bn_decay)
  if op == '1x1':
    return ReluConvBN('conv1x1', (1, 1), in_dim, out_dim, stride, bn_decay)
  if op in _POOLS:
    kind, window = _POOLS[op]
    layers = [pooling.Pooling.Params().Set(
        name=op, pooling_type=kind, window=window, stride=stride)]
    if in_dim != out_dim:
      layers += [Conv('conv1x1', (1, 1), in_dim, out_dim),
                 BatchNorm('conv1x1_bn', out_dim, bn_decay)]
    return layers
  if op in _SEPARABLES:
    k = _SEPARABLES[op]
    layers = []
    for i, (cin, s) in enumerate([(in_dim, stride), (out_dim, 1)]):
      layers += [Relu(f'sep{i}_relu'),
                 conv.SeparableConv2D.Params().Set(
                     name=f'sep{i}', filter_shape=[k, k, cin, out_dim],
                     stride=s),
                 BatchNorm(f'sep{i}_bn', out_dim, bn_decay)]
    return layers
  return _Bottleneck(op, in_dim, out_dim, stride, bn_decay)


def _Bottleneck(op: str, in_dim: int, out_dim: int, stride: int,
                bn_decay: float) -> list[Params]:
  """1×1 to F/4, the op's convolutions, 1×1 back to F (no 1×1s when F < 4)."""
  bottleneck = out_dim // 4 >= 1
  layers = []
  if bottleneck:
    mid = out_dim // 4
    layers += ReluConvBN('pre1x1', (1, 1), in_dim, mid, 1, bn_decay)
  else:  # The public code skips the 1×1s when F/4 would be 0.
    mid = out_dim
  convs = _BOTTLENECKS[op]
  cin = mid if bottleneck else in_dim
  layers.append(Relu('relu'))
  for i, (kernel, stride_axes) in enumerate(convs):
    if i:  # Between the 1×7 and the 7×1: BN, ReLU.
      layers += [BatchNorm(f'conv{i - 1}_bn', mid, bn_decay), Relu(f'relu{i}')]
    strides = tuple(stride if a in stride_axes else 1 for a in (0, 1))
    layers.append(Conv(f'conv{i}', kernel, cin, mid, strides))
    cin = mid
  layers.append(BatchNorm(f'conv{len(convs) - 1}_bn', mid, bn_decay))
  if bottleneck:
    layers += ReluConvBN('post1x1', (1, 1), mid, out_dim, 1, bn_decay)
  return layers


def ChainParams(name: str, layers: Sequence[Params]) -> Params:
  """One layer applying `layers` in order (the identity if there are none)."""
  if not layers:
    return Identity(name)
  return combinators.Sequential.Params().Set(name=name, sub=list(layers))


class FactorizedReduction(base_layer.BaseLayer):
  """Halves height and width without dropping pixels, to out_dim channels.

  Two stride-2 1×1 convs to out_dim/2 each, one on the input and one on the
  input shifted by one pixel up and left (zero-padded at the bottom and
  right), so together they see every pixel; then concat and BatchNorm. The
  ReLU before it belongs to the caller.
  """

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('input_dim', hyperparams.REQUIRED, 'Input channels.')
    p.Define('output_dim', hyperparams.REQUIRED, 'Output channels; even.')
    p.Define('batch_norm_decay', 0.997, 'Moving-average decay of the BN.')
    return p

  @classmethod
  def ChildParams(cls, p) -> NestedMap:
    """The two half-width 1×1 convs and the BN, after checking output_dim."""
    if not isinstance(p.output_dim, int) or p.output_dim < 2 or p.output_dim % 2:
      raise ValueError(f'{p.name}: factorized reduction needs an even '
                       f'output_dim >= 2 (two halves), got {p.output_dim!r}. '
                       'Choose num_filters so that every cell that halves '
                       'the size of its previous input has even filters.')
    half = p.output_dim // 2
    return NestedMap(
        path1=Conv('path1', (1, 1), p.input_dim, half, stride=2),
        path2=Conv('path2', (1, 1), p.input_dim, half, stride=2),
        bn=BatchNorm('bn', p.output_dim, p.batch_norm_decay))

  @staticmethod
  def _Shift(x: tf.Tensor) -> tf.Tensor:
    return tf.pad(x[:, 1:, 1:, :], [[0, 0], [0, 1], [0, 1], [0, 0]])

  def FProp(self, theta: NestedMap, inputs: tf.Tensor) -> tf.Tensor:
    path1 = self.path1.FProp(theta.path1, inputs)
    path2 = self.path2.FProp(theta.path2, self._Shift(inputs))
    return self.bn.FProp(theta.bn, tf.concat([path1, path2], axis=-1))

  @classmethod
  def NumParams(cls, p) -> int:
    return sum(c.cls.NumParams(c) for c in cls.ChildParams(p).values())

  @classmethod
  def FPropMeta(cls, p, input_shape):
    children = cls.ChildParams(p)
    m1 = children.path1.cls.FPropMeta(children.path1, input_shape)
    m2 = children.path2.cls.FPropMeta(children.path2, input_shape)
    out = m1.out_shapes[0][:-1].concatenate([p.output_dim])
    m3 = children.bn.cls.FPropMeta(children.bn, out)
    return base_layer.Meta(m1.flops + m2.flops + m3.flops, out)


def InputProjection(name: str, input_dim: int, output_dim: int,
                    halve: bool, bn_decay: float) -> Optional[Params]:
  """How a cell brings an input to its F channels (None: it already has them).

  ReLU then a factorized reduction when the input is at twice the cell's
  spatial size (`halve`), else ReLU, 1×1 conv, BN when channels differ.
  """
  if halve:
    return ChainParams(name, [Relu(), FactorizedReduction.Params().Set(
        name='reduce', input_dim=input_dim, output_dim=output_dim,
        batch_norm_decay=bn_decay)])
  if input_dim != output_dim:
    return ChainParams(name, OpLayers('1x1', input_dim, output_dim, 1,
                                      bn_decay))
  return None
