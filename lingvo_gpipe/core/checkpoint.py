"""Checkpoints of a training run: written atomically, kept N deep, restored exactly.

Invariant: a checkpoint holds everything a step depends on: the global step,
the model's variables (BatchNorm moving averages included), the optimizer's
slots and update count, and, when asked, the input iterator's position. A
run resumed from it takes the same next step as the run that wrote it.

Atomicity is TensorFlow's: a checkpoint's files are written under temporary
names and renamed when complete, and the `checkpoint` index that names the
latest one is replaced in one rename after that. A process killed mid-save
leaves the previous checkpoints and the index intact.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from absl import logging
import tensorflow as tf

CHECKPOINT_SUBDIR = 'checkpoints'
CHECKPOINT_PREFIX = 'ckpt'


class CheckpointMismatchError(ValueError):
  """A checkpoint whose variables do not fit the model being restored into."""


def Directory(logdir: str) -> str:
  """Where a run in `logdir` keeps its checkpoints."""
  return os.path.join(logdir, CHECKPOINT_SUBDIR)


def StepOf(path: str) -> int:
  """The global step a checkpoint was saved at, from its name ('.../ckpt-120')."""
  return int(path.rsplit('-', 1)[-1])


class Checkpointer:
  """Saves and restores `objects` (name -> trackable) under `logdir`."""

  def __init__(self, logdir: str, objects: Mapping[str, Any],
               max_to_keep: int = 5):
    self.directory = Directory(logdir)
    self._checkpoint = tf.train.Checkpoint(**objects)
    self._manager = tf.train.CheckpointManager(
        self._checkpoint, self.directory, max_to_keep=max_to_keep,
        checkpoint_name=CHECKPOINT_PREFIX)

  @property
  def latest(self) -> Optional[str]:
    return self._manager.latest_checkpoint

  def Save(self, step: int) -> str:
    path = self._manager.save(checkpoint_number=step)
    logging.info('Saved checkpoint %s', path)
    return path

  def Restore(self, path: Optional[str] = None, partial: bool = False) -> Optional[str]:
    """Restores `path` (default: the latest); returns it, or None if there is none.

    Args:
      path: a checkpoint prefix; None: the latest in the directory.
      partial: restore only the objects this Checkpointer holds (an
        evaluator holds the model, not the optimizer or the input).

    Raises:
      CheckpointMismatchError: if the checkpoint lacks one of this model's
        variables or has one of a different shape: usually a --logdir
        reused for a different model or different overrides.
    """
    path = path or self.latest
    if path is None:
      return None
    try:
      status = self._checkpoint.restore(path)
      if partial:
        status.expect_partial()
        status.assert_existing_objects_matched()
      else:
        status.assert_consumed()
    except (AssertionError, ValueError, tf.errors.InvalidArgumentError) as e:
      raise CheckpointMismatchError(
          f'Checkpoint {path} does not match this model: {_FirstLine(e)} '
          'Was this logdir written by another model or other overrides? Use a '
          'new --logdir, or the params.txt saved in this one.') from e
    logging.info('Restored checkpoint %s', path)
    return path


def _FirstLine(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else type(error).__name__)[:500]
