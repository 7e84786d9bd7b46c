"""Orders a cell's backward so the gradient it sends upstream is computed first.

In GPipe's drain, cell k-1 waits for cell k's gradient with respect to its
input; cell k's weight gradients are needed only when the step ends. Left
alone, TensorFlow's executor runs every gradient op as soon as it is ready, so
the weight-gradient matmuls share the device with the input-gradient chain and
the previous stage waits for both. Making the weight-gradient ops wait for the
input gradient lets the previous stage start about one weight-gradient pass
earlier per micro-batch (bench/results/throughput.md). The math is unchanged:
only control edges are added. The price is memory: the cell's intermediate
gradients of the micro-batch, which the weight gradients need, all stay alive
until the input gradient is out, so PipeliningLayer leaves it off by default
(its input_grads_first).

The tape offers no way to ask for the two parts separately without computing
the backward chain twice, so this works on the graph the tape built: the ops
one `tape.gradient` call created that the input gradient does not depend on
get a control edge from it. In eager mode there is no graph and nothing to do.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import tensorflow as tf


@contextlib.contextmanager
def Capture(enabled: bool = True) -> Iterator[list[tf.Operation]]:
  """Yields a list that receives the ops created in the block.

  It stays empty when not enabled (listing a large graph's ops is not free)
  and when executing eagerly.
  """
  created = []
  if not enabled or tf.executing_eagerly():
    yield created
    return
  graph = tf.compat.v1.get_default_graph()
  before = len(graph.get_operations())
  yield created
  created.extend(graph.get_operations()[before:])


def Independent(ops: Sequence[tf.Operation], first: Any) -> list[tf.Operation]:
  """The ops in `ops` that `first` (nested tensors) does not depend on.

  Only paths inside `ops` count, so `ops` must hold every op between them
  and `first` (e.g. all one gradient call made). Stateful ops and ops
  without inputs are left out: tf.function orders the former by program
  order, and an edge against that order would be a cycle. No tensors in
  `first`: all the others.
  """
  firsts = [t.op for t in tf.nest.flatten(first, expand_composites=True)
            if isinstance(t, tf.Tensor)]
  candidates = set(ops)
  needed = set()  # ops in `ops` that `first` depends on
  stack = [op for op in firsts if op in candidates]
  while stack:
    op = stack.pop()
    if op in needed:
      continue
    needed.add(op)
    stack.extend(t.op for t in op.inputs if t.op in candidates)
    stack.extend(c for c in op.control_inputs if c in candidates)
  return [op for op in ops
          if op not in needed and op.inputs and not op.op_def.is_stateful]


def Wait(ops: Sequence[tf.Operation], first: Any) -> None:
  """Makes every op in `ops` wait for the tensors in `first`.

  The caller vouches that `first` does not depend on them (e.g. they came
  from `Independent` and nothing but the weight gradients' sum reads them).
  """
  firsts = [t.op for t in tf.nest.flatten(first, expand_composites=True)
            if isinstance(t, tf.Tensor)]
  if not firsts:
    return
  for op in ops:
    # No public API adds a control edge to an existing op.
    op._add_control_inputs(firsts)  # pylint: disable=protected-access


def RunAfter(ops: Sequence[tf.Operation], first: Any) -> int:
  """Makes each op in `ops` that `first` does not depend on wait for `first`.

  Args:
    ops: ops of one graph, e.g. those `Capture()` saw one gradient call make.
    first: tensors (a nested structure; None and non-tensors skipped) that
      must be complete before the other ops in `ops` start.

  Returns:
    How many ops now wait (see `Independent` for those that never do).
  """
  if not ops:  # e.g. eager execution
    return 0
  if not any(isinstance(t, tf.Tensor) for t in
             tf.nest.flatten(first, expand_composites=True)):
    return 0
  waiting = Independent(ops, first)
  Wait(waiting, first)
  return len(waiting)
