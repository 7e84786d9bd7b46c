"""Tests of placement backends; the TPU parts that need no TPU run for real."""

import re

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.compiler.xla import xla_data_pb2

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


class _FakeTpuStrategy:
  """Records experimental_assign_to_logical_device calls, as TPUStrategy's API."""

  def __init__(self):
    self.calls = []

  def experimental_assign_to_logical_device(self, tensor, logical_device_id):
    self.calls.append(logical_device_id)
    return tensor


def test_tpu_placement_annotates_every_tensor_with_its_core():
  strategy = _FakeTpuStrategy()
  pl = placement.TpuPlacement(4, strategy)
  out = pl.Annotate(2, NestedMap(a=tf.ones([1]), b=(tf.ones([2]),)))
  assert isinstance(out, NestedMap)
  assert strategy.calls == [2, 2]
  assert pl.Device(3) == 'TPU logical core 3'
  with pl.CellScope(1):
    pass


class _TpuResolver:
  """Answers TPUExtended's one question, the TPU system's metadata, from a mesh."""

  def __init__(self, mesh):
    topology = _Topology(mesh)
    devices = [tf.config.LogicalDevice(
        f'/job:worker/replica:0/task:0/device:TPU:{i}', 'TPU')
               for i in range(int(np.prod(mesh)))]
    self.metadata = tf.tpu.experimental.TPUSystemMetadata(
        num_cores=len(devices), num_hosts=1,
        num_of_cores_per_host=len(devices), topology=topology, devices=devices)

  def get_tpu_system_metadata(self):
    return self.metadata


def _TpuStrategy(num_cells, mesh=(2, 2, 1, 2)):
  """A real tf.distribute.TPUStrategy of K-core replicas, on a fake TPU system.

  Nothing runs on it; it is TensorFlow's own class, so its public logical-core
  API is the one TpuPlacement relies on (a rename fails here, not on a TPU).
  """
  assignment = placement.BuildTpuDeviceAssignment(_Topology(list(mesh)),
                                                  num_cells)
  return tf.distribute.TPUStrategy(
      _TpuResolver(list(mesh)), experimental_device_assignment=assignment)


def test_tpu_logical_cores_of_a_real_strategy():
  strategy = _TpuStrategy(4)
  assert strategy.num_replicas_in_sync == 2
  assert placement.TpuLogicalCores(strategy, at_most=8) == 4
  assert placement.TpuLogicalCores(strategy, at_most=3) == 3
  assert placement.TpuLogicalCores(_TpuStrategy(2), at_most=8) == 2
  assert placement.TpuLogicalCores(_TpuStrategy(1), at_most=8) == 1


def test_tpu_placement_refuses_more_cells_than_the_strategys_cores():
  strategy = _TpuStrategy(4)
  assert placement.TpuPlacement(4, strategy).strategy is strategy
  assert placement.TpuPlacement(2, strategy).num_cells == 2
  with pytest.raises(ValueError, match=re.escape(
      'The TPUStrategy gives 4 logical cores per replica, fewer than the 8 '
      'pipeline cells; build its DeviceAssignment with computation_shape '
      '[1, 1, 1, 8].')):
    placement.TpuPlacement(8, strategy)
  with pytest.raises(ValueError, match='gives 2 logical cores per replica, '
                     'fewer than the 4 pipeline cells'):
    placement.TpuPlacement(4, _TpuStrategy(2))


def test_tpu_placement_annotates_a_real_strategys_graph_tensors():
  pl = placement.TpuPlacement(4, _TpuStrategy(4))

  @tf.function
  def Annotated(x):
    return pl.Annotate(3, NestedMap(a=x, b=(x + 1.0,)))

  graph = Annotated.get_concrete_function(tf.TensorSpec([2])).graph
  shardings = [op for op in graph.get_operations() if op.type == 'XlaSharding']
  assert len(shardings) == 2
  for op in shardings:
    sharding = xla_data_pb2.OpSharding.FromString(op.get_attr('_XlaSharding'))
    assert sharding.type == xla_data_pb2.OpSharding.MAXIMAL
    assert list(sharding.tile_assignment_devices) == [3]


def test_allocator_peak_sees_a_large_tensor():
  tf.config.experimental.reset_memory_stats('CPU:0')
  x = tf.ones([1024, 1024])
  assert placement.AllocatorPeak('CPU:0') >= x.shape.num_elements() * 4
  assert placement.AllocatorPeak('TPU:0') is None
