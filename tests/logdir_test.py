"""Tests of the logdir: one writer at a time, params.txt only for an accepted run."""

import os
import subprocess
import sys

import pytest

from lingvo_gpipe import experiment
from lingvo_gpipe import logdir
from lingvo_gpipe.core import hyperparams

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_second_lock_is_refused_with_the_holders_pid(tmp_path):
  held = logdir.Lock(str(tmp_path))
  with pytest.raises(logdir.LogdirError,
                     match=rf'in use by another trainer \(pid {os.getpid()}\)'):
    logdir.Lock(str(tmp_path))
  held.Release()
  logdir.Lock(str(tmp_path)).Release()  # free again


def test_a_dead_holder_leaves_no_lock(tmp_path):
  # A process that takes the lock and dies without releasing it.
  code = ('import os, sys; from lingvo_gpipe import logdir; '
          f'logdir.Lock({str(tmp_path)!r}); os._exit(9)')
  done = subprocess.run([sys.executable, '-c', code], check=False,
                        env=dict(os.environ, PYTHONPATH=_REPO_ROOT))
  assert done.returncode == 9
  logdir.Lock(str(tmp_path)).Release()


def test_an_unwritable_directory_is_named(tmp_path):
  (tmp_path / 'file').write_text('x')
  with pytest.raises(logdir.LogdirError, match='is not writable'):
    logdir.Lock(str(tmp_path / 'file' / 'run'))


def test_write_params_replaces_atomically(tmp_path):
  p = hyperparams.Params()
  p.Define('a', 1, '')
  logdir.WriteParams(str(tmp_path), p)
  assert logdir.ReadParams(str(tmp_path)) == 'a : 1\n'
  p.a = 2
  logdir.WriteParams(str(tmp_path), p)
  assert logdir.ReadParams(str(tmp_path)) == 'a : 2\n'
  assert sorted(os.listdir(tmp_path)) == ['params.txt']


def _TrialParams():
  return experiment.Resolve(experiment.Settings(model='example.toy.ToyRegression'))


def test_the_trial_record_holds_for_its_task_and_batch_only(tmp_path, caplog):
  params = _TrialParams()
  assert logdir.ReadTrial(str(tmp_path), params) is None  # none written
  logdir.WriteTrial(str(tmp_path), params, 'loop', 'Executor trial: ...')
  assert logdir.ReadTrial(str(tmp_path), params) == 'loop'
  longer = _TrialParams()
  longer.train.max_steps = 10 * params.train.max_steps  # a longer resumed run
  assert logdir.ReadTrial(str(tmp_path), longer) == 'loop'
  for field, value in (('input.batch_size', 7),
                       ('task.network.pipeline.num_micro_batches', 1)):
    other = _TrialParams()
    other.Set(**{field: value})
    assert logdir.ReadTrial(str(tmp_path), other) is None, field
  path = tmp_path / logdir.TRIAL_FILE
  path.write_text(path.read_text().replace('executor: loop', 'executor: fast'))
  assert logdir.ReadTrial(str(tmp_path), params) is None
  assert "names no executor ('fast')" in caplog.text
  path.write_bytes(b'\xff\xfe')
  assert logdir.ReadTrial(str(tmp_path), params) is None
  assert 'cannot be read' in caplog.text
