"""Tests of ImageClassifier: loss terms, metrics, network inputs and outputs."""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe import pipelining_layer
from lingvo_gpipe.core.layers import conv
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.layers import normalization
from lingvo_gpipe.core.layers import pooling
from lingvo_gpipe.core.nested_map import NestedMap
from tasks import metrics
from tasks.image import classifier

CLASSES = 7


def _Batch(b=4):
  return NestedMap(
      image=tf.random.stateless_normal([b, 6, 6, 3], [1, 2]),
      label=tf.constant([0, 3, 6, 2][:b], tf.int32))


def _ConvLayers():
  return [conv.Conv2D.Params().Set(name='conv', filter_shape=[3, 3, 3, 4]),
          normalization.BatchNorm.Params().Set(name='bn', dim=4),
          pooling.GlobalAvgPool.Params().Set(name='pool'),
          dense.Dense.Params().Set(name='logits', input_dim=4,
                                   output_dim=CLASSES, activation='none')]


class _TwoHeads(base_layer.BaseLayer):
  """NestedMap(image, label) -> NestedMap(logits, aux_logits, label)."""

  def __init__(self, params):
    super().__init__(params)
    for name in ('head', 'aux'):
      self.CreateChild(name, dense.Dense.Params().Set(
          input_dim=6 * 6 * 3, output_dim=CLASSES, activation='none'))

  def FProp(self, theta, inputs):
    flat = tf.reshape(inputs.image, [tf.shape(inputs.image)[0], -1])
    return NestedMap(logits=self.head.FProp(theta.head, flat),
                     aux_logits=self.aux.FProp(theta.aux, flat),
                     label=inputs.label)


def _Task(network, **kwargs):
  return classifier.ImageClassifier.Params().Set(
      name='classifier', network=network, **kwargs).Instantiate()


def test_pipelined_conv_net_metrics():
  network = pipelining_layer.PipeliningLayer.Params().Set(
      layers=_ConvLayers(), num_partitions=2, num_micro_batches=2,
      devices=['/device:CPU:0', '/device:CPU:1'])
  task = _Task(network, label_smoothing=0.1)
  batch = _Batch()
  with base_layer.Context(training=True):
    out = task.FPropDefaultTheta(batch)
  assert sorted(out) == ['log_pplx', 'loss', 'top1_accuracy', 'top5_accuracy',
                         'xent']
  for name, (value, weight) in out.items():
    assert np.isfinite(value), name
    assert float(weight) == 4.0, name
  # No aux head, no weight decay: the loss is the smoothed xent.
  assert float(out.loss[0]) == float(out.xent[0])
  assert 0.0 <= float(out.top1_accuracy[0]) <= float(out.top5_accuracy[0])


def test_aux_head_and_weight_decay_add_to_the_loss():
  network = _TwoHeads.Params()
  task = _Task(network, network_input='batch', aux_loss_weight=0.4,
               weight_decay=1e-2)
  batch = _Batch()
  out = task.FPropDefaultTheta(batch)
  assert sorted(out) == ['aux_xent', 'log_pplx', 'loss', 'top1_accuracy',
                         'top5_accuracy', 'weight_decay_loss', 'xent']
  theta = task.theta.network
  # Σ ½‖w‖² of both heads' kernels; the biases are exempt.
  l2 = sum(0.5 * np.sum(theta[h].w.numpy() ** 2) for h in ('head', 'aux'))
  np.testing.assert_allclose(out.weight_decay_loss[0], 1e-2 * l2, rtol=1e-5)
  flat = tf.reshape(batch.image, [4, -1])
  logits = flat @ theta.head.w + theta.head.b
  aux_logits = flat @ theta.aux.w + theta.aux.b
  xent = np.mean(metrics.SmoothedXent(logits, batch.label))
  aux_xent = np.mean(metrics.SmoothedXent(aux_logits, batch.label))
  np.testing.assert_allclose(out.xent[0], xent, rtol=1e-5)
  np.testing.assert_allclose(out.aux_xent[0], aux_xent, rtol=1e-5)
  np.testing.assert_allclose(out.loss[0], xent + 0.4 * aux_xent + 1e-2 * l2,
                             rtol=1e-5)
  # The loss is differentiable w.r.t. every kernel and bias.
  with tf.GradientTape() as tape:
    loss = task.FPropDefaultTheta(batch).loss[0]
  grads = tape.gradient(loss, task.trainable_variables)
  assert all(g is not None for g in grads)


def test_l2_norm_picks_kernels_only():
  theta = NestedMap(a=NestedMap(w=tf.ones([2, 3]), b=tf.ones([3])),
                    c=[NestedMap(depthwise_w=tf.ones([2]),
                                 pointwise_w=2 * tf.ones([1]),
                                 scale=tf.ones([5]))])
  assert float(classifier.ImageClassifier.L2Norm(theta)) == 0.5 * (6 + 2 + 4)
  assert float(classifier.ImageClassifier.L2Norm(NestedMap())) == 0.0


def test_bad_params_and_outputs():
  with pytest.raises(ValueError, match="network_input='pixels'"):
    _Task(dense.Dense.Params(), network_input='pixels')
  task = _Task(_TwoHeads.Params(), network_input='batch')
  with pytest.raises(ValueError, match=r"NestedMap with 'logits'.*keys"):
    task._Logits(NestedMap(probs=tf.zeros([1, 2])))
