"""TensorFlow workers for pipeline cells: the cluster, the connection, the device names.

Invariant: TensorFlow's own distributed runtime does the work. Worker
processes are `tf.distribute.Server`s of job 'worker'; the trainer process
connects to them with `tf.config.experimental_connect_to_cluster` (it becomes
job 'localhost') and places cell k on worker k, so variables, optimizer slots
and each cell's forward and backward run in that worker's process, with its
own allocator and its own memory cap, while the input pipeline, the loop and
the checkpoints stay in the trainer. `StartLocalWorkers` runs such workers on
this machine (lingvo_gpipe.tools.local_cluster, benchmarks, tests).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Optional, Sequence

import tensorflow as tf

WORKER_JOB = 'worker'


def ParseHosts(text: str) -> list[str]:
  """'host:port,host:port' -> ['host:port', ...]; ValueError names a bad entry."""
  hosts = [h.strip() for h in text.split(',') if h.strip()]
  if not hosts:
    raise ValueError(f'No worker hosts in {text!r}; expected '
                     "'host:port[,host:port...]'.")
  for host in hosts:
    name, _, port = host.rpartition(':')
    if not name or not port.isdigit():
      raise ValueError(f'Worker host {host!r} is not host:port (e.g. '
                       "'127.0.0.1:2222').")
  return hosts


def ClusterSpec(worker_hosts: Sequence[str]) -> tf.train.ClusterSpec:
  return tf.train.ClusterSpec({WORKER_JOB: list(worker_hosts)})


def WorkerDevices(num_workers: int, device_type: str = 'CPU') -> list[str]:
  """Device k of the cluster: device 0 of type device_type on worker task k."""
  return [f'/job:{WORKER_JOB}/replica:0/task:{k}/device:{device_type}:0'
          for k in range(num_workers)]


def ConnectToWorkers(worker_hosts: Sequence[str]) -> list[str]:
  """Connects this process to the workers; returns their device names.

  Must run before this process creates any tensor. Ops without a device stay
  in this process (job 'localhost').
  """
  tf.config.experimental_connect_to_cluster(ClusterSpec(worker_hosts))
  return WorkerDevices(len(worker_hosts))


def FreePorts(count: int, host: str = '127.0.0.1') -> list[int]:
  """`count` distinct ports free on `host` now (the OS picks them)."""
  sockets = []
  try:
    for _ in range(count):
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      s.bind((host, 0))
      sockets.append(s)
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def WaitForListening(hosts: Sequence[str], timeout_secs: float) -> None:
  """Returns once every host:port accepts connections; TimeoutError otherwise."""
  deadline = time.time() + timeout_secs
  for host in hosts:
    name, _, port = host.rpartition(':')
    while True:
      try:
        with socket.create_connection((name, int(port)), timeout=1.0):
          break
      except OSError:
        if time.time() > deadline:
          raise TimeoutError(f'Worker {host} is not listening after '
                             f'{timeout_secs:.0f} s.') from None
        time.sleep(0.1)


def _WorkerCommand(hosts: Sequence[str], task: int, pin: bool) -> list[str]:
  command = [sys.executable, '-m', 'lingvo_gpipe.tools.worker',
             f'--worker_hosts={",".join(hosts)}', f'--task_index={task}']
  if pin:
    command = ['taskset', '-c', str(task % (os.cpu_count() or 1))] + command
  return command


def StartLocalWorkers(num_workers: int, mem_limit_mb: Optional[int] = None,
                      pin: bool = False, startup_timeout_secs: float = 120.0
                      ) -> tuple[list[str], list[subprocess.Popen]]:
  """(hosts, processes) of num_workers listening workers on 127.0.0.1.

  Args:
    num_workers: how many (task k listens on hosts[k]).
    mem_limit_mb: caps each worker (TF_CPU_BFC_MEM_LIMIT_IN_MB).
    pin: pin worker k to core k with taskset.
    startup_timeout_secs: how long they may take to listen.
  """
  hosts = [f'127.0.0.1:{p}' for p in FreePorts(num_workers)]
  env = dict(os.environ)
  if mem_limit_mb:
    env['TF_CPU_BFC_MEM_LIMIT_IN_MB'] = str(mem_limit_mb)
  processes = []
  try:
    for task in range(num_workers):
      processes.append(subprocess.Popen(_WorkerCommand(hosts, task, pin),
                                        env=env))
    WaitForListening(hosts, startup_timeout_secs)
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
