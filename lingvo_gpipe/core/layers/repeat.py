"""Repeat: N identical layers as one body with stacked weights, run by a loop.

Invariant: Repeat(sub, num=N) computes what a Sequential of N layers built
from `sub` would compute, where layer t's weights are iteration t of the
Repeat's stacked variables (each weight one [N, ...] StackedVariable), with
the same NumParams and N times the FLOPs. Its graph holds the body once,
whatever N: a loop over iterations reads iteration t's slice of every
weight. Random ops draw per iteration (the iteration seeds them, through the
execution context), so iteration t's dropout mask is its own and a
recomputation of the same step and micro-batch draws it again.

Its backward is its own (`tf.custom_gradient`), re-materialization at the
grain of one iteration: the forward keeps each iteration's input, and the
backward runs the iterations in reverse, recomputing one from its input and
taking its gradients. So the backward holds N boundary activations and one
iteration's intermediates, where TensorFlow's while-loop gradient kept every
iteration's intermediates (8 Transformer blocks, d_model 128, 16 × 64
tokens, one tape: a step's peak 24 MiB, against 87 MiB before and 73 MiB
with the blocks listed), for one more forward of the body. One iteration's
forward and its gradient are two `tf.function`s traced once and called by
every piece, cell and micro-batch, so a pipeline of K cells traces the body
once, not K times (1663 blocks on K=128: bench/results/transformer_l_1663.md).
So are a piece's two loops, with its first iteration and its size as
arguments (`_PieceLoops`): a cell holding a piece traces one call for each.

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
from lingvo_gpipe.core.gpipe import accumulate
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


_IsDifferentiable = accumulate.IsDifferentiable


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
    p.Define('inline_body', True, "True: TensorFlow inlines the body's "
             'ops wherever an iteration runs, the fastest steps. False: '
             'each device runs the body as one function instance, so the '
             'graph TensorFlow optimizes, partitions and holds is smaller '
             '(1663 blocks on K=128, bench/results/'
             'transformer_l_1663.md: a 6.4 GiB peak RSS against 7.8), for '
             'steps 4-19% slower here.')
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
    # training flag -> one iteration's traced functions (_Iterations).
    self._iteration_fns = self._no_dependency({})
    # training flag and carry structure -> a piece's two loops (_PieceLoops).
    self._loop_fns = self._no_dependency({})
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

  @tf.autograph.experimental.do_not_convert
  def RunPiece(self, i: int, piece_theta: NestedMap, inputs: Any) -> Any:
    """Runs iterations [starts[i], starts[i] + sizes[i]) on `inputs`.

    Differentiable with its own gradient: a reverse loop that recomputes
    each iteration from the input it kept and takes that iteration's
    gradients (`_Iterations`). Both loops are functions every piece calls
    (`_PieceLoops`).
    """
    outer = base_layer.CurrentContext()
    skeleton = piece_theta.Transform(lambda _: None)
    forward_loop, backward_loop = self._PieceLoops(outer.training, skeleton,
                                                   inputs)
    # What every loop call takes besides theta and the carry.
    where = (tf.cast(outer.step, tf.int64), tf.cast(outer.micro_batch,
                                                    tf.int64),
             tf.constant(self.piece_starts[i], tf.int64),
             tf.constant(self.piece_sizes[i]))
    flat_theta = [tf.convert_to_tensor(v) for v in piece_theta.Flatten()]
    flat_inputs = tf.nest.flatten(inputs)
    num_theta = len(flat_theta)

    @tf.custom_gradient
    def Loop(*args):
      theta, carry = list(args[:num_theta]), list(args[num_theta:])
      flat_outputs, kept = forward_loop(theta, carry, *where)

      def Grad(*flat_dy):
        dy = [tf.zeros_like(y) if d is None else d
              for d, y in zip(flat_dy, flat_outputs)]
        g_theta, dx = backward_loop(theta, kept, dy, *where)
        return list(g_theta) + [g if _IsDifferentiable(x) else None
                                for g, x in zip(dx, flat_inputs)]

      return list(flat_outputs), Grad

    return tf.nest.pack_sequence_as(inputs, Loop(*flat_theta, *flat_inputs))

  def _PieceLoops(self, training: bool, skeleton: NestedMap, inputs: Any
                  ) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(a piece's forward loop, its backward loop), traced once for all pieces.

    Both are `tf.function`s of the piece's flat theta ([size, ...] each),
    the flat carry (for the backward: each iteration's kept input, stacked,
    and the outputs' gradients), the step, the micro-batch, the piece's
    first iteration and its size. A pipeline cuts a Repeat into K pieces of
    13 or 14 iterations (1663 blocks on K=128); built in each cell's trace,
    the two loops were most of a narrow cell's ops, and the loop executor
    traces a cell and differentiates it once per cell. As calls, a cell
    holds one op for each (bench/results/graph_build_one_trace.md).
    """
    key = f'{bool(training)} {tf.nest.map_structure(lambda _: 0, inputs)!r}'
    if key in self._loop_fns:
      return self._loop_fns[key]
    forward, backward = self._Iterations(training, skeleton)

    def Pack(flat: Sequence[Any]) -> Any:
      return tf.nest.pack_sequence_as(inputs, list(flat))

    def ForwardLoop(theta, carry, step, micro_batch, start, size):
      kept = [tf.TensorArray(x.dtype, size=size, element_shape=x.shape)
              for x in carry]

      def Forward(j, carry, kept):
        kept = [a.write(j, x) for a, x in zip(kept, tf.nest.flatten(carry))]
        carry = forward([tf.gather(w, j) for w in theta], carry, step,
                        micro_batch, start + tf.cast(j, tf.int64))
        return j + 1, carry, kept

      _, outputs, kept = tf.while_loop(
          lambda j, *_: j < size, Forward, (tf.constant(0), Pack(carry), kept),
          parallel_iterations=1)
      return tf.nest.flatten(outputs), [a.stack() for a in kept]

    def BackwardLoop(theta, kept, dy, step, micro_batch, start, size):
      # Iteration j's weight gradients, stacked as the weights are.
      grads = [tf.TensorArray(w.dtype, size=size, element_shape=w.shape[1:])
               for w in theta]

      def Backward(done, dy, grads):
        j = size - 1 - done
        g_theta, dx = backward([tf.gather(w, j) for w in theta],
                               Pack([tf.gather(x, j) for x in kept]), dy,
                               step, micro_batch, start + tf.cast(j, tf.int64))
        return done + 1, dx, [a.write(j, g) for a, g in zip(grads, g_theta)]

      _, dx, grads = tf.while_loop(
          lambda done, *_: done < size, Backward,
          (tf.constant(0), Pack(dy), grads), parallel_iterations=1)
      return [a.stack() for a in grads], tf.nest.flatten(dx)

    name = self.path.replace('/', '_')
    ForwardLoop.__name__ = f'{name}_forward_loop'
    BackwardLoop.__name__ = f'{name}_backward_loop'
    fns = tuple(tf.function(fn, autograph=False, reduce_retracing=True)
                for fn in (ForwardLoop, BackwardLoop))
    self._loop_fns[key] = fns
    return fns

  def _Iterations(self, training: bool, skeleton: NestedMap
                  ) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(one iteration's forward, its recomputation and gradients), traced once.

    Both are `tf.function`s of iteration t's flat theta, the carry (and for
    the backward, the carry's gradient), the step, the micro-batch and t,
    which the execution context seeds random ops from. Every piece, in
    every cell and micro-batch, calls the same two, so the body is traced
    and differentiated once per input signature; a loop body per piece,
    differentiated by TensorFlow's while-loop gradient, traced and
    differentiated it once per piece, with an accumulator per intermediate
    tensor (at K=128 the trace of the whole step took minutes), and held
    every iteration's intermediates until the backward. Here the backward
    keeps only each iteration's input and recomputes one iteration at a
    time, as GPipe re-materializes a cell.
    """
    key = bool(training)
    if key in self._iteration_fns:
      return self._iteration_fns[key]

    def Body(flat_theta, carry, step, micro_batch, t):
      # t is the only Repeat iteration: StackedBuild refuses a Repeat inside
      # a Repeat.
      probe = base_layer.StatsCollector()
      with base_layer.Context(training=key, step=step,
                              micro_batch=micro_batch,
                              repeat_iterations=(t,), stats_collector=probe):
        out = self.body.FProp(skeleton.Pack(list(flat_theta)), carry)
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

    def BodyGrad(flat_theta, carry, dy, step, micro_batch, t):
      flat_theta, leaves = list(flat_theta), tf.nest.flatten(carry)
      with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(flat_theta + [x for x in leaves if _IsDifferentiable(x)])
        out = Body(flat_theta, carry, step, micro_batch, t)
      pairs = [(y, d) for y, d in zip(tf.nest.flatten(out),
                                      tf.nest.flatten(dy))
               if _IsDifferentiable(y)]
      grads = tape.gradient([y for y, _ in pairs], flat_theta + leaves,
                            output_gradients=[d for _, d in pairs],
                            unconnected_gradients=tf.UnconnectedGradients.ZERO)
      grads = [tf.zeros_like(x) if g is None else tf.convert_to_tensor(g)
               for g, x in zip(grads, flat_theta + leaves)]
      return (grads[:len(flat_theta)],
              tf.nest.pack_sequence_as(carry, grads[len(flat_theta):]))

    name = self.path.replace('/', '_')
    Body.__name__, BodyGrad.__name__ = f'{name}_body', f'{name}_body_grad'
    attrs = None if self.params.inline_body else {'_noinline': True}
    fns = tuple(tf.function(fn, autograph=False, reduce_retracing=True,
                            experimental_attributes=attrs)
                for fn in (Body, BodyGrad))
    self._iteration_fns[key] = fns
    return fns

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
