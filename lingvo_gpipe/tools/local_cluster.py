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

Either way it stops every process it started when the trainer ends, also on
failure or Ctrl-C, and exits with the trainer's status (the first failing
replica's; 130 after Ctrl-C). For trying multi-process runs on one machine,
and for tests.
"""

import signal
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging

from lingvo_gpipe.core import cluster

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

EXIT_INTERRUPTED = 130
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
    sys.exit(_RunReplicas(_REPLICA_PROCESSES.value, trainer_flags))
  if _REPLICA_PROCESSES.value < 1:
    raise app.UsageError('--replica_processes must be >= 1, got '
                         f'{_REPLICA_PROCESSES.value}.')
  if _NUM_WORKERS.value < 1:
    raise app.UsageError(f'--num_workers must be >= 1, got {_NUM_WORKERS.value}.')
  hosts, workers = cluster.StartLocalWorkers(
      _NUM_WORKERS.value, _MEM_LIMIT.value, _PIN.value, _STARTUP.value)
  logging.info('Workers listening at %s.', ', '.join(hosts))
  try:
    status = _Supervise([[*trainer_flags, f'--worker_hosts={",".join(hosts)}']])
  finally:
    cluster.StopAll(workers)
  sys.exit(status)


def _RunReplicas(num: int, trainer_flags: list[str]) -> int:
  hosts = [f'127.0.0.1:{p}' for p in cluster.FreePorts(num)]
  logging.info('Replica processes at %s.', ', '.join(hosts))
  return _Supervise([[*trainer_flags, f'--replica_hosts={",".join(hosts)}',
                      f'--replica_index={i}'] for i in range(num)])


def _Supervise(flag_lists: list[list[str]]) -> int:
  """Runs one trainer per flag list until all end or one fails; its status.

  A failed replica would leave the others waiting in an all-reduce forever,
  so the first failure stops the rest.
  """
  trainers = []
  try:
    for trainer_flags in flag_lists:
      trainers.append(subprocess.Popen(
          [sys.executable, '-m', 'lingvo_gpipe.trainer', *trainer_flags]))
    while True:
      statuses = [t.poll() for t in trainers]
      failed = [s for s in statuses if s]
      if failed or all(s is not None for s in statuses):
        cluster.StopAll(trainers)
        return failed[0] if failed else 0
      time.sleep(0.2)
  except KeyboardInterrupt:
    for trainer in trainers:
      if trainer.poll() is None:
        trainer.send_signal(signal.SIGINT)
    cluster.StopAll(trainers)
    return EXIT_INTERRUPTED


if __name__ == '__main__':
  app.run(main)
