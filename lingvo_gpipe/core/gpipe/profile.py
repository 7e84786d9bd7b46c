"""Measures each layer's cost on this process's device: step time or peak memory.

Invariant: layer i is measured on the real output of layers 0..i-1 (so shapes
and dtypes are those of the model), running its forward and backward under
tf.function, once to warm up and then `repeats` times; time is the median,
memory the peak above the allocator's level before the step.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.layers import combinators


def _SampleInput(shape_or_spec: Any) -> tf.Tensor:
  dtype = getattr(shape_or_spec, 'dtype', tf.float32)
  shape = tf.TensorShape(getattr(shape_or_spec, 'shape', shape_or_spec))
  if not shape.is_fully_defined():
    raise ValueError(f'Profiling needs fully defined input shapes, got {shape}.')
  if dtype.is_integer:
    return tf.zeros(shape, dtype)
  return tf.random.stateless_normal(shape, [0, 0], dtype=dtype)


def _Samples(input_shapes: Any) -> Any:
  def IsLeaf(x):
    return isinstance(x, (tf.TensorShape, tf.TensorSpec)) or (
        isinstance(x, (list, tuple)) and all(isinstance(d, int) for d in x))

  if IsLeaf(input_shapes):
    return _SampleInput(input_shapes)
  if isinstance(input_shapes, dict):
    return type(input_shapes)(
        (k, _Samples(v)) for k, v in input_shapes.items())
  return type(input_shapes)(_Samples(v) for v in input_shapes)


def _MemoryInfo(device: str) -> dict:
  try:
    return tf.config.experimental.get_memory_info(device)
  except ValueError as e:
    raise ValueError(
        "partition_method='memory' reads the allocator's peak, which this "
        f'device does not report ({e}). On CPU run with '
        'TF_CPU_ALLOCATOR_USE_BFC=true; or use partition_method=time/flops.'
    ) from e


def ProfileLayers(layer_params: Sequence[base_layer.Params], method: str,
                  input_shapes: Sequence[Any], repeats: int = 3,
                  device: str = '/device:CPU:0') -> list[float]:
  """Per-layer seconds ('time') or peak bytes ('memory') of forward+backward.

  Args:
    layer_params: the layers, in order.
    method: 'time' or 'memory'.
    input_shapes: FProp arguments of the first layer as shapes or TensorSpecs
      (integer specs get zeros, e.g. token ids).
    repeats: measured runs after one warm-up.
    device: where layers are built and run, and whose allocator 'memory'
      reads (a local device).
  """
  if method not in ('time', 'memory'):
    raise ValueError(f'ProfileLayers measures time or memory, not {method!r}.')
  spec = tf.DeviceSpec.from_string(device)
  allocator = f'{spec.device_type or "CPU"}:{spec.device_index or 0}'
  inputs = tuple(_Samples(tuple(input_shapes)))
  costs = []
  with base_layer.Context(training=True), tf.device(device):
    for p in layer_params:
      layer = p.Instantiate()
      variables = layer.trainable_variables

      @tf.function
      def Step(*args, layer=layer, variables=variables):
        with tf.GradientTape() as tape:
          tape.watch([a for a in tf.nest.flatten(args)
                      if a is not None and a.dtype.is_floating])
          out = layer.FPropDefaultTheta(*args)
          loss = tf.add_n([tf.reduce_sum(tf.cast(o, tf.float32))
                           for o in tf.nest.flatten(out)
                           if o is not None and o.dtype.is_floating] or
                          [tf.constant(0.0)])
        grads = tape.gradient(loss, variables) if variables else []
        return out, grads

      out, _ = Step(*inputs)
      samples = []
      for _ in range(repeats):
        if method == 'memory':
          before = _MemoryInfo(allocator)['current']
          tf.config.experimental.reset_memory_stats(allocator)
          result = Step(*inputs)
          tf.nest.map_structure(lambda t: t.numpy(), result[0])
          samples.append(float(_MemoryInfo(allocator)['peak'] - before))
        else:
          start = time.perf_counter()
          result = Step(*inputs)
          tf.nest.map_structure(lambda t: t.numpy(), result[0])
          samples.append(time.perf_counter() - start)
      costs.append(statistics.median(samples))
      inputs = combinators.AsArgs(out)  # as a Sequential hands them on
  return costs
