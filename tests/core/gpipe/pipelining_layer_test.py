"""PipeliningLayer equals the sequential model, for every K, M and recompute mode.

The reference runs the same layers one after another on each micro-batch
(GPipe's definition: BatchNorm uses per-micro-batch statistics in training and
updates its moving averages once from all micro-batches).
"""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe import pipelining_layer
from lingvo_gpipe.core.gpipe import report as report_lib
from lingvo_gpipe.core.layers import activations
from lingvo_gpipe.core.layers import conv
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.layers import dropout
from lingvo_gpipe.core.layers import normalization
from lingvo_gpipe.core.layers import pooling
from lingvo_gpipe.core.layers import repeat
from tests.support import test_utils

PipeliningLayer = pipelining_layer.PipeliningLayer


def _Mlp(num_layers=8, dim=6):
  return [dense.Dense.Params().Set(name=f'fc{i}', input_dim=dim, output_dim=dim,
                                   activation='tanh')
          for i in range(num_layers)]


def _ConvNet():
  layers = []
  channels = 3
  for i, out in enumerate([4, 4, 8, 8]):
    layers.append(conv.Conv2D.Params().Set(
        name=f'conv{i}', filter_shape=[3, 3, channels, out],
        stride=2 if i == 2 else 1))
    layers.append(normalization.BatchNorm.Params().Set(name=f'bn{i}', dim=out))
    layers.append(activations.Activation.Params().Set(name=f'relu{i}'))
    channels = out
  layers.append(pooling.GlobalAvgPool.Params().Set(name='pool'))
  layers.append(dense.Dense.Params().Set(name='logits', input_dim=8,
                                         output_dim=3, activation='none'))
  return layers


def _Pipeline(layers, k, m, recompute, input_grads_first=False):
  return PipeliningLayer.Params().Set(
      name='pipe', layers=layers, num_partitions=k, num_micro_batches=m,
      recompute=recompute, input_grads_first=input_grads_first,
      devices=[f'/device:CPU:{i}' for i in range(k)]).Instantiate()


def _LossAndGrads(fn, pipe, x):
  variables = pipe.trainable_variables
  with base_layer.Context(training=True, step=3):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = fn(pipe.theta, x)
      loss = tf.reduce_sum(y * y) + tf.reduce_sum(tf.sin(y))
    grads = tape.gradient(loss, list(variables) + [x])
  return loss, grads


def _MovingStats(pipe):
  return [v.numpy() for v in pipe.vars.Flatten() if not v.trainable]


def _Check(layers, x, k, m, recompute, input_grads_first=False, traced=False):
  pipe = _Pipeline(layers, k, m, recompute, input_grads_first)
  sizes = pipe.MicroBatchSizes(x)
  start = _MovingStats(pipe)
  piped = lambda x: _LossAndGrads(pipe.FProp, pipe, x)
  loss, grads = (tf.function(piped) if traced else piped)(x)
  piped_stats = _MovingStats(pipe)
  for v, s in zip([v for v in pipe.vars.Flatten() if not v.trainable], start):
    v.assign(s)
  ref_loss, ref_grads = _LossAndGrads(
      lambda theta, x: test_utils.SequentialReference(pipe, x, sizes, theta),
      pipe, x)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    # Summed in another order, an element near 0 keeps the rounding error of
    # the terms it was summed from: allow for the tensor's largest magnitude.
    np.testing.assert_allclose(g, r, rtol=1e-5,
                               atol=1e-6 * max(1.0, np.max(np.abs(r))))
  for a, b in zip(piped_stats, _MovingStats(pipe)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  return pipe


_GRID = list(itertools.product([1, 2, 4], [1, 2, 3, 4, 8],
                               ['always', 'never']))


@pytest.mark.parametrize('k,m,recompute', _GRID)
def test_mlp_equals_sequential(k, m, recompute):
  # Batch 10: divisible by 1 and 2, not by 3, 4 or 8 (ragged micro-batches).
  x = tf.random.stateless_normal([10, 6], [1, k * 10 + m])
  _Check(_Mlp(), x, k, m, recompute)


@pytest.mark.parametrize('k,m,recompute', _GRID)
def test_convnet_with_batchnorm_equals_sequential(k, m, recompute):
  x = tf.random.stateless_normal([8 if m != 3 else 7, 6, 6, 3], [2, k * 10 + m])
  pipe = _Check(_ConvNet(), x, k, m, recompute)
  assert len(pipe.cells) == k


@pytest.mark.parametrize('k,m,recompute', [(2, 4, 'always'), (4, 3, 'never'),
                                            (4, 8, 'except_last')])
def test_input_grads_first_equals_sequential(k, m, recompute):
  # Only control edges differ; traced, so that there is a graph to order.
  x = tf.random.stateless_normal([10, 6], [7, k * 10 + m])
  _Check(_Mlp(), x, k, m, recompute, input_grads_first=True, traced=True)
  conv_x = tf.random.stateless_normal([8, 8, 8, 3], [8, k * 10 + m])
  _Check(_ConvNet(), conv_x, k, m, recompute, input_grads_first=True,
         traced=True)


def test_except_last_and_tf_function():
  pipe = _Pipeline(_Mlp(), 2, 4, 'except_last')
  x = tf.random.stateless_normal([8, 6], [3, 3])
  loss, grads = tf.function(lambda x: _LossAndGrads(pipe.FProp, pipe, x))(x)
  ref_loss, ref_grads = _LossAndGrads(
      lambda theta, x: test_utils.SequentialReference(pipe, x, [2] * 4, theta),
      pipe, x)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_gradient_taken_outside_the_context_recomputes_in_training_mode():
  """The backward recomputes each cell in the forward's mode and step.

  A caller may leave its `Context(training=True)` before `tape.gradient`; the
  recomputed BatchNorm and dropout must still be the training ones.
  """
  layers = _ConvNet()
  layers.insert(3, dropout.Dropout.Params().Set(name='drop', keep_prob=0.7))
  pipe = _Pipeline(layers, 2, 2, 'always')
  x = tf.random.stateless_normal([4, 6, 6, 3], [5, 5])
  inside = _LossAndGrads(pipe.FProp, pipe, x)[1]
  with tf.GradientTape() as tape:
    tape.watch(x)
    with base_layer.Context(training=True, step=3):
      y = pipe.FProp(pipe.theta, x)
      loss = tf.reduce_sum(y * y) + tf.reduce_sum(tf.sin(y))
  outside = tape.gradient(loss, list(pipe.trainable_variables) + [x])
  for a, b in zip(inside, outside):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_an_outer_stats_collector_gets_the_batch_norm_stats():
  """A trainer collects the moments and applies them only for a good step."""
  x = tf.random.stateless_normal([4, 6, 6, 3], [6, 6])
  pipe = _Pipeline(_ConvNet(), 2, 2, 'always')
  start = _MovingStats(pipe)
  collector = base_layer.StatsCollector()
  with base_layer.Context(training=True, stats_collector=collector):
    pipe.FPropDefaultTheta(x)
  for a, b in zip(start, _MovingStats(pipe)):
    np.testing.assert_array_equal(a, b)  # not applied yet
  # One record per BatchNorm and micro-batch.
  assert [len(s) for _, s in collector.ByLayer()] == [2] * 4
  collector.ApplyAll()
  applied = _MovingStats(pipe)
  for v, s in zip([v for v in pipe.vars.Flatten() if not v.trainable], start):
    v.assign(s)
  with base_layer.Context(training=True):
    pipe.FPropDefaultTheta(x)  # the pipeline applies them itself
  for a, b in zip(applied, _MovingStats(pipe)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert not all(np.allclose(a, b) for a, b in zip(start, applied))


def test_nested_inputs_with_integer_leaves():
  """A NestedMap input (values with int lengths) flows through the cells."""

  class Masked(base_layer.BaseLayer):

    @classmethod
    def Params(cls):
      p = super().Params()
      p.Define('dim', 4, '')
      return p

    def __init__(self, params):
      super().__init__(params)
      self.CreateChild('fc', dense.Dense.Params().Set(
          input_dim=self.params.dim, output_dim=self.params.dim))

    def FProp(self, theta, inputs):
      mask = tf.sequence_mask(inputs.lengths, tf.shape(inputs.x)[1],
                              tf.float32)[..., None]
      out = inputs.copy()
      out.x = self.fc.FProp(theta.fc, inputs.x) * mask
      return out

  layers = [Masked.Params().Set(name=f'm{i}') for i in range(4)]
  pipe = _Pipeline(layers, 2, 3, 'always')
  inputs = base_layer.NestedMap(
      x=tf.random.stateless_normal([5, 3, 4], [4, 4]),
      lengths=tf.constant([1, 2, 3, 3, 2]))
  with tf.GradientTape() as tape:
    out = pipe.FPropDefaultTheta(inputs)
    loss = tf.reduce_sum(out.x ** 2)
  assert out.lengths.dtype == tf.int32
  np.testing.assert_array_equal(out.lengths, inputs.lengths)
  with tf.GradientTape() as ref_tape:
    ref = test_utils.SequentialReference(pipe, inputs, [2, 2, 1], pipe.theta)
    ref_loss = tf.reduce_sum(ref.x ** 2)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for g, r in zip(tape.gradient(loss, pipe.trainable_variables),
                  ref_tape.gradient(ref_loss, pipe.trainable_variables)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_dropout_masks_repeat_under_recompute_and_vary_per_micro_batch():
  layers = [dense.Dense.Params().Set(name='fc', input_dim=6, output_dim=6,
                                     activation='none'),
            dropout.Dropout.Params().Set(name='drop', keep_prob=0.5)]
  pipe = _Pipeline(layers, 2, 2, 'always')
  x = tf.ones([4, 6])
  # Gradients (computed from the recomputed forward) equal the reference's,
  # which uses each micro-batch's mask once: so the masks were the same.
  with base_layer.Context(training=True, step=7):
    with tf.GradientTape() as tape:
      y = pipe.FPropDefaultTheta(x)
      loss = tf.reduce_sum(y * y)
    grads = tape.gradient(loss, pipe.trainable_variables)
    with tf.GradientTape() as ref_tape:
      ref = test_utils.SequentialReference(pipe, x, [2, 2], pipe.theta)
      ref_loss = tf.reduce_sum(ref * ref)
    ref_grads = ref_tape.gradient(ref_loss, pipe.trainable_variables)
  np.testing.assert_allclose(y, ref)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-6)
  zeros = (y.numpy() == 0)
  # Both micro-batches see identical rows of x, yet their masks differ.
  assert not np.array_equal(zeros[:2], zeros[2:])
  with base_layer.Context(training=True, step=8):
    other_step = pipe.FPropDefaultTheta(x).numpy() == 0
  assert not np.array_equal(zeros, other_step)


def test_cells_are_placed_on_their_devices():
  pipe = _Pipeline(_Mlp(num_layers=4), 4, 2, 'always')
  for k, cell in enumerate(pipe.cells):
    for v in cell.vars.Flatten():
      assert v.device.endswith(f'CPU:{k}'), (k, v.name, v.device)

  @tf.function
  def Step(x):
    with base_layer.Context(training=True):
      with tf.GradientTape() as tape:
        y = pipe.FPropDefaultTheta(x)
      return tape.gradient(y, pipe.trainable_variables)

  graph = Step.get_concrete_function(tf.TensorSpec([4, 6])).graph
  matmuls = [op for op in graph.get_operations() if op.type == 'MatMul']
  seen = set()
  for op in matmuls:
    device = op.device
    assert '/device:CPU:' in device, (op.name, device)
    seen.add(device[-1])
  # Forward and backward matmuls of all four cells, each on its own device.
  assert seen == {'0', '1', '2', '3'}
  for op in matmuls:
    cell = [c for c in op.name.split('/') if c.startswith('cell_')]
    if cell:
      assert op.device.endswith(f'CPU:{cell[0][5:]}'), (op.name, op.device)
  # Micro-batches are cut and joined on the first and last cells' devices
  # (the inputs and the output gradient), never on the caller's default one.
  for op_type in ('SplitV', 'ConcatV2'):
    devices = {op.device[-5:] for op in graph.get_operations()
               if op.type == op_type}
    assert devices and devices <= {'CPU:0', 'CPU:3'}, (op_type, devices)
  # A weight's value never leaves its cell: every op that reads it runs on
  # the cell's device (a custom gradient over all thetas would otherwise
  # gather the whole model on the caller's device every step).
  cell_of_handle = {}
  for k, cell in enumerate(pipe.cells):
    for v in cell.vars.Flatten():
      cell_of_handle[id(v.handle)] = k
  captured = {id(external): internal for external, internal
              in graph.captures}
  reads = [op for op in graph.get_operations() if op.type == 'ReadVariableOp']
  checked = 0
  for k, cell in enumerate(pipe.cells):
    handles = {id(captured[id(v.handle)]) for v in cell.vars.Flatten()}
    for read in reads:
      if id(read.inputs[0]) not in handles:
        continue
      for consumer in read.outputs[0].consumers():
        checked += 1
        assert consumer.device.endswith(f'CPU:{k}'), (
            k, consumer.type, consumer.name, consumer.device)
  assert checked >= 2 * len(pipe.trainable_variables)


def test_report_lists_every_layer_once():
  p = PipeliningLayer.Params().Set(
      name='pipe', layers=_Mlp(num_layers=7), num_partitions=3,
      num_micro_batches=4, input_shapes=[[8, 6]],
      devices=['/device:CPU:0', '/device:CPU:1', '/device:CPU:2'])
  pipe = p.Instantiate()
  report = pipe.Report()
  assert sum(c.num_layers for c in report.cells) == 7
  names = [n for c in report.cells for n in c.layer_names]
  assert names == [f'fc{i}' for i in range(7)]
  assert report.bubble_fraction == pytest.approx(2 / 6)
  assert sum(c.num_params for c in report.cells) == PipeliningLayer.NumParams(p)
  assert all(c.flops > 0 for c in report.cells)
  assert [c.device for c in report.cells] == [
      f'/device:CPU:{i}' for i in range(3)]
  # Logical CPUs share one allocator: no per-device figure, a process one.
  assert all(c.peak_bytes is None for c in report.cells)
  assert report.process_peak_bytes is not None
  table = report_lib.FormatTable(report).splitlines()
  assert table[0].split() == ['cell', 'layers', 'first..last', 'params',
                              'flops', 'device', 'peak_mem']
  assert table[1].split()[:3] == ['0', str(report.cells[0].num_layers),
                                  f'fc0..fc{report.cells[0].num_layers - 1}']
  assert table[4].split()[:2] == ['total', '7']
  assert 'bubble=33.3%' in table[5]


@pytest.mark.parametrize('overrides,message', [
    (dict(layers=None), 'exactly one of cell_tpl'),
    (dict(recompute='sometimes'), "recompute='sometimes'"),
    (dict(partition_method='size'), "partition_method='size'"),
    (dict(num_partitions=9), 'num_partitions=9 exceeds the 8 layers'),
    (dict(balance=[3, 3], num_partitions=2), 'sums to 6, but there are 8'),
    (dict(partition_method='flops', num_partitions=2), 'needs the input shapes'),
    (dict(placement_backend='tpu'), 'needs a tf.distribute.TPUStrategy scope'),
    (dict(placement_backend='gpu'), "placement_backend='gpu'"),
])
def test_bad_params_raise_clear_errors(overrides, message):
  p = PipeliningLayer.Params().Set(name='pipe', layers=_Mlp())
  p.Set(**overrides)
  with pytest.raises(ValueError, match=message):
    p.Instantiate()


@pytest.mark.parametrize('overrides,message', [
    # micro_batch_size was accepted here and refused only at the first call.
    (dict(micro_batch_size=0), r'micro_batch_size must be >= 1 \(.*\), got 0'),
    (dict(micro_batch_size=-1), r'micro_batch_size must be >= 1 .*, got -1'),
    (dict(micro_batch_size=2.5),
     r'micro_batch_size must be an integer >= 1 .*, got 2.5'),
    (dict(micro_batch_size='4'),
     r"micro_batch_size must be an integer >= 1 .*, got '4'"),
    (dict(num_micro_batches=2.5),
     r'num_micro_batches must be an integer >= 1 .*, got 2.5'),
    (dict(num_micro_batches=True),
     r'num_micro_batches must be an integer >= 1 .*, got True'),
    (dict(num_micro_batches=0), r'num_micro_batches must be >= 1 .*, got 0'),
    (dict(num_micro_batches=-2), r'num_micro_batches must be >= 1 .*, got -2'),
    (dict(num_micro_batches=2, micro_batch_size=4),
     r'num_micro_batches=2 and micro_batch_size=4 are both set'),
    (dict(num_partitions=0), r'num_partitions must be >= 1 .*, got 0'),
    (dict(num_partitions=1.5),
     r'num_partitions must be an integer >= 1 .*, got 1.5'),
    (dict(balance=[4, 3.5]),
     r'balance\[1\] must be an integer >= 1 .*, got 3.5'),
    (dict(balance=[8, 0]), r'balance\[1\] must be >= 1 .*, got 0'),
    (dict(balance='44'), r"balance='44'; valid: None or a non-empty list"),
    (dict(batch_dim=-1), r'batch_dim must be >= 0 .*, got -1'),
    (dict(batch_dim='0'), r"batch_dim must be an integer >= 0 .*, got '0'"),
    (dict(clocks_per_iteration=0),
     r'clocks_per_iteration must be >= 1 \(clocks run per loop iteration\), '
     'got 0'),
    (dict(skip_bubbles='yes'),
     r"skip_bubbles must be True or False, got 'yes'"),
    (dict(pack_weights='no'),
     r"pack_weights must be True or False, got 'no'"),
    (dict(input_grads_first=1), r'input_grads_first must be True or False, '
     'got 1'),
    (dict(jit_compile=None), r'pipe: jit_compile must be True or False, got '
     'None'),
    (dict(recompute='alway'), r"recompute='alway'.*Did you mean 'always'\?"),
    (dict(executor='loops'), r"executor='loops'.*Did you mean 'loop'\?"),
    (dict(schedule='1fb1'), r"schedule='1fb1'.*Did you mean '1f1b'\?"),
    (dict(schedule='interleaved_1fb1'),
     r"Did you mean 'interleaved_1f1b'\?"),
    (dict(cells_per_device=2), r"cells_per_device=2; valid: 1, or use "
     r"schedule='interleaved_1f1b': schedule 'gpipe' runs one cell per "
     'device'),
    (dict(cells_per_device=0), r'cells_per_device must be >= 1'),
    (dict(schedule='interleaved_1f1b', cells_per_device=3,
          num_partitions=3), r'num_partitions=3 x cells_per_device=3 = 9 cells '
     'exceeds the 8 layers'),
    (dict(partition_method='tme'),
     r"partition_method='tme'.*Did you mean 'time'\?"),
    (dict(placement_backend='device'),
     r"placement_backend='device'.*Did you mean 'devices'\?"),
    (dict(devices='/device:CPU:0'),
     r"devices='/device:CPU:0'; valid: None or a list of device names"),
])
def test_every_param_is_checked_at_construction(overrides, message):
  p = PipeliningLayer.Params().Set(name='pipe', layers=_Mlp())
  p.Set(**overrides)
  with pytest.raises(ValueError, match=message):
    p.Instantiate()


@pytest.mark.parametrize('overrides,message', [
    (dict(num_partitions=2), r'num_partitions=2; valid: 1 or 3: with cell_tpl'),
    (dict(balance=[1, 2]), r'balance=\[1, 2\]; valid: None with cell_tpl'),
])
def test_fields_cell_tpl_would_ignore_are_refused(overrides, message):
  p = PipeliningLayer.Params().Set(name='pipe', cell_tpl=_Mlp(num_layers=3))
  p.Set(**overrides)
  with pytest.raises(ValueError, match=message):
    p.Instantiate()


def test_integral_floats_are_accepted_as_ints():
  x = tf.random.stateless_normal([4, 6], [1, 2])
  pipe = PipeliningLayer.Params().Set(
      name='pipe', layers=_Mlp(num_layers=4), num_micro_batches=2.0,
      balance=[2.0, 2.0], num_partitions=2.0,
      devices=['/device:CPU:0', '/device:CPU:1']).Instantiate()
  assert pipe.params.num_micro_batches == 2
  assert pipe.MicroBatchSizes(x) == [2, 2]
  assert pipe.balance == [2, 2]
  assert pipe.FPropDefaultTheta(x).shape == (4, 6)
  pipe = PipeliningLayer.Params().Set(
      name='pipe', layers=_Mlp(num_layers=2),
      micro_batch_size=3.0).Instantiate()
  assert pipe.MicroBatchSizes(x) == [3, 1]


@pytest.mark.parametrize('inputs,message', [
    (('tokens', tf.zeros([4, 6])), r"inputs\[0\] is a str \('tokens'\), not a "
     'tensor'),
    (base_layer.NestedMap(vec=tf.zeros([4, 6]), length=3),
     r'inputs.length is a int \(3\), not a tensor'),
])
def test_a_non_tensor_input_is_named(inputs, message):
  pipe = PipeliningLayer.Params().Set(
      name='pipe', layers=_Mlp(num_layers=2)).Instantiate()
  with pytest.raises(ValueError, match=message):
    pipe.MicroBatchSizes(inputs)


class _Scale(base_layer.BaseLayer):
  """x * w: a layer with FProp and no FPropMeta."""

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('dim', 6, 'Size of the last dimension.')
    return p

  def __init__(self, params):
    super().__init__(params)
    self.CreateVariable('w', base_layer.WeightParams([self.params.dim]))

  def FProp(self, theta, x):
    return x * theta.w


class _DenseMetaNotImplemented(dense.Dense):

  @classmethod
  def FPropMeta(cls, p, *input_shapes):
    raise NotImplementedError('FLOPs of this layer are not counted yet')


def _LayersWithoutMeta():
  return [_Mlp(num_layers=1)[0], _Scale.Params().Set(name='scale'),
          _DenseMetaNotImplemented.Params().Set(
              name='dense_nm', input_dim=6, output_dim=6)] + _Mlp(
                  num_layers=3)[1:]


@pytest.mark.parametrize('method', ['time', 'memory'])
def test_time_and_memory_partitioning_need_only_fprop(method):
  p = PipeliningLayer.Params().Set(
      name='pipe', layers=_LayersWithoutMeta(), num_partitions=2,
      partition_method=method, input_shapes=[[4, 6]],
      devices=['/device:CPU:0', '/device:CPU:1'])
  pipe = p.Instantiate()
  report = pipe.Report()
  assert sum(c.num_layers for c in report.cells) == 5
  assert sum(c.num_params for c in report.cells) == PipeliningLayer.NumParams(p)
  assert report.cells[0].num_params > 0
  # FLOPs are counted up to the cell holding 'scale', the first layer
  # without FPropMeta; where the cut falls depends on measured times.
  first_unknown = next(k for k, c in enumerate(report.cells)
                       if 'scale' in c.layer_names)
  assert [c.flops is None for c in report.cells] == [
      k >= first_unknown for k in range(len(report.cells))], report.cells
  text = report_lib.FormatTable(report)
  assert "FLOPs: unknown, layer 'scale' (_Scale) has no FPropMeta" in text, text
  x = tf.random.stateless_normal([4, 6], [1, 2])
  assert pipe.FPropDefaultTheta(x).shape == (4, 6)


def test_the_report_names_a_layer_whose_fpropmeta_is_not_implemented():
  layers = _Mlp(num_layers=2) + [_DenseMetaNotImplemented.Params().Set(
      name='dense_nm', input_dim=6, output_dim=6)]
  pipe = PipeliningLayer.Params().Set(
      name='pipe', layers=layers, balance=[2, 1], input_shapes=[[4, 6]],
      devices=['/device:CPU:0', '/device:CPU:1']).Instantiate()
  report = pipe.Report()
  # The cell before the layer is counted; the one holding it is not.
  assert report.cells[0].flops > 0 and report.cells[1].flops is None
  assert report.flops_unknown == (
      "FPropMeta of layer 'dense_nm' (_DenseMetaNotImplemented) raised "
      'NotImplementedError: FLOPs of this layer are not counted yet')
  assert report_lib.FormatTable(report).splitlines()[-2].startswith(
      'FLOPs: unknown, FPropMeta of layer')


def test_the_report_says_flops_need_input_shapes():
  pipe = PipeliningLayer.Params().Set(
      name='pipe', layers=_Mlp(num_layers=2)).Instantiate()
  assert ('FLOPs: unknown, no input shapes' in
          report_lib.FormatTable(pipe.Report()))


def test_flops_partitioning_names_the_layer_without_fpropmeta():
  p = PipeliningLayer.Params().Set(
      name='pipe', layers=_LayersWithoutMeta(), num_partitions=2,
      partition_method='flops', input_shapes=[[4, 6]])
  with pytest.raises(ValueError, match=(
      r"layer 'scale' \(_Scale\) has no FPropMeta. Use "
      r"partition_method='params', 'time' or 'memory' instead")):
    p.Instantiate()


@pytest.mark.parametrize('schedule,bubble', [('gpipe', None),
                                             ('zero_bubble_h1', 1 / 10)])
def test_the_layer_runs_the_schedule_it_reports(schedule, bubble):
  p = PipeliningLayer.Params().Set(
      name='pipe', layers=[dense.Dense.Params().Set(
          name=f'fc{i}', input_dim=4, output_dim=4) for i in range(2)],
      num_partitions=2, num_micro_batches=3, input_grads_first=True,
      schedule=schedule, devices=['/device:CPU:0', '/device:CPU:1'])
  pipe = p.Instantiate()
  sched = pipe.Schedule(3)
  assert (sched.num_cells, sched.num_micro_batches) == (2, 3)
  assert {t.kind for t in sched.CellOrder(1)} == {'F', 'Bx', 'Bw'}
  report = pipe.Report()
  assert report.bubble_fraction == sched.TheoreticalBubble()
  if bubble is not None:  # ZB-H1: (K-1)/(3M+K-1)
    assert report.bubble_fraction == pytest.approx(bubble)
  assert (f'schedule={schedule}, bubble={report.bubble_fraction:.1%} '
          '(predicted') in report_lib.FormatTable(report)


# --- a Repeat cut between iterations -------------------------------------------


def _RepeatStack():
  block = dense.Dense.Params().Set(input_dim=6, output_dim=6, activation='tanh')
  return [block.Copy().Set(name='first'),
          repeat.Repeat.Params().Set(name='blocks', sub=block, num=5),
          block.Copy().Set(name='last')]


def _RepeatPipeline(k, m, executor, recompute='always'):
  return PipeliningLayer.Params().Set(
      name='pipe', layers=_RepeatStack(), num_partitions=k,
      num_micro_batches=m, executor=executor, recompute=recompute,
      devices=[f'/device:CPU:{i}' for i in range(k)]).Instantiate()


def _LogicalGrads(pipe, grads):
  """Gradients by logical weight: a cut Repeat's pieces joined."""
  out, i = [], 0
  for layer_vars in pipe.vars.layers:
    if 'body' in layer_vars:
      pieces = [list(piece.Flatten()) for piece in layer_vars.body]
      n = len(pieces[0])
      chunk = grads[i:i + n * len(pieces)]
      out += [np.concatenate([chunk[p * n + w] for p in range(len(pieces))])
              for w in range(n)]
      i += n * len(pieces)
    else:
      n = len(layer_vars.Flatten())
      out += [g.numpy() for g in grads[i:i + n]]
      i += n
  return out


@pytest.mark.parametrize('executor,recompute', [
    ('unrolled', 'always'), ('loop', 'always'), ('loop', 'never')])
def test_a_repeat_cut_across_cells_equals_it_whole(executor, recompute):
  cut = _RepeatPipeline(3, 3, executor, recompute)
  whole = _RepeatPipeline(1, 1, 'unrolled')
  # 7 units of equal cost (first, 5 iterations, last) in 3 cells: the
  # Repeat is cut, and each piece's weights live on its cell's device.
  assert sum(cut.balance) == 7 and len(cut.balance) == 3
  blocks = cut.layers[1]
  assert len(blocks.piece_sizes) >= 2
  cells_with_blocks = [k for k, cell in enumerate(cut.segments)
                       if any(s.layer == 1 for s in cell)]
  for i, k in enumerate(cells_with_blocks):
    for v in blocks.vars.body[i].Flatten():
      assert v.device.endswith(f'CPU:{k}'), (i, k, v.device)
  names = [n for c in cut.Report().cells for n in c.layer_names]
  assert names[0] == 'first' and names[-1] == 'last'
  assert any(n.startswith('blocks[0:') for n in names)
  x = tf.random.stateless_normal([7, 6], [1, 2])
  grads = {}
  for name, pipe in (('cut', cut), ('whole', whole)):
    # Variables in the order of pipe.vars (layers, then pieces).
    variables = pipe.vars.Flatten()
    with base_layer.Context(training=True, step=3):
      with tf.GradientTape() as tape:
        y = pipe.FProp(pipe.theta, x)
        loss = tf.reduce_sum(y * y)
    grads[name] = (loss.numpy(), _LogicalGrads(
        pipe, tape.gradient(loss, variables)))
  np.testing.assert_allclose(grads['cut'][0], grads['whole'][0], rtol=1e-5)
  for a, b in zip(grads['cut'][1], grads['whole'][1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_restores_across_a_repeat_cut(tmp_path):
  whole = _RepeatPipeline(1, 1, 'unrolled')
  for v in whole.trainable_variables:
    v.assign(tf.random.stateless_normal(v.shape, [7, len(v.name)]))
  path = tf.train.Checkpoint(model=whole).save(str(tmp_path / 'ckpt'))
  cut = _RepeatPipeline(4, 2, 'unrolled')
  assert len(cut.layers[1].piece_sizes) >= 2
  tf.train.Checkpoint(model=cut).restore(path).assert_consumed()
  np.testing.assert_array_equal(
      whole.layers[1].vars.body[0].w.numpy(),
      np.concatenate([p.w.numpy() for p in cut.layers[1].vars.body]))


def test_sequential_layers_run_in_turn_where_their_weights_are():
  """SequentialLayers: run one at a time, each in its scope, the layers give
  FProp's output, each computed on its cell's device (a cut Repeat's pieces
  each on its own), so no weight is copied to the caller's device."""
  pipe = _RepeatPipeline(3, 1, 'unrolled')
  assert len(pipe.layers[1].piece_sizes) >= 2
  x = tf.random.stateless_normal([5, 6], [3, 4])
  y = x
  index = lambda d: tf.DeviceSpec.from_string(d).device_index
  triples = pipe.SequentialLayers(pipe.theta)
  assert len(triples) == sum(len(cell.sub) for cell in pipe.cells)
  on = set()
  for layer, theta, scope in triples:
    weights = {index(v.device) for v in tf.nest.flatten(theta)}
    assert len(weights) == 1, layer.path
    with scope():
      y = layer.FProp(theta, y)
    assert {index(y.device)} == weights, layer.path
    on |= weights
  assert on == {0, 1, 2}
  np.testing.assert_allclose(y, pipe.FProp(pipe.theta, x), rtol=1e-6)


def test_interleaved_cells_go_round_the_devices_v_times():
  # K=2 devices, V=2: 4 cells, cell c on device c mod 2; the schedule runs
  # each device's two cells as one task list.
  devices = ['/device:CPU:0', '/device:CPU:1']
  pipe = PipeliningLayer.Params().Set(
      name='pipe', layers=_Mlp(num_layers=4), num_partitions=2,
      cells_per_device=2, schedule='interleaved_1f1b', num_micro_batches=4,
      devices=devices).Instantiate()
  assert len(pipe.cells) == 4
  assert [c.device for c in pipe.Report().cells] == devices * 2
  assert [pipe.placement.Device(c) for c in range(4)] == devices * 2
  sched = pipe.Schedule(4)
  assert (sched.name, sched.num_cells, sched.num_devices) == (
      'interleaved_1f1b', 4, 2)
  assert {t.cell for t in sched.DeviceOrder(1)} == {1, 3}
  report = report_lib.FormatTable(pipe.Report())
  assert 'schedule=interleaved_1f1b, bubble=11.1%' in report  # 1/(2*4+1)


def test_a_default_tf_function_does_not_convert_the_pipeline(monkeypatch):
  # Autograph would parse and rewrite FProp and every Python helper it calls
  # (micro-batch sizes, the schedule, cell thetas) at each trace, for nothing:
  # none of them branches on a tensor.
  from tensorflow.python.autograph.impl import api  # pylint: disable=g-import-not-at-top
  converted = []
  convert = api._convert_actual  # pylint: disable=protected-access

  def Spy(entity, program_ctx):
    converted.append(getattr(entity, '__module__', '') or '')
    return convert(entity, program_ctx)

  monkeypatch.setattr(api, '_convert_actual', Spy)
  pipe = _Pipeline(_Mlp(4), k=2, m=2, recompute='always')
  x = tf.random.normal([4, 6])

  @tf.function  # autograph on, as a user's own step has it by default
  def Step(x):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(pipe.FPropDefaultTheta(x))
    return tape.gradient(loss, pipe.trainable_variables)

  Step.get_concrete_function(x)
  assert converted, 'autograph converted nothing: the spy missed it'
  assert not [m for m in converted if m.startswith('lingvo_gpipe.core.gpipe')]
