"""Tests of placement backends; the TPU parts that need no TPU run for real."""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core.gpipe import placement
from lingvo_gpipe.core.nested_map import NestedMap


def test_device_placement_names_and_round_robin():
  pl = placement.DevicePlacement(3, ['/device:CPU:0', 'CPU:1'])
  assert [pl.Device(k) for k in range(3)] == [
      '/device:CPU:0', '/device:CPU:1', '/device:CPU:0']
  with pytest.raises(ValueError, match='Cell 3 is out of range for 3'):
    pl.Device(3)
  with pytest.raises(ValueError, match='at least one device'):
    placement.DevicePlacement(1, [])
  remote = placement.DevicePlacement(2, ['/job:worker/task:1/device:CPU:0'])
  assert remote.Device(1) == '/job:worker/task:1/device:CPU:0'
  assert remote.PeakMemory(0) is None  # a remote allocator is not readable


def test_cell_scope_places_ops():
  pl = placement.DevicePlacement(2, placement.LocalDevices('CPU')[:2])
  with pl.CellScope(1):
    x = tf.Variable(1.0)
  assert x.device.endswith('CPU:1')


def test_local_devices_and_split_cpu():
  # conftest split the CPU into 4 before TensorFlow initialized.
  assert len(placement.LocalDevices('CPU')) == 4
  assert len(placement.SplitCpu(2)) == 2
  with pytest.raises(RuntimeError, match='already initialized with 4'):
    placement.SplitCpu(8)


@pytest.mark.parametrize('k,mesh,expected', [
    (1, [2, 2, 1, 2], [1, 1, 1, 1]), (2, [2, 2, 1, 2], [1, 1, 1, 2]),
    (4, [2, 2, 1, 2], [2, 1, 1, 2]), (8, [2, 2, 1, 2], [2, 2, 1, 2]),
    (4, [4, 4, 4, 1], [4, 1, 1, 1]), (32, [4, 4, 4, 1], [4, 4, 2, 1])])
def test_tpu_computation_shape(k, mesh, expected):
  assert placement.TpuComputationShape(k, mesh) == expected


def test_tpu_computation_shape_errors():
  with pytest.raises(ValueError, match='multiple of 2'):
    placement.TpuComputationShape(3, [2, 2, 1, 2])
  with pytest.raises(ValueError, match='do not fit'):
    placement.TpuComputationShape(16, [2, 2, 1, 2])


def _Topology(mesh):
  """A Topology of one task holding every core of `mesh` (no TPU needed)."""
  coords = np.array([[[x, y, z, c] for x in range(mesh[0])
                      for y in range(mesh[1]) for z in range(mesh[2])
                      for c in range(mesh[3])]], dtype=np.int32)
  return tf.tpu.experimental.Topology(mesh_shape=mesh, device_coordinates=coords)


def test_device_assignment_gives_each_replica_k_cores():
  assignment = placement.BuildTpuDeviceAssignment(_Topology([2, 2, 1, 2]), 4)
  assert assignment.num_cores_per_replica == 4
  assert assignment.num_replicas == 2
  with pytest.raises(ValueError, match='3 TPU cores do not split into replicas of 2 cells'):
    placement.BuildTpuDeviceAssignment(_Topology([3, 1, 1, 1]), 2)


class _FakeExtended:

  def __init__(self, cores):
    self._device_assignment = type('DA', (), {'num_cores_per_replica': cores})


class _FakeTpuStrategy:
  """Records experimental_assign_to_logical_device calls, as TPUStrategy's API."""

  def __init__(self, cores):
    self.extended = _FakeExtended(cores)
    self.calls = []

  def experimental_assign_to_logical_device(self, tensor, logical_device_id):
    self.calls.append(logical_device_id)
    return tensor


def test_tpu_placement_annotates_every_tensor_with_its_core():
  strategy = _FakeTpuStrategy(cores=4)
  pl = placement.TpuPlacement(4, strategy)
  out = pl.Annotate(2, NestedMap(a=tf.ones([1]), b=(tf.ones([2]),)))
  assert isinstance(out, NestedMap)
  assert strategy.calls == [2, 2]
  assert pl.Device(3) == 'TPU logical core 3'
  with pl.CellScope(1):
    pass
  with pytest.raises(ValueError, match='fewer than the 8 pipeline cells'):
    placement.TpuPlacement(8, strategy)


def test_allocator_peak_sees_a_large_tensor():
  tf.config.experimental.reset_memory_stats('CPU:0')
  x = tf.ones([1024, 1024])
  assert placement.AllocatorPeak('CPU:0') >= x.shape.num_elements() * 4
  assert placement.AllocatorPeak('TPU:0') is None
