"""A stacked variable: one logical weight of N iterations, stored as pieces.

Invariant: a StackedVariable is one weight of shape [N, ...] (the weights of
N identical layers, iteration t at index t) stored as consecutive pieces
along dim 0, each a tf.Variable that may live on its own device. However it
is cut, it saves and restores as that one [N, ...] tensor under its own
checkpoint key (the key a plain variable at the same place would have), so a
checkpoint written with one cut restores under any other, or none.

A `Repeat` layer's weights are stacked variables; the pipeline cuts a Repeat
between iterations when its cells need it, and each cell then holds and
updates only its piece (the optimizer keeps its slots as stacked variables
too, optimizer.py).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import tensorflow as tf
from tensorflow.python.trackable import base as trackable  # pylint: disable=g-direct-tensorflow-import


class StackedVariable(trackable.Trackable):
  """N iterations of one weight, as pieces along dim 0 (see module docstring).

  Attributes:
    name: the logical variable's name (without a piece suffix).
    pieces: the piece variables, in iteration order.
    sizes: the iterations each piece holds.
  """

  def __init__(self, name: str, pieces: Sequence[Any]):
    if not pieces:
      raise ValueError(f'{name}: a stacked variable needs at least one piece.')
    self.name = name
    self.pieces = list(pieces)
    self.sizes = [int(p.shape[0]) for p in self.pieces]
    for i, piece in enumerate(self.pieces):
      if isinstance(piece, tf.Variable):
        # Lets the optimizer find the logical weight a piece belongs to.
        piece.stacked_owner = (self, i)

  @property
  def shape(self) -> tf.TensorShape:
    """The logical shape, [N] + the per-iteration shape."""
    return tf.TensorShape([sum(self.sizes)]).concatenate(
        self.pieces[0].shape[1:])

  @property
  def dtype(self) -> tf.DType:
    return self.pieces[0].dtype

  def assign(self, value: Any) -> Any:
    """Assigns the logical [N, ...] `value`: each piece its iterations' rows."""
    value = tf.convert_to_tensor(value, tf.as_dtype(self.dtype).base_dtype)
    if value.shape.rank is not None and value.shape[0] != sum(self.sizes):
      raise ValueError(
          f'{self.name}: the value holds {value.shape[0]} iterations of '
          f'this weight, the model has {sum(self.sizes)} (Repeat.num '
          'differs).')
    parts = tf.split(value, self.sizes, axis=0)
    return tf.group([p.assign(v) for p, v in zip(self.pieces, parts)])

  def Map(self, fn: Callable[[Any, int], Any], name: str) -> 'StackedVariable':
    """A stacked variable of the same cut whose piece i is fn(piece i, i)."""
    return StackedVariable(name, [fn(p, i) for i, p in enumerate(self.pieces)])

  # --- checkpointing: one tensor, whatever the cut --------------------------

  def _serialize_to_tensors(self):
    value = (self.pieces[0].read_value() if len(self.pieces) == 1 else
             tf.concat([p.read_value() for p in self.pieces], axis=0))
    return {trackable.VARIABLE_VALUE_KEY: value}

  def _restore_from_tensors(self, restored_tensors):
    return self.assign(restored_tensors[trackable.VARIABLE_VALUE_KEY])

  def __repr__(self) -> str:
    return (f'StackedVariable({self.name}, {self.shape}, pieces '
            f'{self.sizes})')
