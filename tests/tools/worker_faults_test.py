"""Faults of workers and launchers end runs, bounded and named, and leave no process behind.

A worker nothing listens at, a worker stopped (SIGSTOP) or killed mid-run:
the trainer exits with WORKER_LOST naming it. A local_cluster launcher
stopped by SIGTERM or killed by SIGKILL: its trainer and workers end too and
checkpoints stop. Every test bounds its time and checks at the end that no
process it started runs and nothing listens at the worker ports.
"""

import os
import re
import signal
import socket
import subprocess
import time

import pytest

from lingvo_gpipe.core import checkpoint as checkpoint_lib
from lingvo_gpipe.core import local_processes
from lingvo_gpipe.run_errors import ExitStatus
from tests.support import binaries

_TOY = 'example.toy.ToyRegression'
_FLAG = '--worker_timeout_secs'
# Long runs that checkpoint often: a fault always hits a run in progress.
_LONG_RUN = ('--max_steps=1000000', '--params_override=train.save_interval_'
             'steps=10; train.log_interval_steps=1000000')
_STARTUP_SECS = 240  # TensorFlow imports and first steps on a busy 2-core box


def _Gone(pid):
  """True when pid runs no more (a zombie left for init to reap counts)."""
  try:
    with open(f'/proc/{pid}/stat', encoding='ascii') as f:
      return f.read().rpartition(')')[2].split()[0] in ('Z', 'X')
  except (FileNotFoundError, ProcessLookupError):
    return True


def _Children(pid):
  """The pids whose parent is pid, from /proc (no psutil)."""
  children = []
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/stat', encoding='ascii') as f:
        fields = f.read().rpartition(')')[2].split()
    except OSError:
      continue
    if int(fields[1]) == pid:
      children.append(int(entry))
  return children


def _CommandLine(pid):
  try:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      return f.read().replace(b'\0', b' ').decode()
  except OSError:
    return ''


def _WaitGone(pids, secs):
  deadline = time.monotonic() + secs
  while time.monotonic() < deadline:
    if all(_Gone(p) for p in pids):
      return True
    time.sleep(0.1)
  return False


def _Listening(host):
  name, _, port = host.rpartition(':')
  try:
    socket.create_connection((name, int(port)), timeout=2).close()
    return True
  except OSError:
    return False


def _AssertNotListening(hosts, secs=10):
  # A killed process shows as a zombie while its other threads, which hold
  # its sockets, are still being torn down: allow a moment.
  deadline = time.monotonic() + secs
  while any(_Listening(h) for h in hosts) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not [h for h in hosts if _Listening(h)]


def _CheckpointState(logdir):
  return os.path.join(checkpoint_lib.Directory(str(logdir)), 'checkpoint')


def _WaitForCheckpoint(logdir, process, describe):
  deadline = time.monotonic() + _STARTUP_SECS
  while not os.path.exists(_CheckpointState(logdir)):
    assert process.poll() is None, describe()
    assert time.monotonic() < deadline, 'no checkpoint in time: ' + describe()
    time.sleep(0.2)


def _Checkpoints(logdir):
  directory = checkpoint_lib.Directory(str(logdir))
  return sorted((name, os.stat(os.path.join(directory, name)).st_mtime_ns)
                for name in os.listdir(directory))


def _ErrorLines(stderr):
  return [l for l in stderr.splitlines() if l.startswith('error: ')]


def _Kill(pids):
  for pid in pids:
    if not _Gone(pid):
      try:
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass


def test_trainer_exits_worker_lost_when_no_worker_listens(tmp_path):
  host = f'127.0.0.1:{local_processes.FreePorts(1)[0]}'
  result = binaries.Run(binaries.TRAINER, f'--model={_TOY}',
                        f'--logdir={tmp_path}', f'--worker_hosts={host}',
                        f'{_FLAG}=3', timeout=120)
  assert result.returncode == ExitStatus.WORKER_LOST, result.stderr[-3000:]
  [error] = _ErrorLines(result.stderr)
  assert f'worker task 0 ({host}) is not listening after 3 s ({_FLAG}=3)' in (
      error)
  assert 'Traceback' not in result.stderr


def test_trainer_refuses_a_worker_timeout_that_is_not_positive(tmp_path):
  result = binaries.Run(binaries.TRAINER, f'--model={_TOY}',
                        f'--logdir={tmp_path}', f'{_FLAG}=0', timeout=120)
  assert result.returncode == ExitStatus.USAGE, result.stderr[-3000:]
  assert f'{_FLAG}=0' in result.stderr and 'finite number' in result.stderr


def _LoseAWorkerMidRun(tmp_path, fault):
  """Trains on 2 workers, sends `fault` to worker 1 after a checkpoint.

  Returns (trainer's status, its stderr, worker 1's host); every process is
  gone by then. The trainer must end within 60 s of the fault.
  """
  hosts, workers = local_processes.StartLocalWorkers(2, startup_timeout_secs=180)
  trainer = None
  try:
    with open(tmp_path / 'stderr', 'w+', encoding='utf-8') as stderr:
      trainer = binaries.Start(
          binaries.TRAINER, f'--model={_TOY}', f'--logdir={tmp_path}',
          f'--worker_hosts={",".join(hosts)}', f'{_FLAG}=10', *_LONG_RUN,
          stdout=subprocess.DEVNULL, stderr=stderr)
      _WaitForCheckpoint(tmp_path, trainer,
                         lambda: (tmp_path / 'stderr').read_text()[-3000:])
      os.kill(workers[1].pid, fault)
      try:
        status = trainer.wait(timeout=60)
      except subprocess.TimeoutExpired:
        pytest.fail(f'trainer still running 60 s after {fault!r} of worker 1')
    text = (tmp_path / 'stderr').read_text()
  finally:
    if trainer is not None and trainer.poll() is None:
      trainer.kill()
      trainer.wait()
    local_processes.StopAll(workers, grace_secs=5)  # resumes a stopped one first
  assert _WaitGone([trainer.pid] + [w.pid for w in workers], 10)
  _AssertNotListening(hosts)
  return status, text, hosts[1]


@pytest.mark.heavy  # about 30 s: three TensorFlow processes
def test_a_stopped_worker_ends_the_run_naming_it(tmp_path):
  status, stderr, host = _LoseAWorkerMidRun(tmp_path, signal.SIGSTOP)
  assert status == ExitStatus.WORKER_LOST, stderr[-3000:]
  [error] = _ErrorLines(stderr)
  assert f'worker task 1 ({host}) did not answer a probe within 10 s ' in error
  assert f'({_FLAG}=10)' in error
  assert 'Traceback' not in stderr


@pytest.mark.heavy  # about 30 s: three TensorFlow processes
def test_a_killed_worker_ends_the_run_as_worker_lost(tmp_path):
  status, stderr, host = _LoseAWorkerMidRun(tmp_path, signal.SIGKILL)
  assert status == ExitStatus.WORKER_LOST, stderr[-3000:]
  # The step's UnavailableError or the watchdog's probe, whichever comes
  # first, reports it, naming the worker (task and host).
  errors = _ErrorLines(stderr)
  assert errors and f'worker task 1 ({host}) was lost' in errors[0], errors
  assert 'task 0' not in errors[0], errors  # worker 0 is fine
  assert 'Traceback' not in stderr


def _LauncherThenFault(tmp_path, fault):
  """Runs local_cluster, sends it `fault` once a checkpoint exists.

  Returns (launcher's status, its stderr, worker hosts, the pids it started).
  """
  with open(tmp_path / 'stderr', 'w+', encoding='utf-8') as stderr:
    launcher = binaries.Start(
        binaries.LOCAL_CLUSTER, '--num_workers=2', '--', f'--model={_TOY}',
        f'--logdir={tmp_path / "run"}', *_LONG_RUN,
        stdout=subprocess.DEVNULL, stderr=stderr)
  children = []
  try:
    _WaitForCheckpoint(tmp_path / 'run', launcher,
                       lambda: (tmp_path / 'stderr').read_text()[-3000:])
    children = _Children(launcher.pid)
    commands = [_CommandLine(p) for p in children]
    workers = sum('lingvo_gpipe.tools.worker' in c for c in commands)
    assert workers == 2, commands
    assert sum('lingvo_gpipe.trainer' in c for c in commands) == 1, commands
    launcher.send_signal(fault)
    status = launcher.wait(timeout=90)
    assert _WaitGone(children, 30), [
        _CommandLine(p) for p in children if not _Gone(p)]
  finally:
    if launcher.poll() is None:
      launcher.kill()
      launcher.wait()
    _Kill(children)
  text = (tmp_path / 'stderr').read_text()
  match = re.search(r'Workers listening at (.*)\.', text)
  assert match, text[-3000:]
  hosts = match.group(1).split(', ')
  _AssertNotListening(hosts)
  before = _Checkpoints(tmp_path / 'run')
  time.sleep(2)
  assert _Checkpoints(tmp_path / 'run') == before
  return status, text


@pytest.mark.heavy  # about 30 s: four TensorFlow processes
def test_sigterm_stops_the_launcher_its_trainer_and_workers(tmp_path):
  status, stderr = _LauncherThenFault(tmp_path, signal.SIGTERM)
  assert status == 143, stderr[-3000:]
  assert 'Traceback' not in stderr


@pytest.mark.heavy  # about 30 s: four TensorFlow processes
def test_trainer_and_workers_die_with_a_killed_launcher(tmp_path):
  status, _ = _LauncherThenFault(tmp_path, signal.SIGKILL)
  assert status == -signal.SIGKILL


def test_a_worker_exits_when_its_launcher_is_gone():
  # The portable fallback: the launcher's pid in the environment is not this
  # worker's parent (as after the launcher's death), so it exits at once.
  host = f'127.0.0.1:{local_processes.FreePorts(1)[0]}'
  result = binaries.Run('lingvo_gpipe.tools.worker', f'--worker_hosts={host}',
                        '--task_index=0', timeout=120,
                        **{local_processes.LAUNCHER_PID_ENV: '1'})
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'The launcher (pid 1) is gone' in result.stderr
