"""Mixed precision: float32 weights, each layer computing in its fprop_dtype.

Invariant: variables, optimizer slots and the gradients that reach them stay
in the layer's `dtype` (float32); a layer whose `fprop_dtype` is bfloat16 or
float16 computes in it. At FProp entry its floating inputs and its own
weights are cast to the compute dtype (`CastingFProp`, which BaseLayer puts
around every layer's FProp), so its outputs, and the boundary activations a
pipeline carries between cells, are in the compute dtype, and gradients flow
back through the casts into float32. A cell's weight gradients therefore
reach the pipeline's running sums in float32 and are accumulated across
micro-batches there.

What loses too much in 16 bits computes in float32, by name: normalization
statistics (LayerNorm: the whole normalization, cast back to the compute
dtype after; BatchNorm: FusedBatchNorm's float32 statistics on images, else
as LayerNorm), attention logits and their softmax, the softmax over classes
and its cross-entropy, and a task's metrics and loss (its network's outputs
are cast to float32 before `OutputMetrics`). Their gradients keep the 16-bit
tensors, not float32 copies (`Softmax` here, LayerNorm's own): a float32 copy
kept for the backward cost more than the float32 model did (the Transformer
probe grew 52 MB a layer in bfloat16 against float32's 57; now 36, measured
with lingvo_gpipe.tools.step_memory --plain). A layer opts out of the
generic casts with two class attributes: `cast_theta_to_fprop_dtype` (an
embedding gathers rows from its float32 table and casts only those, so its
gradient stays sparse) and `cast_inputs_to_fprop_dtype` (a task, whose batch
holds labels and weights that are not activations).

`fprop_dtype` None computes in `dtype`; a child left at None takes its
parent's, so setting it once on a model's top Params reaches every layer.
"""

from __future__ import annotations

import difflib
import functools
from typing import Any, Callable

import tensorflow as tf

# The compute dtypes a layer may run in.
FPROP_DTYPES = ('float32', 'bfloat16', 'float16')


def ComputeDtype(fprop_dtype: Any, dtype: tf.DType, where: str = 'fprop_dtype'
                 ) -> tf.DType:
  """The dtype a layer computes in: `fprop_dtype` (a DType or its name), else `dtype`.

  Raises:
    ValueError: `fprop_dtype` names no dtype of FPROP_DTYPES.
  """
  if fprop_dtype is None:
    return tf.as_dtype(dtype)
  name = getattr(fprop_dtype, 'name', fprop_dtype)
  if isinstance(name, str) and name.startswith('tf.'):
    name = name[3:]
  if name not in FPROP_DTYPES:
    close = difflib.get_close_matches(str(name), FPROP_DTYPES, n=1)
    hint = f' Did you mean {close[0]!r}?' if close else ''
    raise ValueError(f'{where}={fprop_dtype!r} is not a compute dtype; use one '
                     f'of {", ".join(FPROP_DTYPES)} (or None: the variables\' '
                     f'dtype).{hint}')
  return tf.as_dtype(name)


def CastFloats(value: Any, dtype: tf.DType) -> Any:
  """`value` (nested) with every floating tensor cast to `dtype`; others as they are."""

  def Cast(t: Any) -> Any:
    if isinstance(t, (tf.Tensor, tf.Variable)) and t.dtype.is_floating and (
        t.dtype != dtype):
      return tf.cast(t, dtype)
    return t

  return tf.nest.map_structure(Cast, value)


def _CastOwnWeights(layer: Any, theta: Any, dtype: tf.DType) -> Any:
  """`theta` with the layer's own float weights (not its children's) cast."""
  own = getattr(layer, '_variables_by_name', None)
  if not own or not isinstance(theta, dict):
    return theta
  cast = theta.copy()
  for name in own:
    if name in cast:
      cast[name] = CastFloats(cast[name], dtype)
  return cast


def CastingFProp(fprop: Callable[..., Any]) -> Callable[..., Any]:
  """`fprop` run in the layer's compute dtype: its float inputs and own weights cast."""

  @functools.wraps(fprop)
  def FProp(self, theta, *inputs, **kwargs):
    dtype = self.fprop_dtype
    if dtype == self.params.dtype:
      return fprop(self, theta, *inputs, **kwargs)
    if self.cast_theta_to_fprop_dtype:
      theta = _CastOwnWeights(self, theta, dtype)
    if self.cast_inputs_to_fprop_dtype:
      inputs = CastFloats(inputs, dtype)
    return fprop(self, theta, *inputs, **kwargs)

  FProp.casts_to_fprop_dtype = True
  return FProp


def InFloat32(fn: Callable[..., tf.Tensor], x: tf.Tensor, *args: Any,
              **kwargs: Any) -> tf.Tensor:
  """`fn(x, ...)` computed in float32 (x cast up), its result cast back to x's dtype.

  For the parts that lose too much in 16 bits (normalization statistics).
  """
  if x.dtype in (tf.float32, tf.float64):
    return fn(x, *args, **kwargs)
  return tf.cast(fn(tf.cast(x, tf.float32), *args, **kwargs), x.dtype)


def Softmax(logits: tf.Tensor, out_dtype: tf.DType) -> tf.Tensor:
  """softmax(logits) over the last axis computed in float32, returned in `out_dtype`.

  For a 16-bit `out_dtype` its gradient keeps only the 16-bit output
  (softmax's gradient p·(g - Σ p·g) needs nothing else), computed from it in
  float32: TensorFlow's own softmax gradient would keep the float32
  probabilities besides the 16-bit ones the next op keeps, a third more
  memory than the float32 model for the attention's largest activation.
  """
  if out_dtype in (tf.float32, tf.float64):
    return tf.nn.softmax(tf.cast(logits, out_dtype))

  @tf.custom_gradient
  def Forward(x):
    probs = tf.cast(tf.nn.softmax(tf.cast(x, tf.float32)), out_dtype)

    def Backward(grad):
      # Cast when the gradient is there: the cast of `probs` alone could run
      # as soon as the forward made it, every layer's float32 copy alive at
      # once through the backward (6 layers: 48 MiB more at the peak).
      with tf.control_dependencies([grad]):
        p32 = tf.cast(probs, tf.float32)
      g32 = tf.cast(grad, tf.float32)
      dx = p32 * (g32 - tf.reduce_sum(p32 * g32, axis=-1, keepdims=True))
      return tf.cast(dx, x.dtype)

    return probs, Backward

  return Forward(logits)
