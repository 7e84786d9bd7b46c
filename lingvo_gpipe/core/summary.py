"""TensorBoard summaries: scalars, texts, and the pipeline schedule as a picture.

Invariant: every function here writes to the default `tf.summary` writer at an
explicit step, so the trainer decides where (DIR/train, DIR/eval_<split>) and
when; nothing here runs inside the traced training step. `ReadEvents` reads
them back, for tools, benchmarks and tests.
"""

from __future__ import annotations

import colorsys
import os
from typing import Any, Mapping, Optional

import numpy as np
import tensorflow as tf

from lingvo_gpipe.core.gpipe import schedule as schedule_lib

# Pixels per clock cell of the schedule picture, and the gap between cells.
_BOX = 24
_GAP = 2
_BUBBLE_RGB = (235, 235, 235)
_BACKGROUND_RGB = (255, 255, 255)


def Scalars(values: Mapping[str, float], step: int) -> None:
  """One scalar summary per name; None values are skipped."""
  for name, value in values.items():
    if value is not None:
      tf.summary.scalar(name, float(value), step=step)


def Text(name: str, text: str, step: int) -> None:
  """A text summary shown verbatim (TensorBoard renders markdown; we fence it)."""
  tf.summary.text(name, '```\n' + text + '\n```', step=step)


def ScheduleGrid(sched: schedule_lib.Schedule) -> list[list[Optional[schedule_lib.Task]]]:
  """grid[cell][clock]: the task cell runs at that clock, or None (a bubble)."""
  clocks = sched.Clocks()
  grid = [[None] * len(clocks) for _ in range(sched.num_cells)]
  for t, tasks in enumerate(clocks):
    for task in tasks:
      grid[task.cell][t] = task
  return grid


def ScheduleText(sched: schedule_lib.Schedule) -> str:
  """The schedule as a table: a row per cell, F3/B3 = forward/backward of micro-batch 3."""
  grid = ScheduleGrid(sched)
  kind = max(len(t.kind) for row in grid for t in row if t)
  width = max(3, kind + len(str(sched.num_micro_batches - 1)) + 1)
  header = 'cell ' + ''.join(f'{t:>{width}}' for t in range(len(grid[0])))
  rows = [header]
  for cell, row in enumerate(grid):
    marks = ''.join(
        f'{(task.kind + str(task.micro_batch)) if task else ".":>{width}}'
        for task in row)
    rows.append(f'{cell:>4} {marks}')
  bubble = sched.TheoreticalBubble()
  rows.append(f'K={sched.num_cells} cells, M={sched.num_micro_batches} '
              f'micro-batches, {sched.name}: "." is a bubble; bubble fraction '
              f'{bubble:.1%}')
  return '\n'.join(rows)


def TaskColor(task: schedule_lib.Task, num_micro_batches: int) -> tuple[int, int, int]:
  """Forwards in blues, backwards in oranges (weight gradients apart in greens).

  The hue steps with the micro-batch.
  """
  shade = task.micro_batch / max(1, num_micro_batches - 1)
  base = {'F': 0.55, 'Bw': 0.25}.get(task.kind, 0.02)
  hue = base + (0.12 if task.kind == 'F' else 0.10) * shade
  r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95 - 0.3 * shade)
  return int(r * 255), int(g * 255), int(b * 255)


def ScheduleImage(sched: schedule_lib.Schedule) -> np.ndarray:
  """An RGB uint8 picture [H, W, 3]: a row per cell, a column per clock.

  Each box is a task (forward blue, backward orange, darker for later
  micro-batches); light grey boxes are bubbles, where a cell waits.
  """
  grid = ScheduleGrid(sched)
  rows, cols = len(grid), len(grid[0])
  pitch = _BOX + _GAP
  image = np.empty((rows * pitch + _GAP, cols * pitch + _GAP, 3), np.uint8)
  image[:] = _BACKGROUND_RGB
  for cell, row in enumerate(grid):
    for clock, task in enumerate(row):
      color = (_BUBBLE_RGB if task is None else
               TaskColor(task, sched.num_micro_batches))
      top, left = _GAP + cell * pitch, _GAP + clock * pitch
      image[top:top + _BOX, left:left + _BOX] = color
  return image


def Schedule(sched: schedule_lib.Schedule, step: int) -> None:
  """The schedule as an image ('pipeline/schedule') and a table ('pipeline/schedule_table').

  Distinct tags: TensorBoard keeps one plugin per (run, tag) and would drop
  one of the two.
  """
  tf.summary.image('pipeline/schedule', ScheduleImage(sched)[np.newaxis],
                   step=step,
                   description=f'{sched.name}: rows are cells, columns clocks; '
                   'blue forward, orange backward, green weight gradients when '
                   'split from the backward (darker: later micro-batch), '
                   'grey: bubble.')
  Text('pipeline/schedule_table', ScheduleText(sched), step)


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
