"""Pipeline schedules (what each cell runs at each clock) and their simulator.

Invariant: a schedule is a per-cell ordered list of tasks, each a forward
('F') or backward ('B') pass of one micro-batch; the simulator runs any such
schedule against per-cell times and activation sizes, honouring the data
dependencies F(k-1, m) -> F(k, m) and B(k+1, m) -> B(k, m) and one task at a
time per device. GPipe's fill-drain comes first; 1F1B and others only need a
new task order.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from lingvo_gpipe.core.nested_map import NestedMap


@dataclasses.dataclass(frozen=True)
class Task:
  kind: str  # 'F' forward, 'B' backward (with recomputation when enabled)
  cell: int
  micro_batch: int


class Schedule:
  """Base: K cells, M micro-batches, and the order each cell runs its tasks."""

  name = 'base'

  def __init__(self, num_cells: int, num_micro_batches: int):
    if num_cells < 1 or num_micro_batches < 1:
      raise ValueError('A schedule needs >= 1 cell and >= 1 micro-batch, got '
                       f'K={num_cells}, M={num_micro_batches}.')
    self.num_cells = num_cells
    self.num_micro_batches = num_micro_batches

  def CellOrder(self, cell: int) -> list[Task]:
    raise TypeError(f'{type(self).__name__} must override CellOrder.')

  def Clocks(self) -> list[list[Task]]:
    """Tasks grouped by clock: all tasks that can run at once, in order."""
    raise TypeError(f'{type(self).__name__} must override Clocks.')

  def TheoreticalBubble(self) -> float:
    k, m = self.num_cells, self.num_micro_batches
    return (k - 1) / (m + k - 1)


class FillDrain(Schedule):
  """GPipe: cell k runs forward of micro-batch m at clock k+m; then all backward.

  Backward runs in reverse: at backward clock t, cell k runs micro-batch
  (M+K-2-t) - (K-1-k), so the last cell starts with the last micro-batch.
  """

  name = 'fill_drain'

  def Clocks(self) -> list[list[Task]]:
    k, m = self.num_cells, self.num_micro_batches
    n = m + k - 1
    forward = [[Task('F', c, t - c) for c in range(k) if 0 <= t - c < m]
               for t in range(n)]
    backward = [[Task('B', c, t - c) for c in reversed(range(k))
                 if 0 <= t - c < m] for t in reversed(range(n))]
    return forward + backward

  def CellOrder(self, cell: int) -> list[Task]:
    return [task for clock in self.Clocks() for task in clock
            if task.cell == cell]


SCHEDULES = {FillDrain.name: FillDrain}


def MakeSchedule(name: str, num_cells: int, num_micro_batches: int) -> Schedule:
  if name not in SCHEDULES:
    raise ValueError(f'Unknown schedule {name!r}; valid: {sorted(SCHEDULES)}.')
  return SCHEDULES[name](num_cells, num_micro_batches)


def Simulate(schedule: Schedule,
             forward_times: Sequence[float],
             backward_times: Sequence[float],
             boundary_bytes: Optional[Sequence[float]] = None,
             internal_bytes: Optional[Sequence[float]] = None,
             recompute: bool = True,
             input_grad_times: Optional[Sequence[float]] = None) -> NestedMap:
  """Runs `schedule` with per-cell task times; reports time, bubble and memory.

  Args:
    schedule: the task order.
    forward_times: per cell, seconds of one micro-batch's forward.
    backward_times: per cell, seconds of one micro-batch's backward (including
      the recomputed forward when recompute is on).
    boundary_bytes: per cell, bytes of one micro-batch's cell input, kept from
      its forward to its backward.
    internal_bytes: per cell, bytes of one micro-batch's activations inside the
      cell; kept until backward without recompute, transient with it.
    recompute: whether cells re-materialize their forward in backward.
    input_grad_times: per cell, seconds from a backward's start until the
      gradient it sends to the previous cell is ready (the pipeline computes it
      before the weight gradients, see grad_order); None: only at its end.

  Returns:
    NestedMap(step_time, bubble_fraction, busy (per cell), peak_bytes (per
    cell), timeline: list of (cell, kind, micro_batch, start, end)).
  """
  k = schedule.num_cells
  for name, values in (('forward_times', forward_times),
                       ('backward_times', backward_times),
                       ('boundary_bytes', boundary_bytes),
                       ('internal_bytes', internal_bytes),
                       ('input_grad_times', input_grad_times)):
    if values is not None and len(values) != k:
      raise ValueError(f'{name} has {len(values)} entries; expected one per '
                       f'cell ({k}).')
  boundary = list(boundary_bytes or [0.0] * k)
  internal = list(internal_bytes or [0.0] * k)
  sends_after = list(input_grad_times or backward_times)
  orders = [schedule.CellOrder(c) for c in range(k)]
  done: dict[Task, float] = {}  # when a task's output for the next one is ready
  device_free = [0.0] * k
  position = [0] * k
  timeline = []
  while any(position[c] < len(orders[c]) for c in range(k)):
    progressed = False
    for c in range(k):
      if position[c] >= len(orders[c]):
        continue
      task = orders[c][position[c]]
      if task.kind == 'F':
        deps = [Task('F', c - 1, task.micro_batch)] if c > 0 else []
        cost = forward_times[c]
      else:
        deps = [Task('F', c, task.micro_batch)]
        if c < k - 1:
          deps.append(Task('B', c + 1, task.micro_batch))
        cost = backward_times[c]
      if any(d not in done for d in deps):
        continue
      start = max([device_free[c]] + [done[d] for d in deps])
      device_free[c] = start + cost
      done[task] = start + (sends_after[c] if task.kind == 'B' else cost)
      timeline.append((c, task.kind, task.micro_batch, start, start + cost))
      position[c] += 1
      progressed = True
    if not progressed:
      raise ValueError(f'Schedule {schedule.name} deadlocks: its task orders '
                       'wait on each other.')
  step_time = max(device_free) if timeline else 0.0
  busy = [sum(e - s for cc, _, _, s, e in timeline if cc == c)
          for c in range(k)]
  bubble = 1.0 - sum(busy) / (k * step_time) if step_time > 0 else 0.0
  peak = [_PeakBytes([t for t in timeline if t[0] == c], boundary[c],
                     internal[c], recompute) for c in range(k)]
  return NestedMap(step_time=step_time, bubble_fraction=bubble, busy=busy,
                   peak_bytes=peak, timeline=timeline)


def _PeakBytes(cell_timeline, boundary: float, internal: float,
               recompute: bool) -> float:
  """Peak live activation bytes of one cell over its tasks, in run order.

  A forward keeps the micro-batch's input (and, without recompute, its
  internal activations) until that micro-batch's backward ends. While a task
  runs its internal activations are live: during forward they are being made,
  during backward (recomputed or kept) they are being consumed.
  """
  kept = 0.0
  peak = 0.0
  for _, kind, _, _, _ in sorted(cell_timeline, key=lambda t: t[3]):
    if kind == 'F':
      peak = max(peak, kept + boundary + internal)
      kept += boundary + (0.0 if recompute else internal)
    else:
      peak = max(peak, kept + (internal if recompute else 0.0))
      kept -= boundary + (0.0 if recompute else internal)
  return peak


def TimesFromFlops(cell_flops: Sequence[float], flops_per_second: float = 1.0,
                   recompute: bool = True) -> tuple[list[float], list[float]]:
  """(forward, backward) seconds per cell estimated from FLOPs.

  A backward pass costs about twice its forward (gradients for inputs and
  weights), plus one more forward when the cell is re-materialized.
  """
  if flops_per_second <= 0:
    raise ValueError(f'flops_per_second must be > 0, got {flops_per_second}.')
  forward = [f / flops_per_second for f in cell_flops]
  factor = 3.0 if recompute else 2.0
  return forward, [factor * t for t in forward]
