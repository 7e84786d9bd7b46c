"""TensorFlow workers for pipeline cells: the cluster, the connection, the device names.

Invariant: TensorFlow's own distributed runtime does the work, and no wait on
a worker is unbounded. Worker processes are `tf.distribute.Server`s of job
'worker'; the trainer process connects to them with
`tf.config.experimental_connect_to_cluster` (it becomes job 'localhost') and
places cell k on worker k, so variables, optimizer slots and each cell's
forward and backward run in that worker's process, with its own allocator and
its own memory cap, while the input pipeline, the loop and the checkpoints
stay in the trainer. `ConnectToWorkers` waits a bounded time for every worker
to answer and `WorkerWatchdog` keeps probing them, so a worker that is absent,
stopped, hung or killed ends the run with `WorkerLostError` or an `on_lost`
message naming it, never a silent wait. Starting such workers on this
machine is local_processes.py's, which needs no TensorFlow.
"""

from __future__ import annotations

import atexit
import math
import os
import re
import socket
import sys
import threading
import time
from typing import Callable, Optional, Sequence

import tensorflow as tf

from lingvo_gpipe.core import hyperparams

WORKER_JOB = 'worker'
DEFAULT_TIMEOUT_SECS = 120.0

# A gRPC server sends its HTTP/2 SETTINGS frame as soon as it accepts a
# connection; a stopped (SIGSTOP) process lets the kernel accept but sends
# nothing. The client preface and an empty SETTINGS frame make us a proper
# HTTP/2 client, so the worker logs nothing about the probe.
_HTTP2_CLIENT_PREFACE = (b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n' +
                         bytes.fromhex('000000040000000000'))
_TASK_PATTERN = re.compile(rf'/job:{WORKER_JOB}/replica:\d+/task:(\d+)')
_GRPC_MESSAGE = re.compile(r'grpc_message:\s*"\s*([^"\\]+)')

# The hosts ConnectToWorkers connected this process to, for LostWorkerMessage.
_connected_hosts: list[str] = []


# Errors of a probe that mean its worker is gone, not merely busy or full.
_LOST_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError,
                tf.errors.CancelledError, OSError)


class WorkerLostError(RuntimeError):
  """A worker did not answer in time, or is gone; the message names it."""


def ParseHosts(text: str) -> list[str]:
  """'host:port,host:port' -> ['host:port', ...]; ValueError names a bad entry."""
  hosts = [h.strip() for h in text.split(',') if h.strip()]
  if not hosts:
    raise hyperparams.ConfigError(f'No worker hosts in {text!r}; expected '
                                  "'host:port[,host:port...]'.")
  for host in hosts:
    name, _, port = host.rpartition(':')
    if not name or not port.isdigit():
      raise hyperparams.ConfigError(f'Worker host {host!r} is not host:port (e.g. '
                                    "'127.0.0.1:2222').")
  return hosts


def ClusterSpec(worker_hosts: Sequence[str]) -> tf.train.ClusterSpec:
  return tf.train.ClusterSpec({WORKER_JOB: list(worker_hosts)})


def WorkerDevices(num_workers: int, device_type: str = 'CPU') -> list[str]:
  """Device k of the cluster: device 0 of type device_type on worker task k."""
  return [f'/job:{WORKER_JOB}/replica:0/task:{k}/device:{device_type}:0'
          for k in range(num_workers)]


def CheckTimeout(timeout_secs: float, flag: Optional[str] = None) -> float:
  """timeout_secs if a finite number of seconds > 0; ValueError otherwise."""
  if not (isinstance(timeout_secs, (int, float)) and
          math.isfinite(timeout_secs) and timeout_secs > 0):
    what = f'{flag}={timeout_secs}' if flag else f'timeout_secs={timeout_secs}'
    raise hyperparams.ConfigError(f'{what}: a worker timeout must be a finite number of '
                                  f'seconds > 0, e.g. {DEFAULT_TIMEOUT_SECS:g}.')
  return float(timeout_secs)


def _Bound(timeout_secs: float, flag: Optional[str]) -> str:
  """'3 s (--worker_timeout_secs=3)': the bound and what sets it."""
  return f'{timeout_secs:g} s' + (f' ({flag}={timeout_secs:g})' if flag else '')


def _Worker(hosts: Sequence[str], task: int) -> str:
  return f'worker task {task} ({hosts[task]})'


def _Workers(hosts: Sequence[str], tasks: Sequence[int]) -> tuple[str, str]:
  """('worker task 0 (h:p) and worker task 1 (h:q)', 'were'): names and verb."""
  return (' and '.join(_Worker(hosts, k) for k in tasks),
          'was' if len(tasks) == 1 else 'were')


def _Answer(host: str, timeout_secs: float) -> str:
  """'answers' (a server greeted us), 'silent' (accepted, no word), 'absent'."""
  name, _, port = host.rpartition(':')
  connect_secs = max(0.1, min(1.0, timeout_secs))
  try:
    with socket.create_connection((name.strip('[]'), int(port)),
                                  timeout=connect_secs) as s:
      s.sendall(_HTTP2_CLIENT_PREFACE)
      s.settimeout(max(0.1, timeout_secs))
      try:
        return 'answers' if s.recv(1) else 'absent'
      except socket.timeout:
        return 'silent'
  except OSError:
    return 'absent'


def WaitForWorkers(worker_hosts: Sequence[str], timeout_secs: float,
                   flag: Optional[str] = None) -> None:
  """Returns once every worker's gRPC server answers; WorkerLostError otherwise.

  Listening is not enough: a stopped worker's socket still accepts
  connections, so each must also send its HTTP/2 greeting.

  Args:
    worker_hosts: host:port of each worker, task k at index k.
    timeout_secs: how long all of them together may take.
    flag: the flag that sets timeout_secs, named in the error.
  """
  timeout_secs = CheckTimeout(timeout_secs, flag)
  deadline = time.monotonic() + timeout_secs
  for task, host in enumerate(worker_hosts):
    while True:
      answer = _Answer(host, max(0.5, deadline - time.monotonic()))
      if answer == 'answers':
        break
      if answer == 'silent':
        raise WorkerLostError(
            f'{_Worker(worker_hosts, task)} accepts connections but did not '
            f'answer within {_Bound(timeout_secs, flag)}: the process is '
            'stopped or hung. Resume or restart it, or raise the bound if the '
            'machine is merely slow.')
      if time.monotonic() > deadline:
        raise WorkerLostError(
            f'{_Worker(worker_hosts, task)} is not listening after '
            f'{_Bound(timeout_secs, flag)}. Start it (python -m '
            f'lingvo_gpipe.tools.worker --worker_hosts={",".join(worker_hosts)}'
            f' --task_index={task}) or fix --worker_hosts.')
      time.sleep(0.1)


def ConnectToWorkers(worker_hosts: Sequence[str],
                     timeout_secs: float = DEFAULT_TIMEOUT_SECS,
                     flag: Optional[str] = None) -> list[str]:
  """Connects this process to the workers; returns their device names.

  Must run before this process creates any tensor. Ops without a device stay
  in this process (job 'localhost'). TensorFlow itself would wait forever for
  a worker that does not answer, so this first waits at most timeout_secs for
  every one of them (WorkerLostError names the first that is missing and
  `flag`, the flag that sets the bound).
  """
  WaitForWorkers(worker_hosts, timeout_secs, flag)
  tf.config.experimental_connect_to_cluster(ClusterSpec(worker_hosts))
  _connected_hosts[:] = worker_hosts
  return WorkerDevices(len(worker_hosts))


def ConnectedHosts() -> list[str]:
  """The workers' host:port this process connected to (ConnectToWorkers)."""
  return list(_connected_hosts)


def _Text(error: BaseException) -> str:
  return str(getattr(error, 'message', '') or error)


def _Cause(error: BaseException) -> str:
  """gRPC's own words ('Socket closed'), not TF's 'Graph execution error:'."""
  text = _Text(error)
  grpc = _GRPC_MESSAGE.search(text)
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  return (grpc.group(1).strip() if grpc else
          (lines or [type(error).__name__])[0])[:200]


def LostWorkerMessage(error: BaseException) -> Optional[str]:
  """A one-line message naming the lost worker, for an error from the workers.

  For a WorkerLostError its own message. For TensorFlow's UnavailableError
  after ConnectToWorkers: the workers that no longer answer now (a second at
  most each), else those its text names (it also names the workers that only
  relayed the failure), with their host:port. None for anything else.
  """
  if isinstance(error, WorkerLostError):
    return str(error)
  if not isinstance(error, tf.errors.UnavailableError):
    return None
  text = _Text(error)
  hosts = list(_connected_hosts)
  lost = [k for k, host in enumerate(hosts) if _Answer(host, 1.0) != 'answers']
  named = sorted({int(t) for t in _TASK_PATTERN.findall(text)
                  if int(t) < len(hosts)})
  who, was = _Workers(hosts, lost or named) if lost or named else (
      'a worker', 'was')
  return (f'{who} {was} lost (killed, crashed or unreachable: '
          f'{_Cause(error)}). '
          'Restart it and rerun the same command to resume from the last '
          'checkpoint.')


def _ProbeOp(device: str) -> None:
  # A round trip through the worker's eager service: only a running process
  # answers it, unlike its socket.
  with tf.device(device):
    value = tf.identity(tf.constant(1.0)) + 1.0
  value.numpy()


class _Probe:
  """One probe of one worker in a thread of its own; it may never return."""

  def __init__(self, device: str):
    self.done = threading.Event()
    self.error: Optional[BaseException] = None
    self._device = device
    threading.Thread(target=self._Run, daemon=True,
                     name=f'worker_probe:{device}').start()

  def _Run(self) -> None:
    try:
      _ProbeOp(self._device)
    except Exception as e:  # pylint: disable=broad-except
      self.error = e
    self.done.set()


class WorkerWatchdog:
  """Probes every worker with a tiny op on it; calls on_lost once if one fails.

  Every interval_secs each worker runs one op in a probe thread; a worker that
  has not answered within timeout_secs (stopped, hung, unreachable) or whose
  probe cannot reach it (killed) is lost (one that answers with an error of
  its own, e.g. out of memory, is alive), and on_lost(message) gets a one-line message
  naming it. Probes run in threads of their own, so they go on while the main
  thread is blocked in a step that waits for the lost worker; probes of the
  other workers keep answering meanwhile (measured). After on_lost the
  watchdog stops. Stop() (also run at exit) ends it without a report.
  """

  def __init__(self, worker_hosts: Sequence[str], timeout_secs: float,
               on_lost: Callable[[str], None], flag: Optional[str] = None,
               interval_secs: Optional[float] = None):
    self._hosts = list(worker_hosts)
    self._timeout = CheckTimeout(timeout_secs, flag)
    self._flag = flag
    self._interval = (interval_secs if interval_secs is not None
                      else min(5.0, max(0.2, self._timeout / 4)))
    self._on_lost = on_lost
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def Start(self) -> WorkerWatchdog:
    self._thread = threading.Thread(target=self._Loop, daemon=True,
                                    name='worker_watchdog')
    self._thread.start()
    atexit.register(self.Stop)  # a probe must not outlive TensorFlow's teardown
    return self

  def Stop(self) -> None:
    """Stops probing, after a short wait for probes in flight."""
    self._stop.set()
    atexit.unregister(self.Stop)
    if self._thread not in (None, threading.current_thread()):
      self._thread.join(timeout=5.0)

  def __enter__(self) -> WorkerWatchdog:
    return self.Start()

  def __exit__(self, *unused_exc_info) -> None:
    self.Stop()

  def _Loop(self) -> None:
    devices = WorkerDevices(len(self._hosts))
    while not self._stop.is_set():
      message = self._Round(devices)
      if message is not None:
        if not self._stop.is_set():
          self._on_lost(message)
        return
      self._stop.wait(self._interval)

  def _Round(self, devices: Sequence[str]) -> Optional[str]:
    """Probes every worker at once; a message naming the lost ones, or None."""
    probes = [_Probe(d) for d in devices]
    deadline = time.monotonic() + self._timeout
    while True:
      # Only a failed connection means a lost worker: a worker that answers
      # with an error of its own (out of memory while a step fills it) is
      # alive, and the step itself reports that error.
      failed = [k for k, p in enumerate(probes) if p.done.is_set() and
                isinstance(p.error, _LOST_ERRORS)]
      if failed:
        who, was = _Workers(self._hosts, failed)
        return (f'{who} {was} lost: a probe of it failed '
                f'({_Cause(probes[failed[0]].error)}). It was '
                'killed, crashed or is unreachable; restart it and rerun the '
                'same command to resume from the last checkpoint.')
      silent = [k for k, p in enumerate(probes) if not p.done.is_set()]
      if not silent:
        return None
      if self._stop.is_set():
        # Exiting: give probes in flight a moment to end outside teardown.
        for p in probes:
          p.done.wait(timeout=max(0.0, min(2.0, deadline - time.monotonic())))
        return None
      if time.monotonic() > deadline:
        return (f'{_Workers(self._hosts, silent)[0]} did not answer a probe '
                f'within {_Bound(self._timeout, self._flag)}: '
                'stopped, hung or unreachable. Resume or restart it, then '
                'rerun the same command to continue from the last checkpoint; '
                'or raise the bound if the machine is merely slow.')
      probes[silent[0]].done.wait(timeout=0.05)


def ExitProcessOnLost(status: int) -> Callable[[str], None]:
  """An on_lost for WorkerWatchdog: prints `error: <message>`, exits `status`.

  It ends the process with os._exit because the main thread may be blocked in
  TensorFlow waiting for the lost worker, where no exception reaches it.
  Checkpoints are written atomically, so none that completed is lost.
  """

  def Exit(message: str) -> None:
    if not threading.main_thread().is_alive():
      return  # already exiting, with its own status and message
    sys.stdout.flush()
    print(f'error: {message}', file=sys.stderr, flush=True)
    os._exit(int(status))  # pylint: disable=protected-access

  return Exit
