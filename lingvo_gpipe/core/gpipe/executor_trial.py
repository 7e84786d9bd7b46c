"""The executor trial: a training step built on both executors, timed, the faster kept.

Invariant: the trial never changes the math. Its two candidates are one
step function traced twice, its executor='auto' pipelines on the loop
executor and then as 'auto' chooses (executor_choice.py); both run the same
tasks in the same per-cell order, equal but for the rounding two different
graphs may do differently. Every call is one real step, run by one
candidate or the other, and the trial decides only which graph runs the
steps after it.

Why: 'auto' chooses by the unrolled graph's estimated size, which predicts
its build time but not its step time. On cells of a few tiny layers the
loop's step is 1.3-1.7× the unrolled executor's, on narrow Transformer
blocks 0.7×, on an AmoebaNet-D about the same (docs/loop_executor.md): the
cells' work and the machine decide, so the trial measures. The loop builds
in a time that does not grow with M, so the run starts on it; where 'auto'
would build the unrolled graph instead, that graph is built after
`warmup_steps` more loop steps, while training goes on, and the candidates
then alternate step by step, `steps` timed steps each (`CallsToDecide`).
The faster median stays; the other graph is dropped.

If the unrolled graph runs out of memory where the loop did not, the loop
is kept and the step runs again on it (the batch the failed step took is
not trained on).

A run that traces no small pipeline (every 'auto' pipeline too large for
the unrolled executor, or refused by the loop) has nothing to try: its one
candidate is the step 'auto' makes, and no second graph is built.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Optional

from absl import logging
import tensorflow as tf

from lingvo_gpipe.core.gpipe import executor_choice

LOOP, UNROLLED = 'loop', 'unrolled'


def CallsToDecide(steps: int, warmup_steps: int) -> int:
  """Calls after the first until the trial decides: `warmup_steps` on the
  loop, the unrolled graph's build and warm-up, then `steps` timed calls of
  each (ExecutorTrial._Phase)."""
  return warmup_steps + 2 + 2 * steps


@dataclasses.dataclass(frozen=True)
class Decision:
  """What the trial measured and kept."""
  executor: str  # LOOP or UNROLLED: what runs the steps after the trial
  loop_step: float  # median seconds of the loop candidate's timed steps
  unrolled_step: float  # the same for the unrolled candidate
  unrolled_build: float  # seconds of the unrolled candidate's first call
  steps: int  # timed steps per candidate
  switched: tuple[str, ...]  # why each switched pipeline was small
  # Why the unrolled candidate could not run, if it could not (then its
  # times are NaN and the loop is kept).
  failure: str = ''

  def Text(self) -> str:
    """One paragraph for logs and TensorBoard."""
    if self.failure:
      return (f'Executor trial: the unrolled graph could not run a step '
              f'({self.failure}); keeping the loop executor. Pipelines '
              f'tried: {"; ".join(self.switched)}.')
    kept = self.loop_step if self.executor == LOOP else self.unrolled_step
    other = self.unrolled_step if self.executor == LOOP else self.loop_step
    return (f'Executor trial: the loop stepped in {self.loop_step * 1e3:.1f} '
            f'ms, the unrolled executor in {self.unrolled_step * 1e3:.1f} ms '
            f'(medians of {self.steps} alternating steps each; the unrolled '
            f'graph took {self.unrolled_build:.1f} s to build and run its '
            f'first step). Keeping the {self.executor} executor, '
            f'{other / kept:.2f}x faster. Pipelines tried: '
            f'{"; ".join(self.switched)}.')


class ExecutorTrial:
  """Calls a step function traced on the loop, then on 'auto', and keeps the faster.

  Call it as the step function itself: each call runs one step on one
  candidate and returns that step's outputs.
  """

  def __init__(self, fn: Callable[..., Any], steps: int, warmup_steps: int = 1,
               decided: Optional[str] = None,
               timer: Callable[[], float] = time.perf_counter,
               on_decision: Optional[Callable[[Decision], None]] = None,
               on_trace: Optional[Callable[[str], None]] = None,
               **function_kwargs: Any):
    """Traces nothing yet.

    Args:
      fn: the step, a Python function of the step's arguments.
      steps: timed steps per candidate; at least 1.
      warmup_steps: untimed loop steps after the first call, before the
        unrolled graph is built.
      decided: LOOP or UNROLLED, what an earlier trial of the same run kept:
        no trial, every call runs that candidate (a resumed run steps on
        the graph the uninterrupted one would).
      timer: seconds, for the timed steps (a test's fake clock).
      on_decision: called once with the Decision.
      on_trace: called with a candidate's name (LOOP, UNROLLED) after the
        call that traced it, e.g. to note what its pipelines chose.
      **function_kwargs: for tf.function (e.g. autograph=False).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
      raise ValueError(f'ExecutorTrial steps={steps!r}: give a whole number '
                       'of timed steps per executor, at least 1.')
    if decided not in (None, LOOP, UNROLLED):
      raise ValueError(f'ExecutorTrial decided={decided!r}: give {LOOP!r}, '
                       f'{UNROLLED!r} or None.')
    self._decided = decided
    self._candidates = {name: tf.function(fn, **function_kwargs)
                        for name in ((decided,) if decided else
                                     (LOOP, UNROLLED))}
    self._steps = steps
    self._warmup = warmup_steps
    self._timer = timer
    self._on_decision = on_decision
    self._on_trace = on_trace
    self._calls = 0
    self._switched: Optional[list[executor_choice.Choice]] = None
    self._times: dict[str, list[float]] = {LOOP: [], UNROLLED: []}
    self._build = 0.0
    self.decision: Optional[Decision] = None
    # Whether the last call traced its candidate (its time is mostly that).
    self.last_call_traced = False

  @property
  def trying(self) -> bool:
    """Whether the trial is under way: a small pipeline switched, no decision."""
    return bool(self._switched) and self.decision is None and not self._decided

  @property
  def function(self) -> Any:
    """The tf.function the next call runs."""
    return self._candidates[self._Phase()[0]]

  def _Phase(self) -> tuple[str, str]:
    """(the next call's candidate, what the call is: 'trace', 'warmup',
    'build', 'timed' or 'kept')."""
    if self._decided:
      return self._decided, 'trace' if self._calls == 0 else 'kept'
    if self._calls == 0:
      return LOOP, 'trace'
    if self.decision is not None:
      return self.decision.executor, 'kept'
    if not self._switched:
      return LOOP, 'kept'  # nothing to try: the loop candidate is 'auto's step
    trial = self._calls - 1 - self._warmup
    if trial < 0:
      return LOOP, 'warmup'
    if trial <= 1:  # its first call builds it, its second warms it up
      return UNROLLED, ('build', 'warmup')[trial]
    return (LOOP, UNROLLED)[trial % 2], 'timed'

  def Trace(self, *args: Any, **kwargs: Any) -> Any:
    """Traces the candidate the first call runs, without running it.

    Returns its ConcreteFunction (e.g. to time the trace apart from the
    first step); the first call then runs that trace.
    """
    if self._calls:
      raise ValueError('ExecutorTrial.Trace: the first call has traced it.')
    name = self._Phase()[0]
    if name != LOOP:
      return self._candidates[name].get_concrete_function(*args, **kwargs)
    with executor_choice.LoopFirst() as switched:
      traced = self._candidates[LOOP].get_concrete_function(*args, **kwargs)
    self._Switched(switched)
    return traced

  def _Switched(self, switched: list[executor_choice.Choice]) -> None:
    """Notes what the loop candidate's trace switched, once."""
    if self._switched is None and not self._decided:
      self._switched = switched
      if not switched:  # one graph, never a second
        self._candidates = {LOOP: self._candidates[LOOP]}

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    name, phase = self._Phase()
    self.last_call_traced = phase in ('trace', 'build')
    start = self._timer()
    if name == LOOP:
      with executor_choice.LoopFirst() as switched:
        outputs = self._candidates[LOOP](*args, **kwargs)
      self._Switched(switched)
    else:
      try:
        outputs = self._candidates[UNROLLED](*args, **kwargs)
      except tf.errors.ResourceExhaustedError as e:
        # The loop runs it: keep the loop and run this step there (the
        # batch the failed step took is not trained on).
        self._Decide(failure=f'out of memory: {e.message.splitlines()[0]}')
        return self(*args, **kwargs)
    seconds = self._timer() - start
    self._calls += 1
    if self.last_call_traced and self._on_trace is not None:
      self._on_trace(name)
    if phase == 'build':
      self._build = seconds
    elif phase == 'timed':
      self._times[name].append(seconds)
      if min(len(t) for t in self._times.values()) == self._steps:
        self._Decide()
    return outputs

  def _Decide(self, failure: str = '') -> None:
    if failure:
      loop = unrolled = float('nan')
      kept = LOOP
    else:
      loop = statistics.median(self._times[LOOP])
      unrolled = statistics.median(self._times[UNROLLED])
      kept = UNROLLED if unrolled < loop else LOOP
    self.decision = Decision(
        kept, loop, unrolled, self._build, self._steps,
        tuple(choice.reason for choice in self._switched), failure)
    # The other graph is never called again; dropping it frees it.
    self._candidates = {kept: self._candidates[kept]}
    logging.info('%s', self.decision.Text())
    if self._on_decision is not None:
      self._on_decision(self.decision)
