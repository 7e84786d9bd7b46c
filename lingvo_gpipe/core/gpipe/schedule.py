"""Pipeline schedules: the order in which each cell runs its tasks, and their simulator.

Invariant: a Schedule's per-cell task lists (`CellOrder`) are the single source
of order. The executor (executor.py) lowers exactly these lists; the clock
grid that the report and the TensorBoard picture draw (`Clocks`) and the
predicted step time, bubble and memory (`Simulate`) are derived from the same
lists by running them with the data dependencies
  F(k-1, m) -> F(k, m),  F(k, m) -> B(k, m),  B(k+1, m) -> B(k, m)
and one task at a time per cell. A new schedule only gives new task lists.

Tasks: 'F' a forward pass of one micro-batch; 'B' its backward pass
(re-materialization included); or the backward split in two, 'Bx' (the
gradient the previous cell waits for) then 'Bw' (the cell's weight
gradients), as `input_grads_first` asks. GPipe's fill-drain comes first;
1F1B holds fewer micro-batches per cell.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from lingvo_gpipe.core.nested_map import NestedMap

FORWARD = 'F'
BACKWARD = 'B'
INPUT_GRAD = 'Bx'
WEIGHT_GRAD = 'Bw'
KINDS = (FORWARD, BACKWARD, INPUT_GRAD, WEIGHT_GRAD)


@dataclasses.dataclass(frozen=True)
class Task:
  kind: str  # one of KINDS
  cell: int
  micro_batch: int

  @property
  def is_backward(self) -> bool:
    return self.kind != FORWARD

  @property
  def sends_gradient(self) -> bool:
    """Whether the previous cell's backward of this micro-batch waits for it."""
    return self.kind in (BACKWARD, INPUT_GRAD)


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
    """The tasks cell `cell` runs, in the order it runs them."""
    raise TypeError(f'{type(self).__name__} must override CellOrder.')

  def RunsAllForwardsFirst(self) -> bool:
    """Whether every cell runs all its forwards before its first backward.

    Only such a schedule runs under a caller's tape around the pipeline
    (forwards in the forward pass, backwards in the gradient); any other
    needs the loss inside the pipeline (pipelined_loss.py).
    """
    for cell in range(self.num_cells):
      order = self.CellOrder(cell)
      first = next((i for i, t in enumerate(order) if t.is_backward),
                   len(order))
      if any(not t.is_backward for t in order[first:]):
        return False
    return True

  def Timeline(self) -> list[tuple[int, Task]]:
    """(clock, task) of every task, each taking one clock, in time order.

    The clocks of `Simulate` with unit task times: what the picture draws and
    the order in which the executor emits the tasks.
    """
    result = Simulate(self, [1.0] * self.num_cells, [1.0] * self.num_cells,
                      input_grad_times=[1.0] * self.num_cells,
                      weight_grad_times=[1.0] * self.num_cells)
    # Within a clock: forwards from the first cell, backwards from the last,
    # the order in which activations and gradients travel.
    return sorted(((int(start), task) for task, start, _ in result.timeline),
                  key=lambda pair: (pair[0], -pair[1].cell if
                                    pair[1].is_backward else pair[1].cell))

  def Clocks(self) -> list[list[Task]]:
    """Tasks grouped by clock (one clock a task); empty clocks kept."""
    timeline = self.Timeline()
    clocks = [[] for _ in range(timeline[-1][0] + 1)] if timeline else []
    for clock, task in timeline:
      clocks[clock].append(task)
    return clocks

  def TheoreticalBubble(self) -> float:
    """The idle fraction of fill-drain, (K-1)/(M+K-1), as the paper gives it."""
    k, m = self.num_cells, self.num_micro_batches
    return (k - 1) / (m + k - 1)


class FillDrain(Schedule):
  """GPipe: every cell runs all its forwards, then all its backwards in reverse.

  Cell k's forward of micro-batch m lands at clock k+m; the backward starts
  with the last cell's last micro-batch. With `split_backward` each backward
  is an input-gradient task followed by its weight-gradient task.
  """

  name = 'fill_drain'

  def __init__(self, num_cells: int, num_micro_batches: int,
               split_backward: bool = False):
    super().__init__(num_cells, num_micro_batches)
    self.split_backward = split_backward

  def CellOrder(self, cell: int) -> list[Task]:
    m = self.num_micro_batches
    order = [Task(FORWARD, cell, i) for i in range(m)]
    for i in reversed(range(m)):
      if self.split_backward:
        order += [Task(INPUT_GRAD, cell, i), Task(WEIGHT_GRAD, cell, i)]
      else:
        order.append(Task(BACKWARD, cell, i))
    return order


class OneFOneB(Schedule):
  """1F1B (PipeDream-Flush, Megatron's default): one forward, one backward.

  Cell k runs min(K-1-k, M) forwards to warm up, then alternates a forward
  and the backward of its oldest kept micro-batch, then runs the backwards
  left. Micro-batches are kept on cell k from forward to backward: at most
  min(M, K-k) at a time, where fill-drain keeps all M; with equal task
  times its bubble is fill-drain's, (K-1)/(M+K-1). Its backwards start
  before the last forward, so it runs only with the loss inside the
  pipeline (pipelined_loss.py).
  """
  name = '1f1b'

  def __init__(self, num_cells: int, num_micro_batches: int,
               split_backward: bool = False):
    super().__init__(num_cells, num_micro_batches)
    self.split_backward = split_backward

  def _Backward(self, cell: int, micro_batch: int) -> list[Task]:
    if self.split_backward:
      return [Task(INPUT_GRAD, cell, micro_batch),
              Task(WEIGHT_GRAD, cell, micro_batch)]
    return [Task(BACKWARD, cell, micro_batch)]

  def CellOrder(self, cell: int) -> list[Task]:
    k, m = self.num_cells, self.num_micro_batches
    warmup = min(k - 1 - cell, m)
    order = [Task(FORWARD, cell, i) for i in range(warmup)]
    for i in range(m - warmup):
      order.append(Task(FORWARD, cell, warmup + i))
      order += self._Backward(cell, i)
    for i in range(m - warmup, m):
      order += self._Backward(cell, i)
    return order


SCHEDULES = {FillDrain.name: FillDrain, OneFOneB.name: OneFOneB}


def MakeSchedule(name: str, num_cells: int, num_micro_batches: int,
                 split_backward: bool = False) -> Schedule:
  if name not in SCHEDULES:
    raise ValueError(f'Unknown schedule {name!r}; valid: {sorted(SCHEDULES)}.')
  return SCHEDULES[name](num_cells, num_micro_batches,
                         split_backward=split_backward)


def Simulate(schedule: Schedule,
             forward_times: Sequence[float],
             backward_times: Sequence[float],
             boundary_bytes: Optional[Sequence[float]] = None,
             internal_bytes: Optional[Sequence[float]] = None,
             recompute: bool = True,
             input_grad_times: Optional[Sequence[float]] = None,
             weight_grad_times: Optional[Sequence[float]] = None) -> NestedMap:
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
      gradient it sends to the previous cell is ready: a 'B' task hands it
      over then, and an 'Bx' task takes this long. None: a 'B' hands it over
      at its end.
    weight_grad_times: per cell, seconds of a 'Bw' task; default
      backward_times - input_grad_times.

  Returns:
    NestedMap(step_time, bubble_fraction, busy (per cell), peak_bytes (per
    cell), timeline: list of (task, start, end)).
  """
  k = schedule.num_cells
  for name, values in (('forward_times', forward_times),
                       ('backward_times', backward_times),
                       ('boundary_bytes', boundary_bytes),
                       ('internal_bytes', internal_bytes),
                       ('input_grad_times', input_grad_times),
                       ('weight_grad_times', weight_grad_times)):
    if values is not None and len(values) != k:
      raise ValueError(f'{name} has {len(values)} entries; expected one per '
                       f'cell ({k}).')
  orders = [schedule.CellOrder(c) for c in range(k)]
  split = any(t.kind in (INPUT_GRAD, WEIGHT_GRAD) for o in orders for t in o)
  if split and input_grad_times is None:
    raise ValueError(f'Schedule {schedule.name} splits backward passes into '
                     "'Bx' and 'Bw' tasks: give input_grad_times.")
  sends_after = list(input_grad_times or backward_times)
  weight_times = list(weight_grad_times or [
      b - x for b, x in zip(backward_times, sends_after)])
  costs = {FORWARD: forward_times, BACKWARD: backward_times,
           INPUT_GRAD: sends_after, WEIGHT_GRAD: weight_times}
  ready: dict[tuple[str, int, int], float] = {}  # (what, cell, mb) -> when
  device_free = [0.0] * k
  position = [0] * k
  timeline = []
  while any(position[c] < len(orders[c]) for c in range(k)):
    progressed = False
    for c in range(k):
      if position[c] >= len(orders[c]):
        continue
      task = orders[c][position[c]]
      deps = _Dependencies(task, k)
      if any(d not in ready for d in deps):
        continue
      start = max([device_free[c]] + [ready[d] for d in deps])
      cost = costs[task.kind][c]
      device_free[c] = start + cost
      if task.kind == FORWARD:
        ready[('F', c, task.micro_batch)] = start + cost
      if task.sends_gradient:
        ready[('dx', c, task.micro_batch)] = start + (
            sends_after[c] if task.kind == BACKWARD else cost)
      timeline.append((task, start, start + cost))
      position[c] += 1
      progressed = True
    if not progressed:
      raise ValueError(f'Schedule {schedule.name} deadlocks: its task orders '
                       'wait on each other.')
  step_time = max(device_free) if timeline else 0.0
  busy = [sum(e - s for t, s, e in timeline if t.cell == c) for c in range(k)]
  bubble = 1.0 - sum(busy) / (k * step_time) if step_time > 0 else 0.0
  boundary = list(boundary_bytes or [0.0] * k)
  internal = list(internal_bytes or [0.0] * k)
  peak = [_PeakBytes([(t, s) for t, s, _ in timeline if t.cell == c],
                     boundary[c], internal[c], recompute) for c in range(k)]
  return NestedMap(step_time=step_time, bubble_fraction=bubble, busy=busy,
                   peak_bytes=peak, timeline=timeline)


def _Dependencies(task: Task, num_cells: int) -> list[tuple[str, int, int]]:
  """What `task` waits for, besides its cell's previous task."""
  c, m = task.cell, task.micro_batch
  if task.kind == FORWARD:
    return [('F', c - 1, m)] if c > 0 else []
  if task.kind == WEIGHT_GRAD:
    return [('dx', c, m)]
  deps = [('F', c, m)]
  if c < num_cells - 1:
    deps.append(('dx', c + 1, m))
  return deps


def _PeakBytes(cell_tasks: list[tuple[Task, float]], boundary: float,
               internal: float, recompute: bool) -> float:
  """Peak live activation bytes of one cell over its tasks, in run order.

  A forward keeps the micro-batch's input (and, without recompute, its
  internal activations) until that micro-batch's backward ends. While a task
  runs its internal activations are live: during forward they are being made,
  during backward (recomputed or kept) they are being consumed; a split
  backward holds them from its 'Bx' to the end of its 'Bw'.
  """
  kept = 0.0
  peak = 0.0
  for task, _ in sorted(cell_tasks, key=lambda pair: pair[1]):
    if task.kind == FORWARD:
      peak = max(peak, kept + boundary + internal)
      kept += boundary + (0.0 if recompute else internal)
    elif task.kind in (BACKWARD, INPUT_GRAD):
      peak = max(peak, kept + (internal if recompute else 0.0))
    if task.kind in (BACKWARD, WEIGHT_GRAD):
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
