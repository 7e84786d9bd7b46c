"""The schedule as it ran: when each task started and ended, from a profiler trace.

Invariant: a task's measured interval is [first start, last end] of the ops
the executor built for it, as TensorFlow's profiler recorded them in this
process, and nothing else. The executor names every task's ops under
`TaskScope(task)` ('task_F_c1_m3/...'); the weight-gradient ops of a 'Bw'
that runs after its 'Bx' are built under the 'Bx' scope (one gradient
computation), so the executor records their names here (`NameDelayed`) and
they count for the 'Bw'. The measured bubble is the share of the devices'
time, from the first task's start to the last one's end, in which no task
of theirs ran.

Cells on remote TensorFlow workers run in the workers' processes: given
their hosts, `Profiled` also asks each worker's server (its gRPC port serves
TensorFlow's profiler) to trace itself for a window of time, and places every
op at its profile's start time plus its offset, so processes on one machine
share a clock (on several machines, as well as their clocks agree).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import re
import tempfile
import threading
import time
from typing import Iterator, Optional, Sequence

import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from lingvo_gpipe.core import timeline_image
from lingvo_gpipe.core.gpipe import schedule as schedule_lib

# The scope, maybe uniquified by TensorFlow ('task_F_c0_m0_1').
_SCOPE = re.compile(r'(?:^|/)task_(F|B|Bx|Bw)_c(\d+)_m(\d+)(?:_\d+)?/')

# Op name -> the 'Bw' task it belongs to, for weight-gradient ops built under
# their 'Bx' scope (executor.py fills it while it builds a step).
_DELAYED: dict[str, schedule_lib.Task] = {}


def TaskScope(task: schedule_lib.Task) -> str:
  """The name scope of a task's ops."""
  return f'task_{task.kind}_c{task.cell}_m{task.micro_batch}'


def NameDelayed(op_names: Sequence[str], task: schedule_lib.Task) -> None:
  """Records that the ops `op_names` compute the delayed 'Bw' `task`."""
  for name in op_names:
    _DELAYED[name] = task


def TaskOf(op_name: str) -> Optional[schedule_lib.Task]:
  """The task an op belongs to, from its name; None for ops outside tasks."""
  delayed = _DELAYED.get(op_name)
  if delayed is not None:
    return delayed
  match = _SCOPE.search(op_name)
  if match is None:
    return None
  kind, cell, micro_batch = match.groups()
  return schedule_lib.Task(kind, int(cell), int(micro_batch))


@dataclasses.dataclass
class Trace:
  """(op name, start ns, end ns) of every op the profiler saw run."""
  ops: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)


# How long a worker's trace takes to start after it is asked for.
_REMOTE_START_SECONDS = 0.5


@contextlib.contextmanager
def Profiled(worker_hosts: Sequence[str] = (),
             window_seconds: float = 0.0) -> Iterator[Trace]:
  """Profiles the block; the yielded Trace is filled when it exits.

  Args:
    worker_hosts: host:port of TensorFlow workers to profile too. Each traces
      itself for `window_seconds` from just before the block starts, so the
      block must end within it; leaving the block waits for the window.
    window_seconds: the workers' trace window.
  """
  trace = Trace()
  with tempfile.TemporaryDirectory() as logdir:
    remote = None
    if worker_hosts:
      remote = threading.Thread(
          target=tf.profiler.experimental.client.trace,
          args=(','.join(f'grpc://{h}' for h in worker_hosts),
                os.path.join(logdir, 'workers'), int(window_seconds * 1000)),
          kwargs=dict(num_tracing_attempts=1), daemon=True)
      remote.start()
      time.sleep(_REMOTE_START_SECONDS)
    tf.profiler.experimental.start(os.path.join(logdir, 'here'))
    try:
      yield trace
    finally:
      tf.profiler.experimental.stop()
      if remote is not None:
        remote.join()
    for path in glob.glob(os.path.join(logdir, '**', '*.xplane.pb'),
                          recursive=True):
      trace.ops.extend(_Ops(path))


def _Ops(path: str) -> list[tuple[str, int, int]]:
  """TensorFlow op events of one profile file: 'name:type' -> name, with
  start and end in ns since the epoch."""
  space = xplane_pb2.XSpace()
  with open(path, 'rb') as f:
    space.ParseFromString(f.read())
  origin = 0  # line times count from the profile's start
  for plane in space.planes:
    stats = plane.stat_metadata
    for stat in plane.stats:
      if stats[stat.metadata_id].name == 'profile_start_time':
        origin = stat.int64_value or stat.uint64_value
  ops = []
  for plane in space.planes:
    names = plane.event_metadata
    for line in plane.lines:
      for event in line.events:
        name = names[event.metadata_id].name
        if ':' not in name:
          continue
        start = origin + line.timestamp_ns + event.offset_ps // 1000
        ops.append((name.split(':', 1)[0], start,
                    start + event.duration_ps // 1000))
  return ops


def TaskTimes(trace: Trace) -> dict[schedule_lib.Task, tuple[int, int]]:
  """Each task's (first start, last end) in ns, from its ops in `trace`."""
  times: dict[schedule_lib.Task, tuple[int, int]] = {}
  for name, start, end in trace.ops:
    task = TaskOf(name)
    if task is None:
      continue
    first, last = times.get(task, (start, end))
    times[task] = (min(first, start), max(last, end))
  return times


def Boxes(times: dict[schedule_lib.Task, tuple[int, int]],
          sched: schedule_lib.Schedule) -> list[timeline_image.Box]:
  """The tasks as boxes in milliseconds from the first start, a row per device."""
  if not times:
    return []
  origin = min(start for start, _ in times.values())
  return [timeline_image.Box(sched.Device(task.cell), (start - origin) / 1e6,
                             (end - origin) / 1e6, task)
          for task, (start, end) in sorted(times.items(),
                                           key=lambda item: item[1])]


def Bubble(boxes: Sequence[timeline_image.Box], num_devices: int) -> float:
  """The idle share of the devices' time between the first start and last end.

  A device's busy time is the union of its tasks' intervals (tasks of one
  device may overlap, e.g. a 'Bw' running beside the next forward).
  """
  if not boxes:
    return 0.0
  span = max(b.end for b in boxes) - min(b.start for b in boxes)
  busy = 0.0
  for device in range(num_devices):
    intervals = sorted((b.start, b.end) for b in boxes if b.row == device)
    end = None
    for start, stop in intervals:
      if end is None or start > end:
        busy += stop - start
        end = stop
      elif stop > end:
        busy += stop - end
        end = stop
  return 1.0 - busy / (num_devices * span) if span > 0 else 0.0


def Image(boxes: Sequence[timeline_image.Box], sched: schedule_lib.Schedule,
          bubble: float):
  """The measured timeline as a picture, titled with its bubble."""
  seen = sorted({b.row for b in boxes})
  missing = ('' if len(seen) == sched.num_devices else
             f'; devices seen: {seen} (no trace of the others)')
  title = (f'{sched.name} measured: K={sched.num_cells} cells, M='
           f'{sched.num_micro_batches}; bubble {bubble:.1%}{missing}')

  return timeline_image.Draw(
      boxes, sched.num_devices, sched.num_micro_batches, title,
      timeline_image.RowLabel(sched), 'ms',
      lambda task: timeline_image.MicroBatchMark(sched, task), width=1000)
