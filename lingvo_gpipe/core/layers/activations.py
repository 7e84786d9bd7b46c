"""Activation functions by name, shared by every layer that takes `activation`.

Invariant: one table maps a name to its function and its per-element FLOPs, so
a layer's FProp and its FPropMeta can never disagree about an activation.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

import tensorflow as tf

from lingvo_gpipe.core import base_layer

# name -> (function, FLOPs per output element)
_ACTIVATIONS: dict[str, tuple[Callable[[tf.Tensor], tf.Tensor], int]] = {
    'none': (lambda x: x, 0),
    'relu': (tf.nn.relu, 1),
    'relu6': (tf.nn.relu6, 2),
    'gelu': (lambda x: tf.nn.gelu(x, approximate=True), 8),
    'tanh': (tf.tanh, 4),
    'sigmoid': (tf.sigmoid, 4),
    'swish': (tf.nn.silu, 5),
}


def Names() -> list[str]:
  return sorted(_ACTIVATIONS)


def _Lookup(name: str) -> tuple[Callable[[tf.Tensor], tf.Tensor], int]:
  if name not in _ACTIVATIONS:
    close = difflib.get_close_matches(str(name), _ACTIVATIONS, n=2)
    hint = f' Did you mean: {", ".join(close)}?' if close else ''
    raise ValueError(f'Unknown activation {name!r}.{hint} '
                     f'Valid: {", ".join(Names())}.')
  return _ACTIVATIONS[name]


def GetFn(name: str) -> Callable[[tf.Tensor], tf.Tensor]:
  """The function for activation `name` (ValueError with valid names if bad)."""
  return _Lookup(name)[0]


def FlopsPerElement(name: str) -> int:
  return _Lookup(name)[1]


class Activation(base_layer.BaseLayer):
  """Applies a named activation; no variables."""

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('activation', 'relu', f'One of {Names()}.')
    return p

  def __init__(self, params):
    super().__init__(params)
    GetFn(self.params.activation)  # fail at build time on a bad name

  def FProp(self, theta: Any, inputs: tf.Tensor) -> tf.Tensor:
    return GetFn(self.params.activation)(inputs)

  @classmethod
  def FPropMeta(cls, p, input_shape):
    shape = base_layer.ToShape(input_shape)
    return base_layer.Meta(
        shape.num_elements() * FlopsPerElement(p.activation), shape)
