"""Repeat: N identical layers as one body with stacked weights, run by a loop.

Invariant: Repeat(sub, num=N) computes what a Sequential of N layers built
from `sub` would compute, where layer t's weights are iteration t of the
Repeat's stacked variables (each weight one [N, ...] StackedVariable), with
the same NumParams and N times the FLOPs. Its graph holds the body once,
whatever N: a loop over iterations reads iteration t's slice of every
weight. Random ops draw per iteration (the iteration seeds them, through the
execution context), so iteration t's dropout mask is its own and a
recomputation of the same step and micro-batch draws it again.

A pipeline cuts a Repeat between iterations when its cells need it
(`piece_sizes`, set by the PipeliningLayer): piece i is iterations
[starts[i], starts[i] + piece_sizes[i]), its weights live on its cell's
device, and `Piece(i)` is the layer a cell runs. The cut changes neither
the weights nor the checkpoint (stacked_variable.py).

Limits, refused with an error: the body's output must have its input's
structure and shapes (a loop carries it); the body cannot record training
statistics (BatchNorm: they are not available outside the loop); a Repeat
inside a Repeat.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Optional, Sequence

import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.layers import combinators
from lingvo_gpipe.core.nested_map import NestedMap


def _Check(p) -> None:
  if p.sub is None:
    raise ValueError(f'Repeat {p.name!r}: sub is None; set it to the '
                     'Params of the layer to repeat.')
  if not isinstance(p.num, int) or p.num < 1:
    raise ValueError(f'Repeat {p.name!r}: num is {p.num!r}; it must be an '
                     'int >= 1.')
  sizes = PieceSizes(p)
  if (any(not isinstance(s, int) or s < 1 for s in sizes) or
      sum(sizes) != p.num):
    raise ValueError(f'Repeat {p.name!r}: piece_sizes={p.piece_sizes} must '
                     f'be positive ints summing to num={p.num}.')


def PieceSizes(p) -> list[int]:
  """Iterations per piece: p.piece_sizes, or one piece of all num."""
  return list(p.piece_sizes) if p.piece_sizes else [p.num]


class Repeat(base_layer.BaseLayer):
  """`num` layers built from the same Params, with stacked weights and a loop."""

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('sub', None, 'Params of the layer to repeat (the body).')
    p.Define('num', 1, 'How many times; at least 1.')
    p.Define('piece_sizes', None, 'Iterations per piece when a pipeline '
             'cuts this Repeat across cells (set by the PipeliningLayer); '
             'None: one piece.')
    return p

  def __init__(self, params):
    super().__init__(params)
    p = self.params
    _Check(p)
    self.piece_sizes = PieceSizes(p)
    self.piece_starts = [sum(self.piece_sizes[:i])
                         for i in range(len(self.piece_sizes))]
    with base_layer.StackedBuild(self.piece_sizes,
                                 getattr(_local, 'scopes', None)):
      self.CreateChild('body', p.sub)

  @property
  def vars(self) -> NestedMap:
    """NestedMap(body=[piece i's variables, nested like the body's theta])."""
    stacked = self.body.vars
    return NestedMap(body=[
        stacked.Transform(lambda v, i=i: v.pieces[i])
        for i in range(len(self.piece_sizes))])

  # --- computation -------------------------------------------------------------

  def FProp(self, theta: NestedMap, inputs: Any) -> Any:
    outputs = inputs
    for i in range(len(self.piece_sizes)):
      outputs = self.RunPiece(i, theta.body[i], outputs)
    return outputs

  def Piece(self, i: int) -> 'RepeatPiece':
    """The layer a pipeline cell runs for piece i (theta: PieceTheta(theta, i))."""
    return RepeatPiece(self, i)

  def PieceTheta(self, theta: NestedMap, i: int) -> NestedMap:
    """Piece i's part of this layer's theta."""
    return theta.body[i]

  def RunPiece(self, i: int, piece_theta: NestedMap, inputs: Any) -> Any:
    """Runs iterations [starts[i], starts[i] + sizes[i]) on `inputs`."""
    start = self.piece_starts[i]
    iterations = tf.range(start, start + self.piece_sizes[i], dtype=tf.int64)
    flat_theta = piece_theta.Flatten()
    outer = base_layer.CurrentContext()

    def Step(carry, elems):
      t, flat = elems
      theta_t = piece_theta.Pack(list(flat))
      probe = base_layer.StatsCollector()
      with base_layer.Context(
          repeat_iterations=outer.repeat_iterations + (t,),
          stats_collector=probe):
        out = self.body.FProp(theta_t, carry)
      if probe.records:
        raise ValueError(
            f'{self.path}: its body records training statistics '
            f'({type(probe.records[0][0]).__name__} '
            f'{probe.records[0][0].path}), which cannot leave the Repeat '
            'loop. Use LayerNorm, or list the layers unrolled instead of in '
            'a Repeat.')
      combinators.CheckSameStructure(self.path, carry, out, 'its body',
                                     '(a loop carries it)')
      return out

    theta_tensors = [tf.convert_to_tensor(v) for v in flat_theta]
    return tf.foldl(Step, (iterations, theta_tensors), initializer=inputs)

  # --- static size and cost ------------------------------------------------------

  @classmethod
  def NumUnits(cls, p) -> int:
    """A pipeline may cut a Repeat between any two of its num iterations."""
    return p.num

  @classmethod
  def PieceParams(cls, p, start: int, stop: int):
    """Params of a Repeat equal in size and cost to iterations [start, stop)."""
    return p.Copy().Set(num=stop - start, piece_sizes=None)

  @classmethod
  def NumParams(cls, p) -> int:
    _Check(p)
    return p.num * p.sub.cls.NumParams(p.sub)

  @classmethod
  def FPropMeta(cls, p, *input_shapes):
    _Check(p)
    meta = p.sub.cls.FPropMeta(p.sub, *input_shapes)
    if len(input_shapes) != 1 or len(meta.out_shapes) != 1:
      raise ValueError(
          f'Repeat {p.name!r}: its body must map one input to one output (a '
          f'loop carries it); {p.sub.cls.__name__} maps {len(input_shapes)} '
          f'to {len(meta.out_shapes)}.')
    combinators.CheckSameStructure(
        f'Repeat {p.name!r}', base_layer.ToShape(input_shapes[0]),
        base_layer.ToShape(meta.out_shapes[0]), 'its body',
        '(a loop carries it)')
    return base_layer.Meta(p.num * meta.flops, *meta.out_shapes)


class RepeatPiece(tf.Module):
  """Piece i of a Repeat as a layer of its own: what a pipeline cell runs.

  It owns nothing (the Repeat owns the weights); its theta is piece i's,
  i.e. the Repeat theta's body[i].
  """

  def __init__(self, repeat: Repeat, i: int):
    super().__init__(name=f'{repeat.name}_piece_{i}')
    self._repeat = self._no_dependency(repeat)
    self.index = i

  @property
  def vars(self) -> NestedMap:
    return self._repeat.vars.body[self.index]

  @property
  def path(self) -> str:
    return f'{self._repeat.path}[piece {self.index}]'

  def FProp(self, theta: NestedMap, inputs: Any) -> Any:
    return self._repeat.RunPiece(self.index, theta, inputs)


# --- helpers ---------------------------------------------------------------------

_local = threading.local()


@contextlib.contextmanager
def PieceScopes(scopes: Optional[Sequence[Callable[[], Any]]]
                ) -> Iterator[None]:
  """A Repeat built inside puts piece i's weights under scopes[i]().

  The PipeliningLayer uses it to create each piece's weights on its cell's
  device while the Repeat itself is built as one layer.
  """
  previous = getattr(_local, 'scopes', None)
  _local.scopes = scopes
  try:
    yield
  finally:
    _local.scopes = previous
