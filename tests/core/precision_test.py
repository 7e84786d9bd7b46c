"""Tests of mixed precision: each layer in bfloat16 and float16 against float32.

Every layer is built twice from the same Params (so the same float32
weights), once with fprop_dtype set; its outputs must match the float32 ones
within a tolerance stated per dtype, be in the compute dtype (float32 where
precision.py says so), and its weights' gradients must be float32. Tolerances,
as a share of the largest float32 output: bfloat16 keeps 8 bits of
mantissa (a relative rounding of 2^-8 ≈ 0.4% a value), float16 11 bits
(≈ 0.05%); a few layers deep the errors add up, so 5% and 1%. The weights'
gradients must match the float32 ones within twice that, as a share of the
layer's largest gradient.
"""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core import precision
from lingvo_gpipe.core.gpipe import pipelining_layer
from lingvo_gpipe.core.layers import activations
from lingvo_gpipe.core.layers import attention
from lingvo_gpipe.core.layers import combinators
from lingvo_gpipe.core.layers import conv
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.layers import embedding
from lingvo_gpipe.core.layers import normalization
from lingvo_gpipe.core.layers import pooling
from lingvo_gpipe.core.layers import repeat
from lingvo_gpipe.core.layers import transformer
from lingvo_gpipe.core.nested_map import NestedMap
from tasks.image import amoebanet
from tests.support import test_utils

TOLERANCE = {tf.bfloat16: 0.05, tf.float16: 0.01}
D = 16


def _Normal(shape, seed=1):
  return tf.random.stateless_normal(shape, [seed, 3])


def _Tokens(shape=(2, 6), vocab=13):
  return tf.random.stateless_uniform(list(shape), [4, 5], maxval=vocab,
                                     dtype=tf.int32)


def _LmInputs():
  ids = _Tokens()
  paddings = tf.constant([[0.] * 6, [0.] * 4 + [1.] * 2])
  return NestedMap(ids=ids, labels=tf.roll(ids, -1, axis=1),
                   paddings=paddings)


def _Block():
  return transformer.TransformerLayer.Params().Set(
      model_dim=D, num_heads=2, hidden_dim=2 * D, causal=True)


# name -> (Params, inputs, outputs that stay float32 whatever the fprop_dtype)
CASES = {
    'dense': (lambda: dense.Dense.Params().Set(input_dim=D, output_dim=D),
              lambda: _Normal([4, D]), ()),
    'feed_forward': (lambda: dense.FeedForward.Params().Set(
        input_dim=D, hidden_dim=2 * D), lambda: _Normal([2, 3, D]), ()),
    'conv2d': (lambda: conv.Conv2D.Params().Set(filter_shape=[3, 3, 4, 8]),
               lambda: _Normal([2, 6, 6, 4]), ()),
    'depthwise_conv2d': (lambda: conv.DepthwiseConv2D.Params().Set(
        filter_shape=[3, 3, 4, 2]), lambda: _Normal([2, 6, 6, 4]), ()),
    'separable_conv2d': (lambda: conv.SeparableConv2D.Params().Set(
        filter_shape=[3, 3, 4, 8]), lambda: _Normal([2, 6, 6, 4]), ()),
    'max_pool': (lambda: pooling.Pooling.Params().Set(pooling_type='MAX'),
                 lambda: _Normal([2, 6, 6, 4]), ()),
    'global_avg_pool': (lambda: pooling.GlobalAvgPool.Params(),
                        lambda: _Normal([2, 6, 6, 4]), ()),
    'activation': (lambda: activations.Activation.Params().Set(
        activation='gelu'), lambda: _Normal([4, D]), ()),
    'batch_norm': (lambda: normalization.BatchNorm.Params().Set(dim=4),
                   lambda: _Normal([2, 6, 6, 4]) * 30 + 100, ()),
    'batch_norm_vectors': (lambda: normalization.BatchNorm.Params().Set(dim=D),
                           lambda: _Normal([8, D]) * 30 + 100, ()),
    'layer_norm': (lambda: normalization.LayerNorm.Params().Set(dim=D),
                   lambda: _Normal([4, D]) * 30 + 100, ()),
    'attention': (lambda: attention.MultiHeadAttention.Params().Set(
        input_dim=D, num_heads=2, causal=True), lambda: _Normal([2, 5, D]),
                  ()),
    'embedding': (lambda: embedding.Embedding.Params().Set(
        vocab_size=13, embedding_dim=D), _Tokens, ()),
    'softmax': (lambda: embedding.Softmax.Params().Set(
        input_dim=D, num_classes=13), lambda: _Normal([4, D]),
                ('logits', 'log_probs')),
    'residual': (lambda: combinators.Residual.Params().Set(
        sub=dense.Dense.Params().Set(input_dim=D, output_dim=D),
        pre_norm=normalization.LayerNorm.Params().Set(dim=D)),
                 lambda: _Normal([4, D]), ()),
    'repeat': (lambda: repeat.Repeat.Params().Set(
        sub=dense.Dense.Params().Set(input_dim=D, output_dim=D,
                                     activation='tanh'), num=3),
               lambda: _Normal([4, D]), ()),
    'transformer_lm': (lambda: combinators.Sequential.Params().Set(sub=[
        transformer.TransformerEmbedding.Params().Set(
            name='emb', vocab_size=13, model_dim=D),
        _Block().Set(name='block'),
        transformer.TransformerSoftmax.Params().Set(
            name='softmax', model_dim=D, vocab_size=13)]), _LmInputs,
                       ('logits', 'per_token_xent', 'weights')),
    'amoebanet': (lambda: amoebanet.NetworkParams(
        3, 8, num_classes=10, image_size=8, input_channels=1,
        stem_type='basic'), lambda: _Normal([3, 8, 8, 1]), ()),
}


# Where a 16-bit rounding moves a value across a kink (relu at 0, the max of
# a max-pool), that element's gradient changes by O(1): a deep relu network
# with BatchNorm over a few values cannot be compared element by element.
# Its pipeline's gradients are compared with the same-dtype sequential model
# below instead, where the arithmetic is the same.
_GRADIENTS_NOT_COMPARED = {'amoebanet'}


def _Build(name, fprop_dtype=None):
  params, _, _ = CASES[name]
  return params().Set(name=name, fprop_dtype=fprop_dtype).Instantiate()


def _Items(outputs):
  if isinstance(outputs, dict):
    return sorted(NestedMap(outputs).FlattenItems())
  return [('', outputs)]


@pytest.mark.parametrize('dtype', [tf.bfloat16, tf.float16],
                         ids=['bfloat16', 'float16'])
@pytest.mark.parametrize('name', sorted(CASES))
def test_layer_matches_float32(name, dtype):
  _, inputs_fn, float32_outputs = CASES[name]
  inputs = inputs_fn()
  reference, layer = _Build(name), _Build(name, dtype)
  def Loss(outputs):  # weights every element differently: gradients differ
    return tf.add_n([tf.reduce_sum(tf.sin(tf.cast(t, tf.float32)))
                     for _, t in _Items(outputs) if t.dtype.is_floating])

  with base_layer.Context(training=True):
    with tf.GradientTape(persistent=True) as tape:
      expected = reference.FPropDefaultTheta(inputs)
      got = layer.FPropDefaultTheta(inputs)
      loss, ref_loss = Loss(got), Loss(expected)
  for (key, want), (_, have) in zip(_Items(expected), _Items(got)):
    if not want.dtype.is_floating:
      np.testing.assert_array_equal(have.numpy(), want.numpy())
      continue
    final_key = key.rsplit('.', 1)[-1]
    assert have.dtype == (tf.float32 if final_key in float32_outputs
                          else dtype), (key, have.dtype)
    want, have = want.numpy(), tf.cast(have, tf.float32).numpy()
    scale = max(np.abs(want).max(), 1e-6)
    error = np.abs(have - want).max() / scale
    assert error <= TOLERANCE[dtype], (key, error)
  assert all(v.dtype == tf.float32 for v in layer.vars.Flatten())
  grads = tape.gradient(loss, layer.trainable_variables)
  ref_grads = tape.gradient(ref_loss, reference.trainable_variables)
  assert all(g is not None and g.dtype == tf.float32 for g in grads), name
  if name in _GRADIENTS_NOT_COMPARED:
    return
  # As a share of the layer's largest gradient: some gradients are near 0
  # in exact arithmetic (a key bias's, under the softmax), so noise.
  grads = [tf.convert_to_tensor(g).numpy() for g in grads]
  ref_grads = [tf.convert_to_tensor(r).numpy() for r in ref_grads]
  scale = max([np.abs(r).max() for r in ref_grads] + [1e-6])
  for v, g, r in zip(layer.trainable_variables, grads, ref_grads):
    error = np.abs(g - r).max() / scale
    assert error <= 2 * TOLERANCE[dtype], (v.name, error)


def test_fprop_dtype_reaches_children_unless_they_set_their_own():
  p = combinators.Sequential.Params().Set(name='seq', sub=[
      dense.Dense.Params().Set(name='a', input_dim=D, output_dim=D),
      dense.Dense.Params().Set(name='b', input_dim=D, output_dim=D,
                               fprop_dtype=tf.float32)])
  seq = p.Set(fprop_dtype='bfloat16').Instantiate()
  assert seq.fprop_dtype == tf.bfloat16
  assert [c.fprop_dtype for c in seq.sub] == [tf.bfloat16, tf.float32]
  assert all(v.dtype == tf.float32 for v in seq.vars.Flatten())
  # The float32 child casts its bfloat16 input up: the output is float32.
  assert seq.FPropDefaultTheta(_Normal([2, D])).dtype == tf.float32


def test_embedding_gradient_stays_sparse_and_float32():
  layer = _Build('embedding', tf.bfloat16)
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(tf.cast(layer.FPropDefaultTheta(_Tokens()),
                                 tf.float32))
  grad = tape.gradient(loss, layer.vars.emb)
  assert isinstance(grad, tf.IndexedSlices) and grad.dtype == tf.float32


def test_bad_fprop_dtype_names_the_valid_ones():
  with pytest.raises(ValueError, match=r"d\.fprop_dtype='bfloat61'.*bfloat16, "
                     r"float16.*Did you mean 'bfloat16'"):
    dense.Dense.Params().Set(name='d', input_dim=2, output_dim=2,
                             fprop_dtype='bfloat61').Instantiate()
  with pytest.raises(ValueError, match='int32'):
    precision.ComputeDtype(tf.int32, tf.float32)
  assert precision.ComputeDtype('tf.float16', tf.float32) == tf.float16
  assert precision.ComputeDtype(None, tf.float32) == tf.float32


# --- the pipeline ---------------------------------------------------------------


def _PipelineLayers():
  """A conv net with BatchNorm, then Dense layers: 10 layers to cut in 4."""
  layers = []
  channels = 3
  for i, out in enumerate([4, 8]):
    layers += [
        conv.Conv2D.Params().Set(name=f'conv{i}', filter_shape=[3, 3, channels,
                                                                out]),
        normalization.BatchNorm.Params().Set(name=f'bn{i}', dim=out),
        activations.Activation.Params().Set(name=f'relu{i}')]
    channels = out
  layers.append(pooling.GlobalAvgPool.Params().Set(name='pool'))
  layers += [dense.Dense.Params().Set(name=f'fc{i}', input_dim=8, output_dim=8,
                                      activation='tanh') for i in range(3)]
  return layers


def _PipelineLossAndGrads(fn, pipe, x):
  with base_layer.Context(training=True, step=3):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = fn(pipe.theta, x)
      y32 = tf.cast(y, tf.float32)
      loss = tf.reduce_sum(y32 * y32) + tf.reduce_sum(tf.sin(y32))
    grads = tape.gradient(loss, list(pipe.trainable_variables) + [x])
  return y, loss, grads


@pytest.mark.parametrize('executor,k,m,recompute', [
    ('unrolled', 2, 3, 'always'), ('unrolled', 4, 4, 'never'),
    ('loop', 2, 3, 'always'), ('loop', 4, 4, 'except_last')])
def test_pipeline_in_bfloat16_equals_the_sequential_model_in_bfloat16(
    executor, k, m, recompute):
  """Same casts, same math: the pipelined model's loss, gradients and moving
  averages match the layers run in sequence on each micro-batch in bfloat16.

  Tolerance: the cells run the same bfloat16 ops on the same values; the
  weight gradients are summed over micro-batches in float32 in both, in
  another order: the float32 tests' 1e-5 (observed: 8e-8 of the largest
  gradient).
  """
  pipe = pipelining_layer.PipeliningLayer.Params().Set(
      name='pipe', layers=_PipelineLayers(), num_partitions=k,
      num_micro_batches=m, recompute=recompute, executor=executor,
      fprop_dtype=tf.bfloat16,
      devices=[f'/device:CPU:{i}' for i in range(k)]).Instantiate()
  x = tf.random.stateless_normal([7, 6, 6, 3], [9, k * 10 + m])
  sizes = pipe.MicroBatchSizes(x)
  moving = [v for v in pipe.vars.Flatten() if not v.trainable]
  start = [v.numpy() for v in moving]
  y, loss, grads = _PipelineLossAndGrads(pipe.FProp, pipe, x)
  piped_moving = [v.numpy() for v in moving]
  for v, s in zip(moving, start):
    v.assign(s)
  ref_y, ref_loss, ref_grads = _PipelineLossAndGrads(
      lambda theta, x: test_utils.SequentialReference(pipe, x, sizes, theta),
      pipe, x)
  assert y.dtype == ref_y.dtype == tf.bfloat16
  assert all(g.dtype == tf.float32 for g in grads)  # weights' and the input's
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5,
                               atol=1e-5 * max(1.0, np.max(np.abs(r))))
  for a, b in zip(piped_moving, [v.numpy() for v in moving]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
