"""cluster: bounded waits for workers, the liveness watchdog, the lost-worker exit.

The watchdog's probe is replaced by a fake here (connecting this test process
to a cluster would change TensorFlow's context for every other test);
tests/tools/worker_faults_test.py runs it against real workers.
"""

import socket
import threading
import time

import pytest
import tensorflow as tf

from lingvo_gpipe.core import cluster
from lingvo_gpipe.core import local_processes
from tests.support import binaries

_FLAG = '--worker_timeout_secs'


@pytest.mark.parametrize('value', [0, -1.0, float('inf'), float('nan')])
def test_check_timeout_refuses_what_is_not_finite_and_positive(value):
  with pytest.raises(ValueError, match=f'{_FLAG}={value}: .*finite number of '
                     r'seconds > 0, e\.g\. 120'):
    cluster.CheckTimeout(value, _FLAG)
  assert cluster.CheckTimeout(2.5, _FLAG) == 2.5


def test_wait_for_workers_names_the_host_nothing_listens_at():
  hosts = [f'127.0.0.1:{p}' for p in local_processes.FreePorts(2)]
  with pytest.raises(cluster.WorkerLostError) as e:
    cluster.WaitForWorkers(hosts, 0.5, _FLAG)
  assert str(e.value).startswith(f'worker task 0 ({hosts[0]}) is not '
                                 f'listening after 0.5 s ({_FLAG}=0.5).')
  assert '--task_index=0' in str(e.value)


class _Server:
  """A 127.0.0.1 listener; with greet, it answers like a gRPC server."""

  def __init__(self, greet):
    self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    self._socket.bind(('127.0.0.1', 0))
    self._socket.listen(8)
    self.host = f'127.0.0.1:{self._socket.getsockname()[1]}'
    if greet:
      threading.Thread(target=self._Greet, daemon=True).start()

  def _Greet(self):
    while True:
      try:
        connection, _ = self._socket.accept()
      except OSError:
        return  # closed
      with connection:  # a gRPC server's first words: HTTP/2 SETTINGS
        connection.sendall(bytes.fromhex('000000040000000000'))

  def __enter__(self):
    return self

  def __exit__(self, *unused):
    self._socket.close()


def test_wait_for_workers_tells_a_silent_listener_from_a_live_server():
  # Silent is how a stopped (SIGSTOP) worker looks: the kernel accepts,
  # nothing answers.
  with _Server(greet=True) as live, _Server(greet=False) as silent:
    cluster.WaitForWorkers([live.host], 10, _FLAG)
    with pytest.raises(cluster.WorkerLostError,
                       match=rf'worker task 1 \({silent.host}\) accepts '
                       rf'connections but did not answer within 0.5 s '
                       rf'\({_FLAG}=0.5\): the process is stopped or hung'):
      cluster.WaitForWorkers([live.host, silent.host], 0.5, _FLAG)


class _FakeProbes:
  """Stands in for the remote op: per device, answer, hang or fail."""

  def __init__(self):
    self.hang = set()
    self.fail = {}
    self.calls = []
    self.release = threading.Event()

  def __call__(self, device):
    self.calls.append(device)
    if device in self.fail:
      raise self.fail[device]
    if device in self.hang:
      self.release.wait(timeout=30)


@pytest.fixture
def probes(monkeypatch):
  fake = _FakeProbes()
  monkeypatch.setattr(cluster, '_ProbeOp', fake)
  yield fake
  fake.release.set()


_HOSTS = ['127.0.0.1:1001', '127.0.0.1:1002']
_DEVICES = cluster.WorkerDevices(2)


def _Watch(timeout_secs=0.5, interval_secs=0.05):
  lost = []
  reported = threading.Event()

  def OnLost(message):
    lost.append(message)
    reported.set()

  watchdog = cluster.WorkerWatchdog(_HOSTS, timeout_secs, OnLost, _FLAG,
                                    interval_secs=interval_secs)
  return watchdog, lost, reported


def test_watchdog_stays_quiet_while_workers_answer_and_stops_promptly(probes):
  watchdog, lost, _ = _Watch()
  with watchdog:
    time.sleep(1.0)
  watchdog.Stop()
  assert not watchdog._thread.is_alive()  # pylint: disable=protected-access
  assert not lost
  assert set(probes.calls) == set(_DEVICES) and len(probes.calls) > 4


def test_watchdog_names_a_worker_that_stops_answering(probes):
  probes.hang.add(_DEVICES[1])
  watchdog, lost, reported = _Watch(timeout_secs=0.5)
  start = time.monotonic()
  with watchdog:
    assert reported.wait(timeout=10)
  assert time.monotonic() - start >= 0.5  # it waited the whole bound
  [message] = lost
  assert message.startswith(f'worker task 1 ({_HOSTS[1]}) did not answer a '
                            f'probe within 0.5 s ({_FLAG}=0.5): stopped, hung '
                            'or unreachable.')
  assert 'task 0' not in message


def test_watchdog_names_a_worker_whose_probe_fails(probes):
  probes.fail[_DEVICES[0]] = tf.errors.UnavailableError(
      None, None, 'recvmsg:Connection reset by peer\nmore')
  watchdog, lost, reported = _Watch(timeout_secs=30)
  with watchdog:
    assert reported.wait(timeout=10)
  [message] = lost
  assert message.startswith(f'worker task 0 ({_HOSTS[0]}) was lost: a probe '
                            'of it failed (recvmsg:Connection reset by peer).')


def test_a_worker_that_answers_with_its_own_error_is_not_lost(probes):
  # A capped worker out of memory mid-step fails the probe too, but answers.
  probes.fail[_DEVICES[0]] = tf.errors.ResourceExhaustedError(
      None, None, 'OOM when allocating tensor with shape[2048,2048]')
  watchdog, lost, reported = _Watch(timeout_secs=30)
  with watchdog:
    assert not reported.wait(timeout=1.5)
  assert not lost


def test_watchdog_stopped_in_time_reports_nothing(probes):
  probes.hang.add(_DEVICES[0])
  watchdog, lost, _ = _Watch(timeout_secs=2)
  with watchdog:
    time.sleep(0.3)
  time.sleep(2.5)
  assert not lost


def test_watchdog_refuses_a_bad_timeout():
  with pytest.raises(ValueError, match=f'{_FLAG}=0'):
    cluster.WorkerWatchdog(_HOSTS, 0, lambda message: None, _FLAG)


_KILLED_TEXT = (
    'Graph execution error:\n\nDetected at node Tanh_1/_6 defined at (most '
    'recent call last):\n  (0) UNAVAILABLE:   Socket closed\nAdditional GRPC '
    'error information from remote target /job:worker/replica:0/task:1 while '
    'calling /tensorflow.WorkerService/RecvTensor:\n:UNKNOWN:Error received '
    'from peer  {grpc_status:14, grpc_message:"Socket closed"}\nAdditional GRPC '
    'error information from remote target /job:worker/replica:0/task:0/device:'
    'CPU:0 while calling /tensorflow.eager.EagerService/RunComponentFunction')


def test_lost_worker_message_names_the_worker_that_no_longer_answers(
    monkeypatch):
  # TensorFlow's text names task 0 too, which only relayed the failure.
  dead = f'127.0.0.1:{local_processes.FreePorts(1)[0]}'
  with _Server(greet=True) as live:
    monkeypatch.setattr(cluster, '_connected_hosts', [live.host, dead])
    message = cluster.LostWorkerMessage(
        tf.errors.UnavailableError(None, None, _KILLED_TEXT))
  assert message.startswith(f'worker task 1 ({dead}) was lost (killed, '
                            'crashed or unreachable: Socket closed). Restart')


def test_lost_worker_message_falls_back_on_the_tasks_tensorflow_names(
    monkeypatch):
  with _Server(greet=True) as a, _Server(greet=True) as b:
    monkeypatch.setattr(cluster, '_connected_hosts', [a.host, b.host])
    message = cluster.LostWorkerMessage(
        tf.errors.UnavailableError(None, None, _KILLED_TEXT))
  assert message.startswith(f'worker task 0 ({a.host}) and worker task 1 '
                            f'({b.host}) were lost')
  monkeypatch.setattr(cluster, '_connected_hosts', [])
  assert cluster.LostWorkerMessage(tf.errors.UnavailableError(
      None, None, 'recvmsg:Connection reset by peer')).startswith(
          'a worker was lost (killed, crashed or unreachable: recvmsg:'
          'Connection reset by peer).')
  lost = cluster.WorkerLostError('worker task 0 (h:1) did not answer')
  assert cluster.LostWorkerMessage(lost) == str(lost)
  assert cluster.LostWorkerMessage(ValueError('x')) is None


def test_exit_process_on_lost_exits_while_the_main_thread_is_blocked():
  result = binaries.RunPython(
      'import threading\n'
      'from lingvo_gpipe.core import cluster\n'
      'exit_now = cluster.ExitProcessOnLost(5)\n'
      "threading.Timer(0.2, exit_now, ['worker task 1 (h:2) lost']).start()\n"
      'threading.Event().wait(60)\n')
  assert result.returncode == 5, result.stderr[-2000:]
  assert result.stderr.endswith('error: worker task 1 (h:2) lost\n')
