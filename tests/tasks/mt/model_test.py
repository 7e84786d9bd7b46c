"""Tests of the Transformer translation model and MtTask.

The flat layer list carries the target side through the encoder and the
encoder output through the decoder; pipelined over 2 cells it gives the
sequential loss and gradients; SGD lowers the loss; greedy decoding emits
what the teacher-forced model predicts and stops at EOS.
"""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.layers import combinators
from lingvo_gpipe.core.nested_map import NestedMap
from tasks import metrics
from tasks.mt import model
from tests.support import test_utils

SRC_VOCAB, TGT_VOCAB, D = 11, 13, 16
B, S, T = 4, 5, 6


def _Network(**kwargs):
  return model.TransformerParams(
      SRC_VOCAB, TGT_VOCAB, model_dim=D, num_heads=2, hidden_dim=32,
      num_layers=2, **kwargs)


def _Task(network=None, **kwargs):
  return model.MtTask.Params().Set(
      name='mt', network=network or _Network(dropout=0.0),
      **kwargs).Instantiate()


def _Batch(seed=1):
  """Targets are the sources' first 5 tokens; row i has 5 - i source tokens."""
  tokens = tf.random.stateless_uniform([B, S], [seed, 1], 3, SRC_VOCAB,
                                       tf.int32)
  src_len = tf.constant([5, 4, 3, 2])
  src_pad = 1.0 - tf.sequence_mask(src_len, S, tf.float32)
  src_ids = tf.where(src_pad > 0, 0, tokens)
  tgt_pad = 1.0 - tf.sequence_mask(src_len + 1, T, tf.float32)
  body = tf.pad(src_ids, [[0, 0], [0, 1]])
  eos = tf.one_hot(src_len, T, dtype=tf.int32) * model.EOS_ID
  labels = body + eos
  ids = tf.concat([tf.fill([B, 1], model.SOS_ID), labels[:, :-1]], axis=1)
  ids = tf.where(tgt_pad > 0, 0, ids)
  return NestedMap(src=NestedMap(ids=src_ids, paddings=src_pad),
                   tgt=NestedMap(ids=ids, labels=labels, paddings=tgt_pad))


def test_keys_flow_through_the_flat_layer_list():
  task = _Task(_Network(dropout=0.0, stack_layers=False))
  layers = model.SequentialLayers(task.network, task.theta.network)
  assert [l.name for l in task.network.pipeline.params.layers] == [
      'src_emb', 'enc_0', 'enc_1', 'enc_dec', 'dec_0', 'dec_1', 'softmax']
  assert [type(l).__name__ for l, _, _ in layers] == [
      'TransformerEmbedding', 'TransformerLayer', 'TransformerLayer',
      'EncoderToDecoder', 'TransformerLayer', 'TransformerLayer',
      'TransformerSoftmax']
  batch = _Batch()
  x = model.NetworkInputs(batch)
  keys = []
  for layer, theta, _ in layers:
    x = layer.FProp(theta, x)
    keys.append(sorted(x))
  assert keys[0] == keys[1] == keys[2] == ['paddings', 'tgt', 'vec']
  assert keys[3] == keys[4] == keys[5] == ['aux_paddings', 'aux_vec',
                                           'paddings', 'vec']
  assert keys[6] == ['aux_paddings', 'aux_vec', 'logits', 'paddings']
  assert x.logits.shape == [B, T, TGT_VOCAB]
  np.testing.assert_array_equal(x.paddings, batch.tgt.paddings)
  np.testing.assert_array_equal(x.aux_paddings, batch.src.paddings)


def test_stacked_blocks_compute_what_listed_blocks_do():
  listed = _Task()  # stack_layers=False, the default
  stacked = _Task(_Network(dropout=0.0, stack_layers=True))
  assert [l.name for l in stacked.network.pipeline.params.layers] == [
      'src_emb', 'enc', 'enc_dec', 'dec', 'softmax']
  layers = model.SequentialLayers(stacked.network, stacked.theta.network)
  assert [type(l).__name__ for l, _, _ in layers] == [
      'TransformerEmbedding', 'Repeat', 'EncoderToDecoder', 'Repeat',
      'TransformerSoftmax']
  # Give the listed blocks the stacked blocks' weights (iteration i of each
  # stacked weight is block i's): the two networks then agree.
  listed_layers = listed.network.pipeline.layers
  for j, layer in enumerate(stacked.network.pipeline.layers):
    if type(layer).__name__ != 'Repeat':
      for a, b in zip(listed_layers[{0: 0, 2: 3, 4: 6}[j]].trainable_variables,
                      layer.trainable_variables):
        a.assign(b)
      continue
    first = 1 if j == 1 else 4
    stacked_vars = layer.vars.body[0]
    for i in range(layer.params.num):
      block = listed_layers[first + i]
      for a, b in zip(block.vars.Flatten(), stacked_vars.Flatten()):
        a.assign(b[i])
  x = model.NetworkInputs(_Batch())
  out = [x, x]
  for k, task in enumerate((listed, stacked)):
    out[k] = model.RunLayers(
        model.SequentialLayers(task.network, task.theta.network), out[k])
  np.testing.assert_allclose(out[0].logits, out[1].logits, rtol=1e-5,
                             atol=1e-5)


def test_encoder_to_decoder_layer():
  p = model.EncoderToDecoder.Params().Set(model_dim=D, tgt_vocab_size=7,
                                          keep_prob=0.9)
  src_pad = tf.constant([[0.0, 0, 1], [0, 0, 0]])
  tgt = NestedMap(ids=tf.constant([[2, 3, 4, 0], [2, 5, 6, 6]]),
                  paddings=tf.constant([[0.0, 0, 0, 1], [0, 0, 0, 0]]),
                  labels=tf.constant([[3, 4, 1, 0], [5, 6, 6, 1]]))
  inputs = NestedMap(vec=tf.random.stateless_normal([2, 3, D], [3, 3]),
                     paddings=src_pad, tgt=tgt, extra=tf.ones([2, 1]))
  layer, out = test_utils.CheckLayer(p, inputs, training=True)
  assert sorted(out) == ['aux_paddings', 'aux_vec', 'extra', 'labels',
                         'paddings', 'vec']
  assert out.aux_paddings is src_pad and out.paddings is tgt.paddings
  assert out.labels is tgt.labels and out.vec.shape == [2, 4, D]
  normed = layer.enc_norm.FPropDefaultTheta(inputs.vec)
  np.testing.assert_allclose(out.aux_vec, normed, rtol=1e-6)
  with pytest.raises(ValueError, match="the key 'tgt'"):
    layer.FPropDefaultTheta(NestedMap(vec=inputs.vec))


@pytest.mark.heavy  # ~5-10 s: eager pipelined and sequential backward
def test_pipelined_equals_sequential():
  network = _Network(dropout=0.1, num_partitions=2, num_micro_batches=2,
                     devices=['/device:CPU:0', '/device:CPU:1'])
  task = _Task(network, label_smoothing=0.1)
  pipe = task.network.pipeline
  assert len(pipe.cells) == 2
  assert model.Transformer.NumParams(network) == (
      test_utils.CountTrainable(pipe))
  batch = _Batch()

  def LossAndGrads(fprop):
    with base_layer.Context(training=True, step=3):
      with tf.GradientTape() as tape:
        out = fprop(task.theta.network.pipeline, model.NetworkInputs(batch))
        loss = metrics.SequenceMetrics(
            out.logits, batch.tgt.labels, batch.tgt.paddings, 0.1).loss[0]
      grads = tape.gradient(loss, pipe.trainable_variables)
    return loss, [tf.convert_to_tensor(g) for g in grads]

  loss, grads = LossAndGrads(pipe.FProp)
  ref_loss, ref_grads = LossAndGrads(
      lambda theta, x: test_utils.SequentialReference(pipe, x, [2, 2], theta))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert len(grads) == len(ref_grads) == len(pipe.trainable_variables)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
  # The task's metrics: its loss is the pipelined one.
  with base_layer.Context(training=True, step=3):
    out = task.FPropDefaultTheta(batch)
  assert sorted(out) == ['log_pplx', 'loss', 'token_accuracy']
  for name, (value, weight) in out.items():
    assert np.isfinite(value), name
    assert float(weight) == 5 + 4 + 3 + 2 + 4 * 1, name  # tokens + EOS
  np.testing.assert_allclose(out.loss[0], loss, rtol=1e-6)


def _Decode(task, batch):
  return task.Decode(task.theta, batch)


@pytest.mark.heavy  # ~4-7 s: 4 eager SGD steps and a decode
def test_sgd_reduces_loss_then_decodes_in_range():
  # Any layer running the flat list will do; a Sequential skips the
  # pipeline's overhead in this eager loop.
  network = combinators.Sequential.Params().Set(
      name='net', sub=model.Transformer.Layers(_Network(dropout=0.0)))
  task = _Task(network, max_decode_len=7)
  batch = _Batch()
  variables = task.trainable_variables
  optimizer = tf.keras.optimizers.SGD(learning_rate=0.1)

  def Step():
    with base_layer.Context(training=True):
      with tf.GradientTape() as tape:
        loss = task.FPropDefaultTheta(batch).loss[0]
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return float(loss)

  losses = [Step() for _ in range(4)]
  assert losses[-1] < 0.8 * losses[0], losses
  decoded = _Decode(task, batch)
  hyp = decoded.hyp_ids.numpy()
  assert hyp.shape == (B, 7) and hyp.dtype == np.int32
  assert ((0 <= hyp) & (hyp < TGT_VOCAB)).all()
  for row in hyp:  # nothing but padding after the first EOS
    eos = np.flatnonzero(row == model.EOS_ID)
    if eos.size:
      assert (row[eos[0] + 1:] == 0).all(), row
  np.testing.assert_array_equal(decoded.ref_ids, batch.tgt.labels)
  decode_metrics = task.CreateDecodeMetrics()
  decode_metrics.Update(decoded.Transform(lambda t: t.numpy()))
  result = decode_metrics.Result()
  assert 0.0 <= result['bleu_token_ids'] <= 100.0
  assert result['num_sequences'] == B


def _SetOutputBias(task, values):
  softmax = model.SequentialLayers(task.network, task.theta.network)[-1][0]
  softmax.softmax.proj.vars.b.assign(values)


def test_greedy_decode_stops_at_eos():
  task = _Task(max_decode_len=5)
  _SetOutputBias(task, 100.0 * tf.one_hot(model.EOS_ID, TGT_VOCAB))
  hyp = _Decode(task, _Batch()).hyp_ids.numpy()
  np.testing.assert_array_equal(hyp, [[model.EOS_ID, 0, 0, 0, 0]] * B)


def test_greedy_decode_is_teacher_forced_argmax():
  """Fed its own output as the target, the model predicts that same output."""
  task = _Task(max_decode_len=6)
  # Keep padding and EOS out, so every row runs the full length.
  _SetOutputBias(task, -100.0 * tf.reduce_sum(
      tf.one_hot([model.PAD_ID, model.EOS_ID], TGT_VOCAB), axis=0))
  batch = _Batch(seed=4)
  hyp = _Decode(task, batch).hyp_ids
  assert hyp.shape == [B, 6]
  assert (hyp.numpy() >= 2).all()
  forced = NestedMap(
      src=batch.src,
      tgt=NestedMap(ids=tf.concat([tf.fill([B, 1], model.SOS_ID), hyp[:, :-1]],
                                  axis=1),
                    paddings=tf.zeros([B, 6])))
  out = task.network.FPropDefaultTheta(model.NetworkInputs(forced))
  np.testing.assert_array_equal(
      tf.argmax(out.logits, axis=-1, output_type=tf.int32), hyp)


def test_params_round_trip_and_errors():
  p = model.MtTask.Params().Set(name='mt', network=_Network(num_partitions=2))
  assert model.MtTask.Params().FromText(p.ToText()) == p
  with pytest.raises(ValueError, match='max_decode_len must be >= 1'):
    _Task(max_decode_len=0)
  with pytest.raises(ValueError, match='dropout is 1.0'):
    _Network(dropout=1.0).Instantiate()


def test_greedy_decoding_runs_each_layer_on_its_cell_s_device():
  """Every op a layer makes while decoding is on the device of its pipeline
  cell, in the encoder and in every decode step (the while loop's body):
  none on the default device, CPU:0, which holds no cell; an op there would
  copy the layer's weights to it at every step (with remote stages, over the
  network)."""
  devices = ['/device:CPU:1', '/device:CPU:2']
  task = _Task(_Network(dropout=0.0, num_partitions=2, devices=devices),
               max_decode_len=3)
  index = lambda d: tf.DeviceSpec.from_string(d).device_index
  made = {}  # layer path -> device indices of the ops its FProp made
  for layer, theta, _ in model.SequentialLayers(task.network,
                                                task.theta.network):

    def Recording(theta, x, fprop=layer.FProp, path=layer.path):
      graph = tf.compat.v1.get_default_graph()
      before = len(graph.get_operations())
      out = fprop(theta, x)
      made.setdefault(path, set()).update(
          index(op.device) if op.device else None
          for op in graph.get_operations()[before:]
          # Weight reads go where their variable is whatever the scope (the
          # placer puts an op with a resource input there); their values
          # then go where the ops using them are, which the scope sets.
          if op.type != 'Placeholder' and
          not any(t.dtype == tf.resource for t in op.inputs))
      return out

    layer.FProp = Recording
    made[layer.path] = set()
    cell_device = {index(v.device) for v in tf.nest.flatten(theta)}
    assert len(cell_device) == 1
    made[layer.path + ' expected'] = cell_device
  batch = _Batch()
  tf.function(lambda b: task.Decode(task.theta, b)).get_concrete_function(batch)
  paths = [p for p in made if not p.endswith(' expected')]
  assert len(paths) == 7
  for path in paths:
    assert made[path], f'{path} made no op'
    assert made[path] == made[path + ' expected'], path
  assert set().union(*(made[p] for p in paths)) == {1, 2}
