"""Checks for layers and pipelines, for this project's tests.

CheckLayer enforces that `NumParams(p)` equals the scalars of the trainable
variables the layer really creates, and that `FPropMeta(p, *shapes)` gives the
shapes `FProp` really returns. SequentialReference computes what a pipeline
must equal.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe import microbatch
from lingvo_gpipe.core.nested_map import NestedMap


def CountTrainable(layer: base_layer.BaseLayer) -> int:
  return sum(int(np.prod(v.shape)) for v in layer.vars.Flatten() if v.trainable)


def _AsTuple(outputs: Any) -> tuple:
  return outputs if isinstance(outputs, tuple) else (outputs,)


def CheckLayer(p: base_layer.Params, *inputs: Any, training: bool = False,
               meta_inputs: Any = None) -> tuple[base_layer.BaseLayer, Any]:
  """Builds `p`, runs FProp on `inputs`, and checks NumParams and FPropMeta.

  Args:
    p: the layer's Params.
    *inputs: FProp's inputs (tensors or nested structures of them).
    training: the execution context's training flag during FProp.
    meta_inputs: input shapes for FPropMeta if not the inputs' own shapes.

  Returns:
    (layer, outputs), for further checks by the caller.
  """
  layer = p.Instantiate()
  num_params = p.cls.NumParams(p)
  built = CountTrainable(layer)
  assert num_params == built, (
      f'{p.cls.__name__}.NumParams says {num_params}, built {built}')
  with base_layer.Context(training=training):
    outputs = layer.FPropDefaultTheta(*inputs)
  shapes = meta_inputs if meta_inputs is not None else tuple(
      tf.nest.map_structure(lambda t: t.shape, x) for x in inputs)
  meta = p.cls.FPropMeta(p, *shapes)
  assert isinstance(meta, NestedMap) and meta.flops >= 0, meta
  actual = tf.nest.map_structure(lambda t: tf.TensorShape(t.shape),
                                 _AsTuple(outputs))
  predicted = tuple(meta.out_shapes)
  tf.nest.assert_same_structure(actual, predicted)
  for a, b in zip(tf.nest.flatten(actual), tf.nest.flatten(predicted)):
    assert a.as_list() == b.as_list(), (
        f'{p.cls.__name__}: FProp shape {actual} but FPropMeta says {predicted}')
  return layer, outputs


def SequentialReference(pipe: Any, inputs: Any, sizes: list[int],
                        theta: NestedMap) -> Any:
  """What a PipeliningLayer must compute, without the pipeline.

  Runs `pipe`'s cells one after another on each micro-batch (the same
  micro-batch index in the context, so random masks match), collects
  training statistics over all micro-batches and applies them once: GPipe's
  definition of the math, for equivalence tests of any pipelined model.
  """
  collector = base_layer.StatsCollector()
  outputs = []
  for m, x in enumerate(microbatch.Split(inputs, sizes)):
    with base_layer.Context(micro_batch=m, stats_collector=collector):
      for k, cell in enumerate(pipe.cells):
        x = cell.FProp(pipe.CellTheta(theta, k), x)
    outputs.append(x)
  collector.ApplyAll()
  return microbatch.Merge(outputs)


class UnmergeableStats(base_layer.BaseLayer):
  """Records statistics (its batch size) it cannot merge two at a time (no MergeStats)."""

  def FProp(self, theta, x):
    self.RecordStats(NestedMap(rows=tf.shape(x)[0]))
    return x

  def ApplyStats(self, stats_list):
    del stats_list


class UnknownFeatureShape(base_layer.BaseLayer):
  """Returns its input with every dimension but the first unknown when traced.

  (Known or not, the batch size does not make them known, as it would a
  reshape's computed from the input's shape.)
  """

  def FProp(self, theta, x):
    return tf.compat.v1.placeholder_with_default(
        x, [x.shape[0]] + [None] * (x.shape.rank - 1))
