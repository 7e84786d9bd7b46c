"""Checkpoints of a training run: written atomically, kept N deep, restored exactly.

Invariant: a checkpoint holds everything a step depends on: the global step,
the model's variables (BatchNorm moving averages included), the optimizer's
slots and update count, and, when asked, the input iterator's position. A
run resumed from it takes the same next step as the run that wrote it. No
completed checkpoint is ever overwritten or deleted by a fault:

- Atomicity is TensorFlow's: a checkpoint's files are written under
  temporary names (`ckpt-N_temp/`) and renamed when complete, and the
  `checkpoint` index that names the latest one is replaced in one rename
  after that. A process killed mid-save leaves the previous checkpoints and
  the index intact.
- The files on disk, not the index, say what exists. `Resume` lists the
  `ckpt-N.index` files, so a missing or garbled index cannot make a run
  start over from step 0 on top of its own checkpoints; it rewrites the
  index from what is on disk and says so.
- A damaged checkpoint (truncated, zeroed, half deleted) is never restored
  and never deleted: `Resume` moves it into `checkpoints/damaged/`, warns,
  and falls back to the next older one; if none restores it refuses to
  start, naming them.
- A save that fails for lack of disk space or write permission removes its
  own partial files and raises StorageError; older checkpoints stay.
- Ctrl-C or SIGTERM during a save waits for it to finish: the interrupt is
  delivered (as KeyboardInterrupt) right after, so a stopped run leaves a
  complete checkpoint and no `ckpt-N_temp/` behind.
- A keyed object (the input position) is restored only from a checkpoint
  written with the same key (the input settings): an iterator restored
  under other settings would replay the old input pipeline.

The trainer process alone writes a logdir (lingvo_gpipe/logdir.py locks it);
readers (the evaluator) use `Restore` with an explicit path and never move
or delete anything.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import glob
import os
import re
import shutil
import signal
import threading
from typing import Any, Iterator, Mapping, Optional

from absl import logging
import tensorflow as tf

from lingvo_gpipe.core import hyperparams

CHECKPOINT_SUBDIR = 'checkpoints'
CHECKPOINT_PREFIX = 'ckpt'
DAMAGED_SUBDIR = 'damaged'
_INDEX_FILE = 'checkpoint'
_KEY_SUFFIX = '_key'
_STEP = re.compile(rf'^{CHECKPOINT_PREFIX}-(\d+)$')
# errno values of a logdir that can no longer be written.
_STORAGE_ERRNOS = {errno.ENOSPC: 'the disk is full',
                   errno.EDQUOT: 'the disk quota is exceeded',
                   errno.EROFS: 'the file system is read-only',
                   errno.EACCES: 'permission denied',
                   errno.EPERM: 'permission denied'}


@contextlib.contextmanager
def InterruptsDeferred() -> Iterator[None]:
  """Holds SIGINT and SIGTERM until the block ends, then raises KeyboardInterrupt.

  A save cut by an interrupt would leave a `ckpt-N_temp/` directory and lose
  the step it was saving. Signals go to the main thread only, so elsewhere
  this does nothing.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received = []
  held = (signal.SIGINT, signal.SIGTERM)
  previous = {s: signal.getsignal(s) for s in held}
  for s in held:
    signal.signal(s, lambda signum, frame: received.append(signum))
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, signal.SIG_DFL if handler is None else handler)
  if received:
    logging.warning('%s arrived during a checkpoint save; stopping after it.',
                    signal.Signals(received[0]).name)
    raise KeyboardInterrupt()


class CheckpointMismatchError(ValueError):
  """A checkpoint whose variables do not fit the model being restored into."""


class CheckpointDamagedError(RuntimeError):
  """A checkpoint whose files are missing or unreadable."""


class StorageError(OSError):
  """The logdir cannot be written: disk full, read-only, or permission denied."""


def Directory(logdir: str) -> str:
  """Where a run in `logdir` keeps its checkpoints."""
  return os.path.join(logdir, CHECKPOINT_SUBDIR)


def StepOf(path: str) -> int:
  """The global step a checkpoint was saved at, from its name ('.../ckpt-120').

  Raises:
    ValueError: naming `path` if it is not a checkpoint name.
  """
  match = _STEP.match(os.path.basename(path.strip()))
  if not match:
    raise hyperparams.ConfigError(f'{path!r} is not a checkpoint name (expected '
                                  f'{CHECKPOINT_PREFIX}-<step>).')
  return int(match.group(1))


def ListCheckpoints(directory: str) -> list[str]:
  """Prefixes of the checkpoints on disk (an index file each), oldest first."""
  found = []
  for index in glob.glob(os.path.join(glob.escape(directory),
                                      f'{CHECKPOINT_PREFIX}-*.index')):
    prefix = index[:-len('.index')]
    if _STEP.match(os.path.basename(prefix)):
      found.append(prefix)
  return sorted(found, key=StepOf)


def StorageProblem(error: BaseException) -> Optional[str]:
  """Why `error` means the disk cannot be written ('the disk is full'), or None."""
  if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
    return _STORAGE_ERRNOS[error.errno]
  text = str(error)
  for code, reason in _STORAGE_ERRNOS.items():
    if os.strerror(code) in text:
      return reason
  if isinstance(error, tf.errors.PermissionDeniedError):
    return 'permission denied'
  return None


class Checkpointer:
  """Saves and restores `objects` (name -> trackable) under `logdir`.

  `keyed` objects (name -> (trackable, key text)) are saved with their key
  and restored only from a checkpoint whose key is the same.
  """

  def __init__(self, logdir: str, objects: Mapping[str, Any],
               max_to_keep: int = 5,
               keyed: Optional[Mapping[str, tuple[Any, str]]] = None):
    self.directory = Directory(logdir)
    self._max_to_keep = max_to_keep
    self._objects = dict(objects)
    self._keys = {}
    for name, (trackable, key) in (keyed or {}).items():
      self._objects[name] = trackable
      self._objects[name + _KEY_SUFFIX] = tf.Variable(key, dtype=tf.string,
                                                      trainable=False)
      self._keys[name] = key
    self._checkpoint = tf.train.Checkpoint(**self._objects)
    self._manager = None  # made on the first save, after Resume's repairs

  @property
  def latest(self) -> Optional[str]:
    """The newest checkpoint on disk, or None."""
    paths = ListCheckpoints(self.directory)
    return paths[-1] if paths else None

  # --- writing ------------------------------------------------------------------

  def Save(self, step: int) -> str:
    """Writes checkpoint `step`; deletes the oldest beyond max_to_keep.

    Raises:
      StorageError: the disk is full or not writable; this save's partial
        files are removed and the older checkpoints are intact.
    """
    if self._manager is None:
      self._manager = tf.train.CheckpointManager(
          self._checkpoint, self.directory, max_to_keep=self._max_to_keep,
          checkpoint_name=CHECKPOINT_PREFIX)
    try:
      with InterruptsDeferred():
        path = self._manager.save(checkpoint_number=step)
    except (OSError, tf.errors.OpError) as e:
      reason = StorageProblem(e)
      if reason is None:
        raise
      self._RemovePartial(step)
      latest = self.latest
      kept = (f'{latest} (step {StepOf(latest)}) is the latest intact '
              'checkpoint; a rerun resumes from it.' if latest else
              'No checkpoint had been written yet.')
      raise StorageError(
          e.errno if isinstance(e, OSError) else None,
          f'Cannot write checkpoint {CHECKPOINT_PREFIX}-{step} to '
          f'{self.directory}: {reason}. Its partial files were removed. '
          f'{kept} Free space or make the logdir writable.') from e
    logging.info('Saved checkpoint %s', path)
    return path

  def _RemovePartial(self, step: int) -> None:
    prefix = os.path.join(self.directory, f'{CHECKPOINT_PREFIX}-{step}')
    for path in glob.glob(glob.escape(prefix) + '*'):
      if os.path.basename(path).startswith(os.path.basename(prefix) + '.') or (
          path == prefix + '_temp'):
        _RemoveQuietly(path)

  def _RemoveTemporaries(self) -> None:
    """Deletes the `ckpt-N_temp/` directories of saves that never finished."""
    for path in glob.glob(os.path.join(glob.escape(self.directory),
                                       f'{CHECKPOINT_PREFIX}-*_temp')):
      logging.warning('Removing %s, the unfinished save of a stopped run.', path)
      _RemoveQuietly(path)

  # --- reading ------------------------------------------------------------------

  def Resume(self) -> Optional[str]:
    """Restores the newest checkpoint that restores (the writer's restore).

    Lists checkpoints from disk, moves damaged ones into `damaged/` while an
    older one restores, and rewrites the index if it disagrees with the
    disk. Returns the restored path, or None if there is no checkpoint.

    Raises:
      CheckpointMismatchError: the newest readable checkpoint is of another
        model (older ones would be too; nothing is moved).
      CheckpointDamagedError: no checkpoint on disk restores (nothing moved).
    """
    self._RemoveTemporaries()
    on_disk = ListCheckpoints(self.directory)
    if not on_disk:
      return None
    damaged = []
    restored = None
    for path in reversed(on_disk):
      try:
        self.Restore(path)
      except CheckpointDamagedError as e:
        logging.warning('%s', e)
        damaged.append(path)
        continue
      restored = path
      break
    if restored is None:
      raise CheckpointDamagedError(
          f'No checkpoint in {self.directory} can be restored: '
          f'{", ".join(os.path.basename(p) for p in damaged)} are damaged '
          '(details in the log above). Nothing was changed. Move them away to '
          'start this run over from step 0, or use a new --logdir.')
    for path in damaged:
      self._MoveDamaged(path)
    self._RepairIndex(restored)
    return restored

  def _MoveDamaged(self, path: str) -> None:
    target = os.path.join(self.directory, DAMAGED_SUBDIR)
    os.makedirs(target, exist_ok=True)
    for file in glob.glob(glob.escape(path) + '.*'):
      os.replace(file, os.path.join(target, os.path.basename(file)))
    logging.warning('Kept damaged checkpoint %s in %s; resuming from an older '
                    'one.', os.path.basename(path), target)

  def _RepairIndex(self, latest: str) -> None:
    """Makes the `checkpoint` index list the checkpoints on disk."""
    on_disk = [os.path.basename(p) for p in ListCheckpoints(self.directory)]
    try:
      state = tf.train.get_checkpoint_state(self.directory)
    except (tf.errors.OpError, ValueError):
      state = None
    listed = ([os.path.basename(p) for p in state.all_model_checkpoint_paths]
              if state else None)
    if listed == on_disk and state.model_checkpoint_path.endswith(
        os.path.basename(latest)):
      return
    if listed is None:
      logging.warning('The checkpoint index %s is missing or unreadable; '
                      'rebuilt it from the checkpoints on disk: %s.',
                      os.path.join(self.directory, _INDEX_FILE),
                      ', '.join(on_disk))
    else:
      logging.warning('The checkpoint index listed %s; rewrote it to list the '
                      'checkpoints on disk: %s.', ', '.join(listed) or 'nothing',
                      ', '.join(on_disk))
    # With their write times, so that the manager counts them against
    # max_to_keep (a checkpoint without one would be kept and unlisted).
    times = [os.path.getmtime(os.path.join(self.directory, name + '.index'))
             for name in on_disk]
    tf.compat.v1.train.update_checkpoint_state(
        self.directory, os.path.basename(latest),
        all_model_checkpoint_paths=on_disk,
        all_model_checkpoint_timestamps=times,
        last_preserved_timestamp=min(times) - 1)

  def Restore(self, path: Optional[str] = None, partial: bool = False) -> Optional[str]:
    """Restores `path` (default: the newest on disk); returns it, or None if none.

    Args:
      path: a checkpoint prefix; None: the newest in the directory.
      partial: restore only the objects this Checkpointer holds (an
        evaluator holds the model, not the optimizer or the input).

    Raises:
      CheckpointMismatchError: if the checkpoint lacks one of this model's
        variables or has one of a different shape: usually a --logdir
        reused for a different model or different overrides.
      CheckpointDamagedError: if its files are missing or unreadable.
    """
    path = path or self.latest
    if path is None:
      return None
    try:
      reader = tf.train.load_checkpoint(path)
      skipped = self._StaleKeyed(path, reader)
    except (tf.errors.OpError, ValueError, IndexError, OSError) as e:
      raise self._Damaged(path, e) from e
    checkpoint = self._checkpoint
    if skipped:
      checkpoint = tf.train.Checkpoint(**{
          name: obj for name, obj in self._objects.items()
          if name not in skipped and name[:-len(_KEY_SUFFIX)] not in skipped})
    try:
      status = checkpoint.restore(path)
      if partial or skipped:
        status.expect_partial()
        status.assert_existing_objects_matched()
      else:
        status.assert_consumed()
    except (AssertionError, ValueError, tf.errors.InvalidArgumentError) as e:
      raise CheckpointMismatchError(
          f'Checkpoint {path} does not match this model: {_FirstLine(e)} '
          'Was this logdir written by another model or other overrides? Use a '
          'new --logdir, or the params.txt saved in this one.') from e
    except (tf.errors.OpError, IndexError, OSError) as e:
      raise self._Damaged(path, e) from e
    logging.info('Restored checkpoint %s', path)
    return path

  def _StaleKeyed(self, path: str, reader: Any) -> set[str]:
    """Keyed objects `path` cannot restore: saved under another key, or not at all."""
    saved = reader.get_variable_to_shape_map()
    stale = set()
    for name, key in self._keys.items():
      tensor = f'{name}{_KEY_SUFFIX}/.ATTRIBUTES/VARIABLE_VALUE'
      old = reader.get_tensor(tensor).decode() if tensor in saved else ''
      if old == key:
        continue
      stale.add(name)
      changed = [line[2:] for line in difflib.ndiff(old.splitlines(),
                                                    key.splitlines())
                 if line[:2] == '+ ']
      logging.warning('%s: its %s was saved with other settings (now: %s); '
                      'the %s starts afresh, everything else is restored.',
                      os.path.basename(path), name,
                      '; '.join(changed[:4]) or 'none saved', name)
    return stale

  def _Damaged(self, path: str, error: BaseException) -> CheckpointDamagedError:
    return CheckpointDamagedError(
        f'Checkpoint {path} is damaged or incomplete: {_FirstLine(error)}')


def _RemoveQuietly(path: str) -> None:
  try:
    if os.path.isdir(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
  except OSError as e:
    logging.warning('Could not remove %s: %s', path, e)


def _FirstLine(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else type(error).__name__)[:500]
