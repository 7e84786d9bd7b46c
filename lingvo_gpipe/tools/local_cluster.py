r"""Runs the trainer with its pipeline stages on K local TensorFlow worker processes.

  python -m lingvo_gpipe.tools.local_cluster --num_workers=2 -- \
      --model=example.toy.ToyRegression --logdir=/tmp/toy_workers

Starts K workers (`lingvo_gpipe.tools.worker`) on free 127.0.0.1 ports,
runs `python -m lingvo_gpipe.trainer <flags after --> --worker_hosts=...`
(one pipeline stage per worker), stops the workers when the trainer ends,
also on failure or Ctrl-C, and exits with the trainer's status (130 after
Ctrl-C). For trying multi-process pipelines on one machine, and for tests.
"""

import signal
import subprocess
import sys

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


def main(argv):
  trainer_flags = argv[1:]
  if _NUM_WORKERS.value < 1:
    raise app.UsageError(f'--num_workers must be >= 1, got {_NUM_WORKERS.value}.')
  if any(f.startswith('--worker_hosts') for f in trainer_flags):
    raise app.UsageError('local_cluster sets --worker_hosts itself; drop it '
                         'from the trainer flags.')
  hosts, workers = cluster.StartLocalWorkers(
      _NUM_WORKERS.value, _MEM_LIMIT.value, _PIN.value, _STARTUP.value)
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
      cluster.StopAll([trainer])
    status = EXIT_INTERRUPTED
  finally:
    cluster.StopAll(workers)
  sys.exit(status)


if __name__ == '__main__':
  app.run(main)
