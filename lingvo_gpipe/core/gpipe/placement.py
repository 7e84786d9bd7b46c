"""Where pipeline cell k runs: one interface, one implementation per backend.

Invariant: the pipeline asks a Placement only two things, a scope to build and
run cell k's ops in (`CellScope(k)`) and how to mark tensors as belonging to
cell k (`Annotate(k, tensors)`); it never learns which backend it runs on.
Local and remote devices use `tf.device`; TPU cores use the TPUStrategy's
logical-device annotations.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence

import tensorflow as tf

from lingvo_gpipe.core import hyperparams


class Placement:
  """Base: K device slots for K cells."""

  def __init__(self, num_cells: int):
    self.num_cells = num_cells

  def Device(self, cell: int) -> str:
    """A human-readable name of cell `cell`'s device (for reports)."""
    raise TypeError(f'{type(self).__name__} must override Device.')

  def CellScope(self, cell: int) -> contextlib.AbstractContextManager:
    """Context in which cell `cell`'s variables and ops are created."""
    return tf.device(self.Device(cell))

  def Annotate(self, cell: int, tensors: Any) -> Any:
    """Marks tensors as cell `cell`'s; identity where scopes suffice."""
    return tensors

  def PeakMemory(self, cell: int) -> Optional[int]:
    """Peak bytes of the cell's device if the backend can tell, else None."""
    return None

  def _CheckCell(self, cell: int) -> None:
    if not 0 <= cell < self.num_cells:
      raise ValueError(f'Cell {cell} is out of range for {self.num_cells} '
                       'placed cells.')


def _Canonical(name: str) -> str:
  return tf.DeviceSpec.from_string(name).to_string()


class DevicePlacement(Placement):
  """Cells on named TensorFlow devices, local or remote.

  Local examples: '/device:CPU:0', '/device:GPU:1' (logical CPU devices from
  `tf.config.set_logical_device_configuration` are fine). Remote workers of a
  cluster: '/job:worker/task:1/device:CPU:0'. With fewer devices than cells,
  cells are assigned round robin, which keeps a K-cell model runnable (not
  faster) on fewer devices.
  """

  def __init__(self, num_cells: int, devices: Sequence[str]):
    super().__init__(num_cells)
    if not devices:
      raise hyperparams.ConfigError('DevicePlacement needs at least one device name.')
    self.devices = [_Canonical(d) for d in devices]

  def Device(self, cell: int) -> str:
    self._CheckCell(cell)
    return self.devices[cell % len(self.devices)]

  def PeakMemory(self, cell: int) -> Optional[int]:
    spec = tf.DeviceSpec.from_string(self.Device(cell))
    if spec.job is not None or spec.device_type is None:
      return None  # a remote worker's allocator is not readable from here
    if (spec.device_type == 'CPU' and
        len(tf.config.list_logical_devices('CPU')) > 1):
      return None  # logical CPUs share one allocator: not per device
    return AllocatorPeak(f'{spec.device_type}:{spec.device_index or 0}')


def AllocatorPeak(device: str = 'CPU:0') -> Optional[int]:
  """Peak bytes of a local device's allocator, or None if it keeps no stats.

  For CPUs this is the whole process (logical CPU devices share it).
  """
  try:
    return int(tf.config.experimental.get_memory_info(device)['peak'])
  except (ValueError, tf.errors.OpError):
    return None


def LocalDevices(device_type: Optional[str] = None) -> list[str]:
  """Logical devices of this process: GPUs if any (or `device_type`), else CPUs."""
  if device_type is None:
    device_type = 'GPU' if tf.config.list_logical_devices('GPU') else 'CPU'
  return [d.name for d in tf.config.list_logical_devices(device_type)]


def SplitCpu(num_devices: int) -> list[str]:
  """Splits the physical CPU into `num_devices` logical devices; returns them.

  Must run before TensorFlow initializes its devices (before any op runs).
  The logical devices share one allocator and one thread pool: good for
  testing placement, not for measuring per-device memory or speed-up.
  """
  if ConfigureCpuDevices(num_devices):
    return LocalDevices('CPU')
  return LocalDevices('CPU')[:num_devices]


def ConfigureCpuDevices(num_devices: int) -> bool:
  """Asks for `num_devices` logical CPU devices without initializing TensorFlow.

  Unlike SplitCpu it lists nothing, so a strategy that must configure
  TensorFlow itself (MultiWorkerMirroredStrategy) can still be created after
  it. Returns True if the split is exactly as asked, False if TensorFlow was
  already running with more devices (the first `num_devices` serve).
  """
  cpus = tf.config.list_physical_devices('CPU')
  existing = tf.config.get_logical_device_configuration(cpus[0])
  if existing is not None and len(existing) == num_devices:
    return True
  try:
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_devices)
  except RuntimeError as e:
    have = len(tf.config.list_logical_devices('CPU'))
    if have >= num_devices:
      return False
    raise RuntimeError(
        f'Cannot split the CPU into {num_devices} devices: TensorFlow is '
        f'already initialized with {have}. Split it at program start.') from e
  return True


class TpuPlacement(Placement):
  """Cells on the logical TPU cores of one replica, under a TPUStrategy.

  The strategy is built with a DeviceAssignment giving each replica K logical
  cores (`tf.tpu.experimental.DeviceAssignment.build(topology,
  computation_shape=[1, 1, 1, K])` with `num_replicas`), and the pipeline runs
  inside `strategy.run`. There, `experimental_assign_to_logical_device` pins
  a tensor (and the ops computing from it) to logical core k of the replica.
  Runs only on a TPU host; it was not exercised on a TPU here. A stand-in
  that is no `tf.distribute.TPUStrategy` (a test double) is not asked for its
  cores.
  """

  def __init__(self, num_cells: int, strategy: Any):
    super().__init__(num_cells)
    if isinstance(strategy, tf.distribute.TPUStrategy):
      cores = TpuLogicalCores(strategy, at_most=num_cells)
      if cores < num_cells:
        raise hyperparams.ConfigError(f'The TPUStrategy gives {cores} logical cores per '
                                      f'replica, fewer than the {num_cells} pipeline cells; '
                                      'build its DeviceAssignment with computation_shape '
                                      f'[1, 1, 1, {num_cells}].')
    self.strategy = strategy

  def Device(self, cell: int) -> str:
    self._CheckCell(cell)
    return f'TPU logical core {cell}'

  def CellScope(self, cell: int) -> contextlib.AbstractContextManager:
    self._CheckCell(cell)
    return contextlib.nullcontext()

  def Annotate(self, cell: int, tensors: Any) -> Any:
    self._CheckCell(cell)
    return tf.nest.map_structure(
        lambda t: self.strategy.experimental_assign_to_logical_device(t, cell),
        tensors)


def TpuLogicalCores(strategy: Any, at_most: int) -> int:
  """Logical cores per replica of a TPUStrategy, counted up to `at_most`.

  TensorFlow has no public count of them (the DeviceAssignment is kept only in
  the private `extended._device_assignment`), but the public
  `strategy.extended.experimental_logical_device(k)` refuses with ValueError a
  core k the replica does not have; so this enters each core in turn. Outside
  a replica context entering one only pushes and pops the core: no ops.
  """
  for core in range(at_most):
    try:
      with strategy.extended.experimental_logical_device(core):
        pass
    except ValueError:
      return core
  return at_most


def TpuComputationShape(num_cells: int, mesh_shape: Sequence[int]) -> list[int]:
  """The block of TPU cores ([x, y, z, core]) that holds one K-cell replica.

  Fills a chip's cores first, then chips along x, y and z of the mesh, so a
  pipeline's neighbouring cells sit on neighbouring cores.
  """
  cores_per_chip = int(mesh_shape[-1])
  if num_cells <= cores_per_chip:
    if cores_per_chip % num_cells:
      raise hyperparams.ConfigError(f'{num_cells} cells do not evenly share a chip of '
                                    f'{cores_per_chip} cores; use a divisor of it or a '
                                    f'multiple of {cores_per_chip}.')
    return [1, 1, 1, num_cells]
  if num_cells % cores_per_chip:
    raise hyperparams.ConfigError(f'{num_cells} cells need whole chips of {cores_per_chip} '
                                  f'cores: use a multiple of {cores_per_chip}.')
  remaining = num_cells // cores_per_chip
  shape = [1, 1, 1, cores_per_chip]
  for dim in range(3):
    extent = max(d for d in range(1, int(mesh_shape[dim]) + 1)
                 if remaining % d == 0)
    shape[dim] = extent
    remaining //= extent
  if remaining != 1:
    raise hyperparams.ConfigError(f'{num_cells} cells do not fit one block of the TPU mesh '
                                  f'{list(mesh_shape)}.')
  return shape


def BuildTpuDeviceAssignment(topology: Any, num_cells: int,
                             num_replicas: Optional[int] = None) -> Any:
  """A DeviceAssignment giving each replica `num_cells` logical cores.

  Args:
    topology: a tf.tpu.experimental.Topology (from initialize_tpu_system).
    num_cells: K, logical cores per replica (one per pipeline cell).
    num_replicas: data-parallel replicas; None uses every core.
  """
  total = int(topology.num_tasks * topology.num_tpus_per_task)
  if num_replicas is None:
    if total % num_cells:
      raise hyperparams.ConfigError(f'{total} TPU cores do not split into replicas of '
                                    f'{num_cells} cells.')
    num_replicas = total // num_cells
  shape = TpuComputationShape(num_cells, topology.mesh_shape)
  return tf.tpu.experimental.DeviceAssignment.build(
      topology, computation_shape=shape, num_replicas=num_replicas)


def MakeTpuStrategy(tpu: str, num_cells: int,
                    num_replicas: Optional[int] = None) -> Any:
  """Connects to a TPU and returns a TPUStrategy with K cores per replica.

  Build the PipeliningLayer (placement_backend='tpu') under the returned
  strategy's scope and run steps with `strategy.run`. Needs a TPU host.
  """
  resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
  tf.config.experimental_connect_to_cluster(resolver)
  topology = tf.tpu.experimental.initialize_tpu_system(resolver)
  assignment = BuildTpuDeviceAssignment(topology, num_cells, num_replicas)
  return tf.distribute.TPUStrategy(
      resolver, experimental_device_assignment=assignment)
