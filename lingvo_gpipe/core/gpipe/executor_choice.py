"""executor='auto': the unrolled executor while its graph stays small, the loop beyond.

Invariant: the choice never changes the numbers (both executors run the same
tasks in the same per-cell order), and 'auto' picks the loop only for a
pipeline the loop runs: what it refuses (loop_executor.Refusal and
TracedRefusal) runs unrolled, with the reason logged.

Why choose at all: the unrolled graph holds a copy of every cell per
micro-batch, so its build grows with M × layers (about a millisecond of
trace and first step per graph op here, bench/results/graph_build.md), while
the loop's graph holds each cell once. Yet on cells of a few tiny layers the
loop's step is slower (16 × Dense(64), K=4: 1.7× the unrolled step,
bench/results/executor_step_d64.md), and there the unrolled build is short:
16 × Dense(64) at M=64 builds unrolled in 13-19 s, 12-15 s more than the
loop, which the 10-15 ms it saves a step repay in under 1,500 steps
(graph_build_loop.md, graph_build_auto_dense_d64.md).
Where cells do real work the loop's step is as fast or faster (narrow
Transformer blocks 0.68-0.78×, 16 × Dense(512) 1.1×) and the unrolled graph
is the large one. So 'auto' estimates the unrolled graph's size before
building anything: each cell's forward is traced alone once on a micro-batch
of known size (CellRunner.Specs), and the unrolled graph holds about
UNROLLED_OPS_PER_FORWARD_OP times those ops per micro-batch (the forward,
its recomputation, the gradients). Above `max_unrolled_ops` it runs the
loop, which calls those same traces where its micro-batches are all one
size (else it traces each cell once more with the batch size unknown, here,
for its refusals).

The bound is on build time alone. The loop's slower step on tiny cells is a
fixed cost per cell and clock (about 110 nodes of its loops' bookkeeping a
micro-batch, bench/results/loop_census_d64.md) and a second core kept less
busy than by the unrolled graph, which cells with more work pay off; but a
cell's op count does not predict the ratio well enough to choose by (an
AmoebaNet-D of hundreds of ops a cell stepped 1.04× on the loop;
docs/loop_executor.md). So 64 × Dense(64), K=8, M=32 (about 29,000
estimated ops) gets the loop, 6.5 s to build against 31 s, at 1.5× the
unrolled step (bench/results/graph_build_auto_dense_64x64_k8.md); a long run
of such a model wants executor='unrolled' or a higher bound.

Step time is measured instead where it can be: the trainer's executor trial
(executor_trial.py) traces its step inside `LoopFirst`, where 'auto' runs
the loop also for a small pipeline, and then again as above, and keeps the
faster of the two graphs.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, NamedTuple, Sequence

from absl import logging
import tensorflow as tf

from lingvo_gpipe.core.gpipe import loop_executor
from lingvo_gpipe.core.gpipe import placement as placement_lib
from lingvo_gpipe.core.gpipe import recompute as recompute_lib
from lingvo_gpipe.core.gpipe import schedule as schedule_lib

# Ops of the unrolled graph per op of the cells' forwards traced alone, per
# micro-batch. Measured (whole training step's graph ÷ forward ops × M):
# 2.2-2.4 on Dense stacks (16 × Dense(64), K=4, M=16 and 64; 64 × Dense(64),
# K=8, M=32; 16 × Dense(512)), 1.8 with recompute 'never', 3.1 on 16 narrow
# Transformer blocks (K=4, M=8), 4.7 with them stacked in a Repeat, whose
# bodies are functions, 1.3 on AmoebaNet-D (18 cells, K=4, M=8,
# bench/results/graph_build_amoebanet.md). 2.5 keeps every one within a
# factor of two; tests/core/gpipe/executor_choice_test.py checks two stacks.
UNROLLED_OPS_PER_FORWARD_OP = 2.5

# The default bound: 15-22 s of trace and first step for the unrolled graph
# here, at 0.7-1.1 ms an op (bench/results/graph_build.md,
# graph_build_loop.md).
DEFAULT_MAX_UNROLLED_OPS = 20000


class Choice(NamedTuple):
  """What 'auto' ran and why."""
  executor: str  # 'unrolled' or 'loop'
  reason: str  # one sentence, logged
  estimated_ops: int  # the unrolled graph's estimated ops; 0 if not traced


class _LoopFirst(threading.local):
  """Per thread: the choices made inside `LoopFirst`, None outside it."""
  switched: list | None = None


_LOOP_FIRST = _LoopFirst()


@contextlib.contextmanager
def LoopFirst() -> Iterator[list[Choice]]:
  """Inside: 'auto' runs the loop also where the unrolled graph is small.

  Where 'auto' would run a pipeline unrolled only because its graph is
  small, and the loop runs it, it runs the loop; what either refuses runs
  as before. Yields the choices so switched, one per pipeline traced
  inside: empty if there was nothing to switch (the step traced inside is
  then the one 'auto' makes anyway).
  """
  outer = _LOOP_FIRST.switched
  _LOOP_FIRST.switched = switched = []
  try:
    yield switched
  finally:
    _LOOP_FIRST.switched = outer


def EstimatedUnrolledOps(forward_ops: Sequence[int],
                         num_micro_batches: int) -> int:
  """Ops of the unrolled graph, from each cell's forward ops traced alone."""
  return int(UNROLLED_OPS_PER_FORWARD_OP * sum(forward_ops) *
             num_micro_batches)


def Choose(schedule: schedule_lib.Schedule,
           runners: Sequence[recompute_lib.CellRunner],
           placement: placement_lib.Placement, inputs: Any,
           sizes: Sequence[int], recompute: str, batch_dim: int,
           max_unrolled_ops: int, skip_bubbles: bool = True) -> Choice:
  """The executor 'auto' runs for this pipeline, and why.

  Args:
    schedule: the task order.
    runners: per cell, its CellRunner.
    placement: where each cell runs.
    inputs: the first cell's inputs (tensors), batched along batch_dim.
    sizes: the micro-batch sizes.
    recompute: the re-materialization mode.
    batch_dim: the batch dimension of every input and output leaf.
    max_unrolled_ops: the unrolled graph's size above which the loop runs.
    skip_bubbles: the loop's setting, which decides how it traces the cells.
  """
  refusal = loop_executor.Refusal(schedule, recompute, batch_dim, placement)
  if refusal:
    return Choice('unrolled', refusal, 0)
  # Sized as the unrolled executor traces a micro-batch: with the batch
  # dimension unknown a Dense traces as a dozen shape ops around its matmul.
  spec = tf.nest.map_structure(
      lambda t: tf.TensorSpec([sizes[0]] + t.shape[1:].as_list(), t.dtype),
      inputs)
  forward_ops = []
  for runner in runners:
    trace = runner.Specs(spec)
    spec = trace.outputs
    forward_ops.append(trace.num_ops)
  estimate = EstimatedUnrolledOps(forward_ops, schedule.num_micro_batches)
  size = (f'the unrolled graph would hold about {estimate} ops (M='
          f'{schedule.num_micro_batches}, {sum(forward_ops)} forward ops over '
          f'{len(runners)} cells)')
  small = estimate <= max_unrolled_ops
  bound = (f'{"at most" if small else "more than"} max_unrolled_ops='
           f'{max_unrolled_ops}')
  if small and _LOOP_FIRST.switched is None:
    return Choice('unrolled', f'{size}, {bound}', estimate)
  # What the loop traces (CellRunner.Specs keeps it for the loop).
  specs, traces = loop_executor.TraceCells(
      runners, inputs, loop_executor.Rows(sizes, skip_bubbles))
  refusal = loop_executor.TracedRefusal(
      specs[1:], [trace.recorded for trace in traces])
  if refusal:
    return Choice('unrolled', f'{size}, but {refusal}', estimate)
  if not small:
    return Choice('loop', f'{size}, {bound}', estimate)
  choice = Choice('loop', f'{size}, {bound}; the executor trial runs the '
                  'loop', estimate)
  _LOOP_FIRST.switched.append(choice)
  return choice


def Log(choice: Choice) -> None:
  logging.info("executor='auto' runs %r: %s.", choice.executor,
               choice.reason.rstrip('.'))
