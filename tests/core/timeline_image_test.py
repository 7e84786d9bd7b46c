"""The timeline picture: every task visible, however short; the width rules."""

import numpy as np

from lingvo_gpipe.core import timeline_image
from lingvo_gpipe.core.gpipe import schedule as schedule_lib

Task = schedule_lib.Task


def test_a_task_of_no_duration_still_gets_a_pixel_of_its_color():
  # Measured steps have ops of a few microseconds in steps of many ms (a
  # trainer once crashed drawing one); every box is at least a pixel wide.
  boxes = [timeline_image.Box(0, 0.0, 100.0, Task('F', 0, 0)),
           timeline_image.Box(1, 50.0, 50.0, Task('B', 1, 1)),
           timeline_image.Box(1, 60.0, 60.0001, Task('Bw', 1, 0)),
           timeline_image.Box(0, 99.9999, 100.0, Task('Bx', 0, 1))]
  image = timeline_image.Draw(boxes, 2, 2, 'title', 'cell', 'ms',
                              lambda t: str(t.micro_batch), width=1000)
  assert image.shape[1] == 1000
  for box in boxes:
    top = timeline_image.RowTop(box.row)
    x = timeline_image.XOf(box.start, 100.0, 1000) + 1
    color = timeline_image.TaskColor(box.task, 2)
    assert tuple(image[top + 2, x]) == color, box


def test_the_width_grows_until_the_shortest_task_is_readable():
  boxes = [timeline_image.Box(0, float(i), i + 1.0, Task('F', 0, i % 4))
           for i in range(100)]
  image = timeline_image.Draw(boxes, 1, 4, 't', 'cell', 'clock', str)
  assert (image.shape[1] - 86 - 24) / 100 >= 24
  small = timeline_image.Draw(boxes[:3], 1, 4, 't', 'cell', 'clock', str)
  assert small.shape[1] == timeline_image.MIN_WIDTH
  assert np.all(small[0, 0] == 255)  # a white background
