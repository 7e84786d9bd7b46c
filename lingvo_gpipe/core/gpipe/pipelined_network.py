"""PipelinedNetwork: a network declared by its own fields, run as a PipeliningLayer.

Invariant: a subclass states its architecture as Params fields (AmoebaNet's
num_cells and num_filters, a Transformer's num_layers) and how to turn them
into a flat layer list (`Layers(p)`); how that list is pipelined lives in
one field, `pipeline` (a PipeliningLayer Params template). So a config
overrides `task.network.num_layers` or `task.network.pipeline.num_micro_batches`
alike, and size, FLOPs and the partition report come from Params alone.
"""

from __future__ import annotations

import contextlib
from typing import Any

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe.pipelining_layer import PipeliningLayer
from lingvo_gpipe.core.nested_map import NestedMap


class PipelinedNetwork(base_layer.BaseLayer):
  """Base: `Layers(p)` built from the fields, run by a PipeliningLayer child."""

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('pipeline', PipeliningLayer.Params(), 'How the layers are '
             'pipelined (num_partitions, num_micro_batches, partition_method, '
             'recompute, devices, ...); `layers` is filled from the network '
             'fields: leave it None.')
    return p

  @classmethod
  def Layers(cls, p) -> list:
    """The flat list of layer Params the fields describe."""
    raise TypeError(f'{cls.__name__} must override Layers.')

  @classmethod
  def DefaultInputShapes(cls, p) -> Any:
    """Input shapes for cost-based partitioning when pipeline has none."""
    return None

  @classmethod
  def PipelineParams(cls, p) -> base_layer.Params:
    """The PipeliningLayer Params that run Layers(p) as p.pipeline says."""
    pipe = p.pipeline.Copy()
    if pipe.layers is not None or pipe.cell_tpl is not None:
      raise ValueError(f'{p.name}: pipeline.layers and pipeline.cell_tpl are '
                       'filled from the network fields; leave them None.')
    pipe.Set(name='pipeline', layers=cls.Layers(p))
    if pipe.input_shapes is None and pipe.partition_method != 'params':
      pipe.input_shapes = cls.DefaultInputShapes(p)
    return pipe

  def __init__(self, params):
    super().__init__(params)
    self.CreateChild('pipeline', self.PipelineParams(self.params))

  def FProp(self, theta: NestedMap, *inputs: Any) -> Any:
    return self.pipeline.FProp(theta.pipeline, *inputs)

  def FPropLoss(self, theta: NestedMap, inputs: Any, targets: Any,
                loss_fn: Any) -> NestedMap:
    """The pipeline's FPropLoss: the loss inside the pipeline."""
    return self.pipeline.FPropLoss(theta.pipeline, inputs, targets, loss_fn)

  def OutputScope(self) -> contextlib.AbstractContextManager:
    return self.pipeline.OutputScope()

  def Report(self) -> NestedMap:
    """The pipeline's report: layers, params, FLOPs and device per cell."""
    return self.pipeline.Report()

  @classmethod
  def NumParams(cls, p) -> int:
    return sum(layer.cls.NumParams(layer) for layer in cls.Layers(p))

  @classmethod
  def FPropMeta(cls, p, *input_shapes):
    return PipeliningLayer.FPropMeta(
        PipeliningLayer.Params().Set(layers=cls.Layers(p)), *input_shapes)
