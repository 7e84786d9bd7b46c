"""Pipeline stages on TensorFlow worker processes, through local_cluster and the trainer.

Every test starts real `tf.distribute.Server` workers on free 127.0.0.1 ports,
bounds its time, and checks that the workers are gone at the end.
"""

import os
import re
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import checkpoint as checkpoint_lib
from lingvo_gpipe.core import cluster
from lingvo_gpipe.core import summary
from lingvo_gpipe.run_errors import ExitStatus
from tests.support import binaries

_TOY = 'example.toy.ToyRegression'
_STEPS = ('--max_steps=4', '--params_override=train.save_interval_steps=4; '
          'train.log_interval_steps=1')


def _LocalCluster(*flags, trainer_flags=(), timeout=300):
  return binaries.Run(binaries.LOCAL_CLUSTER, *flags, '--', *trainer_flags,
                      timeout=timeout)


def _WorkerHosts(stderr):
  match = re.search(r'Workers listening at (.*)\.', stderr)
  assert match, stderr[-2000:]
  return match.group(1).split(', ')


def _AssertStopped(hosts):
  """Nothing listens at any of `hosts` any more."""
  for host in hosts:
    name, _, port = host.rpartition(':')
    with pytest.raises(OSError):
      socket.create_connection((name, int(port)), timeout=2).close()


def _Checkpoint(logdir):
  path = tf.train.latest_checkpoint(checkpoint_lib.Directory(str(logdir)))
  reader = tf.train.load_checkpoint(path)
  return {name: reader.get_tensor(name)
          for name in reader.get_variable_to_shape_map()
          if reader.get_variable_to_dtype_map()[name].is_floating}


@pytest.mark.heavy
def test_stages_on_two_workers_train_as_one_process_does(tmp_path):
  flags = (f'--model={_TOY}', *_STEPS)
  result = _LocalCluster('--num_workers=2', trainer_flags=(
      *flags, f'--logdir={tmp_path / "workers"}'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert '/job:worker/replica:0/task:1/device:CPU:0' in result.stderr
  # The cells ran on the workers, which profiled themselves: the third step
  # (the second timed the window) drawn as it ran, both cells seen.
  assert re.search(r'Measured schedule at step 3: .* tasks seen on devices '
                   r'\[0, 1\]', result.stderr), result.stderr[-3000:]
  measured = summary.ReadEvents(str(tmp_path / 'workers' / 'train'))
  assert [s for s, _ in measured['pipeline/schedule_measured']] == [3]
  _AssertStopped(_WorkerHosts(result.stderr))
  local = binaries.Run(binaries.TRAINER, *flags,
                       f'--logdir={tmp_path / "local"}')
  assert local.returncode == 0, local.stderr[-3000:]
  # Same losses step by step (the forward) and the same weights and Adam
  # slots after 4 updates (the gradients).
  losses = [summary.ReadEvents(str(tmp_path / run / 'train'))['loss']
            for run in ('workers', 'local')]
  assert [s for s, _ in losses[0]] == [1, 2, 3, 4]
  np.testing.assert_allclose([v for _, v in losses[0]],
                             [v for _, v in losses[1]], rtol=1e-5)
  remote, local = _Checkpoint(tmp_path / 'workers'), _Checkpoint(tmp_path / 'local')
  assert sorted(remote) == sorted(local) and len(remote) > 10
  for name in remote:
    np.testing.assert_allclose(remote[name], local[name], rtol=1e-5,
                               atol=1e-6, err_msg=name)


@pytest.mark.heavy
def test_a_model_too_big_for_one_capped_worker_trains_on_two(tmp_path):
  # Four 2048x2048 layers: 64 MiB of weights, 192 MiB with Adam's two slots;
  # a worker capped at 150 MB holds half of that, not all of it.
  flags = (f'--model={_TOY}', '--max_steps=2',
           '--params_override=task.network.hidden_dim=2048; '
           'task.network.num_hidden_layers=5; train.save_interval_steps=2')
  one = _LocalCluster('--num_workers=1', '--worker_mem_limit_mb=150',
                      trainer_flags=(*flags, f'--logdir={tmp_path / "one"}'))
  assert one.returncode == ExitStatus.OUT_OF_MEMORY, one.stderr[-3000:]
  assert 'out of memory' in one.stderr
  _AssertStopped(_WorkerHosts(one.stderr))
  two = _LocalCluster('--num_workers=2', '--worker_mem_limit_mb=150',
                      trainer_flags=(*flags, f'--logdir={tmp_path / "two"}'))
  assert two.returncode == 0, two.stderr[-3000:]
  assert 'Done: example.toy.ToyRegression at step 2' in two.stderr
  _AssertStopped(_WorkerHosts(two.stderr))


@pytest.mark.heavy
def test_replicas_in_processes_and_in_one_process_train_as_one_replica(tmp_path):
  # R=2 replicas of a 2-stage pipeline with BatchNorm, each taking half of
  # every mini-batch in 2 micro-batches, must make the updates one replica
  # makes taking all of it in 4 micro-batches (BatchNorm normalizes per
  # micro-batch): in two processes (MultiWorkerMirroredStrategy) and in one
  # (MirroredStrategy). Checkpoints, train summaries and evals as usual.
  flags = (f'--model={_TOY}', '--mode=train_and_eval', '--max_steps=4',
           '--params_override=train.save_interval_steps=4; '
           'train.log_interval_steps=1; task.network.batch_norm=True')
  one = binaries.Run(binaries.TRAINER, *flags, '--num_micro_batches=4',
                     f'--logdir={tmp_path / "one"}')
  assert one.returncode == 0, one.stderr[-3000:]
  local = binaries.Run(binaries.TRAINER, *flags, '--num_replicas=2',
                       f'--logdir={tmp_path / "local"}')
  assert local.returncode == 0, local.stderr[-3000:]
  assert 'on 2 replica(s)' in local.stderr
  processes = _LocalCluster('--replica_processes=2', trainer_flags=(
      *flags, f'--logdir={tmp_path / "processes"}'))
  assert processes.returncode == 0, processes.stderr[-3000:]
  match = re.search(r'Replica processes at (.*)\.', processes.stderr)
  assert match, processes.stderr[-3000:]
  _AssertStopped(match.group(1).split(', '))
  expected = _Checkpoint(tmp_path / 'one')
  assert any('moving_mean' in name for name in expected)
  losses = summary.ReadEvents(str(tmp_path / 'one' / 'train'))['loss']
  for run in ('local', 'processes'):
    got = _Checkpoint(tmp_path / run)
    assert sorted(got) == sorted(expected), run
    for name in expected:
      np.testing.assert_allclose(got[name], expected[name], rtol=2e-5,
                                 atol=1e-6, err_msg=f'{run}: {name}')
    np.testing.assert_allclose(
        [v for _, v in summary.ReadEvents(str(tmp_path / run / 'train'))['loss']],
        [v for _, v in losses], rtol=2e-5)
    evals = summary.ReadEvents(str(tmp_path / run / 'eval_test'))
    assert [s for s, _ in evals['loss']] == [4], run


def test_replica_processes_exit_with_the_trainers_status(tmp_path):
  result = _LocalCluster('--replica_processes=2', trainer_flags=(
      f'--model={_TOY}', f'--logdir={tmp_path}', '--num_replicas=2'))
  assert result.returncode == ExitStatus.USAGE, result.stderr[-3000:]
  assert '--num_replicas: with --replica_hosts every process' in result.stderr
  assert '--num_workers and --replica_processes' in _LocalCluster(
      '--replica_processes=2', '--num_workers=2', trainer_flags=(
          f'--model={_TOY}',)).stderr


def test_exit_status_is_the_trainers_and_workers_stop(tmp_path):
  result = _LocalCluster('--num_workers=2', trainer_flags=(
      '--model=example.toy.Toy', f'--logdir={tmp_path}'))
  assert result.returncode == ExitStatus.USAGE
  assert "Unknown model name 'example.toy.Toy'" in result.stderr
  _AssertStopped(_WorkerHosts(result.stderr))


@pytest.mark.heavy
def test_ctrl_c_stops_the_trainer_and_the_workers(tmp_path):
  process = binaries.Start(
      binaries.LOCAL_CLUSTER, '--num_workers=2', '--', f'--model={_TOY}',
      f'--logdir={tmp_path}', '--max_steps=10000000',
      '--params_override=train.save_interval_steps=10;'
      ' train.log_interval_steps=1000000',
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 240
    state = os.path.join(checkpoint_lib.Directory(str(tmp_path)), 'checkpoint')
    while not os.path.exists(state):
      assert process.poll() is None, process.stderr.read()[-3000:]
      assert time.time() < deadline, 'no checkpoint in time'
      time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  assert process.returncode == 130, stderr[-3000:]
  _AssertStopped(_WorkerHosts(stderr))


def test_parse_hosts_and_device_names():
  assert cluster.ParseHosts('127.0.0.1:1, 127.0.0.1:2') == ['127.0.0.1:1',
                                                              '127.0.0.1:2']
  with pytest.raises(ValueError, match="'localhost' is not host:port"):
    cluster.ParseHosts('localhost')
  with pytest.raises(ValueError, match='No worker hosts'):
    cluster.ParseHosts(' , ')
  assert cluster.WorkerDevices(2, 'GPU') == [
      '/job:worker/replica:0/task:0/device:GPU:0',
      '/job:worker/replica:0/task:1/device:GPU:0']
