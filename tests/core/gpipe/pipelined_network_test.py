"""Tests of PipelinedNetwork: fields in, a pipelined flat layer list out."""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core.gpipe import pipelined_network
from lingvo_gpipe.core.layers import dense
from tests.support import test_utils


class _Mlp(pipelined_network.PipelinedNetwork):

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('num_layers', 4, 'Layers.')
    p.Define('dim', 6, 'Width.')
    return p

  @classmethod
  def Layers(cls, p):
    return [dense.Dense.Params().Set(name=f'fc{i}', input_dim=p.dim,
                                     output_dim=p.dim)
            for i in range(p.num_layers)]

  @classmethod
  def DefaultInputShapes(cls, p):
    return [[1, p.dim]]


def _Params(**kw):
  p = _Mlp.Params().Set(**kw)
  p.pipeline.Set(num_partitions=2, num_micro_batches=2,
                 devices=['/device:CPU:0', '/device:CPU:1'])
  return p


def test_fields_drive_the_layers_and_sizes():
  p = _Params()
  hyperparams.ApplyOverrides(p, 'num_layers=6; pipeline.num_micro_batches=3')
  net, y = test_utils.CheckLayer(p, tf.ones([6, 6]))
  assert len(net.pipeline.params.layers) == 6
  assert net.pipeline.params.num_micro_batches == 3
  assert [c.num_layers for c in net.Report().cells] == [3, 3]
  np.testing.assert_allclose(
      y, net.pipeline.FPropDefaultTheta(tf.ones([6, 6])))


def test_cost_partitioning_uses_default_input_shapes():
  p = _Params()
  p.pipeline.partition_method = 'flops'
  pipe = _Mlp.PipelineParams(p)
  assert pipe.input_shapes == [[1, 6]]
  assert pipe.name == 'pipeline'


def test_layers_in_the_template_are_rejected():
  p = _Params()
  p.pipeline.layers = _Mlp.Layers(p)
  with pytest.raises(ValueError, match='filled from the network fields'):
    p.Instantiate()
