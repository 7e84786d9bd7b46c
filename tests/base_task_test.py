"""Tests of the BaseTask contract and WeightedMean."""

import pytest
import tensorflow as tf

from lingvo_gpipe import base_task
from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe import pipelining_layer
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.nested_map import NestedMap


class _Regression(base_task.BaseTask):
  """Mean squared error of the network's output against batch.y."""

  def ComputeMetrics(self, theta, batch):
    pred = self.network.FProp(theta.network, batch.x)
    err = tf.reduce_mean(tf.square(pred - batch.y), axis=-1)
    return NestedMap(loss=base_task.WeightedMean(err, tf.ones_like(err)))


def test_task_builds_its_network_and_reports_metrics():
  p = _Regression.Params().Set(network=dense.Dense.Params().Set(
      input_dim=3, output_dim=2, activation='none'))
  task = p.Instantiate()
  assert sorted(task.theta.keys()) == ['network']
  batch = NestedMap(x=tf.ones([4, 3]), y=tf.zeros([4, 2]))
  loss, weight = task.FPropDefaultTheta(batch).loss
  assert loss.shape == () and float(weight) == 4.0
  assert task.Decode(task.theta, batch) is None
  assert task.CreateDecodeMetrics() is None


def test_network_is_required():
  with pytest.raises(ValueError, match='network'):
    _Regression.Params().Instantiate()


def test_weighted_mean():
  value, weight = base_task.WeightedMean([1.0, 3.0, 5.0], [1.0, 1.0, 0.0])
  assert float(value) == 2.0 and float(weight) == 2.0
  value, weight = base_task.WeightedMean([1.0], [0.0])
  assert float(value) == 0.0 and float(weight) == 0.0


class _SplitRegression(base_task.BaseTask):
  """_Regression with its metrics split from the network."""

  def NetworkInputs(self, batch):
    return batch.x

  def OutputMetrics(self, outputs, batch):
    err = tf.reduce_mean(tf.square(outputs - batch.y), axis=-1)
    return NestedMap(loss=base_task.WeightedMean(err, tf.ones_like(err)))


def _Pipeline():
  return pipelining_layer.PipeliningLayer.Params().Set(
      layers=[dense.Dense.Params().Set(name=f'fc{i}', input_dim=3,
                                       output_dim=3) for i in range(2)],
      num_partitions=2, num_micro_batches=2,
      devices=['/device:CPU:0', '/device:CPU:1'])


def test_the_loss_inside_the_pipeline_runs_in_training_only():
  task = _SplitRegression.Params().Set(
      network=_Pipeline(), loss_inside_pipeline=True).Instantiate()
  batch = NestedMap(x=tf.ones([4, 3]), y=tf.zeros([4, 3]))
  seen = []
  task.network.FPropLoss = lambda *args: seen.append('inside') or (
      pipelining_layer.PipeliningLayer.FPropLoss(task.network, *args))
  with base_layer.Context(training=True):
    train_loss = task.FPropDefaultTheta(batch).loss[0]
  assert seen == ['inside']
  with base_layer.Context(training=False):
    eval_loss = task.FPropDefaultTheta(batch).loss[0]
  assert seen == ['inside']  # eval needs no backward: the plain forward
  assert abs(float(train_loss) - float(eval_loss)) < 1e-6


@pytest.mark.parametrize('task_cls,network,message', [
    (_SplitRegression, dense.Dense.Params().Set(input_dim=3, output_dim=3),
     'needs a network that is a PipeliningLayer or PipelinedNetwork'),
    (_Regression, _Pipeline(), 'needs _Regression to define NetworkInputs'),
])
def test_the_loss_inside_the_pipeline_is_refused_where_it_cannot_apply(
    task_cls, network, message):
  with pytest.raises(ValueError, match=message):
    task_cls.Params().Set(network=network,
                          loss_inside_pipeline=True).Instantiate()


def test_a_schedule_that_needs_the_loss_inside_is_refused_without_it():
  network = _Pipeline().Set(schedule='1f1b')
  with pytest.raises(ValueError, match="network.schedule='1f1b' starts a "
                     'backward before the last forward.*set '
                     'loss_inside_pipeline=True'):
    _SplitRegression.Params().Set(network=network).Instantiate()
  task = _SplitRegression.Params().Set(
      network=network, loss_inside_pipeline=True).Instantiate()
  batch = NestedMap(x=tf.ones([4, 3]), y=tf.zeros([4, 3]))
  with base_layer.Context(training=True):
    with tf.GradientTape() as tape:
      loss = task.FPropDefaultTheta(batch).loss[0]
  grads = tape.gradient(loss, task.trainable_variables)
  assert all(g is not None for g in grads)
