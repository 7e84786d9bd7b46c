"""Evaluation: a task's metrics over an eval split, once per checkpoint.

Invariant: a checkpoint is evaluated at most once per split, also across
evaluator restarts (DIR/eval_<split>/last_evaluated holds the last one), and
its metrics are written as summaries at the checkpoint's step under
DIR/eval_<split>, where TensorBoard shows them beside the training curves.
Every metric is averaged over the split by its weight; host-side decode
metrics (BLEU, sequence accuracy) come from the task's DecodeMetrics.
"""

from __future__ import annotations

import os
import time
from typing import Iterator, Optional

from absl import logging
import numpy as np
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core import checkpoint as checkpoint_lib
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core import summary

_MARKER = 'last_evaluated'


def Subdir(split: str) -> str:
  return f'eval_{split}'


class EvalProgram:
  """Evaluates `task` (its current weights) on one split of `params.input`."""

  def __init__(self, params: hyperparams.Params, logdir: str,
               task: base_layer.BaseLayer, split: Optional[str] = None):
    self.params = params
    self.task = task
    self.split = split or params.input.eval_split
    self.directory = os.path.join(logdir, Subdir(self.split))
    self.input = params.input.Instantiate()
    self.writer = tf.summary.create_file_writer(self.directory)
    # No autograph, as train_program's step: nothing to convert.
    self._eval_fn = tf.function(self._EvalStep, autograph=False)
    self._skipped: set[str] = set()

  def _EvalStep(self, batch):
    with base_layer.Context(training=False):
      metrics = self.task.FPropDefaultTheta(batch)
      decoded = self.task.Decode(self.task.theta, batch)
    return metrics, decoded

  def Evaluate(self, step: int) -> dict[str, float]:
    """Metrics of the current weights over the split; written at `step`."""
    start = time.time()
    max_batches = self.params.train.eval_max_batches
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    decode_metrics = self.task.CreateDecodeMetrics()
    if decode_metrics is not None:
      decode_metrics.UseInput(self.input)
    dataset = self.input.Dataset(self.split, training=False)
    for i, batch in enumerate(dataset):
      if max_batches and i >= max_batches:
        break
      metrics, decoded = self._eval_fn(batch)
      for name, (value, weight) in metrics.items():
        sums[name] = sums.get(name, 0.0) + float(value) * float(weight)
        weights[name] = weights.get(name, 0.0) + float(weight)
      if decode_metrics is not None and decoded is not None:
        decode_metrics.Update(tf.nest.map_structure(np.asarray, decoded))
    if not weights:
      raise hyperparams.ConfigError(f'Eval split {self.split!r} of {self.params.input.name} '
                                    'has no examples.')
    results = {name: sums[name] / weights[name] if weights[name] else 0.0
               for name in sums}
    if decode_metrics is not None:
      results.update(decode_metrics.Result())
    with self.writer.as_default():
      summary.Scalars(results, step)
    self.writer.flush()
    logging.info('Eval %s at step %d (%.1f s): %s', self.split, step,
                 time.time() - start, '  '.join(
                     f'{k} {v:.4f}' for k, v in sorted(results.items())))
    return results

  # --- watching a training run's checkpoints ----------------------------------

  def LastEvaluated(self) -> Optional[str]:
    """The last checkpoint evaluated (its name), or None.

    A marker that names no checkpoint (garbled) is ignored with a warning:
    evaluating a checkpoint again loses nothing.
    """
    marker = os.path.join(self.directory, _MARKER)
    try:
      with open(marker, encoding='utf-8') as f:
        name = f.read().strip()
    except FileNotFoundError:
      return None
    try:
      checkpoint_lib.StepOf(name)
    except ValueError:
      logging.warning('Ignoring %s: it holds %r, not a checkpoint name; '
                      'evaluating from the newest checkpoint.', marker,
                      name[:80])
      return None
    return name

  def MarkEvaluated(self, path: str) -> None:
    os.makedirs(self.directory, exist_ok=True)
    marker = os.path.join(self.directory, _MARKER)
    with open(marker + '.tmp', 'w', encoding='utf-8') as f:
      f.write(os.path.basename(path) + '\n')
    os.replace(marker + '.tmp', marker)

  def NewCheckpoints(self, logdir: str, timeout_secs: float,
                     poll_secs: float = 2.0) -> Iterator[str]:
    """Yields the newest checkpoint not yet evaluated, each time one appears.

    An evaluator slower than the trainer skips to the newest checkpoint, as
    older ones may already be deleted (max_checkpoints_to_keep). A
    checkpoint the caller could not read (deleted by the trainer after it
    was listed, or damaged) is passed to `Skip` and the next newest is
    yielded instead. Stops after the checkpoint at train.max_steps, or when
    no new one appears for timeout_secs.
    """
    directory = checkpoint_lib.Directory(logdir)
    last = self.LastEvaluated()
    last_step = checkpoint_lib.StepOf(last) if last else -1
    self._skipped = set()
    deadline = time.time() + timeout_secs
    while True:
      new = [p for p in checkpoint_lib.ListCheckpoints(directory)
             if checkpoint_lib.StepOf(p) > last_step and
             os.path.basename(p) not in self._skipped]
      if new:
        path = new[-1]
        yield path
        if os.path.basename(path) in self._skipped:
          continue
        last_step = checkpoint_lib.StepOf(path)
        if last_step >= self.params.train.max_steps:
          return
        deadline = time.time() + timeout_secs
        continue
      if time.time() > deadline:
        logging.info('No new checkpoint in %s for %.0f s; the evaluator stops.',
                     directory, timeout_secs)
        return
      time.sleep(poll_secs)

  def Skip(self, path: str, reason: Exception) -> None:
    """Passes over `path`, which could not be read; NewCheckpoints moves on."""
    logging.warning('Skipping %s, which could not be read (%s); evaluating '
                    'the next newest checkpoint instead.', path, reason)
    self._skipped.add(os.path.basename(path))
