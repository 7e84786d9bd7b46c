"""Data parallelism over pipelines: R replicas of a K-cell model, gradients all-reduced by tf.distribute.

Invariants:
- A step on R replicas, each taking an equal shard of the mini-batch, makes
  the same update as one replica taking the whole mini-batch: each replica's
  gradient is weighted by its share of the loss weight and summed by the
  strategy's all-reduce; metrics are weighted means over all replicas; and
  BatchNorm moving averages move by the moments of the whole mini-batch.
- All replicas hold the same weights and optimizer state between steps, so
  replica 0 alone is checkpointed and evaluated.

Three ways to lay replicas out, one step function for all of them:
- `Local`: R copies in this process, replica r's K cells on its own group of
  K local devices (GPUs or logical CPUs; TF2's MirroredStrategy refuses
  remote workers in eager mode); `MirroredStrategy` over
  each group's first device runs the R replica functions and all-reduces.
  The copies are plain variables we place ourselves, because a mirrored
  variable has one device per replica, while a pipeline needs K.
- `MultiWorker`: one replica per process, its K cells on that process's own
  devices; `MultiWorkerMirroredStrategy` all-reduces across the processes.
- `Tpu`: `TPUStrategy` with K logical cores per replica; variables are the
  strategy's own (mirrored) and the cells are placed by annotation.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence

import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core.gpipe import microbatch

ReduceOp = tf.distribute.ReduceOp


class Replicas:
  """The replicas of a task in this process, and the strategy that syncs them.

  Attributes:
    strategy: runs the per-replica step and all-reduces (the default
      strategy when there is one replica).
    tasks: this process's replicas' tasks: R for `Local`, one otherwise
      (under `Tpu` the one task's variables are mirrored by the strategy).
    is_chief: whether this process writes checkpoints, summaries and evals.
  """

  def __init__(self, strategy: tf.distribute.Strategy,
               tasks: Sequence[base_layer.BaseLayer], is_chief: bool = True,
               mirrors_variables: bool = False):
    self.strategy = strategy
    self.tasks = list(tasks)
    self.is_chief = is_chief
    self._mirrors_variables = mirrors_variables

  @property
  def num_replicas(self) -> int:
    """R, the replicas in sync across all processes."""
    return self.strategy.num_replicas_in_sync

  def VariableScope(self) -> contextlib.AbstractContextManager:
    """Where per-replica state (optimizer slots) must be created."""
    if self._mirrors_variables:
      return self.strategy.scope()
    return contextlib.nullcontext()

  def LocalIndex(self) -> int:
    """Inside a replica function: which of `tasks` this replica runs."""
    if len(self.tasks) == 1:
      return 0
    replica_id = tf.distribute.get_replica_context().replica_id_in_sync_group
    index = tf.get_static_value(replica_id)
    if index is None:
      raise ValueError('Local replicas need a static replica id; '
                       f'{type(self.strategy).__name__} gives a dynamic one.')
    return int(index)

  def Distribute(self, batch: Any) -> Any:
    """Cuts a mini-batch into R equal shards along dim 0, shard r for replica r.

    Every process reads the whole mini-batch and keeps its replicas' shards,
    so the input order (and its checkpoint) is the same everywhere.
    """
    if self.num_replicas == 1:
      return batch
    size = tf.nest.flatten(batch)[0].shape[0]
    self.CheckBatchSize(size)
    shards = microbatch.Split(batch, [size // self.num_replicas] *
                              self.num_replicas, 0)
    return self.strategy.experimental_distribute_values_from_function(
        lambda ctx: shards[ctx.replica_id_in_sync_group])

  def CheckBatchSize(self, size: Optional[int]) -> None:
    """ValueError unless a mini-batch of `size` splits evenly into the replicas."""
    if self.num_replicas > 1 and (size is None or size % self.num_replicas):
      raise hyperparams.ConfigError(f'The mini-batch of {size} examples does not split '
                                    f'evenly into {self.num_replicas} replicas; make '
                                    'input.batch_size a multiple of the number of replicas.')

  def Run(self, fn: Callable[..., Any], *args: Any) -> Any:
    """Runs fn(*args) on every replica; returns the first local replica's result."""
    out = self.strategy.run(fn, args=args)
    return self.strategy.experimental_local_results(out)[0]

  def SyncFromFirst(self, objects_per_replica: Sequence[Sequence[tf.Module]]
                    ) -> None:
    """Copies local replica 0's variables into the other local replicas.

    Args:
      objects_per_replica: for each local replica, the modules whose
        variables make its state (e.g. [task, optimizer]), in the same order.
    """
    sources = _Variables(objects_per_replica[0])
    for objects in objects_per_replica[1:]:
      targets = _Variables(objects)
      if len(targets) != len(sources):
        raise ValueError(f'Replicas differ: {len(sources)} variables in '
                         f'replica 0, {len(targets)} in another.')
      for source, target in zip(sources, targets):
        target.assign(source)


def _Variables(modules: Sequence[tf.Module]) -> list[tf.Variable]:
  return [v for m in modules for v in m.variables]


# --- inside a replica function ----------------------------------------------------


def OneReplica() -> bool:
  """Whether this step runs one replica, so nothing needs reducing."""
  ctx = tf.distribute.get_replica_context()
  return ctx is None or ctx.num_replicas_in_sync == 1


def CrossReplicaSum(values: Any) -> Any:
  """Sums a nested structure over all replicas (identity for one replica)."""
  if OneReplica():
    return values
  return tf.distribute.get_replica_context().all_reduce(ReduceOp.SUM, values)


def _Scale(g: Any, factor: tf.Tensor) -> Any:
  if isinstance(g, tf.IndexedSlices):
    return tf.IndexedSlices(g.values * tf.cast(factor, g.values.dtype),
                            g.indices, g.dense_shape)
  return g * tf.cast(factor, g.dtype)


def GlobalGradients(grads: Sequence[Any], weight: tf.Tensor) -> list[Any]:
  """The gradients of the whole mini-batch's loss from this replica's.

  The mini-batch loss is sum_r w_r L_r / sum_r w_r (w_r: replica r's loss
  weight), so its gradient is sum_r (w_r / W) grad_r. Missing (None)
  gradients stay None.
  """
  if OneReplica():
    return list(grads)
  weight = tf.cast(weight, tf.float32)
  share = tf.math.divide_no_nan(weight, CrossReplicaSum(weight))
  present = [i for i, g in enumerate(grads) if g is not None]
  summed = CrossReplicaSum([_Scale(grads[i], share) for i in present])
  out = list(grads)
  for i, g in zip(present, summed):
    out[i] = g
  return out


def GlobalMetrics(metrics: Any) -> dict[str, tuple[tf.Tensor, tf.Tensor]]:
  """name -> (value, weight) over all replicas: weighted means, summed weights."""
  names = list(metrics.keys())
  if OneReplica():
    return {n: tuple(metrics[n]) for n in names}
  weights = [tf.cast(metrics[n][1], tf.float32) for n in names]
  sums = CrossReplicaSum([[tf.cast(metrics[n][0], tf.float32) * w, w]
                          for n, w in zip(names, weights)])
  return {n: (tf.math.divide_no_nan(s, w), w) for n, (s, w) in zip(names, sums)}


def Local(task_params: Sequence[hyperparams.Params],
          replica_devices: Sequence[str]) -> Replicas:
  """R replicas in this process, replica r built from task_params[r].

  Args:
    task_params: one task Params per replica, each placing its cells on its
      own device group. Layers initialize deterministically from their
      Params, so the copies start equal.
    replica_devices: each replica's main device (its first cell's), where
      the strategy runs its replica function and its all-reduce.
  """
  if len(task_params) != len(replica_devices):
    raise ValueError(f'{len(task_params)} replica Params but '
                     f'{len(replica_devices)} replica devices.')
  tasks = [p.Instantiate() for p in task_params]
  if len(tasks) == 1:
    return Replicas(tf.distribute.get_strategy(), tasks)
  # On GPUs MirroredStrategy picks NCCL. Elsewhere its default, collective
  # ops, keys groups per strategy object, so a second strategy over other
  # devices in the same process fails ("joining a group that is already
  # full"); reducing through one device has no such state.
  on_gpus = all(tf.DeviceSpec.from_string(d).device_type == 'GPU'
                for d in replica_devices)
  strategy = tf.distribute.MirroredStrategy(
      devices=list(replica_devices),
      cross_device_ops=None if on_gpus else tf.distribute.ReductionToOneDevice())
  return Replicas(strategy, tasks)


class ReplicaIndexError(ValueError):
  """A process's replica index is not one of the replica hosts'."""


def MakeMultiWorkerStrategy(hosts: Sequence[str], index: int
                            ) -> tf.distribute.MultiWorkerMirroredStrategy:
  """The strategy of process `index` of a data-parallel job on `hosts`.

  Must be created at program start, before any op runs. Each process is one
  replica; it listens on hosts[index].
  """
  if not 0 <= index < len(hosts):
    raise ReplicaIndexError(f'Replica index {index} is out of range for '
                            f'{len(hosts)} replica hosts (0..{len(hosts) - 1}).')
  resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
      tf.train.ClusterSpec({'worker': list(hosts)}), task_type='worker',
      task_id=index, rpc_layer='grpc')
  options = tf.distribute.experimental.CommunicationOptions(
      implementation=tf.distribute.experimental.CommunicationImplementation.RING)
  return tf.distribute.MultiWorkerMirroredStrategy(
      cluster_resolver=resolver, communication_options=options)


def MultiWorker(strategy: tf.distribute.MultiWorkerMirroredStrategy,
                task_params: hyperparams.Params) -> Replicas:
  """This process's one replica of a multi-process data-parallel job."""
  task = task_params.Instantiate()
  return Replicas(strategy, [task],
                  is_chief=strategy.cluster_resolver.task_id == 0)


def Tpu(strategy: Any, task_params: hyperparams.Params) -> Replicas:
  """Replicas on TPU cores: one task built under the TPUStrategy's scope."""
  with strategy.scope():
    task = task_params.Instantiate()
  return Replicas(strategy, [task], mirrors_variables=True)


def Single(task: base_layer.BaseLayer) -> Replicas:
  """One replica in this process: the default strategy."""
  return Replicas(tf.distribute.get_strategy(), [task])

