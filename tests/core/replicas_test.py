"""Data parallel x pipeline in one process: R replicas of a K-cell pipeline (MirroredStrategy).

The claim under test: R replicas, each on its own group of K logical CPU
devices and its shard of the mini-batch, make the same updates (weights,
optimizer slots, BatchNorm moving averages, losses) as one replica on the
whole mini-batch cut into R times as many micro-batches.
"""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe import experiment
from lingvo_gpipe import train_program
from lingvo_gpipe.core import replicas
from lingvo_gpipe.core.layers import normalization
from lingvo_gpipe.core.nested_map import NestedMap

_TOY = 'example.toy.ToyRegression'
_CPUS = [f'/device:CPU:{i}' for i in range(4)]
_STEPS = 3


def _Params(override=''):
  return experiment.Resolve(experiment.Settings(
      model=_TOY, params_override='task.network.batch_norm=True; '
      'train.save_interval_steps=2; input.shuffle_buffer=64; ' + override))


def _Program(logdir, groups, override=''):
  per_replica = []
  for group in groups:
    params = _Params(override)
    experiment.SetDevices(params, list(group))
    per_replica.append(params.task)
  local = replicas.Local(per_replica, [group[0] for group in groups])
  return train_program.TrainProgram(params, str(logdir), local)


def _State(program, index=0):
  task = program.replicas.tasks[index]
  optimizer = program._optimizers[index]  # pylint: disable=protected-access
  return ([v.numpy() for v in task.variables] +
          [s.numpy() for table in optimizer.slots.values()
           for s in table.values()])


def _Losses(program, steps):
  losses = []
  for _ in range(steps):
    losses.append(float(program._step_fn()['loss']))  # pylint: disable=protected-access
  return losses


def _AssertAllClose(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6)


def test_two_replicas_of_two_stages_make_the_one_big_batch_update(tmp_path):
  # BatchNorm normalizes each micro-batch by its own moments, so the same
  # math needs the same micro-batches: 1 x 4 of 4 examples, 2 x 2 of 4.
  one = _Program(tmp_path / 'one', [_CPUS[:2]],
                 'task.network.pipeline.num_micro_batches=4')
  two = _Program(tmp_path / 'two', [_CPUS[:2], _CPUS[2:]])
  assert one.replicas.num_replicas == 1 and two.replicas.num_replicas == 2
  before = _State(one)
  one_losses, two_losses = _Losses(one, _STEPS), _Losses(two, _STEPS)
  np.testing.assert_allclose(one_losses, two_losses, rtol=2e-5)
  _AssertAllClose(_State(one), _State(two))
  # The replicas stayed equal, and the steps changed the moving averages too.
  _AssertAllClose(_State(two, 0), _State(two, 1))
  moving = [v for v in two.task.variables if 'moving_' in v.name]
  assert moving and not all(
      np.allclose(v.numpy(), b) for v, b in zip(
          two.task.variables, before) if 'moving_' in v.name)


def test_each_replica_s_cells_sit_on_its_own_device_group(tmp_path):
  two = _Program(tmp_path, [_CPUS[:2], _CPUS[2:]])
  for index, group in enumerate([_CPUS[:2], _CPUS[2:]]):
    pipe = two.replicas.tasks[index].Pipelines()[0]
    for k, cell in enumerate(pipe.cells):
      devices = {tf.DeviceSpec.from_string(v.device).device_index
                 for v in cell.variables}
      assert devices == {tf.DeviceSpec.from_string(group[k]).device_index}
    optimizer = two._optimizers[index]  # pylint: disable=protected-access
    for table in optimizer.slots.values():
      for var_name, slot in table.items():
        del var_name
        assert tf.DeviceSpec.from_string(slot.device).device_index in {
            tf.DeviceSpec.from_string(d).device_index for d in group}


def test_restore_gives_every_replica_the_checkpoint(tmp_path):
  first = _Program(tmp_path, [_CPUS[:2], _CPUS[2:]])
  first.Run(until_step=2)
  resumed = _Program(tmp_path, [_CPUS[:2], _CPUS[2:]])
  for v in resumed.replicas.tasks[1].variables:
    v.assign(tf.zeros_like(v) + 7.0)  # replica 1 starts out wrong
  assert resumed.Restore() == 2
  _AssertAllClose(_State(first, 0), _State(resumed, 1))


def test_a_batch_that_does_not_split_evenly_is_refused(tmp_path):
  with pytest.raises(ValueError, match='multiple of the number of replicas'):
    _Program(tmp_path, [_CPUS[:2], _CPUS[2:]], 'input.batch_size=15')


def test_batch_norm_cross_replica_moments_equal_the_whole_batch_s():
  strategy = tf.distribute.MirroredStrategy(
      _CPUS[:2], cross_device_ops=tf.distribute.ReductionToOneDevice())
  layer = normalization.BatchNorm.Params().Set(name='bn', dim=3).Instantiate()
  x = tf.random.stateless_normal([8, 3], [1, 2]) * 3.0 + 1.0
  halves = [x[:5], x[5:]]  # unequal counts: the merge must weight them

  def Fn():
    index = tf.get_static_value(
        tf.distribute.get_replica_context().replica_id_in_sync_group)
    part = halves[index]
    mean, variance = tf.nn.moments(part, [0])
    stats = [NestedMap(mean=mean, variance=variance,
                       count=tf.constant(float(part.shape[0])))]
    return layer.CrossReplicaStats(stats, replicas.CrossReplicaSum)[0]

  merged = strategy.experimental_local_results(strategy.run(Fn))
  mean, variance = tf.nn.moments(x, [0])
  for result in merged:
    np.testing.assert_allclose(result.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.variance, variance, rtol=1e-5)
    assert float(result.count) == 8.0
