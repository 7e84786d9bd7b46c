"""Tests of the summaries: the schedule as grid, text and image, and the events written."""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import summary
from lingvo_gpipe.core import timeline_image
from lingvo_gpipe.core.gpipe import schedule as schedule_lib

_KM = [(1, 1), (1, 4), (2, 1), (2, 3), (4, 8), (3, 12)]
_BUBBLE = timeline_image.BUBBLE_RGB


def _Events(logdir):
  """All summary values under `logdir`: a list of (tag, step, value proto)."""
  files = glob.glob(os.path.join(str(logdir), 'events.out.tfevents.*'))
  assert files, f'no event file in {logdir}'
  out = []
  for path in files:
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        out.append((value.tag, event.step, value))
  return out


def _ScalarValues(events):
  return {(tag, step): float(tf.make_ndarray(value.tensor))
          for tag, step, value in events}


def _Write(logdir, fn):
  writer = tf.summary.create_file_writer(str(logdir))
  with writer.as_default():
    fn()
  writer.close()
  return _Events(logdir)


@pytest.mark.parametrize('k,m', _KM)
def test_schedule_grid_shape_tasks_and_bubbles(k, m):
  grid = summary.ScheduleGrid(schedule_lib.FillDrain(k, m))
  n = m + k - 1
  assert len(grid) == k
  assert all(len(row) == 2 * n for row in grid)
  for cell, row in enumerate(grid):
    tasks = [t for t in row if t is not None]
    assert len(tasks) == 2 * m
    assert row.count(None) == 2 * (k - 1)
    assert all(t.cell == cell for t in tasks)
    for mb in range(m):
      # Forward of micro-batch mb at clock cell + mb; backward mirrored.
      assert row[cell + mb] == schedule_lib.Task('F', cell, mb)
      assert row[2 * n - 1 - cell - mb] == schedule_lib.Task('B', cell, mb)


def test_schedule_grid_small_case_exactly():
  grid = summary.ScheduleGrid(schedule_lib.FillDrain(2, 2))
  marks = [[t.kind + str(t.micro_batch) if t else '.' for t in row]
           for row in grid]
  assert marks == [['F0', 'F1', '.', '.', 'B1', 'B0'],
                   ['.', 'F0', 'F1', 'B1', 'B0', '.']]


@pytest.mark.parametrize('k,m', _KM)
def test_schedule_text_lists_marks_and_bubble_fraction(k, m):
  text = summary.ScheduleText(schedule_lib.FillDrain(k, m))
  lines = text.split('\n')
  n = m + k - 1
  assert len(lines) == k + 2  # header, a row per cell, legend
  assert lines[0].split() == ['cell'] + [str(t) for t in range(2 * n)]
  for cell in range(k):
    tokens = lines[1 + cell].split()
    assert tokens[0] == str(cell)
    marks = tokens[1:]
    assert len(marks) == 2 * n
    assert marks.count('.') == 2 * (k - 1)
    assert sorted(x for x in marks if x != '.') == sorted(
        [f'F{i}' for i in range(m)] + [f'B{i}' for i in range(m)])
    for mb in range(m):
      assert marks[cell + mb] == f'F{mb}'
  legend = lines[-1]
  assert f'K={k} cells, M={m} micro-batches, fill_drain' in legend
  assert f'bubble fraction {(k - 1) / n:.1%}' in legend


def test_schedule_text_exact_small_case():
  assert summary.ScheduleText(schedule_lib.FillDrain(2, 2)) == '\n'.join([
      'cell   0  1  2  3  4  5',
      '   0  F0 F1  .  . B1 B0',
      '   1   . F0 F1 B1 B0  .',
      'K=2 cells, M=2 micro-batches, fill_drain: "." is a bubble; bubble '
      'fraction 33.3%'])


def test_schedule_text_columns_stay_apart_with_many_micro_batches():
  text = summary.ScheduleText(schedule_lib.FillDrain(2, 120))
  row = text.split('\n')[1].split()
  assert row[1:4] == ['F0', 'F1', 'F2'] and 'F119' in row and 'B119' in row
  assert len(row) == 1 + 2 * 121


def _BoxPixels(image, sched, row, clock):
  """The pixels of the box at (row, clock), inside its seams, as [N, 3]."""
  span = len(summary.ScheduleGrid(sched)[0])
  width = image.shape[1]
  x0 = timeline_image.XOf(clock, span, width) + 1
  x1 = timeline_image.XOf(clock + 1, span, width) - 1
  top = timeline_image.RowTop(row)
  return image[top:top + 30, x0:x1].reshape(-1, 3)


@pytest.mark.parametrize('sched', [
    schedule_lib.FillDrain(1, 1), schedule_lib.FillDrain(2, 3),
    schedule_lib.FillDrain(4, 8), schedule_lib.FillDrain(3, 12),
    schedule_lib.ZeroBubbleH1(3, 4),
    schedule_lib.Interleaved1F1B(4, 4, num_devices=2)],
                         ids=lambda s: f'{s.name}-{s.num_cells}-'
                         f'{s.num_micro_batches}')
def test_schedule_image_is_readable_and_true_to_the_timeline(sched):
  image = summary.ScheduleImage(sched)
  assert image.dtype == np.uint8 and image.shape[2] == 3
  assert image.shape[1] >= 800  # wide enough to read
  grid = summary.ScheduleGrid(sched)
  m = sched.num_micro_batches
  for row, tasks in enumerate(grid):
    for clock, task in enumerate(tasks):
      pixels = _BoxPixels(image, sched, row, clock)
      colors, counts = np.unique(pixels, axis=0, return_counts=True)
      main = tuple(int(c) for c in colors[np.argmax(counts)])
      if task is None:
        assert main == _BUBBLE and len(colors) == 1, (row, clock)
      else:
        # The task's color, and its micro-batch number written in it.
        assert main == timeline_image.TaskColor(task, m), (row, clock, task)
        assert len(colors) > 1, (row, clock, task)
  # Every kind drawn is in the legend, below the axis, with bubble grey.
  legend = image[timeline_image.Geometry(len(grid), image.shape[1])[
      'bottom'] + 30:].reshape(-1, 3)
  kinds = {t.kind for row in grid for t in row if t}
  for color in [timeline_image.TaskColor(schedule_lib.Task(k, 0, 0), m)
                for k in kinds] + [_BUBBLE]:
    assert np.any(np.all(legend == color, axis=-1)), color
  # Row labels and the title are drawn in ink on the left and at the top.
  assert np.any(image[:, :80].sum(axis=-1) < 300)
  assert np.any(image[:20].sum(axis=-1) < 300)


def test_a_long_schedule_widens_the_picture_to_keep_boxes_readable():
  sched = schedule_lib.FillDrain(2, 120)
  image = summary.ScheduleImage(sched)
  clocks = len(summary.ScheduleGrid(sched)[0])
  assert (image.shape[1] - 86 - 24) / clocks >= 24


def test_task_colors_differ_by_kind_and_micro_batch():
  m = 4
  colors = {(kind, mb): timeline_image.TaskColor(schedule_lib.Task(kind, 0, mb), m)
            for kind in 'FB' for mb in range(m)}
  assert len(set(colors.values())) == 2 * m
  for color in colors.values():
    assert all(isinstance(c, int) and 0 <= c <= 255 for c in color)
    assert color != _BUBBLE
  # The cell does not change the color.
  assert timeline_image.TaskColor(schedule_lib.Task('F', 3, 1), m) == colors['F', 1]
  # A single micro-batch is well defined (no division by zero).
  assert timeline_image.TaskColor(schedule_lib.Task('B', 0, 0), 1) == colors['B', 0]


def test_scalars_written_with_steps_and_values(tmp_path):

  def Write():
    summary.Scalars({'loss': 2.5, 'accuracy': None, 'lr': np.float32(0.125)},
                    step=7)
    summary.Scalars({'loss': tf.constant(1.25)}, step=8)

  events = _ScalarValues(_Write(tmp_path, Write))
  assert events == {('loss', 7): 2.5, ('lr', 7): 0.125, ('loss', 8): 1.25}


def test_text_is_fenced_verbatim(tmp_path):
  text = 'line 1\n  * not a list\n# not a heading'
  events = _Write(tmp_path, lambda: summary.Text('notes/params', text, 3))
  assert len(events) == 1
  tag, step, value = events[0]
  assert (tag, step) == ('notes/params', 3)
  assert value.metadata.plugin_data.plugin_name == 'text'
  written = tf.make_ndarray(value.tensor).item().decode()
  assert written == '```\n' + text + '\n```'


def test_schedule_writes_image_and_text(tmp_path):
  sched = schedule_lib.FillDrain(3, 4)
  events = _Write(tmp_path, lambda: summary.Schedule(sched, 5))
  by_plugin = {v.metadata.plugin_data.plugin_name: (tag, step, v)
               for tag, step, v in events}
  assert len(events) == 2 and set(by_plugin) == {'images', 'text'}
  # Distinct tags: TensorBoard keeps one plugin per (run, tag).
  assert {(tag, step) for tag, step, _ in events} == {
      ('pipeline/schedule', 5), ('pipeline/schedule_table', 5)}
  assert by_plugin['images'][0] == 'pipeline/schedule'

  _, _, image_value = by_plugin['images']
  width, height, png = tf.make_ndarray(image_value.tensor)
  expected = summary.ScheduleImage(sched)
  assert (int(height), int(width)) == expected.shape[:2]
  np.testing.assert_array_equal(tf.io.decode_png(png).numpy(), expected)

  _, _, text_value = by_plugin['text']
  written = tf.make_ndarray(text_value.tensor).item().decode()
  assert written == '```\n' + summary.ScheduleText(sched) + '\n```'



def test_read_events_reads_back_what_was_written(tmp_path):
  sched = schedule_lib.FillDrain(2, 3)

  def Write():
    summary.Scalars({'loss': 0.5, 'rate': 2.0}, 1)
    summary.Scalars({'loss': 0.25}, 2)
    summary.Text('params', 'a : 1', 2)
    summary.Schedule(sched, 2)

  _Write(tmp_path, Write)
  events = summary.ReadEvents(str(tmp_path))
  assert events['loss'] == [(1, 0.5), (2, 0.25)]
  assert events['rate'] == [(1, 2.0)]
  assert events['params'] == [(2, b'```\na : 1\n```')]
  step, (width, height, png) = events['pipeline/schedule'][0]
  assert step == 2
  np.testing.assert_array_equal(tf.io.decode_png(png).numpy(),
                                summary.ScheduleImage(sched))


def test_a_split_backward_is_drawn_task_by_task():
  sched = schedule_lib.FillDrain(2, 2, split_backward=True)
  text = summary.ScheduleText(sched)
  for mark in ('Bx1', 'Bw1', 'Bx0', 'Bw0'):
    assert text.count(mark) == 2, text  # once per cell
  bx, bw = (timeline_image.TaskColor(schedule_lib.Task(kind, 0, 0), 2)
            for kind in ('Bx', 'Bw'))
  assert bx != bw
