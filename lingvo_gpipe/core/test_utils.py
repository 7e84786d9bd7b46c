"""Checks any layer's static estimates against the layer it builds.

Invariant it enforces: `NumParams(p)` equals the scalars of the trainable
variables the layer really creates, and `FPropMeta(p, *shapes).out_shapes`
equals the shapes `FProp` really returns. Every layer test calls it; users can
call it on their own layers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from lingvo_gpipe.core import base_layer
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
