"""What the benchmarks share: the Dense stack, its training step, machine facts, result files.

Invariant: every benchmark times the same training step, the one users write
and `lingvo_gpipe/tools/step_memory.py` measures: forward and backward with a
plain `tf.GradientTape` around the model inside one `tf.function`, loss = mean
of squares, gradients for every trainable variable. The plain step runs the
cells in sequence under that tape (`cell.FProp(theta, y)` for each cell), so
plain and pipelined steps differ only in the pipeline.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Callable, Optional, Sequence

import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe import pipelining_layer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, 'bench', 'results')
PROC_STAT = '/proc/stat'


def BuildPipeline(layers: list, num_partitions: int, num_micro_batches: int,
                  recompute: str,
                  devices: Optional[Sequence[str]] = None,
                  **fields):
  """An instantiated PipeliningLayer over `layers`; `fields` set others."""
  p = pipelining_layer.PipeliningLayer.Params().Set(
      name='stack', layers=layers, num_partitions=num_partitions,
      num_micro_batches=num_micro_batches, recompute=recompute,
      devices=list(devices) if devices else ['/device:CPU:0'], **fields)
  return p.Instantiate()


def TrainStep(model, plain: bool,
              loss_fn: Optional[Callable] = None
              ) -> Callable[[tf.Tensor], tf.Tensor]:
  """A traced training step of `model`; returns (loss, sum of all gradients).

  Args:
    model: a PipeliningLayer.
    plain: run its cells in sequence under the caller's tape instead of
      through the pipeline.
    loss_fn: the scalar loss of the model's output; default mean(y²).
  """
  variables = model.trainable_variables
  # The loss in float32 whatever the layers compute in (core/precision.py).
  loss_fn = loss_fn or (lambda y: tf.reduce_mean(tf.square(
      tf.cast(y, tf.float32))))

  @tf.function
  def Step(x):
    with base_layer.Context(training=True):
      with tf.GradientTape() as tape:
        if plain:
          y = x
          for k, cell in enumerate(model.cells):
            y = cell.FProp(model.CellTheta(model.theta, k), y)
        else:
          y = model.FPropDefaultTheta(x)
        loss = loss_fn(y)
      grads = tape.gradient(loss, variables)
    # One scalar that depends on every gradient, so none is pruned.
    return loss, tf.add_n([tf.reduce_sum(g) for g in grads])

  return Step


def RunOnce(step: Callable, x: tf.Tensor) -> tuple[float, float]:
  """(wall, CPU) seconds of one call of `step`, results fetched to the host.

  CPU time is summed over all of this process's threads. Other processes on
  the machine stretch wall time but barely change CPU time, so on a shared
  machine CPU-time ratios are the steadier measure of extra work.
  """
  wall, cpu = time.perf_counter(), time.process_time()
  tf.nest.map_structure(lambda t: t.numpy(), step(x))
  return time.perf_counter() - wall, time.process_time() - cpu


def Spread(values: Sequence[float]) -> tuple[float, float, float]:
  """(median, min, max)."""
  return statistics.median(values), min(values), max(values)


def MachineFacts() -> dict:
  """Facts a reader needs to compare numbers across runs."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          cpu = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  return {
      'date': datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z'),
      'nproc': os.cpu_count(),
      'cpu': cpu,
      'tensorflow': tf.__version__,
      'python': platform.python_version(),
      'load average at start (1, 5, 15 min)': LoadAverage(),
  }


def LoadAverage() -> str:
  """The 1, 5 and 15 minute load averages: how busy other processes kept the cores."""
  try:
    return ', '.join(f'{l:.2f}' for l in os.getloadavg())
  except OSError:
    return 'unknown'


class StolenCpu:
  """Share of CPU time the hypervisor gave to other guests since Reset().

  On a shared virtual machine (here, /proc/stat's steal column) other guests
  can take a quarter of the cores for minutes at a time. That stretches a
  pipeline that needs both cores more than a one-core baseline, so a speed-up
  measured meanwhile says little; benchmarks report it next to their figures.
  """

  def __init__(self):
    self.Reset()

  def Reset(self) -> None:
    self._start = _CpuCounters()

  def Fraction(self) -> Optional[float]:
    """Stolen over all CPU time since Reset(); None where /proc/stat is not."""
    end = _CpuCounters()
    if self._start is None or end is None or end[1] <= self._start[1]:
      return None
    return (end[0] - self._start[0]) / (end[1] - self._start[1])

  def Text(self) -> str:
    fraction = self.Fraction()
    return 'unknown' if fraction is None else f'{100 * fraction:.0f}%'


def _CpuCounters() -> Optional[tuple[int, int]]:
  """(steal, total) jiffies over all CPUs, from /proc/stat's first line."""
  try:
    with open(PROC_STAT) as f:
      fields = [int(v) for v in f.readline().split()[1:9]]
  except (OSError, ValueError):
    return None
  if len(fields) < 8:
    return None
  return fields[7], sum(fields)


def MarkdownTable(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def WriteResults(file_name: str, title: str, command: str, facts: dict,
                 config: dict, body: str) -> str:
  """Writes bench/results/<file_name>: title, command, facts, config, body."""
  os.makedirs(RESULTS_DIR, exist_ok=True)
  path = os.path.join(RESULTS_DIR, file_name)
  lines = [f'# {title}', '', f'Command: `{command}`', '', '## Machine', '']
  lines += [f'- {k}: {v}' for k, v in facts.items()]
  lines += ['', '## Configuration', '']
  lines += [f'- {k}: {v}' for k, v in config.items()]
  lines += ['', '## Results', '', body.rstrip(), '']
  with open(path, 'w') as f:
    f.write('\n'.join(lines))
  return path
