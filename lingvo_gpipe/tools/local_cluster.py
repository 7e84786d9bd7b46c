r"""Runs the trainer with its pipeline stages on K local TensorFlow worker processes.

  python -m lingvo_gpipe.tools.local_cluster --num_workers=2 -- \
      --model=example.toy.ToyRegression --logdir=/tmp/toy_workers

Starts K workers (`lingvo_gpipe.tools.worker`) on free 127.0.0.1 ports,
runs `python -m lingvo_gpipe.trainer <flags after --> --worker_hosts=...`
(one pipeline stage per worker), stops the workers when the trainer ends,
also on failure or Ctrl-C, and exits with the trainer's status (130 after
Ctrl-C). For trying multi-process pipelines on one machine, and for tests.
"""

import os
import signal
import subprocess
import sys
from typing import Optional, Sequence

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

EXIT_INTERRUPTED = 130


def WorkerCommand(hosts: Sequence[str], task: int, pin: bool) -> list[str]:
  command = [sys.executable, '-m', 'lingvo_gpipe.tools.worker',
             f'--worker_hosts={",".join(hosts)}', f'--task_index={task}']
  if pin:
    command = ['taskset', '-c', str(task % (os.cpu_count() or 1))] + command
  return command


def StartWorkers(num_workers: int, mem_limit_mb: Optional[int] = None,
                 pin: bool = False,
                 startup_timeout_secs: float = 120.0
                 ) -> tuple[list[str], list[subprocess.Popen]]:
  """(hosts, processes) of num_workers listening workers on 127.0.0.1."""
  hosts = [f'127.0.0.1:{p}' for p in cluster.FreePorts(num_workers)]
  env = dict(os.environ)
  if mem_limit_mb:
    env['TF_CPU_BFC_MEM_LIMIT_IN_MB'] = str(mem_limit_mb)
  processes = []
  try:
    for task in range(num_workers):
      processes.append(subprocess.Popen(WorkerCommand(hosts, task, pin),
                                        env=env))
    cluster.WaitForListening(hosts, startup_timeout_secs)
    for task, process in enumerate(processes):
      if process.poll() is not None:
        raise RuntimeError(f'Worker {task} ({hosts[task]}) exited with '
                           f'{process.returncode} at startup.')
  except BaseException:
    StopAll(processes)
    raise
  return hosts, processes


def StopAll(processes: Sequence[subprocess.Popen], grace_secs: float = 10.0) -> None:
  """Terminates every process still running; kills those that linger."""
  for process in processes:
    if process.poll() is None:
      process.terminate()
  for process in processes:
    try:
      process.wait(timeout=grace_secs)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()


def main(argv):
  trainer_flags = argv[1:]
  if _NUM_WORKERS.value < 1:
    raise app.UsageError(f'--num_workers must be >= 1, got {_NUM_WORKERS.value}.')
  if any(f.startswith('--worker_hosts') for f in trainer_flags):
    raise app.UsageError('local_cluster sets --worker_hosts itself; drop it '
                         'from the trainer flags.')
  hosts, workers = StartWorkers(_NUM_WORKERS.value, _MEM_LIMIT.value,
                                _PIN.value, _STARTUP.value)
  logging.info('Workers listening at %s.', ', '.join(hosts))
  trainer = None
  try:
    trainer = subprocess.Popen(
        [sys.executable, '-m', 'lingvo_gpipe.trainer', *trainer_flags,
         f'--worker_hosts={",".join(hosts)}'])
    status = trainer.wait()
  except KeyboardInterrupt:
    if trainer is not None and trainer.poll() is None:
      trainer.send_signal(signal.SIGINT)
      StopAll([trainer])
    status = EXIT_INTERRUPTED
  finally:
    StopAll(workers)
  sys.exit(status)


if __name__ == '__main__':
  app.run(main)
