"""Regression of a vector on a vector: the smallest task that runs the whole stack.

An MLP (`MlpNetwork`, pipelined like any network) under a mean-squared-error
task (`RegressionTask`). It trains in seconds, so it is the model the trainer's
own tests and the registry example (`example.toy.ToyRegression`) use.
"""

from __future__ import annotations

import tensorflow as tf

from lingvo_gpipe import base_task
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core.gpipe import pipelined_network
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.layers import normalization
from lingvo_gpipe.core.nested_map import NestedMap


class MlpNetwork(pipelined_network.PipelinedNetwork):
  """input_dim -> num_hidden_layers x hidden_dim (relu[, BatchNorm]) -> output_dim (linear)."""

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('input_dim', hyperparams.REQUIRED, 'Size of each input vector.')
    p.Define('hidden_dim', hyperparams.REQUIRED, 'Width of the hidden layers.')
    p.Define('num_hidden_layers', 2, 'Number of hidden layers.')
    p.Define('output_dim', hyperparams.REQUIRED, 'Size of each target vector.')
    p.Define('batch_norm', False, 'BatchNorm after each hidden layer (its '
             'moments per micro-batch, moving averages per mini-batch).')
    return p

  @classmethod
  def Layers(cls, p) -> list:
    dims = [p.input_dim] + [p.hidden_dim] * p.num_hidden_layers
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
      layers.append(dense.Dense.Params().Set(name=f'fc{i}', input_dim=a,
                                             output_dim=b))
      if p.batch_norm:
        layers.append(normalization.BatchNorm.Params().Set(name=f'bn{i}', dim=b))
    layers.append(dense.Dense.Params().Set(
        name='out', input_dim=dims[-1], output_dim=p.output_dim,
        activation='none'))
    return layers

  @classmethod
  def DefaultInputShapes(cls, p):
    return [[1, p.input_dim]]


class RegressionTask(base_task.BaseTask):
  """loss = mean squared error of network(batch.x) against batch.y."""

  def NetworkInputs(self, batch: NestedMap) -> tf.Tensor:
    return batch.x

  def OutputMetrics(self, outputs: tf.Tensor, batch: NestedMap) -> NestedMap:
    mse = tf.reduce_mean(tf.square(outputs - batch.y))
    count = tf.cast(tf.shape(batch.x)[0], tf.float32)
    return NestedMap(loss=(mse, count), mse=(mse, count))
