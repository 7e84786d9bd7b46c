"""TensorBoard summaries: scalars, texts, and the pipeline schedule as a picture.

Invariant: every function here writes to the default `tf.summary` writer at an
explicit step, so the trainer decides where (DIR/train, DIR/eval_<split>) and
when; nothing here runs inside the traced training step. `ReadEvents` reads
them back, for tools, benchmarks and tests.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import numpy as np
import tensorflow as tf

from lingvo_gpipe.core import timeline_image
from lingvo_gpipe.core.gpipe import measured
from lingvo_gpipe.core.gpipe import schedule as schedule_lib



def Scalars(values: Mapping[str, float], step: int) -> None:
  """One scalar summary per name; None values are skipped."""
  for name, value in values.items():
    if value is not None:
      tf.summary.scalar(name, float(value), step=step)


def Text(name: str, text: str, step: int) -> None:
  """A text summary shown verbatim (TensorBoard renders markdown; we fence it)."""
  tf.summary.text(name, '```\n' + text + '\n```', step=step)


def ScheduleGrid(sched: schedule_lib.Schedule) -> list[list[Optional[schedule_lib.Task]]]:
  """grid[device][clock]: the task a device runs at that clock, or None (a
  bubble). A device is a cell, but in the interleaved schedule."""
  clocks = sched.Clocks()
  grid = [[None] * len(clocks) for _ in range(sched.num_devices)]
  for t, tasks in enumerate(clocks):
    for task in tasks:
      grid[sched.Device(task.cell)][t] = task
  return grid


def TaskMark(sched: schedule_lib.Schedule, task: schedule_lib.Task) -> str:
  """'F3' (forward of micro-batch 3); 'F3.1' in its device's second cell."""
  return task.kind + timeline_image.MicroBatchMark(sched, task)


def ScheduleText(sched: schedule_lib.Schedule) -> str:
  """The schedule as a table: a row per cell, F3/B3 = forward/backward of micro-batch 3."""
  grid = ScheduleGrid(sched)
  width = max(3, 1 + max(len(TaskMark(sched, t)) for row in grid
                         for t in row if t))
  interleaved = sched.num_devices < sched.num_cells
  header = ('dev ' if interleaved else 'cell ') + ''.join(
      f'{t:>{width}}' for t in range(len(grid[0])))
  rows = [header]
  for device, row in enumerate(grid):
    marks = ''.join(f'{TaskMark(sched, task) if task else ".":>{width}}'
                    for task in row)
    rows.append(f'{device:>{3 if interleaved else 4}} {marks}')
  bubble = sched.TheoreticalBubble()
  devices = (f' on {sched.num_devices} devices (F3.1: micro-batch 3 in a '
             "device's second cell)" if interleaved else '')
  rows.append(f'K={sched.num_cells} cells{devices}, M='
              f'{sched.num_micro_batches} micro-batches, {sched.name}: "." is '
              f'a bubble; bubble fraction {bubble:.1%}')
  return '\n'.join(rows)


def ScheduleImage(sched: schedule_lib.Schedule) -> np.ndarray:
  """The planned schedule as an RGB uint8 picture [H, W, 3] (timeline_image.py).

  A row per device (a cell, but in the interleaved schedule), a box per task
  at the clock the schedule's timeline gives it, each task one clock.
  """
  boxes = [timeline_image.Box(sched.Device(task.cell), clock, clock + 1, task)
           for clock, task in sched.Timeline()]
  interleaved = sched.num_devices < sched.num_cells
  where = (f' on {sched.num_devices} devices' if interleaved else '')
  span = max(b.end for b in boxes)
  drawn = 1 - len(boxes) / (sched.num_devices * span)
  title = (f'{sched.name} planned: K={sched.num_cells} cells{where}, '
           f'M={sched.num_micro_batches}; each task one clock, '
           f'{drawn:.1%} idle; with a backward two clocks, bubble '
           f'{sched.TheoreticalBubble():.1%}')
  return timeline_image.Draw(
      boxes, sched.num_devices, sched.num_micro_batches, title,
      timeline_image.RowLabel(sched), 'clock',
      lambda task: timeline_image.MicroBatchMark(sched, task))


def Schedule(sched: schedule_lib.Schedule, step: int) -> None:
  """The schedule as an image ('pipeline/schedule') and a table ('pipeline/schedule_table').

  Distinct tags: TensorBoard keeps one plugin per (run, tag) and would drop
  one of the two.
  """
  tf.summary.image('pipeline/schedule', ScheduleImage(sched)[np.newaxis],
                   step=step,
                   description=f'{sched.name}, as planned: a row per device, '
                   'a box per task (its micro-batch in it), time in clocks; '
                   'blue forward, orange backward, green weight gradients when '
                   'split from the backward (darker: later micro-batch), '
                   'grey: bubble.')
  Text('pipeline/schedule_table', ScheduleText(sched), step)


def MeasuredSchedule(sched: schedule_lib.Schedule,
                     boxes: list[timeline_image.Box], bubble: float,
                     step: int) -> None:
  """The schedule as it ran: 'pipeline/schedule_measured' and its bubble,
  'pipeline/measured_bubble' (measured.py)."""
  tf.summary.image('pipeline/schedule_measured',
                   measured.Image(boxes, sched, bubble)[np.newaxis], step=step,
                   description=f'{sched.name}, as it ran (profiled): when each '
                   "cell's tasks started and ended, in ms; colors as in "
                   'pipeline/schedule.')
  tf.summary.scalar('pipeline/measured_bubble', bubble, step=step)


def ReadEvents(directory: str) -> dict[str, list[tuple[int, Any]]]:
  """tag -> [(step, value)] of every summary in directory's event files.

  Values are Python scalars for scalar and text summaries (text as bytes) and
  numpy arrays otherwise (an image is [width, height, png]), in file order.
  """
  events: dict[str, list[tuple[int, Any]]] = {}
  for name in sorted(os.listdir(directory)):
    if not name.startswith('events.'):
      continue
    for record in tf.data.TFRecordDataset(os.path.join(directory, name)):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        array = tf.make_ndarray(value.tensor)
        events.setdefault(value.tag, []).append(
            (event.step, array.item() if array.ndim == 0 else array))
  return events
