"""How a failed run is reported: one `error:` line of advice and an exit status.

Invariant: every failure a user can cause or fix maps to one status and a
message that names what was wrong and what would help; anything else is a
bug, printed with its traceback, and exits with its own status (INTERNAL),
so a shape bug in a layer never reads like a mistyped flag. A bad
configuration is a hyperparams.ConfigError: raised where Params are checked
(their overrides, the layers' constructors through Instantiate, the
pipeline's refusals), naming the field. The trainer binary and its tests
share this table, so neither hard-codes a status.
"""

from __future__ import annotations

import enum
from typing import Optional

from absl import logging
import tensorflow as tf

from lingvo_gpipe import base_input_generator
from lingvo_gpipe import logdir
from lingvo_gpipe import model_registry
from lingvo_gpipe import train_program
from lingvo_gpipe.core import checkpoint as checkpoint_lib
from lingvo_gpipe.core import cluster
from lingvo_gpipe.core import hyperparams


class ExitStatus(enum.IntEnum):
  OK = 0
  USAGE = 1  # bad flag, model name, override, logdir, or checkpoint
  DATA_NOT_FOUND = 2
  OUT_OF_MEMORY = 3
  NON_FINITE = 4
  WORKER_LOST = 5  # a worker unreachable, killed or hung (bounded by a flag)
  STORAGE = 6  # the logdir's disk is full or turned unwritable mid-run
  INTERNAL = 70  # a bug: the traceback is printed (sysexits' EX_SOFTWARE)
  INTERRUPTED = 130  # Ctrl-C or SIGTERM, after a clean stop (shell convention)


class UsageError(ValueError):
  """A bad command line; the message says what would be valid."""


def Report(error: BaseException) -> Optional[tuple[ExitStatus, str]]:
  """(status, message) for a failure the user can act on; None for a bug."""
  if isinstance(error, base_input_generator.DataNotFoundError):
    return ExitStatus.DATA_NOT_FOUND, f'{error} (set the directory with --data_dir).'
  if isinstance(error, (train_program.TrainingInterrupted, KeyboardInterrupt)):
    return ExitStatus.INTERRUPTED, (str(error) or 'Interrupted before '
                                    'training started; nothing was written.')
  if isinstance(error, checkpoint_lib.StorageError):
    return ExitStatus.STORAGE, str(error)
  storage = checkpoint_lib.StorageProblem(error)
  if storage is not None and isinstance(error, (OSError, tf.errors.OpError)):
    return ExitStatus.STORAGE, (f'cannot write to the logdir: {storage} '
                                f'({_FirstLine(error)}). Checkpoints already '
                                'written are intact; a rerun resumes from the '
                                'latest.')
  if isinstance(error, (cluster.WorkerLostError, tf.errors.UnavailableError)):
    return ExitStatus.WORKER_LOST, WorkerLostMessage(error)
  if isinstance(error, tf.errors.ResourceExhaustedError):
    return ExitStatus.OUT_OF_MEMORY, OutOfMemoryMessage(error)
  if isinstance(error, train_program.NonFiniteLossError):
    return ExitStatus.NON_FINITE, str(error)
  if isinstance(error, (UsageError, model_registry.UnknownModelError,
                        logdir.LogdirError,
                        checkpoint_lib.CheckpointMismatchError,
                        checkpoint_lib.CheckpointDamagedError)):
    return ExitStatus.USAGE, str(error)
  if isinstance(error, hyperparams.ConfigError):
    logging.debug('Configuration error', exc_info=error)
    return ExitStatus.USAGE, UserMessage(error)
  return None


def WorkerLostMessage(error: BaseException) -> str:
  """Which worker was lost and how to go on."""
  return cluster.LostWorkerMessage(error) or (
      f'a TensorFlow worker was lost: {_FirstLine(error)}. Checkpoints already '
      'written are intact; restart the worker and rerun to resume.')


def UserMessage(error: BaseException) -> str:
  """The error's own message, without the stack tf.function wraps it in.

  An error raised while tracing a tf.function reads 'in user code:' and the
  traced frames, then the original 'ValueError: message' last.
  """
  text = str(error).strip()
  if not text.startswith('in user code:'):
    return text[:2000]
  prefix = f'{type(error).__name__}: '
  lines = [l.strip() for l in text.splitlines()]
  for i in range(len(lines) - 1, -1, -1):
    if lines[i].startswith(prefix):
      return ' '.join(l for l in lines[i:] if l)[len(prefix):]
  return lines[-1]


def _FirstLine(error: BaseException) -> str:
  """The error's first line, at most 300 characters."""
  text = str(error).strip().splitlines()
  return (text[0] if text else type(error).__name__)[:300]


def OutOfMemoryMessage(error: BaseException) -> str:
  """The allocation that failed and the knobs that lower the peak."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  oom = [l for l in lines if 'OOM' in l or 'exhausted' in l.lower()]
  what = (oom or lines or [type(error).__name__])[0][:300]
  return ('out of memory: ' + what + '\nKnobs that lower the peak: more micro-'
          'batches (--num_micro_batches), more pipeline cells on more devices '
          "(--num_partitions), task.network.pipeline.recompute='always' "
          '(re-materialize every cell), task.network.pipeline.'
          'input_grads_first=False (if it was turned on), or a smaller '
          'input.batch_size.')
