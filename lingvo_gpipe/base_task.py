"""BaseTask: what is learned: a network, a loss and metrics over input batches.

Invariant: a task is a layer whose only child that holds weights is
`network` (usually a PipeliningLayer), and whose `ComputeMetrics(theta,
batch)` returns a NestedMap of name -> (value, weight) with a scalar 'loss':
the trainer minimizes metrics.loss[0] and averages every metric over steps
or an eval set by its weight, without knowing the task. And a task says where
its pipelines are (`PipelinePaths`): the run's K, M and devices go to exactly
those PipeliningLayers, and a task that builds one anywhere else is refused,
so no pipeline silently keeps its config's layout. A task that splits its
metrics from its network (NetworkInputs, OutputMetrics) can compute them per
micro-batch inside the pipeline (`loss_inside_pipeline`) with the same
numbers.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Optional

import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core import precision
from lingvo_gpipe.core.gpipe import pipelined_network
from lingvo_gpipe.core.gpipe import pipelining_layer
from lingvo_gpipe.core.nested_map import NestedMap

# One part of a pipeline path: a field name with optional [index]es.
_PATH_PART = re.compile(r'([A-Za-z_]\w*)((?:\[\d+\])*)$')


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

  # The batch holds labels and weights, not activations: the network casts
  # what it takes to its compute dtype, and the metrics are float32.
  cast_inputs_to_fprop_dtype = False

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('network', hyperparams.REQUIRED, 'Params of the network; a '
             'PipeliningLayer to train it with GPipe.')
    p.Define('loss_inside_pipeline', False, 'In training, compute each '
             "micro-batch's metrics on the pipeline's last cell right after "
             'its forward (PipeliningLayer.FPropLoss, pipelined_loss.py), as '
             'schedules that interleave forwards and backwards need; the '
             'same numbers. Needs a network that is a PipeliningLayer or '
             'PipelinedNetwork and a task that defines NetworkInputs and '
             'OutputMetrics.')
    return p

  @classmethod
  def PipelinePaths(cls, p) -> list[str]:
    """Where the task's PipeliningLayers are: paths of their Params under `p`.

    Dotted field names with optional list indices ('network.pipeline',
    'network.stacks[1]'); a layer builds each child under its field's name,
    so the same path leads from the task to the built layer and from its
    theta to the layer's theta. The trainer's K, M and device flags apply to
    every pipeline listed, and the task refuses, when built, a PipeliningLayer
    not listed. Default: the network if it is a PipeliningLayer, its
    `pipeline` if it is a PipelinedNetwork, else none; a task with a pipeline
    placed deeper, or several, overrides this.
    """
    network = p.network
    cls_of = getattr(network, 'cls', None)
    if isinstance(cls_of, type):
      if issubclass(cls_of, pipelining_layer.PipeliningLayer):
        return ['network']
      if issubclass(cls_of, pipelined_network.PipelinedNetwork):
        return ['network.pipeline']
    return []

  def __init__(self, params):
    super().__init__(params)
    self.CreateChild('network', self.params.network)
    self._CheckPipelines()
    if params.loss_inside_pipeline:
      self._CheckLossInsidePipeline()
    else:
      self._CheckSchedules()

  def _CheckSchedules(self) -> None:
    """Refuses a schedule that needs the loss inside the pipeline, without it."""
    for path, pipe in zip(self.PipelinePaths(self.params), self.Pipelines()):
      if not pipe.Schedule(max(2, pipe.params.num_micro_batches)
                           ).RunsAllForwardsFirst():
        raise hyperparams.ConfigError(
            f'{self.path}: {path}.schedule={pipe.params.schedule!r} starts a '
            'backward before the last forward, so it trains only with the '
            'loss inside the pipeline: set loss_inside_pipeline=True on the '
            f"task, or {path}.schedule='gpipe'.")

  def _CheckLossInsidePipeline(self) -> None:
    """Refuses loss_inside_pipeline where it cannot apply, naming why."""
    if not hasattr(self.network, 'FPropLoss'):
      raise hyperparams.ConfigError(
          f'{self.path}: loss_inside_pipeline=True needs a network that is a '
          'PipeliningLayer or PipelinedNetwork (it has FPropLoss); this '
          f'network is a {type(self.network).__name__}.')
    cls = type(self)
    if (cls.NetworkInputs is BaseTask.NetworkInputs or
        cls.OutputMetrics is BaseTask.OutputMetrics):
      raise hyperparams.ConfigError(
          f'{self.path}: loss_inside_pipeline=True needs {cls.__name__} to '
          'define NetworkInputs(batch) and OutputMetrics(outputs, batch), '
          'its metrics split from the network; it computes them whole in '
          'ComputeMetrics.')

  def Pipelines(self) -> list[pipelining_layer.PipeliningLayer]:
    """The built PipeliningLayers at PipelinePaths, in that order."""
    return [FollowPath(self, path) for path in
            self.PipelinePaths(self.params)]

  def _CheckPipelines(self) -> None:
    """Refuses a declared path with no PipeliningLayer, and an undeclared one."""
    declared = []
    for path in self.PipelinePaths(self.params):
      try:
        layer = FollowPath(self, path)
      except (AttributeError, IndexError, KeyError, TypeError):
        layer = None
      if not isinstance(layer, pipelining_layer.PipeliningLayer):
        raise hyperparams.ConfigError(
            f'{self.path}: {type(self).__name__}.PipelinePaths lists '
            f'{path!r}, but the task has no PipeliningLayer there (found '
            f'{type(layer).__name__}); list only the paths of its '
            'PipeliningLayers.')
      declared.append(layer)
    undeclared = [layer.path for layer in _AllPipelines(self)
                  if not any(layer is d for d in declared)]
    if undeclared:
      raise hyperparams.ConfigError(
          f'{self.path}: {type(self).__name__}.PipelinePaths '
          f'({self.PipelinePaths(self.params)}) does not list the '
          f'PipeliningLayer(s) {", ".join(undeclared)}, so the run\'s K, M '
          'and devices would not reach them; override PipelinePaths to list '
          'every pipeline the task builds.')

  def NetworkInputs(self, batch: NestedMap) -> Any:
    """What the network's FProp takes from `batch` (one argument)."""
    raise TypeError(f'{type(self).__name__} must override NetworkInputs and '
                    'OutputMetrics, or ComputeMetrics.')

  def OutputMetrics(self, outputs: Any, batch: NestedMap) -> NestedMap:
    """name -> (value, weight) of the network's `outputs` for `batch`.

    Each value a mean weighted by its weight, so that micro-batches' metrics
    combine by weight into the batch's (pipelined_loss.py); with
    loss_inside_pipeline `outputs` and `batch` are one micro-batch's.
    """
    raise TypeError(f'{type(self).__name__} must override NetworkInputs and '
                    'OutputMetrics, or ComputeMetrics.')

  def ComputeMetrics(self, theta: NestedMap, batch: NestedMap) -> NestedMap:
    """name -> (value, weight) scalars, including 'loss' (the training loss).

    Runs in training or eval mode as the ExecutionContext says. Default:
    OutputMetrics of the network's outputs on NetworkInputs; with
    loss_inside_pipeline, in training, computed per micro-batch inside the
    pipeline.
    """
    inputs = self.NetworkInputs(batch)
    if (self.params.loss_inside_pipeline and
        base_layer.CurrentContext().training):
      return self.network.FPropLoss(theta.network, inputs, batch,
                                    self._Float32Metrics)
    return self._Float32Metrics(self.network.FProp(theta.network, inputs),
                                batch)

  def _Float32Metrics(self, outputs: Any, batch: NestedMap) -> NestedMap:
    """OutputMetrics of `outputs` cast to float32: the loss is never 16-bit."""
    return self.OutputMetrics(precision.CastFloats(outputs, tf.float32), batch)

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


def FollowPath(root: Any, path: str) -> Any:
  """The object at a PipelinePaths path: attributes of a layer, keys of a theta.

  'network.stacks[1]' is root.network.stacks[1] for a layer, and
  root['network']['stacks'][1] for a (nested-map) theta.
  """
  for part in path.split('.'):
    match = _PATH_PART.match(part)
    if match is None:
      raise hyperparams.ConfigError(
          f'Pipeline path {path!r}: {part!r} is not a field name with optional '
          "[index]es, e.g. 'network.pipeline' or 'network.stacks[1]'.")
    name = match.group(1)
    root = root[name] if isinstance(root, dict) else getattr(root, name)
    for index in re.findall(r'\[(\d+)\]', match.group(2)):
      root = root[int(index)]
  return root


def _AllPipelines(layer: base_layer.BaseLayer
                  ) -> list[pipelining_layer.PipeliningLayer]:
  """Every PipeliningLayer in `layer`'s tree (for the check that all are declared)."""
  found = []
  for child in layer.children_layers.Flatten():
    if isinstance(child, pipelining_layer.PipeliningLayer):
      found.append(child)
    if isinstance(child, base_layer.BaseLayer):
      found += _AllPipelines(child)
  return found


def WeightedMean(values: tf.Tensor, weights: tf.Tensor) -> tuple[tf.Tensor,
                                                                 tf.Tensor]:
  """(sum(values·weights) / sum(weights), sum(weights)), safe for zero weight."""
  values = tf.convert_to_tensor(values)
  weights = tf.cast(weights, values.dtype)
  total = tf.reduce_sum(weights)
  return tf.math.divide_no_nan(tf.reduce_sum(values * weights), total), total
