"""Processes a run starts on this machine: workers, trainers, replicas; tied to their launcher.

Invariant: no process started here outlives the one that started it, and
nothing here imports TensorFlow, so a launcher (lingvo_gpipe.tools.local_cluster)
starts in a fraction of a second and holds none of TensorFlow's memory.
`StartLocalWorkers` runs `tf.distribute.Server` workers
(lingvo_gpipe.tools.worker; cluster.py connects to them) on free 127.0.0.1
ports; `DieWithThisProcess` makes the kernel kill a child when its launcher
dies, even by SIGKILL; `StopAll` stops them earlier.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Optional, Sequence

# Set by StartLocalWorkers in each worker's environment: the pid of the process
# that started it, which the worker outlives by at most a poll
# (lingvo_gpipe.tools.worker), also where PR_SET_PDEATHSIG is missing.
LAUNCHER_PID_ENV = 'LINGVO_GPIPE_LAUNCHER_PID'

_PR_SET_PDEATHSIG = 1


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


def DieWithThisProcess(sig: int = signal.SIGKILL
                       ) -> Optional[Callable[[], None]]:
  """A Popen preexec_fn: the child gets `sig` when this process dies.

  Linux only (prctl PR_SET_PDEATHSIG); None elsewhere. The kernel sends it when
  the *thread* that started the child ends, so only the main thread, which
  lasts as long as the process, uses it; None in any other thread.
  """
  if (not sys.platform.startswith('linux') or
      threading.current_thread() is not threading.main_thread()):
    return None
  try:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
  except (OSError, AttributeError):
    return None
  # Resolved and built here: the child between fork and exec should do as
  # little as it can.
  args = (ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(int(sig)),
          ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
  parent = os.getpid()

  def Preexec() -> None:
    prctl(*args)
    if os.getppid() != parent:  # it died before prctl took effect
      os.kill(os.getpid(), int(sig))

  return Preexec


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

  The workers die with this process, even when it is killed (SIGKILL): they
  get SIGKILL when it ends (Linux, started from the main thread) and poll
  that it is still there. StopAll stops them earlier.

  Args:
    num_workers: how many (task k listens on hosts[k]).
    mem_limit_mb: caps each worker (TF_CPU_BFC_MEM_LIMIT_IN_MB).
    pin: pin worker k to core k with taskset.
    startup_timeout_secs: how long they may take to listen.
  """
  hosts = [f'127.0.0.1:{p}' for p in FreePorts(num_workers)]
  env = dict(os.environ)
  env[LAUNCHER_PID_ENV] = str(os.getpid())
  if mem_limit_mb:
    env['TF_CPU_BFC_MEM_LIMIT_IN_MB'] = str(mem_limit_mb)
  processes = []
  try:
    for task in range(num_workers):
      processes.append(subprocess.Popen(_WorkerCommand(hosts, task, pin),
                                        env=env,
                                        preexec_fn=DieWithThisProcess()))
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
      try:
        # A stopped (SIGSTOP) process acts on SIGTERM only once resumed.
        os.kill(process.pid, signal.SIGCONT)
      except (OSError, AttributeError):
        pass
  for process in processes:
    try:
      process.wait(timeout=grace_secs)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()
