"""The executor: lowers a Schedule into TensorFlow ops, one cell task at a time.

Invariant: the order in which a cell runs its tasks is its `CellOrder` in the
schedule and nothing else. Each task's inputs wait (a control dependency) for
the previous task of the same cell: a forward for the previous forward's
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
included). A weight-gradient task ('Bw') is lowered with the
input-gradient task ('Bx') right before it, as one gradient computation whose
weight-gradient ops wait for the input gradient (grad_order).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import tensorflow as tf

from lingvo_gpipe.core.gpipe import accumulate
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
    timeline = [task for _, task in schedule.Timeline()]
    self._forward = [t for t in timeline if not t.is_backward]
    self._backward = [t for t in timeline if t.kind in (
        schedule_lib.BACKWARD, schedule_lib.INPUT_GRAD)]
    # cell_in[k][m] / cell_out[k][m]: cell k's input / outputs for
    # micro-batch m. The inputs are the boundary activations kept for the
    # backward; outputs are dropped once the next cell has them.
    self.cell_in = [[None] * m for _ in range(k)]
    self.cell_out = [[None] * m for _ in range(k)]
    self._kept: dict[tuple[int, int], tuple[tf.GradientTape, Any]] = {}

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
    s = self._schedule
    for cell in range(s.num_cells):
      order = s.CellOrder(cell)
      kinds = [t.kind for t in order]
      for i, kind in enumerate(kinds):
        if kind == schedule_lib.WEIGHT_GRAD and not (
            i > 0 and kinds[i - 1] == schedule_lib.INPUT_GRAD and
            order[i - 1].micro_batch == order[i].micro_batch):
          raise ValueError(
              f'Schedule {s.name}: cell {cell} runs {order[i]} apart from its '
              "input-gradient task; this executor lowers a 'Bw' only right "
              "after the 'Bx' of the same micro-batch.")

  def _Forward(self, task: schedule_lib.Task, received: Any,
               after: Any) -> Any:
    """Runs forward task `task` on `received`, once `after` is computed."""
    k, m = task.cell, task.micro_batch
    with self._placement.CellScope(k):
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
    added, the gradient of the cell's input: None where it gets none).
    """
    k, m = task.cell, task.micro_batch
    with self._placement.CellScope(k):
      # Recompute only once this micro-batch's output gradient is there and
      # the previous one's gradients are summed: one at a time.
      x, dy = accumulate.Gated([running_sum, dy, after],
                               (self.cell_in[k][m], dy))
      kept = self._kept.pop((k, m), None)
      if kept is not None:
        x = self.cell_in[k][m]  # the tensor the forward's tape watched
      g_theta, g_x = self._runners[k].Backward(
          m, x, dy, kept,
          input_grad_first=task.kind == schedule_lib.INPUT_GRAD and k > 0)
      # On the cell's device: summed elsewhere, every micro-batch's weight
      # gradients would travel there (a capped worker ran out of memory).
      return accumulate.AddGrads(running_sum, g_theta), g_x

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
    previous: list[Optional[Any]] = [None] * s.num_cells
    for task in self._forward:
      k, m = task.cell, task.micro_batch
      received = micro_inputs[m] if k == 0 else self.cell_out[k - 1][m]
      previous[k] = self._Forward(task, received, previous[k])
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
    for task in self._backward:
      k, m = task.cell, task.micro_batch
      running_sum[k], g_x = self._Backward(task, dys[k][m], running_sum[k],
                                           None)
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
    after: list[Any] = [None] * s.num_cells  # what a cell's next task waits for
    for _, task in s.Timeline():
      k, m = task.cell, task.micro_batch
      if task.kind == schedule_lib.FORWARD:
        received = micro_inputs[m] if k == 0 else self.cell_out[k - 1][m]
        after[k] = self._Forward(task, received, after[k])
        if k == k_last:
          with self._placement.CellScope(k):
            metrics[m], dys[k][m] = loss_fn(m, after[k])
      elif task.kind != schedule_lib.WEIGHT_GRAD:  # lowered with its 'Bx'
        running_sum[k], g_x = self._Backward(task, dys[k][m], running_sum[k],
                                             after[k])
        after[k] = [running_sum[k], g_x]
        if k > 0:
          dys[k - 1][m] = self._OutputGradient(k - 1, m, g_x)
        else:
          dx[m] = g_x
    return metrics, running_sum, dx

