"""The executor: lowers a Schedule into TensorFlow ops, one cell task at a time.

Invariant: the order in which a device runs its tasks is its `DeviceOrder` in
the schedule and nothing else (a device is a cell, but in the interleaved
schedule). Each task's inputs wait (a control dependency) for the previous
task of the same device: a forward for the previous forward's
outputs, a backward for the running sum of the cell's weight gradients
(accumulate.py), so one micro-batch's partial gradients are alive at a time.
Tasks are emitted in the order of the schedule's own timeline, on their
cell's device.

This executor unrolls the schedule: the graph holds a copy of a cell's
forward and backward per micro-batch. Under a caller's tape around the
pipeline (RunForward, RunBackward) it runs every forward in the pipeline's
forward pass and every backward in its custom gradient, so it lowers
schedules whose cells finish all their forwards before their first backward
(fill-drain). With the loss inside the pipeline (Run, pipelined_loss.py)
it runs every task in one pass, in any order the schedule gives (1F1B
included). A split backward is one gradient computation per micro-batch,
built at its input-gradient task ('Bx'); its weight-gradient ops (those the
input gradient does not need) wait for the input gradient (grad_order). A
weight-gradient task ('Bw') right after its 'Bx' is that same computation;
one the schedule runs later (ZB-H1) makes those ops also wait for the task
before it in the cell's order, and adds them to the running sum then, so the
held-back weight gradients fill the cell's idle time in the order given.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import tensorflow as tf

from lingvo_gpipe.core.gpipe import accumulate
from lingvo_gpipe.core.gpipe import grad_order
from lingvo_gpipe.core.gpipe import measured
from lingvo_gpipe.core.gpipe import placement as placement_lib
from lingvo_gpipe.core.gpipe import recompute as recompute_lib
from lingvo_gpipe.core.gpipe import schedule as schedule_lib


class Executor:
  """Runs `runners` (one per cell) over micro-batches in `schedule`'s order."""

  def __init__(self, schedule: schedule_lib.Schedule,
               runners: Sequence[recompute_lib.CellRunner],
               placement: placement_lib.Placement, recompute: str):
    recompute_lib.CheckMode(recompute)
    if schedule.num_cells != len(runners):
      raise ValueError(f'Schedule {schedule.name} has {schedule.num_cells} '
                       f'cells; the pipeline has {len(runners)}.')
    self._schedule = schedule
    self._runners = list(runners)
    self._placement = placement
    self._recompute = recompute
    k, m = schedule.num_cells, schedule.num_micro_batches
    self._CheckWeightGrads()
    self._orders = [schedule.DeviceOrder(d)
                    for d in range(schedule.num_devices)]
    timeline = [task for _, task in schedule.Timeline()]
    self._forward = [t for t in timeline if not t.is_backward]
    self._backward = [t for t in timeline if t.is_backward]
    # cell_in[k][m] / cell_out[k][m]: cell k's input / outputs for
    # micro-batch m. The inputs are the boundary activations kept for the
    # backward; outputs are dropped once the next cell has them.
    self.cell_in = [[None] * m for _ in range(k)]
    self.cell_out = [[None] * m for _ in range(k)]
    self._kept: dict[tuple[int, int], tuple[tf.GradientTape, Any]] = {}
    # (cell, micro-batch) -> (weight gradients, the ops that compute them)
    # of a 'Bx' whose 'Bw' comes later (ZB-H1).
    self._delayed: dict[tuple[int, int], tuple[list, list]] = {}

  def _CheckTwoPasses(self) -> None:
    """Refuses a schedule that interleaves forwards and backwards in a cell."""
    s = self._schedule
    if not s.RunsAllForwardsFirst():
      raise ValueError(
          f'Schedule {s.name} starts a backward before the last forward. '
          "Run as a layer under a caller's tape, every forward runs in the "
          'forward pass and every backward in the gradient, so only '
          'schedules that run all forwards first (fill-drain) can; with the '
          'loss inside the pipeline (PipeliningLayer.FPropLoss) any '
          'schedule runs.')

  def _CheckWeightGrads(self) -> None:
    """Each cell runs a micro-batch's 'Bw' after its 'Bx', and both or none."""
    s = self._schedule
    for cell in range(s.num_cells):
      seen = set()
      for task in s.CellOrder(cell):
        if task.kind == schedule_lib.INPUT_GRAD:
          seen.add(task.micro_batch)
        elif task.kind == schedule_lib.WEIGHT_GRAD:
          if task.micro_batch not in seen:
            raise ValueError(
                f'Schedule {s.name}: cell {cell} runs {task} before the '
                'input-gradient task of its micro-batch, whose gradient '
                'computation it finishes.')
          seen.discard(task.micro_batch)
      if seen:
        raise ValueError(
            f'Schedule {s.name}: cell {cell} never runs the weight-gradient '
            f'task of micro-batches {sorted(seen)}.')

  def _Delayed(self, task: schedule_lib.Task) -> bool:
    """Whether `task`, a 'Bx', is not followed at once by its own 'Bw'."""
    order = self._orders[self._schedule.Device(task.cell)]
    i = order.index(task)
    return not (i + 1 < len(order) and order[i + 1] == schedule_lib.Task(
        schedule_lib.WEIGHT_GRAD, task.cell, task.micro_batch))

  def _Forward(self, task: schedule_lib.Task, received: Any,
               after: Any) -> Any:
    """Runs forward task `task` on `received`, once `after` is computed."""
    k, m = task.cell, task.micro_batch
    with self._placement.CellScope(k), tf.name_scope(
        measured.TaskScope(task)):
      x = accumulate.Gated([after], self._placement.Annotate(k, received))
      self.cell_in[k][m] = x
      keep = not recompute_lib.Recomputes(self._recompute, m,
                                          self._schedule.num_micro_batches)
      y, tape = self._runners[k].Forward(m, x, keep)
      if tape is not None:
        self._kept[(k, m)] = (tape, y)
      self.cell_out[k][m] = y
    return y

  def _Backward(self, task: schedule_lib.Task, dy: Any, running_sum: Any,
                after: Any) -> tuple[list, Any]:
    """Runs backward task `task` from its output gradient `dy`.

    Returns (the cell's running sum with this micro-batch's weight gradients
    added, the gradient of the cell's input: None where it gets none). A
    'Bx' whose 'Bw' comes later returns the running sum as it was: its weight
    gradients are held until `_WeightGrad`.
    """
    k, m = task.cell, task.micro_batch
    delayed = task.kind == schedule_lib.INPUT_GRAD and self._Delayed(task)
    with self._placement.CellScope(k), tf.name_scope(
        measured.TaskScope(task)):
      # Recompute only once this micro-batch's output gradient is there and
      # the previous one's gradients are summed: one at a time.
      x, dy = accumulate.Gated([running_sum, dy, after],
                               (self.cell_in[k][m], dy))
      kept = self._kept.pop((k, m), None)
      if kept is not None:
        x = self.cell_in[k][m]  # the tensor the forward's tape watched
      with grad_order.Capture(delayed) as created:
        g_theta, g_x = self._runners[k].Backward(
            m, x, dy, kept, input_grad_first=(
                task.kind == schedule_lib.INPUT_GRAD and (k > 0 or delayed)))
      if delayed:
        # The ops the input gradient does not need: the weight gradients'.
        ops = grad_order.Independent(created, g_x)
        self._delayed[(k, m)] = (g_theta, ops)
        measured.NameDelayed([op.name for op in ops], schedule_lib.Task(
            schedule_lib.WEIGHT_GRAD, k, m))
        return running_sum, g_x
      # On the cell's device: summed elsewhere, every micro-batch's weight
      # gradients would travel there (a capped worker ran out of memory).
      return accumulate.AddGrads(running_sum, g_theta), g_x

  def _WeightGrad(self, task: schedule_lib.Task, running_sum: Any,
                  after: Any) -> tuple[Any, Any]:
    """Runs a 'Bw': (the running sum, what the device's next task waits for).

    One right after its 'Bx' was lowered with it: both pass through. A
    delayed one's ops wait for `after`, then join the sum, which the next
    task waits for.
    """
    k, m = task.cell, task.micro_batch
    if (k, m) not in self._delayed:
      return running_sum, after
    g_theta, ops = self._delayed.pop((k, m))
    grad_order.Wait(ops, after)
    with self._placement.CellScope(k), tf.name_scope(
        measured.TaskScope(task)):
      running_sum = accumulate.AddGrads(running_sum, g_theta)
    return running_sum, running_sum

  def _OutputGradient(self, k: int, m: int, g_x: Any) -> Any:
    """Cell k+1's input gradient as cell k's output gradient: zeros for None.

    Made on cell k+1's device, where the gradient was computed.
    """
    with self._placement.CellScope(k + 1):
      return tf.nest.map_structure(
          lambda g, ref: tf.zeros_like(ref) if g is None else g,
          g_x, self.cell_in[k + 1][m])

  def RunForward(self, micro_inputs: Sequence[Any]) -> list[Any]:
    """Every forward task; returns the last cell's outputs per micro-batch."""
    self._CheckTwoPasses()
    s = self._schedule
    previous: list[Optional[Any]] = [None] * s.num_devices
    for task in self._forward:
      k, m, d = task.cell, task.micro_batch, s.Device(task.cell)
      received = micro_inputs[m] if k == 0 else self.cell_out[k - 1][m]
      previous[d] = self._Forward(task, received, previous[d])
    return self.cell_out[s.num_cells - 1]

  def RunBackward(self, micro_dys: Sequence[Any]
                  ) -> tuple[list[Optional[list]], list[Any]]:
    """Every backward task, from the gradients of the last cell's outputs.

    Returns:
      (per cell, the summed gradients of its flat theta; per micro-batch, the
      gradient of the first cell's input).
    """
    s = self._schedule
    # dys[k][m]: gradient of the loss w.r.t. cell k's outputs, micro-batch m.
    dys = [[None] * s.num_micro_batches for _ in range(s.num_cells)]
    dys[s.num_cells - 1] = list(micro_dys)
    dx = [None] * s.num_micro_batches
    running_sum: list[Optional[list]] = [None] * s.num_cells
    after: list[Any] = [None] * s.num_devices  # what a device's next task waits for
    for task in self._backward:
      k, m, d = task.cell, task.micro_batch, s.Device(task.cell)
      if task.kind == schedule_lib.WEIGHT_GRAD:
        running_sum[k], after[d] = self._WeightGrad(task, running_sum[k],
                                                    after[d])
        continue
      running_sum[k], g_x = self._Backward(task, dys[k][m], running_sum[k],
                                           None)
      after[d] = [running_sum[k], g_x]
      if k > 0:
        dys[k - 1][m] = self._OutputGradient(k - 1, m, g_x)
      else:
        dx[m] = g_x
    return running_sum, dx

  def Run(self, micro_inputs: Sequence[Any],
          loss_fn: Callable[[int, Any], tuple[Any, Any]]
          ) -> tuple[list[Any], list[Optional[list]], list[Any]]:
    """Every task in the schedule's order in one pass, the loss on the last cell.

    Right after the last cell's forward of micro-batch m, on its device,
    `loss_fn(m, outputs)` returns (the micro-batch's metrics, the gradient
    of its loss w.r.t. `outputs`, which starts its backward). A backward may
    thus start before the last forward (1F1B), and nothing waits for the
    whole batch's outputs. Each task waits for the cell's previous one, of
    either kind.

    Returns:
      (per micro-batch, its metrics; per cell, the summed gradients of its
      flat theta; per micro-batch, the gradient of the first cell's input).
    """
    s = self._schedule
    k_last, num_mb = s.num_cells - 1, s.num_micro_batches
    dys = [[None] * num_mb for _ in range(s.num_cells)]
    metrics: list[Any] = [None] * num_mb
    dx: list[Any] = [None] * num_mb
    running_sum: list[Optional[list]] = [None] * s.num_cells
    after: list[Any] = [None] * s.num_devices  # what a device's next task waits for
    for _, task in s.Timeline():
      k, m, d = task.cell, task.micro_batch, s.Device(task.cell)
      if task.kind == schedule_lib.FORWARD:
        received = micro_inputs[m] if k == 0 else self.cell_out[k - 1][m]
        after[d] = y = self._Forward(task, received, after[d])
        if k == k_last:
          with self._placement.CellScope(k):
            metrics[m], dys[k][m] = loss_fn(m, y)
      elif task.kind == schedule_lib.WEIGHT_GRAD:
        running_sum[k], after[d] = self._WeightGrad(task, running_sum[k],
                                                    after[d])
      else:
        running_sum[k], g_x = self._Backward(task, dys[k][m], running_sum[k],
                                             after[d])
        after[d] = [running_sum[k], g_x]
        if k > 0:
          dys[k - 1][m] = self._OutputGradient(k - 1, m, g_x)
        else:
          dx[m] = g_x
    return metrics, running_sum, dx

