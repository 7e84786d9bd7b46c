"""Tests of the Transformer LM: GPipe Table 1 sizes from Params, and LmTask."""


import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe import pipelining_layer
from lingvo_gpipe.core.nested_map import NestedMap
from tasks.lm import model

PipeliningLayer = pipelining_layer.PipeliningLayer

# (L, parameters in GPipe Table 1, exact count: see transformer_test.py's
# test_gpipe_table_1_transformer_l_parameter_counts for the arithmetic).
_TABLE_1 = [(3, 282.2e6), (13, 785.8e6), (103, 5.3e9), (415, 21.0e9),
            (1663, 83.9e9)]


def test_transformer_l_matches_gpipe_table_1():
  for num_layers, paper in _TABLE_1:
    p = model.TransformerLParams(num_layers, num_partitions=4)
    ours = model.TransformerLm.NumParams(p)
    assert ours == 50_358_272 * num_layers + 131_108_096
    assert abs(ours - paper) / paper < 0.01, (num_layers, ours, paper)
    assert p.num_layers == num_layers
    pipe = model.TransformerLm.PipelineParams(p)
    assert len(pipe.layers) == 3  # emb, a Repeat of the blocks, softmax
    assert pipe.layers[1].num == num_layers
    listed = model.TransformerLm.PipelineParams(
        p.Copy().Set(stack_layers=False))
    assert len(listed.layers) == num_layers + 2
    assert model.TransformerLm.NumParams(
        p.Copy().Set(stack_layers=False)) == ours
  assert pipe.layers[1].inline_body  # the default: the fastest steps
  out_of_line = model.TransformerLm.PipelineParams(
      p.Copy().Set(inline_stacked_body=False))
  assert not out_of_line.layers[1].inline_body
  block = pipe.layers[1].sub
  assert (block.model_dim, block.hidden_dim, block.num_heads,
          block.causal) == (2048, 8192, 32, True)
  assert pipe.layers[0].vocab_size == pipe.layers[-1].vocab_size == 32000
  # 4 cells of nearly equal size, by parameter count: the Repeat counts as
  # its 1663 blocks and is cut between them.
  balance = PipeliningLayer.CellBalance(pipe)
  assert sum(balance) == 1665 and max(balance) - min(balance) <= 2


def test_lm_task_metrics_pipelined():
  vocab = 9
  network = model.TransformerLmParams(
      vocab_size=vocab, model_dim=8, num_heads=2, hidden_dim=16, num_layers=2,
      dropout=0.1, num_partitions=2, num_micro_batches=2,
      devices=['/device:CPU:0', '/device:CPU:1'])
  task = model.LmTask.Params().Set(name='lm', network=network).Instantiate()
  assert len(task.network.pipeline.cells) == 2
  ids = tf.random.stateless_uniform([4, 6], [1, 1], 1, vocab, tf.int32)
  paddings = 1.0 - tf.sequence_mask([6, 5, 3, 1], 6, tf.float32)
  batch = NestedMap(ids=ids, labels=tf.roll(ids, -1, axis=1),
                    paddings=paddings)
  with base_layer.Context(training=True):
    out = task.FPropDefaultTheta(batch)
  assert sorted(out) == ['log_pplx', 'loss', 'token_accuracy']
  for name, (value, weight) in out.items():
    assert np.isfinite(value), name
    assert float(weight) == 15.0, name
  # Near a uniform guess at initialization.
  assert abs(float(out.log_pplx[0]) - np.log(vocab)) < 1.5


def test_params_errors():
  with pytest.raises(ValueError, match='num_layers must be >= 1'):
    model.TransformerLm.NumParams(model.TransformerLParams(0))
  with pytest.raises(ValueError, match='dropout is 1.5'):
    model.TransformerLParams(3, dropout=1.5).Instantiate()
