"""Where a run's pipeline cells go: a value computed from the command line.

Invariant: every layout decision of the trainer (which devices hold cell k
of replica r, whether the CPU is split, which distribution strategy runs the
replicas, which flag combinations describe no layout) is made by `Compute`, a
pure function of the layout flags (`Settings`), K and the machine's number of
GPUs. The trainer only carries the resulting `Layout` out (splits the CPU,
sets the devices on the Params, makes the strategy), so a layout is tested by
calling `Compute`, with no process and no flags.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from lingvo_gpipe.core import cluster
from lingvo_gpipe.core import hyperparams

DEVICES = ('auto', 'cpu', 'gpu')

# Layout kinds: the cells on this process's devices (R local replicas), on
# TensorFlow workers (one replica), one replica per process of a
# multi-process job, or on TPU cores.
LOCAL, WORKERS, PROCESSES, TPU = 'local', 'workers', 'processes', 'tpu'


@dataclasses.dataclass(frozen=True)
class Settings:
  """The layout flags' values (defaults: the flags' defaults)."""
  device: str = 'auto'
  num_cpu_devices: Optional[int] = None
  worker_hosts: tuple[str, ...] = ()
  num_replicas: int = 1
  replica_hosts: tuple[str, ...] = ()
  replica_index: int = 0
  tpu: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Layout:
  """A run's layout: the devices of each replica's K cells, and how to get them.

  groups[r][k] is the device of cell k of local replica r (empty on a TPU,
  whose cores the strategy assigns). cpu_devices > 0: split the CPU into that
  many logical devices first. tpu_replicas: the replicas asked of the TPU
  (None: all cores / K).
  """
  kind: str
  num_cells: int
  groups: tuple[tuple[str, ...], ...]
  cpu_devices: int = 0
  tpu_replicas: Optional[int] = None
  settings: Settings = dataclasses.field(default_factory=Settings)

  @property
  def devices(self) -> tuple[str, ...]:
    """Replica 0's cell devices: what the Params' pipelines are given."""
    return self.groups[0] if self.groups else ()


def DefaultNumCells(settings: Settings) -> Optional[int]:
  """K when --num_partitions is not given: one cell per worker, else the config's."""
  return len(settings.worker_hosts) if settings.worker_hosts else None


def Check(settings: Settings) -> None:
  """Refuses flag combinations that describe no single layout of the job.

  Needs no K, so it runs before the Params are resolved.

  Raises:
    hyperparams.ConfigError: naming the flags and what is valid.
  """
  if settings.device not in DEVICES:
    raise hyperparams.ConfigError(
        f'--device={settings.device!r}; valid: {", ".join(DEVICES)}.')
  if settings.num_replicas < 1:
    raise hyperparams.ConfigError(
        f'--num_replicas must be >= 1, got {settings.num_replicas}.')
  if settings.num_cpu_devices is not None and settings.num_cpu_devices < 1:
    raise hyperparams.ConfigError(
        f'--num_cpu_devices must be >= 1, got {settings.num_cpu_devices}.')
  chosen = [name for name, value in (('--worker_hosts', settings.worker_hosts),
                                     ('--replica_hosts', settings.replica_hosts),
                                     ('--tpu', settings.tpu)) if value]
  if len(chosen) > 1:
    raise hyperparams.ConfigError(
        f'{" and ".join(chosen)} cannot be combined: stages on workers, '
        'replicas in processes and TPU cores are three separate layouts.')
  if settings.replica_hosts and settings.num_replicas != 1:
    raise hyperparams.ConfigError(
        '--num_replicas: with --replica_hosts every process is one replica '
        '(R = the number of hosts).')
  if settings.worker_hosts and settings.num_replicas != 1:
    # MirroredStrategy refuses remote devices in eager TF2 ("in-graph
    # multi-worker training"); measured, not assumed.
    raise hyperparams.ConfigError(
        '--num_replicas with --worker_hosts: TensorFlow 2 cannot mirror '
        'replicas over worker processes in one program. Run one replica per '
        'process with --replica_hosts (each process its stages on its own '
        'devices) instead.')


def Compute(settings: Settings, num_cells: int, num_gpus: int) -> Layout:
  """The layout the flags ask for, for K = num_cells on a machine with num_gpus GPUs.

  Replica r's cell k runs on device r*K + k of the chosen kind (workers,
  GPUs or logical CPUs); with fewer devices than R*K they are used round
  robin. Under --replica_hosts the devices are this process's own; with
  --worker_hosts there is one replica; on a TPU the strategy places cells.

  Raises:
    hyperparams.ConfigError: flags that describe no layout (Check), or more
      GPUs asked for than the machine has.
  """
  Check(settings)
  if not (isinstance(num_cells, int) and num_cells >= 1):
    raise hyperparams.ConfigError(f'K={num_cells!r}: a pipeline needs >= 1 cell.')
  k, num_replicas = num_cells, settings.num_replicas
  if settings.tpu:
    return Layout(kind=TPU, num_cells=k, groups=(),
                  tpu_replicas=None if num_replicas == 1 else num_replicas,
                  settings=settings)
  total = k * num_replicas
  cpu_devices = 0
  if settings.worker_hosts:
    kind = WORKERS
    devices = cluster.WorkerDevices(
        len(settings.worker_hosts), 'GPU' if settings.device == 'gpu' else 'CPU')
  else:
    kind = PROCESSES if settings.replica_hosts else LOCAL
    if settings.device == 'gpu' or (settings.device == 'auto' and
                                    num_gpus >= total):
      if num_gpus < total:
        raise hyperparams.ConfigError(
            f'--device=gpu: {num_replicas} replica(s) of {k} cells need '
            f'{total} GPUs but this machine has {num_gpus} GPUs. Use fewer '
            '--num_partitions or --num_replicas, or --device=cpu.')
      devices = [f'/device:GPU:{i}' for i in range(total)]
    else:
      cpu_devices = settings.num_cpu_devices or total
      devices = [f'/device:CPU:{i}' for i in range(cpu_devices)]
  flat = [devices[i % len(devices)] for i in range(total)]
  groups = tuple(tuple(flat[r * k:(r + 1) * k]) for r in range(num_replicas))
  return Layout(kind=kind, num_cells=k, groups=groups, cpu_devices=cpu_devices,
                settings=settings)

