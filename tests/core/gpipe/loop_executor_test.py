"""Tests of the loop executor: the unrolled executor's numbers from a graph that does not grow with M."""

import re

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe import microbatch
from lingvo_gpipe.core.gpipe.pipelining_layer import PipeliningLayer
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.layers import dropout
from lingvo_gpipe.core.layers import normalization
from lingvo_gpipe.core.nested_map import NestedMap
from tests.support import test_utils

_DEVICES = [f'/device:CPU:{k}' for k in range(4)]


class _Masked(base_layer.BaseLayer):
  """Dense and dropout on `x`, zeroed past each example's length; lengths pass through."""

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('dim', 4, '')
    return p

  def __init__(self, params):
    super().__init__(params)
    self.CreateChild('fc', dense.Dense.Params().Set(
        input_dim=self.params.dim, output_dim=self.params.dim,
        activation='tanh'))
    self.CreateChild('drop', dropout.Dropout.Params().Set(keep_prob=0.7))

  def FProp(self, theta, inputs):
    mask = tf.sequence_mask(inputs.lengths, tf.shape(inputs.x)[1],
                            tf.float32)[..., None]
    out = inputs.copy()
    out.x = self.drop.FProp(theta.drop, self.fc.FProp(theta.fc, inputs.x))
    out.x *= mask
    return out


def _Pipeline(layers, k, m, **kwargs):
  return PipeliningLayer.Params().Set(
      name='pipe', layers=layers, num_partitions=k, num_micro_batches=m,
      devices=_DEVICES, executor='loop', **kwargs).Instantiate()


def _WeightGradients(pipe, x):
  """A tf.function: the gradients of sum(pipe(x)²) by the pipeline's weights."""

  @tf.function
  def Step():
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(pipe.FPropDefaultTheta(x) ** 2)
    return tape.gradient(loss, pipe.trainable_variables)

  return Step


def _Layers():
  return [_Masked.Params().Set(name=f'm{i}') for i in range(4)]


def _Inputs(batch):
  return NestedMap(x=tf.random.stateless_normal([batch, 3, 4], [4, 4]),
                   lengths=tf.constant([1, 2, 3] * batch)[:batch])


def _LossAndGrads(pipe, inputs, reference=False):

  @tf.function
  def Step():
    with base_layer.Context(training=True, step=3):
      with tf.GradientTape() as tape:
        tape.watch(inputs.x)
        if reference:
          sizes = microbatch.MicroBatchSizes(
              int(inputs.x.shape[0]),
              num_micro_batches=pipe.params.num_micro_batches)
          out = test_utils.SequentialReference(pipe, inputs, sizes,
                                               pipe.theta)
        else:
          out = pipe.FPropDefaultTheta(inputs)
        loss = tf.reduce_sum(out.x ** 2)
    return loss, tape.gradient(
        loss, list(pipe.trainable_variables) + [inputs.x]), out.lengths

  return Step


_SHAPES = [(1, 1, 4), (2, 3, 7), (4, 5, 13), (4, 2, 6)]


@pytest.mark.parametrize('k,m,batch,recompute,input_grads_first', [
    shape + modes for shape in _SHAPES
    for modes in (('always', False), ('always', True))] + [
        shape + modes for shape in _SHAPES[1:3]
        for modes in (('never', False), ('except_last', False))])
@pytest.mark.parametrize('skip_bubbles', [True, False])
def test_loss_and_gradients_equal_the_sequential_model(k, m, batch, recompute,
                                                       input_grads_first,
                                                       skip_bubbles):
  pipe = _Pipeline(_Layers(), k, m, input_grads_first=input_grads_first,
                   skip_bubbles=skip_bubbles, recompute=recompute)
  inputs = _Inputs(batch)  # ragged micro-batches, an int leaf, dropout
  loss, grads, lengths = _LossAndGrads(pipe, inputs)()
  ref_loss, ref_grads, _ = _LossAndGrads(pipe, inputs, reference=True)()
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_array_equal(lengths, inputs.lengths)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('clocks_per_iteration', [2, 3])
def test_several_clocks_an_iteration_compute_the_same(clocks_per_iteration):
  pipe = _Pipeline(_Layers(), 4, 5, clocks_per_iteration=clocks_per_iteration)
  inputs = _Inputs(13)
  loss, grads, _ = _LossAndGrads(pipe, inputs)()
  ref_loss, ref_grads, _ = _LossAndGrads(pipe, inputs, reference=True)()
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_eager_calls_compute_the_same():
  pipe = _Pipeline(_Layers(), 2, 3)
  inputs = _Inputs(6)
  with base_layer.Context(training=True, step=3):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(pipe.FPropDefaultTheta(inputs).x ** 2)
    grads = tape.gradient(loss, pipe.trainable_variables)
  graph_loss, graph_grads, _ = _LossAndGrads(pipe, inputs)()
  np.testing.assert_allclose(loss, graph_loss, rtol=1e-6)
  for g, r in zip(grads, graph_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('skip_bubbles,pack_weights,recompute', [
    (True, True, 'always'), (False, True, 'always'), (True, False, 'always'),
    (True, True, 'never'), (False, False, 'except_last')])
def test_batch_norm_moves_its_averages_as_the_unrolled_executor_does(
    skip_bubbles, pack_weights, recompute):
  layers = []
  for i in range(3):
    layers += [dense.Dense.Params().Set(name=f'fc{i}', input_dim=4,
                                        output_dim=4),
               normalization.BatchNorm.Params().Set(name=f'bn{i}', dim=4,
                                                    decay=0.5)]
  x = tf.random.stateless_normal([11, 4], [5, 6]) * 3.0 + 1.0
  results = {}
  for executor in ('unrolled', 'loop'):
    pipe = PipeliningLayer.Params().Set(
        name='pipe', layers=layers, num_partitions=3, num_micro_batches=4,
        devices=_DEVICES, executor=executor, skip_bubbles=skip_bubbles,
        pack_weights=pack_weights, recompute=recompute).Instantiate()

    @tf.function
    def Step():
      with base_layer.Context(training=True):
        with tf.GradientTape() as tape:
          loss = tf.reduce_sum(pipe.FPropDefaultTheta(x) ** 2)  # pylint: disable=cell-var-from-loop
      return loss, tape.gradient(loss, pipe.trainable_variables)  # pylint: disable=cell-var-from-loop

    loss, grads = Step()
    moving = [v.numpy() for v in pipe.vars.Flatten() if not v.trainable]
    results[executor] = (loss, grads, moving)
  (loss, grads, moving), (ref_loss, ref_grads, ref_moving) = (
      results['loop'], results['unrolled'])
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
  assert len(moving) == 6
  for a, b in zip(moving, ref_moving):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(moving[0], 0.0)  # the averages did move


class _RowCounter(base_layer.BaseLayer):
  """Identity that adds the rows it computes on to a counter variable."""

  def __init__(self, params):
    super().__init__(params)
    self.rows = tf.Variable(0, trainable=False)

  def FProp(self, theta, x):
    with tf.control_dependencies([self.rows.assign_add(tf.shape(x)[0])]):
      return tf.identity(x)


@pytest.mark.parametrize('skip_bubbles,recompute,recomputed', [
    (True, 'always', 10), (False, 'always', 10), (True, 'never', 0),
    (False, 'never', 0), (True, 'except_last', 8)])
def test_bubble_clocks_are_skipped_and_kept_micro_batches_not_recomputed(
    skip_bubbles, recompute, recomputed):
  # K=3, M=4: 6 clocks, so each cell has 2 bubble clocks in each loop.
  layers = []
  for i in range(3):
    layers += [dense.Dense.Params().Set(name=f'fc{i}', input_dim=4,
                                        output_dim=4),
               _RowCounter.Params().Set(name=f'count{i}')]
  pipe = _Pipeline(layers, 3, 4, skip_bubbles=skip_bubbles,
                   recompute=recompute)
  x = tf.ones([10, 4])
  _WeightGradients(pipe, x)()
  rows = [pipe.layers[2 * i + 1].rows.numpy() for i in range(3)]
  # The forward sees the 10 rows (micro-batches of 3, 3, 2, 2) once, the
  # recomputation those not kept; a cell that computes its bubbles adds one
  # spare row per bubble clock and loop (in the backward only where it
  # recomputes: a kept bubble is not run again).
  bubbles = 0 if skip_bubbles else 2 * (2 if recomputed else 1)
  assert rows == [10 + recomputed + bubbles] * 3, rows


def test_skip_bubbles_must_be_a_bool():
  with pytest.raises(ValueError, match="skip_bubbles must be True or False, "
                     "got 'yes'"):
    _Pipeline([dense.Dense.Params().Set(name='fc', input_dim=4,
                                        output_dim=4)], 1, 2,
              skip_bubbles='yes')


def _NumOps(executor, m):
  pipe = PipeliningLayer.Params().Set(
      name='pipe', layers=[dense.Dense.Params().Set(
          name=f'fc{i}', input_dim=8, output_dim=8) for i in range(8)],
      num_partitions=4, num_micro_batches=m, devices=_DEVICES,
      executor=executor).Instantiate()
  x = tf.ones([64, 8])

  @tf.function
  def Step():
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(pipe.FPropDefaultTheta(x))
    return tape.gradient(loss, pipe.trainable_variables)

  return len(Step.get_concrete_function().graph.get_operations())


def test_the_graph_does_not_grow_with_the_micro_batches():
  loop = {m: _NumOps('loop', m) for m in (4, 32)}
  unrolled = {m: _NumOps('unrolled', m) for m in (4, 32)}
  # What grows is reading the M micro-batches' outputs and input gradients
  # back out of their arrays (a few ops each), not the cells.
  assert loop[32] - loop[4] <= 3 * (32 - 4)
  assert unrolled[32] - unrolled[4] > 20 * (loop[32] - loop[4])


@pytest.mark.parametrize('kwargs,layers,message', [
    (dict(recompute='never', input_grads_first=True), None,
     "input_grads_first with recompute='never' needs recompute='always' or "
     "executor='unrolled'"),
    (dict(batch_dim=1), None, 'not batch_dim=1'),
    (dict(clocks_per_iteration=0), None, 'clocks_per_iteration must be >= 1'),
    ({}, [test_utils.UnmergeableStats.Params().Set(name='counter')],
     'pipe/layers_0 cannot merge theirs (no MergeStats)'),
    ({}, [test_utils.UnknownFeatureShape.Params().Set(name='shapeless')],
     "needs every activation's shape but the batch dimension known when the "
     'graph is built, got (None, None)'),
])
def test_what_it_cannot_run_yet_is_refused_by_name(kwargs, layers, message):
  layers = layers or [dense.Dense.Params().Set(name='fc', input_dim=4,
                                               output_dim=4)]
  # Refused at construction (Params checks) or at the first call.
  with pytest.raises(ValueError, match=re.escape(message)):
    pipe = _Pipeline(layers, 1, 2, **kwargs)
    with base_layer.Context(training=True):
      pipe.FPropDefaultTheta(tf.ones([4, 4]))


@pytest.mark.parametrize('skip_bubbles', [True, False])
def test_clocks_run_one_at_a_time_and_the_output_gradient_is_not_copied_twice(
    skip_bubbles):
  # On a capped TensorFlow worker the default parallel_iterations=10 let
  # clocks run ahead, and concatenating the spare row before splitting copied
  # the output gradient twice: bench/memory.py's Transformer fitted 3 layers
  # where it fits 16 now (docs/loop_executor.md). Memory on a worker is
  # not measurable from here, so this checks the graph.
  pipe = PipeliningLayer.Params().Set(
      name='pipe', layers=[dense.Dense.Params().Set(
          name=f'fc{i}', input_dim=8, output_dim=8) for i in range(2)],
      num_partitions=2, num_micro_batches=4, devices=_DEVICES,
      executor='loop', skip_bubbles=skip_bubbles).Instantiate()
  x = tf.ones([12, 8])

  @tf.function
  def Step():
    with tf.GradientTape() as tape:
      tape.watch(x)
      loss = tf.reduce_sum(pipe.FPropDefaultTheta(x) ** 2)
    return tape.gradient(loss, list(pipe.trainable_variables) + [x])

  graph = Step.get_concrete_function().graph
  loops = [op for op in graph.get_operations()
           if op.type in ('While', 'StatelessWhile')]
  assert len(loops) == 2  # the forward's and the backward's
  assert [op.get_attr('parallel_iterations') for op in loops] == [1, 1]
  # Skipping bubbles, the loops slice x themselves (no copy at all) and
  # split only the output gradient, whose slots the backward empties as it
  # reads them; computing bubbles, they split both into arrays. Each split
  # is from the tensor itself, not from a copy with the spare row
  # concatenated.
  splits = [op for op in graph.get_operations() if op.type == 'TensorListSplit']
  assert len(splits) == (1 if skip_bubbles else 2)
  assert not any(op.inputs[0].op.type == 'ConcatV2' for op in splits), [
      op.inputs[0].op.type for op in splits]


@pytest.mark.parametrize('skip_bubbles', [True, False])
def test_the_running_sums_start_empty_not_as_zeros(skip_bubbles):
  # Zeros of every weight's shape made before the backward loop were alive
  # from the start of the step, and on a worker some stayed to its end (6 MiB
  # at bench/memory.py's 19 Transformer layers). The sums start empty and the
  # first micro-batch's gradients start them. (A packed cell's sums, small by
  # construction, start as zeros: starting them costs a cond a clock.)
  pipe = _Pipeline([dense.Dense.Params().Set(
      name=f'fc{i}', input_dim=8, output_dim=8) for i in range(2)], 2, 4,
                   skip_bubbles=skip_bubbles, pack_weights=False)
  x = tf.ones([12, 8])
  graph = _WeightGradients(pipe, x).get_concrete_function().graph
  backward = [op for op in graph.get_operations()
              if op.type in ('While', 'StatelessWhile')][1]
  made = [t for t in backward.inputs if t.dtype.is_floating and
          t.op.type in ('ZerosLike', 'Fill', 'Const')]
  assert made and all(t.shape.num_elements() == 0 for t in made), [
      (t.op.type, t.shape) for t in made]


@pytest.mark.parametrize('skip_bubbles', [True, False])
def test_the_backward_empties_each_boundary_slot_it_has_read(skip_bubbles):
  # The unrolled executor frees a micro-batch's boundary activation and
  # input gradient after its backward; the loop's arrays held all M to the
  # loop's end (5 MiB more on the first of two workers at 40 Transformer
  # layers). Each clock writes an empty micro-batch where cells 1..K-1 read
  # their inputs and every cell its output gradient (the last cell's, the
  # pipeline's, shrinks by a micro-batch a clock: 4 MiB at bench/memory.py's
  # Transformer); where bubbles compute, the spare slot keeps its row and
  # nothing is emptied.
  k = 3
  pipe = _Pipeline([dense.Dense.Params().Set(
      name=f'fc{i}', input_dim=8, output_dim=8) for i in range(k)], k, 4,
                   skip_bubbles=skip_bubbles)
  graph = _WeightGradients(pipe, tf.ones([12, 8])).get_concrete_function().graph
  backward = [op for op in graph.get_operations()
              if op.type in ('While', 'StatelessWhile')][1]
  body = graph._get_function(backward.get_attr('body').name).graph  # pylint: disable=protected-access
  emptied = [op for op in body.get_operations()
             if op.type == 'TensorListSetItem' and
             op.inputs[2].shape.as_list() == [0, 8]]
  assert len(emptied) == ((k - 1) + k if skip_bubbles else 0), emptied


@pytest.mark.parametrize('skip_bubbles', [True, False])
def test_the_spare_slot_holds_a_row_only_where_bubbles_compute(skip_bubbles):
  # A skipped bubble computes nothing, so the arrays' spare slot M holds an
  # empty batch; a row of the last cell's output held there and in the
  # bubble's yield was part of the loop's peak on a worker.
  pipe = _Pipeline([dense.Dense.Params().Set(
      name=f'fc{i}', input_dim=8, output_dim=8) for i in range(2)], 2, 4,
                   skip_bubbles=skip_bubbles)

  @tf.function
  def Step(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      loss = tf.reduce_sum(pipe.FPropDefaultTheta(x) ** 2)
    return tape.gradient(loss, x)

  graph = Step.get_concrete_function(tf.TensorSpec([12, 8])).graph
  spare = [op.inputs[2].shape[0] for op in graph.get_operations()
           if op.type == 'TensorListSetItem']
  assert spare and set(spare) == {0 if skip_bubbles else 1}, spare
  assert np.isfinite(Step(tf.ones([12, 8])).numpy()).all()


class _BatchSeen(base_layer.BaseLayer):
  """Identity that notes the batch size its FProp is traced with."""

  def __init__(self, params):
    super().__init__(params)
    self.seen = set()

  def FProp(self, theta, x):
    self.seen.add(x.shape[0])
    return tf.identity(x)


@pytest.mark.parametrize('batch,skip_bubbles,known', [
    (8, True, True), (7, True, False), (8, False, False)])
def test_cells_are_traced_with_the_micro_batch_size_where_all_are_alike(
    batch, skip_bubbles, known):
  # A batch size unknown when traced makes layers compute shapes at run
  # time: a Dense became a dozen small ops (tensordot's Shape, Gather,
  # Prod, Reshape) where a known size fuses it into one matmul. Known only
  # where every micro-batch a cell sees is alike: no spare-row bubbles, no
  # ragged last micro-batch.
  layers = [dense.Dense.Params().Set(name='fc', input_dim=4, output_dim=4),
            _BatchSeen.Params().Set(name='seen')]
  pipe = _Pipeline(layers, 2, 4, skip_bubbles=skip_bubbles)
  x = tf.ones([batch, 4])
  _WeightGradients(pipe, x).get_concrete_function()
  # (None is also there: the executor first traces each cell on a spec.)
  seen = pipe.layers[1].seen
  assert (2 in seen) == known and seen <= {2, None}, seen
