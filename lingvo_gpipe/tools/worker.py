r"""A TensorFlow worker process: runs the pipeline cells a trainer places on it.

  python -m lingvo_gpipe.tools.worker --worker_hosts=127.0.0.1:2222,127.0.0.1:2223 \
      --task_index=0

Serves until killed, or until the process that launched it ends: a worker
started by `local_processes.StartLocalWorkers` (LINGVO_GPIPE_LAUNCHER_PID in
its environment) never outlives its launcher. Start one per host:port in
--worker_hosts (task k listens on the k-th), then run the trainer with the
same --worker_hosts; `lingvo_gpipe.tools.local_cluster` does both on this
machine. A memory cap (TF_CPU_BFC_MEM_LIMIT_IN_MB) in this process's
environment caps this worker.
"""

import os
import threading
import time

from lingvo_gpipe.core import tf_env

tf_env.Setup()  # before TensorFlow loads: allocator, oneDNN, log noise

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import tensorflow as tf

from lingvo_gpipe.core import cluster
from lingvo_gpipe.core import local_processes

flags.adopt_module_key_flags(tf_env)  # --tf_logs in --help
_HOSTS = flags.DEFINE_string('worker_hosts', None,
                             'Comma-separated host:port of every worker.')
_TASK = flags.DEFINE_integer('task_index', None, 'Which of them this one is.')
_LAUNCHER_POLL_SECS = 1.0


def ExitWithLauncher(poll_secs: float = _LAUNCHER_POLL_SECS) -> None:
  """Ends this process within poll_secs of its launcher's end, if it has one.

  The portable fallback of the SIGKILL the launcher asks Linux to send
  (local_processes.DieWithThisProcess): a worker left behind would serve
  forever. The parent pid changes when the parent dies. No-op without
  local_processes.LAUNCHER_PID_ENV.
  """
  value = os.environ.get(local_processes.LAUNCHER_PID_ENV, '')
  if not value.isdigit():
    return
  launcher = int(value)

  def Watch() -> None:
    while os.getppid() == launcher:
      time.sleep(poll_secs)
    logging.error('The launcher (pid %d) is gone; worker exiting with it.',
                  launcher)
    logging.flush()
    os._exit(1)  # pylint: disable=protected-access

  threading.Thread(target=Watch, daemon=True, name='launcher_watch').start()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _HOSTS.value is None or _TASK.value is None:
    raise app.UsageError('--worker_hosts and --task_index are required.')
  ExitWithLauncher()
  hosts = cluster.ParseHosts(_HOSTS.value)
  if not 0 <= _TASK.value < len(hosts):
    raise app.UsageError(f'--task_index={_TASK.value} is not in [0, '
                         f'{len(hosts)}) for {len(hosts)} worker hosts.')
  server = tf.distribute.Server(cluster.ClusterSpec(hosts),
                                job_name=cluster.WORKER_JOB,
                                task_index=_TASK.value, start=True)
  logging.info('Worker %d serving at %s.', _TASK.value, hosts[_TASK.value])
  server.join()


if __name__ == '__main__':
  app.run(main)
