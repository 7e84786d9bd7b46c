"""Tests of jit_compile: XLA-compiled cells compute what uncompiled ones do, on their devices."""

import re
import types

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe import microbatch
from lingvo_gpipe.core.gpipe import pipeline
from lingvo_gpipe.core.gpipe import placement as placement_lib
from lingvo_gpipe.core.gpipe.pipelining_layer import PipeliningLayer
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.layers import dropout
from lingvo_gpipe.core.layers import embedding
from lingvo_gpipe.core.layers import normalization
from tests.support import test_utils

_DEVICES = ['/device:CPU:0', '/device:CPU:1']
_EXECUTORS = ('unrolled', 'loop')
_CALL_OPS = ('PartitionedCall', 'StatefulPartitionedCall')


def _Dense(n, keep_prob=None):
  layers = []
  for i in range(n):
    layers.append(dense.Dense.Params().Set(name=f'fc{i}', input_dim=4,
                                           output_dim=4, activation='tanh'))
    if keep_prob is not None:
      layers.append(dropout.Dropout.Params().Set(name=f'drop{i}',
                                                 keep_prob=keep_prob))
  return layers


def _Pipeline(layers, executor, jit_compile, m=3, **kwargs):
  return PipeliningLayer.Params().Set(
      name='pipe', layers=layers, num_partitions=2, num_micro_batches=m,
      devices=_DEVICES, executor=executor, jit_compile=jit_compile,
      **kwargs).Instantiate()


def _Step(pipe, x, reference=False):
  """A traced training step: (loss, gradients of the variables and of x)."""

  @tf.function
  def Step():
    with base_layer.Context(training=True, step=5):
      with tf.GradientTape() as tape:
        tape.watch(x)
        if reference:
          sizes = microbatch.MicroBatchSizes(
              int(x.shape[0]), num_micro_batches=pipe.params.num_micro_batches)
          y = test_utils.SequentialReference(pipe, x, sizes, pipe.theta)
        else:
          y = pipe.FPropDefaultTheta(x)
        loss = tf.reduce_sum(y * y)
    return loss, tape.gradient(loss, list(pipe.trainable_variables) + [x])

  return Step


def _XlaReference(pipe, x):
  """_Step's reference, the cells run in sequence by one XLA computation.

  The variables (on both devices) are read outside it: a compiled function
  runs on one device.
  """
  variables = list(pipe.trainable_variables)

  @tf.function(jit_compile=True)
  def Compiled(values):
    with base_layer.Context(training=True, step=5):
      with tf.GradientTape() as tape:
        tape.watch(values + [x])
        by_ref = {v.ref(): t for v, t in zip(variables, values)}
        theta = tf.nest.map_structure(lambda v: by_ref[v.ref()], pipe.vars)
        sizes = microbatch.MicroBatchSizes(
            int(x.shape[0]), num_micro_batches=pipe.params.num_micro_batches)
        y = test_utils.SequentialReference(pipe, x, sizes, theta)
        loss = tf.reduce_sum(y * y)
    return loss, tape.gradient(loss, values + [x])

  return tf.function(lambda: Compiled([tf.convert_to_tensor(v)
                                       for v in variables]))


def _AssertClose(a, b, rtol=2e-5, atol=2e-6):
  (loss, grads), (ref_loss, ref_grads) = a, b
  np.testing.assert_allclose(loss, ref_loss, rtol=rtol)
  assert len(grads) == len(ref_grads)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=rtol, atol=atol)


def _CompiledCalls(step):
  """[(called function, device)] of every call XLA must compile in `step`'s graph.

  Looks in the traced graph and in every function it holds (the loop
  executor's while bodies), so a call inside a loop counts too.
  """
  graph_def = step.get_concrete_function().graph.as_graph_def()
  nodes = list(graph_def.node)
  for function in graph_def.library.function:
    nodes += list(function.node_def)
  return [(n.attr['f'].func.name, n.device) for n in nodes
          if n.op in _CALL_OPS and n.attr['_XlaMustCompile'].b]


def _Batch():
  return tf.random.stateless_normal([7, 4], [1, 2])  # M=3: sizes 3, 2, 2


@pytest.mark.parametrize('executor', _EXECUTORS)
def test_compiled_cells_compute_what_uncompiled_and_sequential_ones_do(
    executor):
  x = _Batch()
  jit = _Pipeline(_Dense(4), executor, jit_compile=True)
  plain = _Pipeline(_Dense(4), executor, jit_compile=False)
  step = _Step(jit, x)
  result = step()
  _AssertClose(result, _Step(plain, x)())
  _AssertClose(result, _Step(jit, x, reference=True)())
  # XLA compiles each cell's forward and its backward, on the cell's device.
  calls = _CompiledCalls(step)
  for k, device in enumerate(_DEVICES):
    on_device = [name for name, d in calls if d == device]
    assert any(f'cell_{k}_xla_forward' in n for n in on_device), calls
    assert any(f'cell_{k}_xla_backward' in n for n in on_device), calls
  assert {d for _, d in calls} == set(_DEVICES)
  assert not _CompiledCalls(_Step(plain, x))


@pytest.mark.parametrize('executor', _EXECUTORS)
@pytest.mark.parametrize('recompute', ['except_last', 'never'])
def test_kept_forwards_are_differentiated_by_compiled_gradients(recompute,
                                                                executor):
  x = _Batch()
  jit = _Pipeline(_Dense(4), executor, jit_compile=True, recompute=recompute)
  step = _Step(jit, x)
  _AssertClose(step(), _Step(jit, x, reference=True)())
  # TensorFlow's gradient of a compiled call: a compiled backward function.
  backward = [(n, d) for n, d in _CompiledCalls(step) if '__backward' in n]
  assert {d for _, d in backward} == set(_DEVICES)


@pytest.mark.parametrize('executor', _EXECUTORS)
def test_dropout_repeats_under_recompute_with_the_same_seeds(executor):
  # XLA draws the same random bits as TensorFlow's kernels but maps them to
  # floats otherwise, so the masks are those of the same layers run in
  # sequence under XLA, with the same (step, micro-batch) seeds.
  x = _Batch()
  jit = _Pipeline(_Dense(2, keep_prob=0.5), executor, jit_compile=True)
  result = _Step(jit, x)()
  _AssertClose(result, _XlaReference(jit, x)())
  kept = _Pipeline(_Dense(2, keep_prob=0.5), executor, jit_compile=True,
                   recompute='never')
  _AssertClose(result, _Step(kept, x)())  # the forward's own masks
  no_dropout = _Pipeline(_Dense(2), executor, jit_compile=True)
  assert not np.allclose(result[0], _Step(no_dropout, x)()[0])  # it drops


@pytest.mark.parametrize('executor', _EXECUTORS)
def test_batch_norm_moves_its_averages_as_without_xla(executor):
  layers = []
  for i in range(2):
    layers += [dense.Dense.Params().Set(name=f'fc{i}', input_dim=4,
                                        output_dim=4),
               normalization.BatchNorm.Params().Set(name=f'bn{i}', dim=4,
                                                    decay=0.5)]
  x = _Batch() * 3.0 + 1.0
  results = {}
  for jit_compile in (False, True):
    pipe = _Pipeline(layers, executor, jit_compile)
    results[jit_compile] = (_Step(pipe, x)(), [
        v.numpy() for v in pipe.vars.Flatten() if not v.trainable])
  (result, moving), (ref, ref_moving) = results[True], results[False]
  _AssertClose(result, ref, atol=1e-5)  # gradients up to 20
  assert len(moving) == 4
  for a, b in zip(moving, ref_moving):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(moving[0], 0.0)  # the averages did move


@pytest.mark.parametrize('executor', _EXECUTORS)
def test_integer_inputs_and_sparse_gradients_pass_through_xla(executor):
  # Ids into an embedding: an input with no gradient, and a gradient that
  # TensorFlow keeps sparse (IndexedSlices), out of the compiled backward.
  layers = [embedding.Embedding.Params().Set(name='emb', vocab_size=10,
                                             embedding_dim=4)] + _Dense(3)
  ids = tf.constant([3, 1, 4, 1, 5, 9, 2])
  results = []
  for jit_compile in (True, False):
    pipe = _Pipeline(layers, executor, jit_compile)

    @tf.function
    def Step():
      with base_layer.Context(training=True):
        with tf.GradientTape() as tape:
          loss = tf.reduce_sum(pipe.FPropDefaultTheta(ids) ** 2)  # pylint: disable=cell-var-from-loop
      grads = tape.gradient(loss, pipe.trainable_variables)  # pylint: disable=cell-var-from-loop
      return loss, [tf.convert_to_tensor(g) for g in grads]

    results.append(Step())
  _AssertClose(*results)


def test_eager_calls_compute_the_same():
  x = _Batch()
  jit = _Pipeline(_Dense(4), 'unrolled', jit_compile=True)
  with base_layer.Context(training=True, step=5):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = jit.FPropDefaultTheta(x)
      loss = tf.reduce_sum(y * y)
  eager = (loss, tape.gradient(loss, list(jit.trainable_variables) + [x]))
  _AssertClose(eager, _Step(jit, x)())


@pytest.mark.parametrize('kwargs,message', [
    (dict(input_grads_first=True), 'schedule fill_drain asks '
     "(input_grads_first, or schedule='zero_bubble_h1'): with jit_compile="
     "True use input_grads_first=False and schedule 'gpipe' or '1f1b'."),
    (dict(schedule='zero_bubble_h1'), 'schedule zero_bubble_h1 asks'),
    (dict(jit_compile='yes'), "jit_compile must be True or False, got 'yes'"),
])
def test_what_cannot_run_compiled_is_refused_by_name(kwargs, message):
  params = dict(executor='unrolled', jit_compile=True)
  params.update(kwargs)
  # Refused at construction where the Params alone say so, else at the
  # first FProp (the loop executor's own refusals).
  with pytest.raises(ValueError, match=re.escape(message)):
    pipe = _Pipeline(_Dense(2), **params)
    with base_layer.Context(training=True):
      pipe.FPropDefaultTheta(_Batch())


def test_tpu_placement_is_refused_by_name():
  pipe = _Pipeline(_Dense(2), 'unrolled', jit_compile=True)
  tpu = placement_lib.TpuPlacement(2, types.SimpleNamespace(
      extended=types.SimpleNamespace()))
  thetas = [pipe.CellTheta(pipe.theta, k) for k in range(2)]
  with pytest.raises(ValueError, match=re.escape(
      "with placement_backend='tpu' XLA already compiles the whole step: use "
      'jit_compile=False')):
    pipeline.RunPipeline(pipe.cells, thetas, _Batch(), [4, 3], tpu,
                         jit_compile=True)


class _StatsOnLargeMicroBatches(base_layer.BaseLayer):
  """Records statistics only for micro-batches of 3 rows or more."""

  def FProp(self, theta, x):
    if x.shape[0] >= 3:
      self.RecordStats(base_layer.NestedMap(rows=tf.shape(x)[0]))
    return x

  def ApplyStats(self, stats_list):
    del stats_list


def test_statistics_that_differ_by_micro_batch_shape_are_refused():
  # One compiled forward serves every micro-batch shape, and its callers
  # record what it returns against one list of layers.
  layers = _Dense(1) + [_StatsOnLargeMicroBatches.Params().Set(name='odd')]
  pipe = _Pipeline(layers, 'unrolled', jit_compile=True, m=2)
  with pytest.raises(ValueError, match=re.escape(
      'with jit_compile=True a cell must record the same statistics for '
      'every micro-batch shape')):
    with base_layer.Context(training=True):
      pipe.FPropDefaultTheta(tf.ones([5, 4]))
