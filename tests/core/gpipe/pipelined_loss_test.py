"""The loss inside the pipeline gives a whole-batch tape's loss, metrics and gradients."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe import microbatch
from lingvo_gpipe.core.gpipe import pipelined_loss
from lingvo_gpipe.core.gpipe import pipelining_layer
from lingvo_gpipe.core.layers import activations
from lingvo_gpipe.core.layers import conv
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.layers import embedding
from lingvo_gpipe.core.layers import normalization
from lingvo_gpipe.core.layers import pooling
from lingvo_gpipe.core.nested_map import NestedMap
from tests.support import test_utils


def _Mlp():
  return [dense.Dense.Params().Set(name=f'fc{i}', input_dim=6, output_dim=6,
                                   activation='tanh') for i in range(8)]


def _ConvNet():
  layers, channels = [], 3
  for i, out in enumerate([4, 8]):
    layers += [conv.Conv2D.Params().Set(name=f'conv{i}',
                                        filter_shape=[3, 3, channels, out]),
               normalization.BatchNorm.Params().Set(name=f'bn{i}', dim=out),
               activations.Activation.Params().Set(name=f'relu{i}')]
    channels = out
  return layers + [pooling.GlobalAvgPool.Params().Set(name='pool'),
                   dense.Dense.Params().Set(name='out', input_dim=8,
                                            output_dim=6)]


def _Pipeline(layers, k, m, recompute='always', **kwargs):
  return pipelining_layer.PipeliningLayer.Params().Set(
      name='pipe', layers=layers, num_partitions=k, num_micro_batches=m,
      recompute=recompute, devices=[f'/device:CPU:{i}' for i in range(k)],
      **kwargs).Instantiate()


def _Metrics(outputs, targets):
  """Masked squared error per real row (the loss) and mean absolute error."""
  err = tf.reduce_sum((outputs - targets.y) ** 2, axis=-1)
  rows = tf.reduce_sum(targets.mask)
  return NestedMap(
      loss=(tf.reduce_sum(err * targets.mask) / rows, rows),
      mae=(tf.reduce_mean(tf.abs(outputs - targets.y)),
           tf.cast(tf.shape(outputs)[0], tf.float32)))


def _Targets(batch):
  return NestedMap(y=tf.random.stateless_normal([batch, 6], [3, batch]),
                   mask=tf.constant([1.0, 0.0, 1.0, 1.0] * 4)[:batch])


def _Pipelined(pipe, x, targets, fn=lambda loss: loss):
  """(metrics, gradients of fn(loss) w.r.t. the variables and x)."""

  @tf.function
  def Step():
    with base_layer.Context(training=True, step=3):
      with tf.GradientTape() as tape:
        tape.watch(x)
        metrics = pipe.FPropLoss(pipe.theta, x, targets, _Metrics)
        objective = fn(metrics.loss[0])
    return metrics, tape.gradient(objective,
                                  list(pipe.trainable_variables) + [x])

  return Step()


def _Reference(pipe, x, targets, fn=lambda loss: loss):
  """The same, from a tape around the sequential model's whole batch."""
  sizes = pipe.MicroBatchSizes(x)
  with base_layer.Context(training=True, step=3):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = test_utils.SequentialReference(pipe, x, sizes, pipe.theta)
      err = tf.reduce_sum((y - targets.y) ** 2, axis=-1)
      loss = tf.reduce_sum(err * targets.mask) / tf.reduce_sum(targets.mask)
      objective = fn(loss)
  per_mb = [_Metrics(a, b) for a, b in zip(microbatch.Split(y, sizes),
                                           microbatch.Split(targets, sizes))]
  mae = pipelined_loss.Combine(per_mb).mae
  return (loss, mae), tape.gradient(objective,
                                    list(pipe.trainable_variables) + [x])


def _Check(layers, x, k, m, recompute, fn=lambda loss: loss, **kwargs):
  pipe = _Pipeline(layers, k, m, recompute, **kwargs)
  targets = _Targets(int(x.shape[0]))
  moving = [v for v in pipe.vars.Flatten() if not v.trainable]
  start = [v.numpy() for v in moving]
  metrics, grads = _Pipelined(pipe, x, targets, fn)
  piped_moving = [v.numpy() for v in moving]
  for v, s in zip(moving, start):
    v.assign(s)
  (loss, mae), ref_grads = _Reference(pipe, x, targets, fn)
  np.testing.assert_allclose(metrics.loss[0], loss, rtol=1e-5)
  np.testing.assert_allclose(metrics.loss[1], np.sum(targets.mask))
  np.testing.assert_allclose(metrics.mae[0], mae[0], rtol=1e-5)
  assert len(grads) == len(ref_grads)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5,
                               atol=1e-6 * max(1.0, np.max(np.abs(r))))
  for a, b in zip(piped_moving, [v.numpy() for v in moving]):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# schedule[:V cells per device]; interleaved with V=1 is 1F1B's order.
_SCHEDULES = ['gpipe', '1f1b', 'zero_bubble_h1', 'interleaved_1f1b:2']


def _Schedule(name):
  """PipeliningLayer fields of a _SCHEDULES entry."""
  schedule, _, v = name.partition(':')
  return dict(schedule=schedule, cells_per_device=int(v or 1))
_GRID = list(itertools.product(_SCHEDULES, [1, 2, 4], [1, 2, 3, 4, 8],
                               ['always', 'never']))


@pytest.mark.parametrize('schedule,k,m,recompute', _GRID)
def test_mlp_equals_a_tape_around_the_whole_batch(schedule, k, m, recompute):
  # Batch 10: ragged micro-batches at M = 3, 4, 8; rows masked out of the loss.
  # K devices, K*V cells.
  _Check(_Mlp(), tf.random.stateless_normal([10, 6], [1, k * 10 + m]), k, m,
         recompute, **_Schedule(schedule))


@pytest.mark.parametrize('schedule', _SCHEDULES)
@pytest.mark.parametrize('k,m,recompute', [(1, 3, 'always'), (2, 4, 'never'),
                                            (4, 8, 'always'),
                                            (2, 2, 'except_last')])
def test_convnet_with_batchnorm_equals_a_tape_around_the_whole_batch(
    schedule, k, m, recompute):
  x = tf.random.stateless_normal([8 if m != 3 else 7, 6, 6, 3], [2, k + m])
  _Check(_ConvNet(), x, k, m, recompute, **_Schedule(schedule))


def test_a_function_of_the_loss_gets_its_chain_rule():
  _Check(_Mlp(), tf.random.stateless_normal([10, 6], [5, 5]), 2, 4, 'always',
         fn=lambda loss: loss ** 2 + 3.0 * loss)


def test_input_grads_first_and_xla_cells_compute_the_same():
  x = tf.random.stateless_normal([10, 6], [6, 6])
  _Check(_Mlp(), x, 2, 4, 'always', input_grads_first=True)
  _Check(_Mlp(), x, 2, 4, 'never', jit_compile=True)


@pytest.mark.parametrize('k,m', [(2, 4), (4, 3), (4, 8)])
def test_one_f_one_b_runs_with_the_loss_inside_and_is_refused_without(k, m):
  # A caller's tape around FProp cannot run it (refused by name); with the
  # loss inside, the executor lowers its order as it is.
  pipe = _Pipeline(_Mlp(), k, m, schedule='1f1b')
  assert pipe.Schedule(m).name == '1f1b'
  x = tf.random.stateless_normal([10, 6], [7, k + m])
  targets = _Targets(10)
  metrics, grads = _Pipelined(pipe, x, targets)
  (loss, _), ref_grads = _Reference(pipe, x, targets)
  np.testing.assert_allclose(metrics.loss[0], loss, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="schedule='1f1b' starts a backward "
                     'before the last forward'):
    with base_layer.Context(training=True):
      pipe.FProp(pipe.theta, x)
  # Without training only forwards run: FProp serves eval as before.
  with base_layer.Context(training=False):
    y = pipe.FProp(pipe.theta, x)
  assert y.shape == x.shape


def test_sparse_gradients_and_integer_inputs_pass_through():
  layers = [embedding.Embedding.Params().Set(name='emb', vocab_size=10,
                                             embedding_dim=6)] + _Mlp()[:3]
  pipe = _Pipeline(layers, 2, 3)
  ids = tf.constant([3, 1, 4, 1, 5, 9, 2, 6])
  targets = _Targets(8)

  @tf.function
  def Step(inside):
    with base_layer.Context(training=True):
      with tf.GradientTape() as tape:
        if inside:
          loss = pipe.FPropLoss(pipe.theta, ids, targets, _Metrics).loss[0]
        else:
          sizes = pipe.MicroBatchSizes(ids)
          y = test_utils.SequentialReference(pipe, ids, sizes, pipe.theta)
          err = tf.reduce_sum((y - targets.y) ** 2, axis=-1)
          loss = (tf.reduce_sum(err * targets.mask) /
                  tf.reduce_sum(targets.mask))
      grads = tape.gradient(loss, pipe.trainable_variables)
    return loss, [tf.convert_to_tensor(g) for g in grads]

  (loss, grads), (ref_loss, ref_grads) = Step(True), Step(False)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('metrics,message', [
    (lambda y, t: NestedMap(mae=(tf.reduce_mean(y), 1.0)),
     "with a 'loss' entry"),
    (lambda y, t: NestedMap(loss=tf.reduce_mean(y)),
     "Metric 'loss' must be a (value, weight) pair"),
])
def test_a_loss_function_that_returns_no_loss_pair_is_refused(metrics,
                                                              message):
  pipe = _Pipeline(_Mlp(), 2, 2)
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(
      ')', r'\)')):
    with base_layer.Context(training=True):
      pipe.FPropLoss(pipe.theta, tf.ones([4, 6]), None, metrics)


def test_the_loop_executor_is_refused_by_name():
  pipe = _Pipeline(_Mlp(), 2, 2, executor='loop')
  with pytest.raises(ValueError, match="executor='unrolled' only for now, "
                     "not executor='loop'"):
    with base_layer.Context(training=True):
      pipe.FPropLoss(pipe.theta, tf.ones([4, 6]), _Targets(4), _Metrics)
