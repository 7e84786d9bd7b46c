"""The trainer binary under faults: nothing lost, nothing hung, one clear error.

Each test injects one fault into a real run of the toy model through the
binary (a damaged checkpoint, a second trainer, a full or read-only disk,
Ctrl-C, bad knobs) and checks the exit status, the `error:` line, and that
every checkpoint written before the fault is still there, byte for byte.
Worker faults are in tests/tools/worker_faults_test.py.
"""

import hashlib
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import checkpoint as checkpoint_lib
from lingvo_gpipe.core import summary
from lingvo_gpipe.run_errors import ExitStatus
from tests.support import binaries

_TOY = 'example.toy.ToyRegression'


def _Run(logdir, *flags, timeout=240):
  return binaries.Run(binaries.TRAINER, f'--model={_TOY}', f'--logdir={logdir}',
                      *flags, timeout=timeout)


def _Error(result):
  """The `error:` line and what follows; asserts there is one and no traceback."""
  lines = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert lines, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  return result.stderr[result.stderr.index(lines[0]):]


def _Digests(directory):
  """File name -> sha256 of every checkpoint file in `directory`."""
  return {name: hashlib.sha256(open(os.path.join(directory, name), 'rb').read()
                               ).hexdigest()
          for name in os.listdir(directory) if name.startswith('ckpt-')}


def _Steps(logdir):
  return [checkpoint_lib.StepOf(p) for p in
          checkpoint_lib.ListCheckpoints(checkpoint_lib.Directory(str(logdir)))]


def _AllFinite(path):
  reader = tf.train.load_checkpoint(path)
  for name, dtype in reader.get_variable_to_dtype_map().items():
    if dtype.is_floating:
      assert np.all(np.isfinite(reader.get_tensor(name))), (path, name)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A finished run: ckpt-50 and ckpt-100 (the toy config's defaults)."""
  logdir = tmp_path_factory.mktemp('trained') / 'run'
  result = _Run(logdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert _Steps(logdir) == [50, 100]
  return logdir


@pytest.fixture
def run(trained, tmp_path):
  """A copy of the trained run for one test to damage."""
  copy = tmp_path / 'run'
  shutil.copytree(trained, copy)
  return copy


# --- 1, 2: the index and the checkpoints ------------------------------------------


@pytest.mark.parametrize('damage', ['deleted', 'garbled'])
def test_a_lost_index_resumes_from_the_checkpoints_on_disk(run, damage):
  directory = checkpoint_lib.Directory(str(run))
  index = os.path.join(directory, 'checkpoint')
  if damage == 'deleted':
    os.remove(index)
  else:  # cut inside a quoted path, as a crash mid-write of a copy would
    text = open(index).read()
    open(index, 'w').write(text[:text.index('ckpt-100') + 3])
  before = _Digests(directory)
  result = _Run(run, '--max_steps=150')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'rebuilt it from the checkpoints on disk' in result.stderr
  assert 'from step 100 to 150' in result.stderr
  after = _Digests(directory)
  for name, digest in before.items():  # nothing overwritten
    assert after[name] == digest, name
  assert _Steps(run) == [50, 100, 150]
  state = tf.train.get_checkpoint_state(directory)
  assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == [
      'ckpt-50', 'ckpt-100', 'ckpt-150']


def _Damage(prefix, how):
  data = prefix + '.data-00000-of-00001'
  if how == 'truncated':
    with open(data, 'r+b') as f:
      f.truncate(1000)
  elif how == 'zeroed_index':
    size = os.path.getsize(prefix + '.index')
    open(prefix + '.index', 'wb').write(b'\0' * size)
  else:  # data file deleted
    os.remove(data)


@pytest.mark.parametrize('how', ['truncated', 'zeroed_index', 'data_deleted'])
def test_a_damaged_latest_checkpoint_is_kept_and_an_older_one_restored(run, how):
  directory = checkpoint_lib.Directory(str(run))
  _Damage(os.path.join(directory, 'ckpt-100'), how)
  damaged = {n: d for n, d in _Digests(directory).items()
             if n.startswith('ckpt-100.')}
  result = _Run(run, '--max_steps=60',
                '--params_override=train.save_interval_steps=10')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'ckpt-100 is damaged' in result.stderr
  assert 'from step 50 to 60' in result.stderr
  kept = os.path.join(directory, checkpoint_lib.DAMAGED_SUBDIR)
  assert _Digests(kept) == damaged  # moved aside, byte for byte
  assert _Steps(run) == [50, 60]


def test_no_restorable_checkpoint_refuses_and_moves_nothing(run):
  directory = checkpoint_lib.Directory(str(run))
  for step in (50, 100):
    _Damage(os.path.join(directory, f'ckpt-{step}'), 'truncated')
  before = _Digests(directory)
  result = _Run(run, '--max_steps=150')
  assert result.returncode == ExitStatus.USAGE
  error = _Error(result)
  assert 'No checkpoint in' in error and 'ckpt-100, ckpt-50' in error
  assert _Digests(directory) == before


# --- 3: no non-finite weight is ever written --------------------------------------


def test_a_nan_learning_rate_is_refused_before_training(tmp_path):
  result = _Run(tmp_path / 'run', '--params_override=train.learning_rate=nan')
  assert result.returncode == ExitStatus.USAGE
  assert 'train.learning_rate=nan' in _Error(result)
  assert not os.path.exists(checkpoint_lib.Directory(str(tmp_path / 'run')))


def test_an_update_that_overflows_is_never_saved(tmp_path):
  # Finite Params whose learning rate grows 1e8-fold a step: the weights
  # overflow float32 while loss and gradients are still finite.
  logdir = tmp_path / 'run'
  result = _Run(logdir, '--max_steps=40', '--params_override='
                'train.optimizer=sgd; train.save_interval_steps=1; '
                'train.lr_schedule.type=exponential; '
                'train.lr_schedule.decay_rate=1e8; '
                'train.lr_schedule.decay_steps=1; '
                'train.lr_schedule.staircase=False')
  assert result.returncode == ExitStatus.NON_FINITE, result.stderr[-3000:]
  assert 'nothing was saved' in _Error(result)
  assert _Steps(logdir)
  for step in _Steps(logdir):
    _AllFinite(os.path.join(checkpoint_lib.Directory(str(logdir)),
                            f'ckpt-{step}'))


# --- 4, 5: params.txt and the lock ------------------------------------------------


def test_a_refused_run_leaves_params_txt_as_it_was(run):
  params = (run / 'params.txt').read_text()
  refused = _Run(run, '--params_override=task.network.hidden_dim=16')
  assert refused.returncode == ExitStatus.USAGE
  assert 'does not match this model' in _Error(refused)
  assert (run / 'params.txt').read_text() == params
  # The error's advice works: the saved params.txt resumes the run.
  resumed = _Run(run, f'--params_file={run / "params.txt"}', '--max_steps=110')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'from step 100 to 110' in resumed.stderr


def _WaitForCheckpoint(process, logdir, deadline_secs=120):
  deadline = time.time() + deadline_secs
  while not _Steps(logdir):
    assert process.poll() is None, 'the trainer exited early'
    assert time.time() < deadline, 'no checkpoint in time'
    time.sleep(0.1)


def _StartLongRun(logdir, **popen_kwargs):
  return binaries.Start(
      binaries.TRAINER, f'--model={_TOY}', f'--logdir={logdir}',
      '--max_steps=100000000', '--params_override=train.save_interval_steps='
      '20; train.log_interval_steps=1000000', **popen_kwargs)


def test_a_second_trainer_on_a_logdir_is_refused_and_a_kill_frees_it(tmp_path):
  logdir = tmp_path / 'run'
  first = _StartLongRun(logdir, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
  try:
    _WaitForCheckpoint(first, logdir)
    second = _Run(logdir, '--max_steps=10')
    assert second.returncode == ExitStatus.USAGE
    assert f'in use by another trainer (pid {first.pid})' in _Error(second)
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
  # The kernel dropped the dead holder's lock: the logdir is free again.
  steps = _Steps(logdir)
  third = _Run(logdir, f'--max_steps={steps[-1] + 2}')
  assert third.returncode == 0, third.stderr[-3000:]


# --- 13: Ctrl-C and SIGTERM -------------------------------------------------------


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_cleanly(tmp_path, signum):
  logdir = tmp_path / 'run'
  process = _StartLongRun(logdir, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    _WaitForCheckpoint(process, logdir)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
  finally:
    if process.poll() is None:
      process.kill()
  assert process.returncode == ExitStatus.INTERRUPTED, stderr[-3000:]
  result = subprocess.CompletedProcess([], process.returncode, '', stderr)
  error = _Error(result)
  assert 'Interrupted at global step' in error and 'is intact' in error
  assert not [n for n in os.listdir(checkpoint_lib.Directory(str(logdir)))
              if n.endswith('_temp')]


# --- 14 and 13: a full disk, a logdir turned read-only ----------------------------


@pytest.fixture
def small_disk(tmp_path):
  """A 600 KB tmpfs (the toy's checkpoints are 135 KB each), unmounted after."""
  mount = tmp_path / 'disk'
  mount.mkdir()
  done = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=600k', 'tmpfs',
                         str(mount)], capture_output=True, text=True, check=False)
  if done.returncode:
    pytest.skip(f'cannot mount a tmpfs here: {done.stderr.strip()}')
  yield mount
  subprocess.run(['umount', '-l', str(mount)], check=False)


def test_a_full_disk_keeps_the_old_checkpoints_and_says_so(small_disk):
  logdir = small_disk / 'run'
  result = _Run(logdir, '--max_steps=1000', '--params_override='
                'train.save_interval_steps=1; train.max_checkpoints_to_keep=100')
  assert result.returncode == ExitStatus.STORAGE, result.stderr[-3000:]
  error = _Error(result)
  assert 'the disk is full' in error and 'partial files were removed' in error
  directory = checkpoint_lib.Directory(str(logdir))
  assert not [n for n in os.listdir(directory) if n.endswith('_temp')]
  steps = _Steps(logdir)
  assert steps and f'ckpt-{steps[-1]} (step {steps[-1]}) is the latest' in error
  for step in steps:
    assert tf.train.load_checkpoint(os.path.join(directory, f'ckpt-{step}'))


def test_a_logdir_turned_unwritable_mid_run_stops_with_its_status(tmp_path):
  logdir = tmp_path / 'run'
  directory = checkpoint_lib.Directory(str(logdir))
  process = _StartLongRun(logdir, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    _WaitForCheckpoint(process, logdir)
    # Immutable: not even root may add a file (remounting read-only is
    # refused while the trainer holds files open for writing).
    done = subprocess.run(['chattr', '+i', directory], capture_output=True,
                          text=True, check=False)
    if done.returncode:
      pytest.skip(f'chattr +i is not supported here: {done.stderr.strip()}')
    _, stderr = process.communicate(timeout=120)
  finally:
    if process.poll() is None:
      process.kill()
    subprocess.run(['chattr', '-i', directory], check=False)
  assert process.returncode == ExitStatus.STORAGE, stderr[-3000:]
  error = _Error(subprocess.CompletedProcess([], 0, '', stderr))
  assert 'permission denied' in error and 'is the latest intact' in error
  assert _Steps(logdir)


# --- 10, 11, 15: the evaluator, another input, markers ----------------------------


def test_the_evaluator_skips_a_checkpoint_it_cannot_read(run):
  directory = checkpoint_lib.Directory(str(run))
  os.remove(os.path.join(directory, 'ckpt-100.data-00000-of-00001'))
  result = _Run(run, '--mode=eval', '--eval_timeout_secs=1')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Skipping' in result.stderr and 'ckpt-100' in result.stderr
  evals = summary.ReadEvents(run / 'eval_test')
  assert [step for step, _ in evals['mse']] == [50]


def test_a_garbled_eval_marker_is_named_and_ignored(run):
  marker = run / 'eval_test' / 'last_evaluated'
  marker.parent.mkdir(exist_ok=True)
  marker.write_text('ckpt-\x00garbage')
  result = _Run(run, '--mode=eval', '--eval_timeout_secs=1')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Ignoring {marker}' in result.stderr
  assert marker.read_text() == 'ckpt-100\n'


@pytest.mark.parametrize('override', ['input.batch_size=8',
                                      'input.shuffle_buffer=7'])
def test_another_input_resets_the_input_position_and_resumes(run, override):
  result = _Run(run, '--max_steps=110', f'--params_override={override}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'its input was saved with other settings' in result.stderr
  assert override.split('=')[0].split('.')[1] in result.stderr
  assert 'from step 100 to 110' in result.stderr


_BAD_KNOBS = [
    ('eval_timeout_nan', ['--mode=eval', '--eval_timeout_secs=nan'],
     ['--eval_timeout_secs=nan', 'finite']),
    ('max_steps_override_negative', ['--params_override=train.max_steps=-1'],
     ['train.max_steps=-1', '>= 1']),
    ('batch_size_zero', ['--params_override=input.batch_size=0'],
     ['input.batch_size=0', '>= 1']),
    ('batch_size_negative', ['--params_override=input.batch_size=-4'],
     ['input.batch_size=-4', '>= 1']),
    ('save_interval_zero', ['--params_override=train.save_interval_steps=0'],
     ['train.save_interval_steps=0', '>= 1']),
    ('log_interval_zero', ['--params_override=train.log_interval_steps=0'],
     ['train.log_interval_steps=0', '>= 1']),
    ('inf_knob', ['--params_override=train.clip_gradient_norm=inf'],
     ['train.clip_gradient_norm=inf', 'finite']),
    ('micro_batches_over_batch', ['--num_micro_batches=32'],
     ['num_micro_batches=32', 'batch of 16 examples', 'at most 16']),
]


@pytest.mark.parametrize('flags,messages', [c[1:] for c in _BAD_KNOBS],
                         ids=[c[0] for c in _BAD_KNOBS])
def test_a_bad_knob_is_named_before_anything_runs(tmp_path, flags, messages):
  result = _Run(tmp_path / 'run', *flags, timeout=120)
  assert result.returncode == ExitStatus.USAGE, result.stderr[-3000:]
  error = _Error(result)
  for message in messages:
    assert message in error, error
  assert 'in user code' not in error and len(error.splitlines()) == 1
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')
