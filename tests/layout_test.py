"""layout.Compute: the trainer's layout from the flag values, K and the GPUs; no process."""

import dataclasses
import re

import pytest

from lingvo_gpipe import layout
from lingvo_gpipe.core import hyperparams

Settings = layout.Settings
_HOSTS = ('127.0.0.1:1', '127.0.0.1:2', '127.0.0.1:3')


def _Cpus(*indices):
  return tuple(f'/device:CPU:{i}' for i in indices)


def _Worker(task, kind='CPU'):
  return f'/job:worker/replica:0/task:{task}/device:{kind}:0'


def test_default_is_one_logical_cpu_per_cell():
  got = layout.Compute(Settings(), num_cells=2, num_gpus=0)
  assert got.kind == layout.LOCAL and got.num_cells == 2
  assert got.groups == (_Cpus(0, 1),) and got.devices == _Cpus(0, 1)
  assert got.cpu_devices == 2


def test_local_replicas_take_consecutive_device_groups():
  got = layout.Compute(Settings(num_replicas=2), num_cells=2, num_gpus=0)
  assert got.groups == (_Cpus(0, 1), _Cpus(2, 3)) and got.cpu_devices == 4
  gpus = layout.Compute(Settings(num_replicas=2), num_cells=2, num_gpus=4)
  assert gpus.groups == (('/device:GPU:0', '/device:GPU:1'),
                         ('/device:GPU:2', '/device:GPU:3'))
  assert gpus.cpu_devices == 0


def test_fewer_devices_than_cells_are_used_round_robin():
  got = layout.Compute(Settings(num_cpu_devices=1), num_cells=3, num_gpus=0)
  assert got.groups == (_Cpus(0, 0, 0),) and got.cpu_devices == 1
  got = layout.Compute(Settings(num_cpu_devices=3, num_replicas=2),
                       num_cells=2, num_gpus=0)
  assert got.groups == (_Cpus(0, 1), _Cpus(2, 0))


def test_auto_takes_gpus_only_if_there_are_enough():
  assert layout.Compute(Settings(), 2, num_gpus=2).devices == (
      '/device:GPU:0', '/device:GPU:1')
  assert layout.Compute(Settings(), 2, num_gpus=1).devices == _Cpus(0, 1)
  assert layout.Compute(Settings(device='cpu'), 2, num_gpus=8).devices == (
      _Cpus(0, 1))


def test_gpu_asked_for_on_too_few_gpus_is_refused():
  with pytest.raises(hyperparams.ConfigError) as raised:
    layout.Compute(Settings(device='gpu', num_replicas=2), 2, num_gpus=3)
  for part in ('2 replica(s) of 2 cells', 'need 4 GPUs', 'has 3 GPUs',
               '--device=cpu'):
    assert part in str(raised.value)


def test_workers_hold_one_cell_each():
  got = layout.Compute(Settings(worker_hosts=_HOSTS[:2]), 2, num_gpus=0)
  assert got.kind == layout.WORKERS and got.cpu_devices == 0
  assert got.groups == ((_Worker(0), _Worker(1)),)
  more = layout.Compute(Settings(worker_hosts=_HOSTS[:2], device='gpu'), 3,
                        num_gpus=0)
  assert more.devices == (_Worker(0, 'GPU'), _Worker(1, 'GPU'),
                          _Worker(0, 'GPU'))
  assert layout.DefaultNumCells(Settings(worker_hosts=_HOSTS)) == 3
  assert layout.DefaultNumCells(Settings()) is None


def test_replica_processes_use_their_own_devices():
  got = layout.Compute(Settings(replica_hosts=_HOSTS[:2], replica_index=1), 2,
                       num_gpus=0)
  assert got.kind == layout.PROCESSES and got.groups == (_Cpus(0, 1),)


def test_tpu_leaves_the_cores_to_the_strategy():
  got = layout.Compute(Settings(tpu='grpc://10.0.0.2:8470'), 4, num_gpus=0)
  assert got.kind == layout.TPU and got.groups == () and got.devices == ()
  assert got.tpu_replicas is None and got.cpu_devices == 0
  assert layout.Compute(Settings(tpu='x', num_replicas=2), 4, 0).tpu_replicas == 2


@pytest.mark.parametrize('settings,message', [
    (Settings(device='tpu'), "--device='tpu'; valid: auto, cpu, gpu"),
    (Settings(num_replicas=0), '--num_replicas must be >= 1, got 0'),
    (Settings(num_cpu_devices=0), '--num_cpu_devices must be >= 1, got 0'),
    (Settings(tpu='x', worker_hosts=_HOSTS),
     '--worker_hosts and --tpu cannot be combined'),
    (Settings(replica_hosts=_HOSTS, worker_hosts=_HOSTS),
     '--worker_hosts and --replica_hosts cannot be combined'),
    (Settings(replica_hosts=_HOSTS, num_replicas=2),
     'with --replica_hosts every process is one replica'),
    (Settings(worker_hosts=_HOSTS, num_replicas=2),
     '--num_replicas with --worker_hosts'),
])
def test_flags_that_describe_no_layout_are_refused(settings, message):
  with pytest.raises(hyperparams.ConfigError, match=re.escape(message)):
    layout.Check(settings)
  with pytest.raises(hyperparams.ConfigError):
    layout.Compute(settings, 2, num_gpus=0)


def test_a_layout_is_a_value():
  a = layout.Compute(Settings(num_replicas=2), 2, 0)
  assert a == layout.Compute(Settings(num_replicas=2), 2, 0)
  assert hash(a) == hash(layout.Compute(Settings(num_replicas=2), 2, 0))
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.num_cells = 3
