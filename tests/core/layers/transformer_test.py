"""Tests of the Transformer layers: sizes, masks, pass-through keys, and pipelining.

Each layer maps a NestedMap to a NestedMap; the checks are that the static
sizes match the built layers, that causal and padding masks hide what they
should, that keys a layer does not use pass through unchanged, and that a
decoder-only LM [TransformerEmbedding, TransformerLayer × 4, TransformerSoftmax]
gives the same loss and gradients pipelined over 2 cells as in sequence.
"""


import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe import pipelining_layer
from lingvo_gpipe.core.layers import combinators
from lingvo_gpipe.core.layers import repeat
from lingvo_gpipe.core.layers import transformer
from lingvo_gpipe.core.nested_map import NestedMap
from tests.support import test_utils

D, HEADS, D_FF, VOCAB = 8, 2, 16, 11


def _Layer(**kwargs):
  p = transformer.TransformerLayer.Params().Set(
      model_dim=D, num_heads=HEADS, hidden_dim=D_FF)
  return p.Set(**kwargs)


def _Normal(shape, seed):
  return tf.random.stateless_normal(shape, [seed, 7])


_PADDINGS = tf.constant([[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]], tf.float32)


def _Inputs(seed=1, **extra):
  return NestedMap(vec=_Normal([2, 5, D], seed), paddings=_PADDINGS, **extra)


def _Run(layer, inputs, training=False):
  with base_layer.Context(training=training):
    return layer.FPropDefaultTheta(inputs)


# --- TransformerLayer ---------------------------------------------------------


@pytest.mark.parametrize('kwargs', [
    dict(),
    dict(causal=True, residual_keep_prob=0.9, atten_keep_prob=0.8,
         relu_keep_prob=0.7),
])
def test_layer_sizes_and_shapes(kwargs):
  p = _Layer(**kwargs)
  _, out = test_utils.CheckLayer(p, _Inputs(), training=True)
  attention = 4 * D * D + 4 * D
  ffn = 2 * D * D_FF + D_FF + D
  assert transformer.TransformerLayer.NumParams(p) == attention + ffn + 2 * 2 * D
  assert sorted(out) == ['paddings', 'vec']
  meta = transformer.TransformerLayer.FPropMeta(p, _Inputs())
  # Dominated by the six d×d-sized matmuls (2 FLOPs a multiply-add).
  matmuls = 2 * 2 * 5 * (4 * D * D + 2 * D * D_FF)
  assert matmuls < meta.flops < 2 * matmuls


def test_layer_is_pre_ln_residual_composition():
  layer = _Layer(causal=True).Instantiate()
  inputs = _Inputs()
  out = _Run(layer, inputs).vec
  th = layer.theta
  x = inputs.vec
  h = layer.self_atten.pre_norm.FProp(th.self_atten.pre_norm, x)
  x = x + layer.self_atten.sub.FProp(th.self_atten.sub, h, None,
                                     inputs.paddings)
  h = layer.ffn.pre_norm.FProp(th.ffn.pre_norm, x)
  for sub, sub_th in zip(layer.ffn.sub.sub, th.ffn.sub.sub):
    h = sub.FProp(sub_th, h)
  np.testing.assert_allclose(out, x + h, rtol=1e-6, atol=1e-6)


def test_causal_output_ignores_later_positions():
  layer = _Layer(causal=True).Instantiate()
  inputs = NestedMap(vec=_Normal([2, 5, D], 1), paddings=tf.zeros([2, 5]))
  base = _Run(layer, inputs).vec.numpy()
  for t in range(4):
    changed = inputs.copy()
    changed.vec = tf.concat([inputs.vec[:, :t + 1],
                             _Normal([2, 4 - t, D], 10 + t)], axis=1)
    out = _Run(layer, changed).vec.numpy()
    np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], rtol=1e-6,
                               atol=1e-6)
    assert not np.allclose(out[:, t + 1:], base[:, t + 1:])
  # Without causal, an earlier position does see the later ones.
  full = _Layer().Instantiate()
  changed = inputs.copy()
  changed.vec = tf.concat([inputs.vec[:, :1], _Normal([2, 4, D], 3)], axis=1)
  assert not np.allclose(_Run(full, changed).vec[:, 0],
                         _Run(full, inputs).vec[:, 0])


def test_padded_positions_do_not_change_other_outputs():
  layer = _Layer().Instantiate()
  inputs = _Inputs()
  noisy = inputs.copy()
  # Row 1's positions 3 and 4 are padded; give them other values.
  noise = _Normal([2, 5, D], 5) * 100.0 * inputs.paddings[..., None]
  noisy.vec = inputs.vec + noise
  base, out = _Run(layer, inputs).vec.numpy(), _Run(layer, noisy).vec.numpy()
  np.testing.assert_allclose(out[0], base[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out[1, :3], base[1, :3], rtol=1e-6, atol=1e-6)


def test_cross_attention():
  p = _Layer(causal=True, has_aux_atten=True)
  aux_paddings = tf.constant([[0, 0, 0, 1], [0, 0, 0, 0]], tf.float32)
  inputs = _Inputs(aux_vec=_Normal([2, 4, D], 2), aux_paddings=aux_paddings)
  layer, out = test_utils.CheckLayer(p, inputs)
  plain = transformer.TransformerLayer.NumParams(_Layer())
  attention_and_norm = 4 * D * D + 4 * D + 2 * D
  assert transformer.TransformerLayer.NumParams(p) == plain + attention_and_norm
  assert sorted(out) == ['aux_paddings', 'aux_vec', 'paddings', 'vec']
  meta = transformer.TransformerLayer.FPropMeta(p, inputs)
  assert meta.flops > transformer.TransformerLayer.FPropMeta(
      _Layer(causal=True), _Inputs()).flops
  # The decoder attends to the source: its unpadded positions matter ...
  changed = inputs.copy()
  changed.aux_vec = inputs.aux_vec + tf.one_hot([0, 0], 4)[..., None]
  assert not np.allclose(_Run(layer, changed).vec, out.vec)
  # ... and its padded ones do not.
  changed.aux_vec = inputs.aux_vec + 50.0 * aux_paddings[..., None]
  np.testing.assert_allclose(_Run(layer, changed).vec, out.vec, rtol=1e-6,
                             atol=1e-6)
  with pytest.raises(ValueError, match="the key 'aux_vec'"):
    layer.FPropDefaultTheta(_Inputs())
  with pytest.raises(ValueError, match="the key 'aux_vec'"):
    transformer.TransformerLayer.FPropMeta(p, _Inputs())


def test_unused_keys_pass_through_unchanged():
  layer = _Layer().Instantiate()
  labels = tf.constant([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]])
  extra = _Normal([2, 3], 9)
  inputs = _Inputs(labels=labels, extra=extra)
  out = _Run(layer, inputs)
  assert sorted(out) == ['extra', 'labels', 'paddings', 'vec']
  assert out.labels is labels and out.extra is extra
  assert out.paddings is inputs.paddings
  assert sorted(inputs) == sorted(out)  # the input map itself is not changed
  assert inputs.vec is not out.vec


def test_layer_errors():
  with pytest.raises(ValueError, match='model_dim and hidden_dim must be > 0'):
    _Layer(hidden_dim=0).Instantiate()
  with pytest.raises(ValueError, match=r'vec must be \[batch, time, 8\]'):
    transformer.TransformerLayer.FPropMeta(
        _Layer(), NestedMap(vec=[2, 5, 6], paddings=[2, 5]))
  with pytest.raises(ValueError, match="need the key 'vec'"):
    _Layer().Instantiate().FPropDefaultTheta(NestedMap(x=tf.zeros([2, 5, D])))


def _CheckpointKeys(layer, tmp_path):
  path = tf.train.Checkpoint(layer=layer).write(str(tmp_path / 'ckpt'))
  return sorted(k.split('/.ATTRIBUTES')[0] for k, _ in
                tf.train.list_variables(path) if k.startswith('layer/'))


def test_children_variables_and_checkpoint_keys_stay_named(tmp_path):
  # Checkpoints written before the layers declared children in ChildParams
  # restore: these names are those of the children made in __init__.
  layer = _Layer(name='tl', has_aux_atten=True).Instantiate()
  assert list(layer.children_layers) == ['self_atten', 'aux_atten', 'ffn']
  block = ['pre_norm.bias', 'pre_norm.scale'] + [
      f'sub.{proj}.{v}' for proj in ('key', 'post', 'query', 'value')
      for v in 'bw']
  assert sorted(v.name for v in layer.variables) == sorted(
      [f'tl.aux_atten.{n}:0' for n in block] +
      [f'tl.self_atten.{n}:0' for n in block] +
      [f'tl.ffn.{n}:0' for n in ('pre_norm.bias', 'pre_norm.scale',
                                 'sub.sub_0.b', 'sub.sub_0.w', 'sub.sub_2.b',
                                 'sub.sub_2.w')])
  keys = _CheckpointKeys(layer, tmp_path)
  assert keys[:2] == ['layer/aux_atten/pre_norm/_var_bias',
                      'layer/aux_atten/pre_norm/_var_scale']
  assert 'layer/ffn/sub/sub/2/_var_w' in keys
  emb = transformer.TransformerEmbedding.Params().Set(
      name='emb', vocab_size=VOCAB, model_dim=D).Instantiate()
  assert [v.name for v in emb.variables] == ['emb.token_emb.emb:0']
  assert list(emb.children_layers) == ['token_emb', 'dropout']
  assert _CheckpointKeys(emb, tmp_path) == ['layer/token_emb/_var_emb']
  softmax = transformer.TransformerSoftmax.Params().Set(
      name='sm', model_dim=D, vocab_size=VOCAB).Instantiate()
  assert _CheckpointKeys(softmax, tmp_path) == [
      'layer/final_norm/_var_bias', 'layer/final_norm/_var_scale',
      'layer/softmax/proj/_var_b', 'layer/softmax/proj/_var_w']
  no_norm = transformer.TransformerSoftmax.Params().Set(
      name='sm', model_dim=D, vocab_size=VOCAB, final_norm=False)
  assert list(no_norm.Instantiate().children_layers) == ['softmax']


# --- TransformerEmbedding ------------------------------------------------------


def _Ids(seed=1):
  return tf.random.stateless_uniform([2, 5], [seed, 3], 0, VOCAB, tf.int32)


def test_embedding():
  p = transformer.TransformerEmbedding.Params().Set(
      vocab_size=VOCAB, model_dim=D, keep_prob=0.9)
  labels = _Ids(2)
  inputs = NestedMap(ids=_Ids(), paddings=_PADDINGS, labels=labels)
  layer, out = test_utils.CheckLayer(p, inputs, training=True)
  assert transformer.TransformerEmbedding.NumParams(p) == VOCAB * D
  assert sorted(out) == ['labels', 'paddings', 'vec']  # ids consumed
  assert out.labels is labels
  out = _Run(layer, inputs)  # no dropout outside training
  emb = layer.vars.token_emb.emb.numpy()
  position = np.arange(5)[:, None]
  inv = 1e4 ** -(np.arange(D // 2) / (D // 2 - 1))
  signal = np.concatenate([np.sin(position * inv), np.cos(position * inv)], 1)
  expected = emb[inputs.ids.numpy()] * np.sqrt(D) + signal
  np.testing.assert_allclose(out.vec, expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='model_dim must be even'):
    p.Copy().Set(model_dim=7).Instantiate()


# --- TransformerSoftmax --------------------------------------------------------


def test_softmax_masks_xent_by_paddings():
  p = transformer.TransformerSoftmax.Params().Set(model_dim=D,
                                                  vocab_size=VOCAB)
  labels = _Ids(4)
  inputs = _Inputs(labels=labels)
  layer, out = test_utils.CheckLayer(p, inputs)
  assert transformer.TransformerSoftmax.NumParams(p) == (
      2 * D + D * VOCAB + VOCAB)
  assert sorted(out) == ['labels', 'logits', 'paddings', 'per_token_xent',
                         'weights']
  np.testing.assert_array_equal(out.weights, 1.0 - _PADDINGS)
  np.testing.assert_array_equal(out.per_token_xent.numpy()[1, 3:], 0.0)
  # Against the Softmax layer on the normalized vec, weighted by 1 - paddings.
  normed = layer.final_norm.FPropDefaultTheta(inputs.vec)
  ref = layer.softmax.FPropDefaultTheta(normed, labels, 1.0 - _PADDINGS)
  loss = transformer.XentLoss(out)
  np.testing.assert_allclose(loss.avg_xent, ref.avg_xent, rtol=1e-6)
  assert float(loss.total_weight) == 8.0
  # Without labels: logits only.
  _, no_labels = test_utils.CheckLayer(p, _Inputs())
  assert sorted(no_labels) == ['logits', 'paddings']


# --- a decoder-only LM, pipelined ------------------------------------------------


def _LmLayers(num_layers=4, keep_prob=1.0):
  layers = [transformer.TransformerEmbedding.Params().Set(
      name='emb', vocab_size=VOCAB, model_dim=D, keep_prob=keep_prob)]
  layers += [_Layer(name=f'layer{i}', causal=True,
                    residual_keep_prob=keep_prob, atten_keep_prob=keep_prob,
                    relu_keep_prob=keep_prob) for i in range(num_layers)]
  layers.append(transformer.TransformerSoftmax.Params().Set(
      name='softmax', model_dim=D, vocab_size=VOCAB))
  return layers


def _LmBatch(batch=4, length=6):
  ids = tf.random.stateless_uniform([batch, length + 1], [5, 5], 0, VOCAB,
                                    tf.int32)
  lengths = tf.constant([6, 4, 5, 2])
  return NestedMap(ids=ids[:, :-1], labels=ids[:, 1:],
                   paddings=1.0 - tf.sequence_mask(lengths, length, tf.float32))


def _LossAndGrads(fn, pipe, inputs):
  with base_layer.Context(training=True, step=3):
    with tf.GradientTape() as tape:
      loss = transformer.XentLoss(fn(pipe.theta, inputs)).avg_xent
    grads = tape.gradient(loss, pipe.trainable_variables)
  # The embedding's gradient is IndexedSlices (from its gather); compare dense.
  return loss, [tf.convert_to_tensor(g) for g in grads]


@pytest.mark.parametrize('keep_prob', [1.0, 0.8])
def test_pipelined_lm_equals_sequential(keep_prob):
  layers = _LmLayers(keep_prob=keep_prob)
  inputs = _LmBatch()
  p = pipelining_layer.PipeliningLayer.Params().Set(
      name='lm', layers=layers, num_partitions=2, num_micro_batches=2,
      partition_method='flops', input_shapes=[inputs],
      devices=['/device:CPU:0', '/device:CPU:1'])
  pipe = p.Instantiate()
  assert len(pipe.cells) == 2
  assert sum(pipe.CellBalance(p)) == len(layers)
  assert pipelining_layer.PipeliningLayer.NumParams(p) == (
      test_utils.CountTrainable(pipe))
  loss, grads = _LossAndGrads(pipe.FProp, pipe, inputs)
  ref_loss, ref_grads = _LossAndGrads(
      lambda theta, x: test_utils.SequentialReference(pipe, x, [2, 2], theta),
      pipe, inputs)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert len(grads) == len(ref_grads) == len(pipe.trainable_variables)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
  # Labels and paddings travelled through both cells with their micro-batch.
  with base_layer.Context(training=True, step=3):
    out = pipe.FPropDefaultTheta(inputs)
  np.testing.assert_array_equal(out.labels, inputs.labels)
  np.testing.assert_array_equal(out.paddings, inputs.paddings)
  assert out.logits.shape == [4, 6, VOCAB]


# --- GPipe Table 1 ----------------------------------------------------------------

_TABLE_1 = [(3, 282.2e6), (13, 785.8e6), (103, 5.3e9), (415, 21.0e9),
            (1663, 83.9e9)]


def test_gpipe_table_1_transformer_l_parameter_counts():
  """GPipe (Huang et al. 2019) Table 1, Transformer-L, within 1%.

  d_model 2048, d_ff 8192, 32 heads, vocabulary 32000, untied input embedding
  and softmax. The straightforward pre-LN block, counted exactly, matches
  every column to 0.03% or better, with nothing added:
    block   = attention 4·d² + 4·d + FFN 2·d·d_ff + d_ff + d + 2 LayerNorms 4·d
            = 50,358,272
    outside = embedding 32000·d + softmax d·32000 + 32000 + final LN 2·d
            = 131,108,096
  L = 3: 282,182,912 (paper 282.2M); 13: 785,765,632 (785.8M);
  103: 5,318,010,112 (5.3B); 415: 21,029,790,976 (21.0B);
  1663: 83,876,914,432 (83.9B).
  So the paper counted decoder-only blocks (self-attention + FFN) with no
  learned position embeddings (sinusoids have no parameters). Blocks with
  cross-attention (67,147,776 each) would give 332.6M at L = 3, 18% over, so
  L does not count decoder layers of an encoder-decoder model.
  """
  block = _Layer(model_dim=2048, hidden_dim=8192, num_heads=32, causal=True)
  for num_layers, paper in _TABLE_1:
    p = combinators.Sequential.Params().Set(name='lm', sub=[
        transformer.TransformerEmbedding.Params().Set(vocab_size=32000,
                                                      model_dim=2048),
        repeat.Repeat.Params().Set(sub=block, num=num_layers),
        transformer.TransformerSoftmax.Params().Set(model_dim=2048,
                                                    vocab_size=32000)])
    ours = combinators.Sequential.NumParams(p)
    assert ours == 50_358_272 * num_layers + 131_108_096
    assert abs(ours - paper) / paper < 0.01, (num_layers, ours, paper)
