"""Tests of the BaseTask contract and WeightedMean."""

import pytest
import tensorflow as tf

from lingvo_gpipe import base_task
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
