"""Re-materialization: a cell's backward recomputes its forward from the kept input.

Invariant: a cell's gradients for a micro-batch are those of its forward on
that micro-batch, whether the forward's activations were kept (a tape held
from the forward) or recomputed from the cell's input, and the recomputation
runs in the forward's mode: the same training flag, step and micro-batch
index, so stateless dropout draws the same mask; it records no statistics
(BatchNorm's moments are counted once, by the forward).

Given the cell's trace (`Specs`, a function of theta, the micro-batch index
and x), the recomputation calls it instead of running the cell's Python
again: TensorFlow's split of that function into a forward that also returns
what its gradient reads, then the gradient (kept_forward.py). The numbers
are the same ops'; the loop executor does this so each cell is traced once.

TensorFlow's own `tf.recompute_grad` does not serve a pipeline: under one
tape around all micro-batches it keeps every micro-batch's partial weight
gradients alive at once (TensorFlow adds them with one AddN), so the
pipeline takes each micro-batch's gradients itself (accumulate.py).

With `jit_compile`, XLA compiles a cell's forward and, when it recomputes,
its backward (the recomputation and the gradients, one computation) as two
`tf.function(jit_compile=True)`s per cell, traced once per micro-batch shape
(not once per micro-batch: the index is a tensor argument) and called where
the executor places the cell, so each runs on its cell's device. A kept
forward (recompute 'never', 'except_last') is differentiated by TensorFlow's
gradient of the compiled call, which XLA compiles too. Statistics the cell
records come out of the compiled forward as outputs and are recorded by the
caller. Dropout still repeats under recomputation (both passes draw XLA's
bits), but XLA turns random bits into floats differently from TensorFlow's
kernels, so its masks are not those of the uncompiled cell.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable, NamedTuple, Optional

import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe import accumulate
from lingvo_gpipe.core.gpipe import grad_order
from lingvo_gpipe.core.gpipe import kept_forward
from lingvo_gpipe.core.nested_map import NestedMap

RECOMPUTE_MODES = ('always', 'except_last', 'never')


def CheckMode(mode: str) -> None:
  if mode not in RECOMPUTE_MODES:
    raise ValueError(f'Unknown recompute mode {mode!r}; valid: '
                     f'{", ".join(RECOMPUTE_MODES)}.')


def Recomputes(mode: str, micro_batch: int, num_micro_batches: int) -> bool:
  """Whether `micro_batch`'s backward recomputes the forward (else keeps its tape)."""
  if mode == 'always':
    return True
  if mode == 'except_last':
    # The last micro-batch's backward follows its forward: keep its tape.
    return micro_batch != num_micro_batches - 1
  return False


def _Watched(tape: tf.GradientTape, theta: NestedMap, x: Any) -> None:
  tape.watch([t for t in tf.nest.flatten((theta, x))
              if accumulate.IsDifferentiable(t)])


def _Compiled(fn: Callable[..., Any], name: str) -> Any:
  """`fn` as a tf.function XLA must compile, named `name` (XLA's errors say it)."""
  def Traced(*args):
    return fn(*args)
  Traced.__name__ = re.sub(r'\W', '_', name)
  return tf.function(Traced, jit_compile=True, autograph=False)


def _CellName(cell: Any) -> str:
  """A layer's path, a pipeline Cell's name ('cell_0'), else its class."""
  return (getattr(cell, 'path', None) or getattr(cell, 'name', None) or
          type(cell).__name__)


def Index(micro_batch: Any) -> tf.Tensor:
  """The micro-batch index as an int64 tensor: one trace serves every index."""
  return tf.cast(micro_batch, tf.int64)


class CellTrace(NamedTuple):
  """A cell's forward traced alone, on inputs of one spec (CellRunner.Specs)."""
  inputs: Any  # the x spec traced on
  outputs: Any  # the outputs' structure of TensorSpecs
  recorded: list  # [(layer, its statistics' TensorSpecs)], in recording order
  num_ops: int  # ops of the traced forward: what one micro-batch adds
  # The trace itself: (theta, the micro-batch index as int64, x) ->
  # (outputs, [statistics in recording order]). A loop calls it rather than
  # tracing the cell again (CellRunner.Forward, Backward).
  forward: tf.types.experimental.ConcreteFunction


class CellRunner:
  """Runs one cell's forward and backward passes, one micro-batch at a time."""

  def __init__(self, cell: Any, theta: NestedMap,
               forward_context: base_layer.ExecutionContext,
               collector: base_layer.StatsCollector,
               jit_compile: bool = False):
    self.cell = cell
    self.theta = theta
    self.num_theta = len(tf.nest.flatten(theta))
    # The recomputation must run in the forward's mode (training, step)
    # wherever the caller takes the gradient, e.g. outside its Context.
    self._context = forward_context
    self._collector = collector
    self.jit_compile = jit_compile
    # The layers whose statistics the compiled forward returns, in order.
    # (One list, shared with rebound copies, whose compiled forward is this
    # runner's: the layers it last recorded.)
    self._stats_layers: list[list[Any]] = []
    self._traces: dict[Any, CellTrace] = {}  # Specs, by input spec
    # Traces split into forward and backward (kept_forward), by trace.
    self._splits: dict[int, kept_forward.KeptForward] = {}
    if jit_compile:
      name = _CellName(cell)
      self.compiled_forward = _Compiled(self._CompiledForward,
                                        f'{name}_xla_forward')
      self.compiled_backward = _Compiled(self._CompiledBackward,
                                         f'{name}_xla_backward')

  def Rebound(self, theta: NestedMap) -> 'CellRunner':
    """This runner computing from `theta` (e.g. the weights read where it runs).

    The copy shares the cell, the context, the collector and the compiled
    functions (which take theta as an argument).
    """
    if len(tf.nest.flatten(theta)) != self.num_theta:
      raise ValueError(f'{_CellName(self.cell)}: rebound to '
                       f'{len(tf.nest.flatten(theta))} weights, it has '
                       f'{self.num_theta}.')
    rebound = copy.copy(self)
    rebound.theta = theta
    return rebound

  def _FProp(self, theta: NestedMap, micro_batch: Any, x: Any, record: bool,
             collector: Optional[base_layer.StatsCollector] = None) -> Any:
    stats = (collector or self._collector) if record else (
        base_layer.StatsCollector())
    with base_layer.Context(training=self._context.training,
                            step=self._context.step, micro_batch=micro_batch,
                            stats_collector=stats):
      return self.cell.FProp(theta, x)

  def _ForwardAndStats(self, theta: NestedMap, micro_batch: tf.Tensor,
                       x: Any, recorded_layers: list) -> tuple[Any, list]:
    """(outputs, the statistics recorded, in order): the function Specs
    traces and XLA compiles. Sets `recorded_layers` to the layers that
    recorded them, in the same order (known once traced)."""
    scratch = base_layer.StatsCollector()
    y = self._FProp(theta, micro_batch, x, record=True, collector=scratch)
    recorded_layers[:] = [layer for layer, _ in scratch.records]
    return y, [stats for _, stats in scratch.records]

  def _CompiledForward(self, theta: NestedMap, micro_batch: tf.Tensor,
                       x: Any) -> tuple[Any, list]:
    """_ForwardAndStats as XLA compiles it: one list of recording layers
    serves all its traces, so every trace must record the same."""
    layers = []
    y, stats = self._ForwardAndStats(theta, micro_batch, x, layers)
    if self._stats_layers and [id(l) for l in layers] != [
        id(l) for l in self._stats_layers[0]]:
      raise ValueError(f'{_CellName(self.cell)}: with '
                       'jit_compile=True a cell must record the same '
                       'statistics for every micro-batch shape.')
    self._stats_layers[:] = [layers]
    return y, stats

  def _RunForward(self, micro_batch: Any, x: Any,
                  collector: Optional[base_layer.StatsCollector],
                  trace: Optional[CellTrace] = None) -> Any:
    """The cell's outputs; its statistics go to `collector` or the pipeline's."""
    if self.jit_compile:
      y, stats = self.compiled_forward(self.theta, Index(micro_batch), x)
      layers = self._stats_layers[0]
    elif trace is not None:
      y, stats = trace.forward(self.theta, Index(micro_batch), x)
      layers = [layer for layer, _ in trace.recorded]
    else:
      return self._FProp(self.theta, micro_batch, x, record=True,
                         collector=collector)
    for layer, record in zip(layers, stats):
      (collector or self._collector).Add(layer, record)
    return y

  def Forward(self, micro_batch: Any, x: Any, keep: bool,
              collector: Optional[base_layer.StatsCollector] = None,
              trace: Optional[CellTrace] = None
              ) -> tuple[Any, Optional[tf.GradientTape]]:
    """(outputs, the tape that kept the activations if `keep`, else None).

    Statistics the cell records go to `collector` if given, else to the
    pipeline's. `trace` (Specs for x's spec): call it rather than trace the
    cell again, where nothing is kept.
    """
    if not keep:
      return self._RunForward(micro_batch, x, collector, trace), None
    tape = tf.GradientTape(persistent=False, watch_accessed_variables=False)
    with tape:
      _Watched(tape, self.theta, x)
      y = self._RunForward(micro_batch, x, None)
    return y, tape

  def KeptForward(self, x_spec: Any) -> kept_forward.KeptForward:
    """This cell's forward split from its backward, for activations kept
    where no tape can hold them (kept_forward.py).

    Its arguments are (theta, the micro-batch index as int64, x like
    `x_spec`); it returns (outputs, [statistics in the order the cell
    records them]); with jit_compile both halves are XLA-compiled.
    """
    if not self.jit_compile:
      return self._Split(self.Specs(x_spec))
    return kept_forward.KeptForward(
        self.compiled_forward,
        [self._ThetaSpec(), tf.TensorSpec([], tf.int64), x_spec])

  def _ThetaSpec(self) -> Any:
    return tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape, t.dtype), self.theta)

  def _Split(self, trace: CellTrace) -> kept_forward.KeptForward:
    """`trace` split into a forward returning residuals and a backward."""
    if id(trace.forward) not in self._splits:
      self._splits[id(trace.forward)] = kept_forward.KeptForward(
          trace.forward)
    return self._splits[id(trace.forward)]

  def Specs(self, x_spec: Any) -> CellTrace:
    """What the cell returns and records for inputs like `x_spec`, and its size.

    Traced once per `x_spec` (its structure and specs) as a function of
    (theta, micro-batch index, x), which nothing runs until a loop calls it:
    the executor chooser, the loop's arrays, its forward clocks and its
    backward's recomputation share the one trace (the cell's Python runs
    once; a loop that traced the cell in each of them spent a third of its
    trace time on the extra two, bench/results/graph_build_one_trace.md).
    """
    key = (repr(tf.nest.map_structure(lambda _: 0, x_spec)),
           tuple(tf.nest.flatten(x_spec)))
    if key not in self._traces:
      recorded_layers = []
      traced = tf.function(
          lambda theta, micro_batch, x: self._ForwardAndStats(
              theta, micro_batch, x, recorded_layers),
          autograph=False).get_concrete_function(
              self._ThetaSpec(), tf.TensorSpec([], tf.int64), x_spec)
      outputs, stats = tf.nest.map_structure(
          lambda t: tf.TensorSpec(t.shape, t.dtype), traced.structured_outputs)
      self._traces[key] = CellTrace(
          x_spec, outputs, list(zip(recorded_layers, stats)),
          len(traced.graph.get_operations()), traced)
    return self._traces[key]

  def _Gradients(self, tape: tf.GradientTape, theta: NestedMap, x: Any,
                 y: Any, dy: Any) -> list:
    """Flat gradients of theta then x, from the outputs' gradients `dy`."""
    pairs = [(a, b) for a, b in zip(tf.nest.flatten(y), tf.nest.flatten(dy))
             if accumulate.IsDifferentiable(a)]
    return tape.gradient(
        [a for a, _ in pairs], tf.nest.flatten((theta, x)),
        output_gradients=[b for _, b in pairs],
        unconnected_gradients=tf.UnconnectedGradients.NONE)

  def _Recomputed(self, theta: NestedMap, micro_batch: Any, x: Any
                  ) -> tuple[tf.GradientTape, Any]:
    """(a tape of the forward recomputed in the forward's mode, its outputs)."""
    tape = tf.GradientTape(watch_accessed_variables=False)
    with tape:
      _Watched(tape, theta, x)
      y = self._FProp(theta, micro_batch, x, record=False)
    return tape, y

  def _TracedGradients(self, trace: CellTrace, micro_batch: Any, x: Any,
                       dy: Any) -> list:
    """Flat gradients of theta then x: `trace` recomputed, then differentiated."""
    split = self._Split(trace)
    args = [self.theta, Index(micro_batch), x]
    _, residuals = split.Forward(*args)
    grads = split.Backward(args, residuals, (dy, tf.nest.map_structure(
        lambda _: None, split.structured_outputs[1])))  # statistics: none
    return grads[:self.num_theta] + grads[self.num_theta + 1:]

  def _CompiledBackward(self, theta: NestedMap, micro_batch: tf.Tensor,
                        x: Any, dy: Any) -> list:
    """The recomputation and the gradients: the body XLA compiles."""
    tape, y = self._Recomputed(theta, micro_batch, x)
    return self._Gradients(tape, theta, x, y, dy)

  def Backward(self, micro_batch: Any, x: Any, dy: Any,
               kept: Optional[tuple[tf.GradientTape, Any]],
               input_grad_first: bool,
               trace: Optional[CellTrace] = None) -> tuple[list, Any]:
    """(theta's gradients, flat; x's gradient) for one micro-batch.

    Args:
      micro_batch: which one (seeds the recomputation as it seeded the forward).
      x: the cell's input (the boundary activation the forward kept).
      dy: the gradient of the loss with respect to the cell's outputs.
      kept: (tape, outputs) the forward kept, or None to recompute.
      input_grad_first: make the weight-gradient ops wait for x's gradient
        (grad_order), so the previous cell gets it sooner (not with
        jit_compile, whose backward is one XLA op; RunPipeline refuses it).
      trace: where recomputing, Specs for x's spec: its forward and
        gradient are called rather than the cell traced again (not with
        input_grad_first, which orders ops a call hides).
    """
    created = []
    if kept is None and self.jit_compile:
      grads = self.compiled_backward(self.theta, Index(micro_batch), x, dy)
    elif kept is None and trace is not None and not input_grad_first:
      grads = self._TracedGradients(trace, micro_batch, x, dy)
    else:
      tape, y = kept if kept is not None else self._Recomputed(
          self.theta, micro_batch, x)
      with grad_order.Capture(input_grad_first) as created:
        grads = self._Gradients(tape, self.theta, x, y, dy)
    g_x = tf.nest.pack_sequence_as(x, list(grads[self.num_theta:]))
    grad_order.RunAfter(created, g_x)  # nothing if not captured
    return list(grads[:self.num_theta]), g_x
