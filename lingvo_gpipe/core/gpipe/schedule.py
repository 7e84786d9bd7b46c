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

  # Cells run on devices; one device runs its tasks one at a time. Every
  # schedule but the interleaved one gives each cell a device of its own.
  @property
  def num_devices(self) -> int:
    return self.num_cells

  def Device(self, cell: int) -> int:
    """The device (0 .. num_devices-1) that runs cell `cell`'s tasks."""
    return cell

  def CellOrder(self, cell: int) -> list[Task]:
    """The tasks cell `cell` runs, in the order it runs them."""
    raise TypeError(f'{type(self).__name__} must override CellOrder.')

  def DeviceOrder(self, device: int) -> list[Task]:
    """The tasks device `device` runs, in order: its cell's, by default."""
    return self.CellOrder(device)

  # Whether each backward is an input-gradient then a weight-gradient task.
  split_backward = False

  def _Backward(self, cell: int, micro_batch: int) -> list[Task]:
    """One micro-batch's backward: 'B', or 'Bx' then 'Bw' when split."""
    if self.split_backward:
      return [Task(INPUT_GRAD, cell, micro_batch),
              Task(WEIGHT_GRAD, cell, micro_batch)]
    return [Task(BACKWARD, cell, micro_batch)]

  def RunsAllForwardsFirst(self) -> bool:
    """Whether every device runs all its forwards before its first backward.

    Only such a schedule runs under a caller's tape around the pipeline
    (forwards in the forward pass, backwards in the gradient); any other
    needs the loss inside the pipeline (pipelined_loss.py).
    """
    for device in range(self.num_devices):
      order = self.DeviceOrder(device)
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
    """The idle fraction of a step when a forward, an input gradient and a
    weight gradient each take one unit (a whole backward two, handing
    the input gradient over at its end).

    Simulated from the task lists: for fill-drain and 1F1B it is the paper's
    (K-1)/(M+K-1); for ZB-H1, (K-1)/(3M+K-1) once M >= K.
    """
    units = [1.0] * self.num_cells
    split = any(t.kind == INPUT_GRAD for c in range(self.num_cells)
                for t in self.CellOrder(c))
    # An unsplit backward hands its input gradient over when it ends.
    return Simulate(self, units, [2.0] * self.num_cells,
                    input_grad_times=units if split else None,
                    weight_grad_times=units if split else None
                    ).bubble_fraction


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
      order += self._Backward(cell, i)
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


class ZeroBubbleH1(Schedule):
  """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", 2024).

  1F1B with every backward split into its input-gradient task ('Bx', which
  the previous cell waits for) and its weight-gradient task ('Bw', which no
  one waits for). Cell k runs 1F1B's warm-up forwards, then in the steady
  phase each 'Bx' of micro-batch i is followed by the 'Bw' of micro-batch
  i-k: the weight gradients are delayed by k micro-batches, and the k held
  back fill cell k's waits in the drain, where 1F1B idles. With equal task
  times (F = Bx = Bw) the bubble is (K-1)(F+Bx-Bw) against 1F1B's
  (K-1)(F+Bx+Bw), a third; every cell keeps at most min(M, K) micro-batches,
  which is 1F1B's peak (on its first cell). It needs the loss inside the
  pipeline, as 1F1B does.
  """
  name = 'zero_bubble_h1'

  def __init__(self, num_cells: int, num_micro_batches: int,
               split_backward: bool = True):
    # Always split: the split is the schedule. The argument is taken so
    # that every schedule is built alike.
    del split_backward
    super().__init__(num_cells, num_micro_batches)

  def CellOrder(self, cell: int) -> list[Task]:
    k, m = self.num_cells, self.num_micro_batches
    warmup = min(k - 1 - cell, m)
    order = [Task(FORWARD, cell, i) for i in range(warmup)]
    held = []  # micro-batches whose weight gradients wait
    for i in range(m):
      if warmup + i < m:
        order.append(Task(FORWARD, cell, warmup + i))
      order.append(Task(INPUT_GRAD, cell, i))
      held.append(i)
      # Steady phase: delay by `cell`; drain: one held back after each 'Bx'.
      if len(held) > cell or warmup + i >= m:
        order.append(Task(WEIGHT_GRAD, cell, held.pop(0)))
    return order + [Task(WEIGHT_GRAD, cell, i) for i in held]


class Interleaved1F1B(Schedule):
  """Interleaved 1F1B (Megatron's): V cells per device, cell c on device c mod D.

  Each of the D devices holds V cells (chunks) of the K = V·D, so a
  micro-batch passes every device V times. Micro-batches go in rounds of D:
  a device runs a round's forwards through its first cell, then its second,
  and so on, and the round's backwards in the reverse order of cells. Device
  d runs 2(D-1-d) + (V-1)·D forwards to warm up (capped at V·M; more where
  a short round would otherwise deadlock; with V=1, 1F1B's D-1-d), then
  alternates one forward and one backward, then the backwards left. Each
  task is 1/V of a device's share of the model, so the fill and the drain
  are V times shorter: with equal task times the bubble is (D-1)/(V·M+D-1)
  against 1F1B's (D-1)/(M+D-1), for more sends between devices and more
  micro-batches in flight early on. When M is not a multiple of D, the
  short round goes first; so placed, the simulated bubble was at most
  1F1B's for every D <= 5, V <= 4, M <= 13 (placed last, it was up to 6
  points more).
  """
  name = 'interleaved_1f1b'

  def __init__(self, num_cells: int, num_micro_batches: int,
               split_backward: bool = False, num_devices: int = 0):
    super().__init__(num_cells, num_micro_batches)
    num_devices = num_devices or num_cells
    if num_devices < 1 or num_cells % num_devices:
      raise ValueError(f'{self.name}: {num_cells} cells cannot be spread '
                       f'evenly over {num_devices} devices; give K = V x D '
                       'cells for V cells per device.')
    self._num_devices = num_devices
    self.split_backward = split_backward
    self._orders: Optional[list[list[Task]]] = None

  @property
  def num_devices(self) -> int:
    return self._num_devices

  @property
  def cells_per_device(self) -> int:
    return self.num_cells // self._num_devices

  def Device(self, cell: int) -> int:
    return cell % self._num_devices

  def CellOrder(self, cell: int) -> list[Task]:
    return [t for t in self.DeviceOrder(self.Device(cell)) if t.cell == cell]

  def DeviceOrder(self, device: int) -> list[Task]:
    if self._orders is None:
      self._orders = self._Orders()
    return list(self._orders[device])

  def _Orders(self) -> list[list[Task]]:
    """Every device's order, with warm-ups that do not deadlock.

    The published warm-up assumes whole rounds; with a short last round a
    device may reach a backward that waits on a forward queued behind it.
    Such a device warms up by one more forward, until the orders run.
    """
    d, v = self._num_devices, self.cells_per_device
    # One cell per device (V=1): 1F1B's warm-up, and its order.
    warmups = [(d - 1 - i) * (2 if v > 1 else 1) + (v - 1) * d
               for i in range(d)]
    while True:
      orders = [self._Order(i, warmups[i]) for i in range(d)]
      blocked = _Blocked(self.num_cells, orders)
      if not blocked:
        return orders
      for i in blocked:
        warmups[i] += 1

  def _Order(self, device: int, warmup: int) -> list[Task]:
    d, v, m = self._num_devices, self.cells_per_device, self.num_micro_batches
    forwards, backwards = [], []
    # A short round first: run last, it idled more than 1F1B in simulation.
    firsts = ([0] if m % d else []) + list(range(m % d, m, d))
    for first, end in zip(firsts, firsts[1:] + [m]):
      rounds = range(first, end)
      for chunk in range(v):
        forwards += [(chunk * d + device, i) for i in rounds]
      for chunk in reversed(range(v)):
        backwards += [(chunk * d + device, i) for i in rounds]
    warmup = min(len(forwards), warmup)
    order = [Task(FORWARD, c, i) for c, i in forwards[:warmup]]
    for j, (c, i) in enumerate(backwards):
      if warmup + j < len(forwards):
        order.append(Task(FORWARD, *forwards[warmup + j]))
      order += self._Backward(c, i)
    return order


def _Blocked(num_cells: int, orders: list[list[Task]]) -> list[int]:
  """The devices stuck on a backward if `orders` deadlock, else []."""
  done: set[tuple[str, int, int]] = set()
  position = [0] * len(orders)
  while True:
    progressed = False
    for d, order in enumerate(orders):
      while position[d] < len(order):
        task = order[position[d]]
        if any(dep not in done for dep in _Dependencies(task, num_cells)):
          break
        if task.kind == FORWARD:
          done.add(('F', task.cell, task.micro_batch))
        if task.sends_gradient:
          done.add(('dx', task.cell, task.micro_batch))
        position[d] += 1
        progressed = True
    if all(p == len(o) for p, o in zip(position, orders)):
      return []
    if not progressed:
      return [d for d, o in enumerate(orders)
              if position[d] < len(o) and o[position[d]].is_backward]


def Simulate(schedule: Schedule,
             forward_times: Sequence[float],
             backward_times: Sequence[float],
             boundary_bytes: Optional[Sequence[float]] = None,
             internal_bytes: Optional[Sequence[float]] = None,
             recompute: bool = True,
             input_grad_times: Optional[Sequence[float]] = None,
             weight_grad_times: Optional[Sequence[float]] = None) -> NestedMap:
  """Runs `schedule` with per-cell task times; reports time, bubble and memory.

  Each device runs its `DeviceOrder` one task at a time, each task once its
  data dependencies are done.

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
    NestedMap(step_time, bubble_fraction, busy (per device), peak_bytes (per
    device), timeline: list of (task, start, end)). A device is a cell but
    in the interleaved schedule, whose device holds several.
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
  num_devices = schedule.num_devices
  orders = [schedule.DeviceOrder(d) for d in range(num_devices)]
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
  device_free = [0.0] * num_devices
  position = [0] * num_devices
  timeline = []
  while any(position[d] < len(orders[d]) for d in range(num_devices)):
    progressed = False
    for d in range(num_devices):
      if position[d] >= len(orders[d]):
        continue
      task = orders[d][position[d]]
      c = task.cell
      deps = _Dependencies(task, k)
      if any(dep not in ready for dep in deps):
        continue
      start = max([device_free[d]] + [ready[dep] for dep in deps])
      cost = costs[task.kind][c]
      device_free[d] = start + cost
      if task.kind == FORWARD:
        ready[('F', c, task.micro_batch)] = start + cost
      if task.sends_gradient:
        ready[('dx', c, task.micro_batch)] = start + (
            sends_after[c] if task.kind == BACKWARD else cost)
      timeline.append((task, start, start + cost))
      position[d] += 1
      progressed = True
    if not progressed:
      raise ValueError(f'Schedule {schedule.name} deadlocks: its task orders '
                       'wait on each other.')
  step_time = max(device_free) if timeline else 0.0
  busy = [sum(e - s for t, s, e in timeline
              if schedule.Device(t.cell) == d) for d in range(num_devices)]
  bubble = (1.0 - sum(busy) / (num_devices * step_time)
            if step_time > 0 else 0.0)
  boundary = list(boundary_bytes or [0.0] * k)
  internal = list(internal_bytes or [0.0] * k)
  peak = [_PeakBytes([(t, s) for t, s, _ in timeline
                      if schedule.Device(t.cell) == d],
                     boundary, internal, recompute)
          for d in range(num_devices)]
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


def _PeakBytes(device_tasks: list[tuple[Task, float]], boundary: list[float],
               internal: list[float], recompute: bool) -> float:
  """Peak live activation bytes of one device over its tasks, in run order.

  A forward keeps the micro-batch's input (and, without recompute, its
  internal activations) until that micro-batch's backward ends. While a task
  runs its internal activations are live: during forward they are being made,
  during backward (recomputed or kept) they are being consumed; a split
  backward holds them from its 'Bx' to the end of its 'Bw', which a schedule
  may delay (ZB-H1). Sizes are the task's cell's.
  """
  kept = 0.0
  peak = 0.0
  for task, _ in sorted(device_tasks, key=lambda pair: pair[1]):
    b, i = boundary[task.cell], internal[task.cell]
    held = b + (0.0 if recompute else i)  # from forward to backward
    if task.kind == FORWARD:
      peak = max(peak, kept + b + i)
      kept += held
    elif task.kind == BACKWARD:
      peak = max(peak, kept + (i if recompute else 0.0))
      kept -= held
    elif task.kind == INPUT_GRAD:
      # Recomputed internals stay for the weight gradients, however late.
      kept += i if recompute else 0.0
      peak = max(peak, kept)
    else:  # WEIGHT_GRAD
      kept -= held + (i if recompute else 0.0)
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
