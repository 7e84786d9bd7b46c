"""lm1b's Transformer-L runs on the loop executor, with the unrolled executor's numbers."""

import numpy as np
import tensorflow as tf

from lingvo_gpipe import model_registry
from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.nested_map import NestedMap

_BATCH, _LEN, _VOCAB = 4, 8, 64


def _Task(executor):
  """The registered task, narrowed (Table 1's widths do not fit a test)."""
  params = model_registry.GetParams('lm.lm1b.TransformerL')
  network = params.task.network
  assert network.pipeline.executor == 'loop'
  network.Set(num_layers=3, model_dim=16, hidden_dim=32, num_heads=2,
              vocab_size=_VOCAB)
  network.pipeline.Set(
      executor=executor, num_partitions=2, num_micro_batches=4,
      devices=['/device:CPU:0', '/device:CPU:1'],
      input_shapes=[NestedMap(ids=[_BATCH, _LEN], paddings=[_BATCH, _LEN])])
  return params.task.Instantiate()


def test_the_loop_executor_computes_what_the_unrolled_one_does():
  ids = tf.random.stateless_uniform([_BATCH, _LEN], [1, 2], maxval=_VOCAB,
                                    dtype=tf.int32)
  batch = NestedMap(ids=ids, labels=tf.roll(ids, -1, axis=1),
                    paddings=tf.cast(tf.range(_LEN)[None, :] >= tf.constant(
                        [[8], [6], [8], [3]]), tf.float32))
  results = {}
  names = weights = None
  for executor in ('loop', 'unrolled'):
    task = _Task(executor)
    variables = task.trainable_variables
    if weights is None:
      names = [v.name for v in variables]
      weights = [v.numpy() for v in variables]
    else:  # the same weights, matched by name (equal at any executor)
      assert [v.name for v in variables] == names
      for v, w in zip(variables, weights):
        v.assign(w)

    @tf.function
    def Step():
      with base_layer.Context(training=True, step=3):
        with tf.GradientTape() as tape:
          loss = task.FPropDefaultTheta(batch).loss[0]  # pylint: disable=cell-var-from-loop
      return loss, tape.gradient(loss, variables)  # pylint: disable=cell-var-from-loop

    results[executor] = Step()
  (loss, grads), (ref_loss, ref_grads) = results['loop'], results['unrolled']
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert len(grads) == len(ref_grads) > 10
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(tf.convert_to_tensor(g), tf.convert_to_tensor(r),
                               rtol=1e-5, atol=1e-6)
