"""A run's directory: one writer at a time, and params.txt written only for an accepted run.

Invariant: at most one live process trains into a logdir. `Lock` takes an
exclusive `fcntl` lock on `DIR/.lock` for the life of the process: the
kernel drops it when the process dies, however it dies, so a killed run
never leaves the logdir locked, and a second trainer on the same logdir is
refused with the holder's pid. Evaluators take a lock of their own per
split, so one evaluator per split runs beside the trainer.

`DIR/params.txt` describes the run whose checkpoints are in DIR: it is
(re)written only after the run was accepted (its Params built a model that
restored DIR's checkpoint), atomically, so a refused run never changes it.
`DIR/executor_trial.txt` keeps what the run's executor trial kept
(core/gpipe/executor_trial.py), for the Params it was measured under, so a
resumed run steps on the same graph as one that never stopped.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from typing import Optional

from absl import logging

from lingvo_gpipe.core import hyperparams

PARAMS_FILE = 'params.txt'
TRIAL_FILE = 'executor_trial.txt'
_LOCK_FILE = '.lock'


class LogdirError(ValueError):
  """The logdir cannot be used: not writable, or in use by another process."""


class Lock:
  """An exclusive lock on `directory` held until `Release` or process exit."""

  def __init__(self, directory: str, role: str = 'trainer'):
    self.path = os.path.join(directory, _LOCK_FILE)
    self._file = None
    try:
      os.makedirs(directory, exist_ok=True)
      handle = open(self.path, 'a+', encoding='utf-8')
    except OSError as e:
      raise NotWritable(directory, e) from e
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      handle.seek(0)
      holder = handle.read().strip() or 'unknown'
      handle.close()
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise NotWritable(directory, e) from e
      raise LogdirError(
          f'{directory} is in use by another {role} ({holder}). Wait for it to '
          'finish or stop it; to run a second job at once, give it its own '
          '--logdir.') from None
    handle.seek(0)
    handle.truncate()
    handle.write(f'pid {os.getpid()}\n')
    handle.flush()
    self._file = handle

  def Release(self) -> None:
    if self._file is not None:
      self._file.close()  # closing drops the flock
      self._file = None


def NotWritable(logdir: str, error: OSError) -> LogdirError:
  return LogdirError(
      f'--logdir={logdir!r} is not writable: {error.strerror or error} '
      f'({error.filename or logdir}). Choose a directory you can write to.')


def ReadParams(logdir: str) -> Optional[str]:
  """The text of DIR/params.txt, or None if there is none."""
  try:
    with open(os.path.join(logdir, PARAMS_FILE), encoding='utf-8') as f:
      return f.read()
  except FileNotFoundError:
    return None


def WriteParams(logdir: str, params: hyperparams.Params) -> None:
  """Writes DIR/params.txt atomically; call only once the run was accepted."""
  text = params.ToText()
  path = os.path.join(logdir, PARAMS_FILE)
  old = ReadParams(logdir)
  if old == text:
    return
  if old is not None:
    changed = sorted(set(text.splitlines()) ^ set(old.splitlines()))
    logging.warning('%s differs from this run\'s Params (%d lines, e.g. %s); '
                    'it is replaced.', path, len(changed), changed[:4])
  _WriteAtomically(logdir, PARAMS_FILE, text)


def _ParamsKey(params: hyperparams.Params) -> str:
  """What decides which executor steps faster: the task (network, pipelines,
  devices) and the batch; not e.g. train.max_steps, which a longer resumed
  run raises."""
  text = params.task.ToText() + f'\nbatch_size: {params.input.batch_size}'
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _WriteAtomically(logdir: str, name: str, text: str) -> None:
  path = os.path.join(logdir, name)
  try:
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      f.write(text)
    os.replace(path + '.tmp', path)
  except OSError as e:
    raise NotWritable(logdir, e) from e


def WriteTrial(logdir: str, params: hyperparams.Params, executor: str,
               text: str) -> None:
  """Writes DIR/executor_trial.txt: the executor kept, under these Params."""
  _WriteAtomically(logdir, TRIAL_FILE, f'executor: {executor}\n'
                   f'params: {_ParamsKey(params)}\n{text}\n')


def ReadTrial(logdir: str, params: hyperparams.Params) -> Optional[str]:
  """The executor DIR's trial kept under these Params, or None.

  None if there is no trial file, or it was written under another task or
  batch size (then the run tries again: another M or K can change which is
  faster).
  """
  path = os.path.join(logdir, TRIAL_FILE)
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    return None
  except (OSError, UnicodeDecodeError) as e:
    logging.warning('%s cannot be read (%s); the trial runs again.', path, e)
    return None
  fields = dict(line.split(': ', 1) for line in lines[:2] if ': ' in line)
  if fields.get('params') != _ParamsKey(params):
    return None
  executor = fields.get('executor')
  if executor not in ('loop', 'unrolled'):
    logging.warning('%s names no executor (%r); the trial runs again.',
                    path, executor)
    return None
  return executor
