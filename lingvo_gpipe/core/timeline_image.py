"""A pipeline timeline a person can read: a row per device, a box per task.

Invariant: a task's box spans exactly its [start, end) on the time axis, in
its device's row, in the task's color (`TaskColor`: forwards blue, backwards
orange, weight gradients green, later micro-batches darker); what no box
covers between 0 and the end of the last task is bubble grey. Around the
boxes: a title, row labels, a time axis with ticks, a legend, and each box's
micro-batch number where it fits. The planned schedule (in clocks) and a
measured step (in milliseconds) are drawn by this one function, so the two
pictures compare directly.

Text is drawn with Pillow's built-in font (Pillow comes with tensorboard
and is listed in requirements.txt for this module).
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from lingvo_gpipe.core.gpipe import schedule as schedule_lib

BUBBLE_RGB = (225, 225, 225)
BACKGROUND_RGB = (255, 255, 255)
_INK = (40, 40, 40)
MIN_WIDTH = 800
_LEFT, _RIGHT, _TOP = 86, 24, 30
_ROW, _ROW_GAP = 30, 4
_AXIS, _LEGEND = 38, 28
_LEGEND_NAMES = {schedule_lib.FORWARD: 'forward',
                 schedule_lib.BACKWARD: 'backward',
                 schedule_lib.INPUT_GRAD: 'input gradient',
                 schedule_lib.WEIGHT_GRAD: 'weight gradient'}


@dataclasses.dataclass(frozen=True)
class Box:
  """One task drawn from `start` to `end` in row `row` (a device)."""
  row: int
  start: float
  end: float
  task: schedule_lib.Task


def TaskColor(task: schedule_lib.Task,
              num_micro_batches: int) -> tuple[int, int, int]:
  """Forwards in blues, backwards in oranges (weight gradients apart in greens).

  The hue steps with the micro-batch.
  """
  shade = task.micro_batch / max(1, num_micro_batches - 1)
  base = {'F': 0.55, 'Bw': 0.25}.get(task.kind, 0.02)
  hue = base + (0.12 if task.kind == 'F' else 0.10) * shade
  r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95 - 0.3 * shade)
  return int(r * 255), int(g * 255), int(b * 255)


def MicroBatchMark(sched: schedule_lib.Schedule,
                   task: schedule_lib.Task) -> str:
  """A box's text: '3' (micro-batch 3); '3.1' in its device's second cell."""
  mark = str(task.micro_batch)
  if sched.num_devices < sched.num_cells:
    mark += f'.{task.cell // sched.num_devices}'
  return mark


def RowLabel(sched: schedule_lib.Schedule) -> str:
  """What a row is: a cell, or a device holding several (interleaved)."""
  return 'device' if sched.num_devices < sched.num_cells else 'cell'


def Geometry(num_rows: int, width: int) -> dict[str, int]:
  """Pixel layout: where the plot area starts and ends, and each row's top."""
  plot_bottom = _TOP + num_rows * (_ROW + _ROW_GAP)
  return dict(left=_LEFT, right=width - _RIGHT, top=_TOP,
              bottom=plot_bottom, height=plot_bottom + _AXIS + _LEGEND)


def RowTop(row: int) -> int:
  return _TOP + row * (_ROW + _ROW_GAP)


def XOf(t: float, span: float, width: int) -> int:
  """The pixel column of time `t` on an axis from 0 to `span`."""
  return _LEFT + int(round(t / span * (width - _LEFT - _RIGHT)))


def _Ticks(span: float, most: int = 12) -> list[float]:
  """Round tick values 0, s, 2s, ... <= span, with s in {1, 2, 5} x 10^k."""
  raw = span / most
  power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
  step = next(f * power for f in (1, 2, 5, 10) if f * power >= raw)
  return [i * step for i in range(int(span / step + 1e-9) + 1)]


def _Font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow without FreeType: the fixed bitmap font
    return ImageFont.load_default()


def _TextWidth(draw: ImageDraw.ImageDraw, text: str, font) -> int:
  left, _, right, _ = draw.textbbox((0, 0), text, font=font)
  return right - left


def Draw(boxes: Sequence[Box], num_rows: int, num_micro_batches: int,
         title: str, row_label: str, axis_label: str,
         mark: Callable[[schedule_lib.Task], str],
         span: Optional[float] = None,
         min_box_width: int = 24,
         width: Optional[int] = None) -> np.ndarray:
  """An RGB uint8 picture [H, W, 3] of `boxes` (module docstring).

  Args:
    boxes: the tasks and their times, in any unit.
    num_rows: rows (devices), labelled '{row_label} 0' and so on.
    num_micro_batches: M, for the colors.
    title: the line above the picture.
    row_label: what a row is ('cell', 'device', 'worker').
    axis_label: what the time axis counts ('clock', 'ms').
    mark: the text in a task's box (e.g. its micro-batch number).
    span: the time the axis ends at; default the end of the last box.
    min_box_width: the picture widens (beyond MIN_WIDTH) until a box of the
      shortest duration is this wide.
    width: instead, this many pixels (at least MIN_WIDTH), e.g. for
      measured times, whose shortest task may be a few microseconds.
  """
  span = span or max([b.end for b in boxes] + [1e-9])
  shortest = min([b.end - b.start for b in boxes if b.end > b.start] + [span])
  width = max(MIN_WIDTH, width or _LEFT + _RIGHT +
              int(math.ceil(min_box_width * span / shortest)))
  geometry = Geometry(num_rows, width)
  image = Image.new('RGB', (width, geometry['height']), BACKGROUND_RGB)
  draw = ImageDraw.Draw(image)
  font, small = _Font(13), _Font(11)
  draw.text((4, 8), title, fill=_INK, font=font)
  end_x = XOf(span, span, width)
  for row in range(num_rows):
    top = RowTop(row)
    draw.text((4, top + _ROW // 2 - 7), f'{row_label} {row}', fill=_INK,
              font=font)
    draw.rectangle([_LEFT, top, end_x - 1, top + _ROW - 1], fill=BUBBLE_RGB)
  for box in boxes:
    top = RowTop(box.row)
    # Pixels x0 .. x1-1, a white seam before each box; at least one pixel
    # however short the task.
    x0 = XOf(box.start, span, width) + 1
    x1 = max(x0 + 1, XOf(box.end, span, width))
    color = TaskColor(box.task, num_micro_batches)
    draw.rectangle([x0, top, x1 - 1, top + _ROW - 1], fill=color)
    text = mark(box.task)
    if _TextWidth(draw, text, small) + 4 <= x1 - x0:
      light = sum(color) / 3 > 140
      draw.text(((x0 + x1) / 2, top + _ROW / 2), text, anchor='mm',
                fill=(0, 0, 0) if light else (255, 255, 255), font=small)
  # The time axis.
  axis_y = geometry['bottom'] + 2
  draw.line([_LEFT, axis_y, end_x, axis_y], fill=_INK)
  for tick in _Ticks(span):
    x = XOf(tick, span, width)
    draw.line([x, axis_y, x, axis_y + 4], fill=_INK)
    label = f'{tick:g}'
    draw.text((x, axis_y + 6), label, anchor='mt', fill=_INK, font=small)
  draw.text((4, axis_y + 6), axis_label, fill=_INK, font=small)
  # The legend: the kinds drawn, then bubble.
  x, legend_y = _LEFT, geometry['bottom'] + _AXIS
  kinds = [k for k in schedule_lib.KINDS if any(b.task.kind == k for b in boxes)]
  entries = [(TaskColor(schedule_lib.Task(k, 0, 0), num_micro_batches),
              f'{k} {_LEGEND_NAMES[k]}') for k in kinds]
  entries.append((BUBBLE_RGB, 'bubble (idle)'))
  for color, name in entries:
    draw.rectangle([x, legend_y, x + 13, legend_y + 13], fill=color)
    draw.text((x + 18, legend_y), name, fill=_INK, font=small)
    x += 18 + _TextWidth(draw, name, small) + 18
  draw.text((x, legend_y), 'darker: later micro-batch', fill=_INK, font=small)
  return np.asarray(image, dtype=np.uint8)
