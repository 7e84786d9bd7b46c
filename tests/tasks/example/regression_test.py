"""The toy regression stack: MLP network, MSE task, generated input."""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe import base_input_generator
from lingvo_gpipe.core import base_layer
from tasks.example import input_generator
from tasks.example import regression


def _Network(**fields):
  p = regression.MlpNetwork.Params().Set(name='mlp', input_dim=3, hidden_dim=5,
                                         output_dim=2, **fields)
  p.pipeline.Set(num_partitions=2, num_micro_batches=2,
                 devices=['/device:CPU:0', '/device:CPU:1'])
  return p


def test_mlp_layers_and_size():
  p = _Network(num_hidden_layers=3)
  layers = regression.MlpNetwork.Layers(p)
  assert [l.name for l in layers] == ['fc0', 'fc1', 'fc2', 'out']
  assert layers[-1].activation == 'none'
  # 3*5+5, 5*5+5 twice, 5*2+2.
  assert regression.MlpNetwork.NumParams(p) == 20 + 30 + 30 + 12


def test_task_loss_is_the_mean_squared_error():
  task = regression.RegressionTask.Params().Set(
      name='task', network=_Network()).Instantiate()
  x = tf.random.stateless_normal([6, 3], [1, 2])
  y = tf.random.stateless_normal([6, 2], [3, 4])
  metrics = task.FPropDefaultTheta(base_layer.NestedMap(x=x, y=y))
  prediction = task.network.FPropDefaultTheta(x)
  expected = np.mean((prediction.numpy() - y.numpy())**2)
  np.testing.assert_allclose(metrics.loss[0], expected, rtol=1e-6)
  assert float(metrics.loss[1]) == 6.0


def test_input_is_deterministic_and_splits_differ():
  p = input_generator.SyntheticRegressionInput.Params().Set(
      input_dim=3, output_dim=2, num_examples=10, batch_size=4)
  first = list(p.Instantiate().Dataset('test', training=False))
  again = list(p.Instantiate().Dataset('test', training=False))
  assert [b.x.shape[0] for b in first] == [4, 4, 2]
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a.x, b.x)
  # y = tanh(x·W): arctanh(y) is exactly linear in x.
  x = np.concatenate([b.x for b in first])
  z = np.arctanh(np.concatenate([b.y for b in first]).astype(np.float64))
  w, *_ = np.linalg.lstsq(x, z, rcond=None)
  np.testing.assert_allclose(x @ w, z, atol=1e-3)
  train = next(iter(p.Instantiate().Dataset('train', training=False)))
  assert not np.allclose(train.x, first[0].x)
  with pytest.raises(base_input_generator.DataNotFoundError, match="'dev'"):
    p.Instantiate().Dataset('dev', training=False)
