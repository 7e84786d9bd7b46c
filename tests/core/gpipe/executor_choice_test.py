"""Tests of executor='auto': unrolled while the graph stays small, the loop beyond, same numbers."""

import re

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core.gpipe import executor_choice
from lingvo_gpipe.core.gpipe import pipeline
from lingvo_gpipe.core.gpipe import placement as placement_lib
from lingvo_gpipe.core.gpipe.pipelining_layer import PipeliningLayer
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.nested_map import NestedMap
from lingvo_gpipe.tools import stacks
from tests.support import test_utils

_DEVICES = [f'/device:CPU:{k}' for k in range(4)]


def _Dense(n, dim=8):
  return [dense.Dense.Params().Set(name=f'fc{i}', input_dim=dim,
                                   output_dim=dim) for i in range(n)]


def _Pipeline(layers, k, m, **kwargs):
  return PipeliningLayer.Params().Set(
      name='pipe', layers=layers, num_partitions=k, num_micro_batches=m,
      devices=_DEVICES, **kwargs).Instantiate()


def _Step(pipe, x, loss_fn=lambda y: tf.reduce_sum(y * y)):

  @tf.function
  def Step():
    with base_layer.Context(training=True, step=2):
      with tf.GradientTape() as tape:
        loss = loss_fn(pipe.FPropDefaultTheta(x))
    return loss, tape.gradient(loss, pipe.trainable_variables)

  return Step


def _HasLoop(step) -> bool:
  return any(op.type in ('While', 'StatelessWhile') for op in
             step.get_concrete_function().graph.get_operations())


def test_auto_is_the_default_executor():
  assert PipeliningLayer.Params().executor == 'auto'


def test_a_small_pipeline_runs_unrolled_and_says_why():
  pipe = _Pipeline(_Dense(4), 2, 4)
  step = _Step(pipe, tf.ones([8, 8]))
  assert not _HasLoop(step)
  choice = pipe.executor_choice
  assert choice.executor == 'unrolled'
  assert 'at most max_unrolled_ops=20000' in choice.reason
  assert 0 < choice.estimated_ops <= 20000


@pytest.mark.parametrize('recompute', ['always', 'never'])
def test_above_the_bound_it_runs_the_loop_with_the_same_numbers(recompute):
  x = tf.random.stateless_normal([12, 8], [1, 2])
  results = {}
  for executor, bound in (('unrolled', 20000), ('auto', 0)):
    tf.keras.utils.set_random_seed(7)
    pipe = _Pipeline(_Dense(4), 2, 3, executor=executor,
                     max_unrolled_ops=bound, recompute=recompute)
    step = _Step(pipe, x)
    results[executor] = step()
    if executor == 'auto':
      assert pipe.executor_choice.executor == 'loop'
      assert 'more than max_unrolled_ops=0' in pipe.executor_choice.reason
      assert _HasLoop(step)
  (loss_u, grads_u), (loss_a, grads_a) = results['unrolled'], results['auto']
  np.testing.assert_allclose(loss_a, loss_u, rtol=1e-6)
  for a, u in zip(grads_a, grads_u):
    np.testing.assert_allclose(a, u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kwargs,layers,message', [
    (dict(batch_dim=1), None, 'not batch_dim=1'),
    (dict(recompute='never', input_grads_first=True), None,
     "input_grads_first with recompute='never' needs recompute='always'"),
    ({}, [test_utils.UnmergeableStats.Params().Set(name='counter')],
     'pipe/layers_0 cannot merge theirs (no MergeStats)'),
    ({}, [test_utils.UnknownFeatureShape.Params().Set(name='shapeless')],
     "needs every activation's shape but the batch dimension known"),
])
def test_what_the_loop_refuses_runs_unrolled_with_the_reason(kwargs, layers,
                                                            message):
  pipe = _Pipeline(layers or _Dense(2), 1, 2, max_unrolled_ops=0, **kwargs)
  x = tf.ones([8, 4, 8]) if kwargs.get('batch_dim') else tf.ones([8, 8])
  step = _Step(pipe, x)
  step()
  assert pipe.executor_choice.executor == 'unrolled'
  assert message in pipe.executor_choice.reason
  assert not _HasLoop(step)


def test_the_loss_inside_the_pipeline_runs_unrolled_under_auto():
  pipe = _Pipeline(_Dense(2), 2, 2, max_unrolled_ops=0)
  x = tf.ones([4, 8])
  with base_layer.Context(training=True):
    metrics = pipe.FPropLoss(pipe.theta, x, None, lambda y, _: NestedMap(
        loss=(tf.reduce_mean(y), tf.constant(1.0))))
  assert np.isfinite(float(metrics.loss[0]))


def _GraphOps(layers, x, loss_fn, k, m):
  pipe = _Pipeline(layers, k, m, executor='auto', max_unrolled_ops=10**9)
  step = _Step(pipe, x, loss_fn)
  ops = len(step.get_concrete_function().graph.get_operations())
  return pipe.executor_choice.estimated_ops, ops


@pytest.mark.parametrize('stack,k,m', [
    ('dense', 4, 16), ('transformer', 2, 4)])
def test_the_estimate_is_within_a_factor_of_two_of_the_graph(stack, k, m):
  if stack == 'dense':
    layers, x, loss_fn = stacks.DenseStack(8, 16, 32)
  else:
    layers, x, loss_fn = stacks.TransformerStack(4, 16, 8, 4, 2, 64)
  estimate, ops = _GraphOps(layers, x, loss_fn, k, m)
  assert ops / 2 <= estimate <= ops * 2, (estimate, ops)


def test_the_estimate_grows_with_the_micro_batches():
  small = _GraphOps(_Dense(4), tf.ones([16, 8]),
                    lambda y: tf.reduce_sum(y), 2, 2)[0]
  large = _GraphOps(_Dense(4), tf.ones([16, 8]),
                    lambda y: tf.reduce_sum(y), 2, 8)[0]
  assert large == 4 * small


@pytest.mark.parametrize('batch,traces_per_cell', [
    # Micro-batches of 2 and 2: the trace that counts a cell's ops serves
    # the loop's arrays, its forward clocks and its backward's recomputation.
    (4, 1),
    # 2 and 1: the loop traces each cell once more, batch size unknown.
    (3, 2),
])
def test_the_cells_forward_is_traced_once_for_the_chooser_and_the_loop(
    batch, traces_per_cell):
  pipe = _Pipeline(_Dense(2), 2, 2, max_unrolled_ops=0)
  traced = []
  for cell in pipe.cells:
    original = cell.FProp

    def Counted(theta, *args, original=original, cell=cell):
      traced.append(cell)
      return original(theta, *args)

    cell.FProp = Counted
  _Step(pipe, tf.ones([batch, 8])).get_concrete_function()
  assert pipe.executor_choice.executor == 'loop'
  assert len(traced) == traces_per_cell * len(pipe.cells), len(traced)


@pytest.mark.parametrize('value,message', [
    (-1, 'max_unrolled_ops must be >= 0'),
    ('many', 'max_unrolled_ops must be an integer >= 0'),
])
def test_a_bad_bound_is_refused_by_name(value, message):
  with pytest.raises(hyperparams.ConfigError, match=message):
    _Pipeline(_Dense(2), 1, 2, max_unrolled_ops=value)


def test_estimated_unrolled_ops_scales_forward_ops_by_the_measured_factor():
  assert executor_choice.EstimatedUnrolledOps([10, 20], 4) == int(
      executor_choice.UNROLLED_OPS_PER_FORWARD_OP * 30 * 4)


class _PassThroughTpuStrategy:
  """Stands in for a TPUStrategy off a TPU: pins nothing, so steps run here."""

  def experimental_assign_to_logical_device(self, tensor, logical_device_id):
    del logical_device_id
    return tensor


def _TpuStep(pipe, x, executor, jit_compile):
  """A step of `pipe`'s cells placed as on TPU cores, compiled whole or not."""
  tpu = placement_lib.TpuPlacement(2, _PassThroughTpuStrategy())

  @tf.function(jit_compile=jit_compile, autograph=False)
  def Step():
    thetas = [pipe.CellTheta(pipe.theta, k) for k in range(2)]
    with tf.GradientTape() as tape:
      y = pipeline.RunPipeline(pipe.cells, thetas, x, [2] * 4, tpu,
                               executor=executor, max_unrolled_ops=0,
                               on_choice=choices.append)
      loss = tf.reduce_sum(y * y)
    return loss, tape.gradient(loss, pipe.trainable_variables)

  choices = []
  return Step(), choices


def test_tpu_placement_runs_unrolled_under_auto_and_compiles_whole():
  # A TPU step is compiled whole by XLA, as jit_compile=True compiles it
  # here (one device: XLA on CPU reads no variable of another); the loop's
  # arrays do not compile, so 'auto' runs it unrolled even above the bound.
  pipe = PipeliningLayer.Params().Set(
      name='pipe', layers=_Dense(4), num_partitions=2, num_micro_batches=4,
      devices=['/device:CPU:0']).Instantiate()
  x = tf.random.stateless_normal([8, 8], [3, 4])
  (loss, grads), choices = _TpuStep(pipe, x, 'auto', jit_compile=True)
  assert [c.executor for c in choices] == ['unrolled']
  assert "does not run under placement_backend='tpu'" in choices[0].reason
  want_loss, want_grads = _Step(pipe, x)()
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_loop_under_tpu_placement_is_refused_by_name():
  with pytest.raises(hyperparams.ConfigError, match=re.escape(
      "pipe: executor='loop'; valid: 'auto' or 'unrolled' with "
      "placement_backend='tpu'")):
    _Pipeline(_Dense(4), 2, 4, executor='loop', placement_backend='tpu')
  # Below the Params, the pipeline itself refuses it.
  pipe = _Pipeline(_Dense(4), 2, 4)
  with pytest.raises(hyperparams.ConfigError, match=re.escape(
      "executor='loop' does not run under placement_backend='tpu': XLA "
      "compiles a TPU step whole and cannot compile the loop's arrays and "
      "empty-started sums; use executor='unrolled' (executor='auto' does).")):
    _TpuStep(pipe, tf.ones([8, 8]), 'loop', jit_compile=False)
