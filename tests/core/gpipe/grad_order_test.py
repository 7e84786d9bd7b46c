"""Tests of grad_order: weight gradients wait for the input gradient."""

import numpy as np
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe import grad_order
from lingvo_gpipe.core.gpipe import pipelining_layer
from lingvo_gpipe.core.layers import dense


def _Ancestors(op):
  """Every op that `op` waits for, through data and control edges."""
  seen, stack = set(), [op]
  while stack:
    node = stack.pop()
    for parent in [t.op for t in node.inputs] + list(node.control_inputs):
      if parent not in seen:
        seen.add(parent)
        stack.append(parent)
  return seen


def _TwoLayerGradients(order: bool):
  """Traced gradients of tanh(x w1) w2 for [w1, w2, x], and the graph's ops."""
  w1 = tf.constant(np.arange(15, dtype=np.float32).reshape(3, 5) / 10)
  w2 = tf.constant(np.arange(10, dtype=np.float32).reshape(5, 2) / 10)
  x = tf.constant(np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3))
  found = {}

  @tf.function
  def Grads():
    with tf.GradientTape() as tape:
      tape.watch([w1, w2, x])
      y = tf.matmul(tf.tanh(tf.matmul(x, w1)), w2)
    with grad_order.Capture() as created:
      grads = tape.gradient(y, [w1, w2, x])
    found['created'] = created
    found['dx'] = grads[2].op
    if order:
      found['deferred'] = grad_order.RunAfter(created, grads[2])
    return grads

  values = Grads()
  return values, found


def test_weight_gradients_wait_for_the_input_gradient():
  values, found = _TwoLayerGradients(order=True)
  weight_grads = [op for op in found['created'] if op.type == 'MatMul'
                  and op.get_attr('transpose_a')]
  assert len(weight_grads) == 2
  for op in weight_grads:
    assert found['dx'] in _Ancestors(op), op.name
  assert found['deferred'] >= 2
  # Nothing the input gradient needs was made to wait for it (no cycle), and
  # the values are those of the unordered graph.
  assert found['dx'] not in _Ancestors(found['dx'])
  reference, unordered = _TwoLayerGradients(order=False)
  for op in unordered['created']:
    if op.type == 'MatMul' and op.get_attr('transpose_a'):
      assert unordered['dx'] not in _Ancestors(op)  # what RunAfter changes
  for a, b in zip(values, reference):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_eager_execution_has_no_graph_to_order():
  x = tf.constant([[1.0, 2.0]])
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = tf.reduce_sum(x * x)
  with grad_order.Capture() as created:
    dx = tape.gradient(y, x)
  assert not created
  assert grad_order.RunAfter(created, dx) == 0
  np.testing.assert_allclose(dx, [[2.0, 4.0]])


def _PipelineStep(input_grads_first: bool, recompute: str):
  """A traced 2-cell, 2-micro-batch step of one Dense layer per cell."""
  layers = [dense.Dense.Params().Set(name=f'fc{i}', input_dim=6, output_dim=6,
                                     activation='tanh') for i in range(2)]
  pipe = pipelining_layer.PipeliningLayer.Params().Set(
      name='pipe', layers=layers, num_partitions=2, num_micro_batches=2,
      recompute=recompute, input_grads_first=input_grads_first,
      devices=['/device:CPU:0', '/device:CPU:1']).Instantiate()

  @tf.function
  def Step(x):
    with base_layer.Context(training=True):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = pipe.FPropDefaultTheta(x)
        loss = tf.reduce_sum(y * y)
      return tape.gradient(loss, list(pipe.trainable_variables) + [x])

  x = tf.reshape(tf.range(24, dtype=tf.float32) / 24, [4, 6])
  return Step.get_concrete_function(x).graph, Step(x)


def test_pipeline_sends_the_input_gradient_before_the_weight_gradients():
  for recompute in ('always', 'never'):
    ordered_graph, ordered = _PipelineStep(True, recompute)
    unordered_graph, unordered = _PipelineStep(False, recompute)
    for a, b in zip(ordered, unordered):
      np.testing.assert_allclose(a, b, rtol=1e-6)
    for graph, expected in ((ordered_graph, True), (unordered_graph, False)):
      ops = graph.get_operations()
      on_cell_1 = [op for op in ops if op.type == 'MatMul'
                   and op.device.endswith('CPU:1')]
      weight_grads = [op for op in on_cell_1 if op.get_attr('transpose_a')]
      input_grads = {op for op in on_cell_1 if op.get_attr('transpose_b')}
      assert len(weight_grads) == 2 and len(input_grads) == 2, recompute
      for op in weight_grads:
        waits = bool(input_grads & _Ancestors(op))
        assert waits == expected, (recompute, expected, op.name)
