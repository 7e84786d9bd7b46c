"""local_processes: free ports, children that die with their launcher, stopping them, no TensorFlow."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from lingvo_gpipe.core import local_processes
from tests.support import binaries


def test_the_launcher_starts_without_tensorflow():
  # local_cluster only starts and watches processes: importing TensorFlow
  # would cost it seconds and hundreds of MB it never uses.
  result = binaries.RunPython(
      'import sys\n'
      'import lingvo_gpipe.core.local_processes\n'
      'import lingvo_gpipe.tools.local_cluster\n'
      "print(sorted(m for m in sys.modules if m.split('.')[0] in "
      "('tensorflow', 'keras')))\n")
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout == '[]\n'


def test_free_ports_are_distinct_and_nothing_listens_at_them():
  ports = local_processes.FreePorts(3)
  assert len(set(ports)) == 3
  with pytest.raises(TimeoutError, match=f'127.0.0.1:{ports[0]}'):
    local_processes.WaitForListening([f'127.0.0.1:{ports[0]}'],
                                     timeout_secs=0.5)


def test_stop_all_ends_a_stopped_process_without_waiting_out_the_grace():
  # One that handles SIGTERM (as the trainer does): stopped, it would handle
  # it only once resumed, after StopAll's grace.
  process = subprocess.Popen(
      [sys.executable, '-c',
       'import signal, sys, time\n'
       'signal.signal(signal.SIGTERM, lambda *unused: sys.exit(7))\n'
       "print('ready', flush=True)\n"
       'time.sleep(60)\n'], stdout=subprocess.PIPE, text=True)
  try:
    assert process.stdout.readline() == 'ready\n'
    os.kill(process.pid, signal.SIGSTOP)
    local_processes.StopAll([process], grace_secs=20)
    assert process.returncode == 7  # its SIGTERM handler ran: not killed
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
    process.stdout.close()


def test_die_with_this_process_only_from_the_main_thread():
  assert callable(local_processes.DieWithThisProcess())
  found = []
  thread = threading.Thread(
      target=lambda: found.append(local_processes.DieWithThisProcess()))
  thread.start()
  thread.join()
  assert found == [None]


def _Gone(pid):
  """True when pid no longer runs (a zombie left for init counts as gone)."""
  try:
    with open(f'/proc/{pid}/stat', encoding='ascii') as f:
      return f.read().rpartition(')')[2].split()[0] in ('Z', 'X')
  except FileNotFoundError:
    return True


@pytest.mark.skipif(not sys.platform.startswith('linux'),
                    reason='PR_SET_PDEATHSIG is Linux only')
def test_a_child_dies_with_its_killed_parent():
  # A parent started with DieWithThisProcess's preexec_fn, killed outright.
  parent = subprocess.Popen(
      [sys.executable, '-c',
       'import subprocess, sys, time\n'
       'from lingvo_gpipe.core import local_processes\n'
       "child = subprocess.Popen(['sleep', '300'], "
       'preexec_fn=local_processes.DieWithThisProcess())\n'
       'print(child.pid, flush=True)\n'
       'time.sleep(300)\n'],
      stdout=subprocess.PIPE, text=True, cwd=binaries.REPO_ROOT,
      env=binaries.Env())
  child = None
  try:
    child = int(parent.stdout.readline())
    assert not _Gone(child)
    parent.kill()
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while not _Gone(child) and time.monotonic() < deadline:
      time.sleep(0.05)
    assert _Gone(child)
  finally:
    if parent.poll() is None:
      parent.kill()
      parent.wait()
    if child and not _Gone(child):
      os.kill(child, signal.SIGKILL)
