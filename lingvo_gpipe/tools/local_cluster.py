r"""Runs the trainer on local TensorFlow processes: pipeline stages on workers, or replicas.

  python -m lingvo_gpipe.tools.local_cluster --num_workers=2 -- \
      --model=example.toy.ToyRegression --logdir=/tmp/toy_workers
  python -m lingvo_gpipe.tools.local_cluster --replica_processes=2 -- \
      --model=example.toy.ToyRegression --logdir=/tmp/toy_replicas

Stages (default): starts K workers (`lingvo_gpipe.tools.worker`) on free
127.0.0.1 ports and runs `python -m lingvo_gpipe.trainer <flags after -->
--worker_hosts=...` (one pipeline stage per worker).

Replicas (--replica_processes=R): runs R trainer processes as one
data-parallel job (MultiWorkerMirroredStrategy, --replica_hosts on free
ports), each with its own K-cell pipeline on its own logical devices.

Invariant: no process it starts outlives it. It stops every one when the
trainer ends, also on failure, Ctrl-C or SIGTERM, and exits with the trainer's
status (the first failing replica's; 130 after Ctrl-C, 143 after SIGTERM);
killed outright (SIGKILL), its trainers and workers get SIGKILL from the
kernel (Linux), and workers also notice their launcher is gone. For trying
multi-process runs on one machine, and for tests.
"""

import signal
import subprocess
import sys
import time
from typing import Callable

from lingvo_gpipe.core import tf_env

tf_env.Setup()  # before TensorFlow loads: log noise

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging

from lingvo_gpipe.core import local_processes

flags.adopt_module_key_flags(tf_env)  # --tf_logs in --help

_NUM_WORKERS = flags.DEFINE_integer('num_workers', 2,
                                    'Worker processes: one per pipeline stage.')
_MEM_LIMIT = flags.DEFINE_integer(
    'worker_mem_limit_mb', None, 'Caps each worker like an accelerator of '
    'this many MB (TF_CPU_BFC_MEM_LIMIT_IN_MB in its environment).')
_PIN = flags.DEFINE_bool(
    'pin_cores', False, 'Pin worker k to core k (taskset), so stages do not '
    'share cores: what a fair speed-up measurement needs.')
_STARTUP = flags.DEFINE_float('startup_timeout_secs', 120.0,
                              'How long workers may take to listen.')
_REPLICA_PROCESSES = flags.DEFINE_integer(
    'replica_processes', 1, 'R > 1: run R trainer processes as one '
    'data-parallel job instead of starting stage workers.')

EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention
EXIT_TERMINATED = 143  # 128 + SIGTERM
_TRAINER_STOP_SECS = 30.0
_SET_BY_LAUNCHER = ('--worker_hosts', '--replica_hosts', '--replica_index')


def main(argv):
  trainer_flags = argv[1:]
  for flag in _SET_BY_LAUNCHER:
    if any(f.startswith(flag) for f in trainer_flags):
      raise app.UsageError(f'local_cluster sets {flag} itself; drop it from '
                           'the trainer flags.')
  if _REPLICA_PROCESSES.value > 1:
    if flags.FLAGS['num_workers'].present:
      raise app.UsageError('--num_workers and --replica_processes cannot be '
                           'combined: replica processes keep their stages on '
                           'their own devices.')
    sys.exit(_Stoppable(
        lambda: _RunReplicas(_REPLICA_PROCESSES.value, trainer_flags)))
  if _REPLICA_PROCESSES.value < 1:
    raise app.UsageError('--replica_processes must be >= 1, got '
                         f'{_REPLICA_PROCESSES.value}.')
  if _NUM_WORKERS.value < 1:
    raise app.UsageError(f'--num_workers must be >= 1, got {_NUM_WORKERS.value}.')
  sys.exit(_Stoppable(lambda: _RunStages(_NUM_WORKERS.value, trainer_flags)))


class _Terminated(BaseException):
  """SIGTERM arrived; a BaseException so that no `except Exception` eats it."""


def _RaiseTerminated(unused_signum, unused_frame):
  raise _Terminated()


def _IgnoreStopSignals() -> None:
  # Stopping has begun: a second Ctrl-C or SIGTERM must not cut short the
  # stopping of the children (StopAll kills what lingers anyway).
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _Stoppable(run: Callable[[], int]) -> int:
  """run()'s status, or 130 / 143 if Ctrl-C / SIGTERM stopped it first."""
  signal.signal(signal.SIGTERM, _RaiseTerminated)
  try:
    return run()
  except KeyboardInterrupt:
    return EXIT_INTERRUPTED
  except _Terminated:
    return EXIT_TERMINATED


def _RunStages(num_workers: int, trainer_flags: list[str]) -> int:
  workers = []
  try:
    hosts, workers = local_processes.StartLocalWorkers(
        num_workers, _MEM_LIMIT.value, _PIN.value, _STARTUP.value)
    logging.info('Workers listening at %s.', ', '.join(hosts))
    return _Supervise([[*trainer_flags, f'--worker_hosts={",".join(hosts)}']])
  finally:
    _IgnoreStopSignals()
    local_processes.StopAll(workers)


def _RunReplicas(num: int, trainer_flags: list[str]) -> int:
  hosts = [f'127.0.0.1:{p}' for p in local_processes.FreePorts(num)]
  logging.info('Replica processes at %s.', ', '.join(hosts))
  return _Supervise([[*trainer_flags, f'--replica_hosts={",".join(hosts)}',
                      f'--replica_index={i}'] for i in range(num)])


def _Supervise(flag_lists: list[list[str]]) -> int:
  """Runs one trainer per flag list until all end or one fails; its status.

  A failed replica would leave the others waiting in an all-reduce forever,
  so the first failure stops the rest. Ctrl-C and SIGTERM are passed on to
  the trainers (which may stop cleanly) before they are stopped.
  """
  trainers = []
  failed = []  # before StopAll, whose SIGTERM would fail the others too
  stop_signal = None
  try:
    for trainer_flags in flag_lists:
      trainers.append(subprocess.Popen(
          [sys.executable, '-m', 'lingvo_gpipe.trainer', *trainer_flags],
          preexec_fn=local_processes.DieWithThisProcess()))
    while True:
      statuses = [t.poll() for t in trainers]
      failed = [s for s in statuses if s]
      if failed or all(s is not None for s in statuses):
        break
      time.sleep(0.2)
  except KeyboardInterrupt:
    stop_signal = signal.SIGINT
  except _Terminated:
    stop_signal = signal.SIGTERM
  _IgnoreStopSignals()
  if stop_signal is not None:
    for trainer in trainers:
      if trainer.poll() is None:
        trainer.send_signal(stop_signal)
    # Time to stop cleanly (finish the step, checkpoint) before StopAll's
    # SIGTERM and SIGKILL.
    deadline = time.monotonic() + _TRAINER_STOP_SECS
    for trainer in trainers:
      try:
        trainer.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        pass
  local_processes.StopAll(trainers)
  if stop_signal is not None:
    return (EXIT_INTERRUPTED if stop_signal == signal.SIGINT
            else EXIT_TERMINATED)
  return failed[0] if failed else 0


if __name__ == '__main__':
  app.run(main)
