"""BaseTask: what is learned: a network, a loss and metrics over input batches.

Invariant: a task is a layer whose only child that holds weights is
`network` (usually a PipeliningLayer), and whose `ComputeMetrics(theta,
batch)` returns a NestedMap of name -> (value, weight) with a scalar 'loss':
the trainer minimizes metrics.loss[0] and averages every metric over steps
or an eval set by its weight, without knowing the task.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core.nested_map import NestedMap


class DecodeMetrics:
  """Metrics computed on the host over a whole eval set (e.g. BLEU).

  `Update` takes one batch of `BaseTask.Decode` results as numpy arrays;
  `Result` returns name -> float.
  """

  def UseInput(self, input_generator: Any) -> None:
    """Sees the eval input generator once, before the first Update.

    For what only the input knows, e.g. the vocabulary that turns ids back
    into text. Default: nothing.
    """
    del input_generator

  def Update(self, decoded: NestedMap) -> None:
    raise TypeError(f'{type(self).__name__} must override Update.')

  def Result(self) -> dict[str, float]:
    raise TypeError(f'{type(self).__name__} must override Result.')


class BaseTask(base_layer.BaseLayer):
  """A network plus its loss; subclasses define ComputeMetrics."""

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('network', hyperparams.REQUIRED, 'Params of the network; a '
             'PipeliningLayer to train it with GPipe.')
    return p

  def __init__(self, params):
    super().__init__(params)
    self.CreateChild('network', self.params.network)

  def ComputeMetrics(self, theta: NestedMap, batch: NestedMap) -> NestedMap:
    """name -> (value, weight) scalars, including 'loss' (the training loss).

    Runs in training or eval mode as the ExecutionContext says.
    """
    raise TypeError(f'{type(self).__name__} must override ComputeMetrics.')

  def FProp(self, theta: NestedMap, batch: NestedMap) -> NestedMap:
    """ComputeMetrics where the network's output is (see OutputScope)."""
    with self.OutputScope():
      return self.ComputeMetrics(theta, batch)

  def OutputScope(self) -> contextlib.AbstractContextManager:
    """The network's output scope: where the loss and its gradient belong."""
    return self.network.OutputScope()

  def Decode(self, theta: NestedMap, batch: NestedMap) -> Optional[NestedMap]:
    """Tensors for host-side eval metrics (e.g. hypotheses for BLEU); None: none."""
    del theta, batch
    return None

  def CreateDecodeMetrics(self) -> Optional[DecodeMetrics]:
    """A fresh host-side metrics accumulator for one eval pass; None: none."""
    return None


def WeightedMean(values: tf.Tensor, weights: tf.Tensor) -> tuple[tf.Tensor,
                                                                 tf.Tensor]:
  """(sum(values·weights) / sum(weights), sum(weights)), safe for zero weight."""
  values = tf.convert_to_tensor(values)
  weights = tf.cast(weights, values.dtype)
  total = tf.reduce_sum(weights)
  return tf.math.divide_no_nan(tf.reduce_sum(values * weights), total), total
