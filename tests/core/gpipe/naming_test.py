"""A PipeliningLayer's layers are named by layer, not by cell: the same at any K.

GPipe never changes the model, so the cut must not change what identifies its
weights: variable names (optimizer slots are keyed by them), layer paths
(they seed initial weights and dropout masks) and checkpoint keys. Then a
checkpoint written at one K restores at another.
"""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe import pipelining_layer
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.layers import dropout
from lingvo_gpipe.core.layers import normalization

PipeliningLayer = pipelining_layer.PipeliningLayer

_KS = (1, 2, 3)


def _Layers():
  """Dense layers with BatchNorm (non-trainable state) and dropout (masks)."""
  return [
      dense.Dense.Params().Set(name='fc0', input_dim=5, output_dim=6),
      normalization.BatchNorm.Params().Set(name='bn0', dim=6),
      dropout.Dropout.Params().Set(name='drop', keep_prob=0.6),
      dense.Dense.Params().Set(name='fc1', input_dim=6, output_dim=6),
      normalization.BatchNorm.Params().Set(name='bn1', dim=6),
      dense.Dense.Params().Set(name='out', input_dim=6, output_dim=2,
                               activation='none'),
  ]


def _Pipeline(k, m=2):
  return PipeliningLayer.Params().Set(
      name='pipe', layers=_Layers(), num_partitions=k, num_micro_batches=m,
      devices=[f'/device:CPU:{i}' for i in range(k)]).Instantiate()


def _CheckpointKeys(pipe, directory):
  path = tf.train.Checkpoint(pipe=pipe).save(str(directory / 'ckpt'))
  return sorted(name for name, _ in tf.train.list_variables(path)
                if name != '_CHECKPOINTABLE_OBJECT_GRAPH')


def test_names_initial_values_and_checkpoint_keys_do_not_depend_on_k(tmp_path):
  pipes = {k: _Pipeline(k) for k in _KS}
  assert [len(pipes[k].cells) for k in _KS] == list(_KS)
  names = {k: [v.name for v in pipes[k].variables] for k in _KS}
  keys = {k: _CheckpointKeys(pipes[k], tmp_path / f'k{k}') for k in _KS}
  for k in _KS:
    assert names[k] == names[1], k
    assert keys[k] == keys[1], k
    for a, b in zip(pipes[k].variables, pipes[1].variables):
      np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert 'pipe.layers_5.w:0' in names[1]
  assert not [n for n in names[1] + keys[1] if 'cell' in n]


def test_layers_sit_on_their_cells_devices():
  pipe = _Pipeline(3)
  for k, cell in enumerate(pipe.cells):
    assert cell.vars.Flatten()
    for v in cell.vars.Flatten():
      assert v.device.endswith(f'CPU:{k}'), (k, v.name, v.device)


def test_dropout_masks_do_not_depend_on_k():
  x = tf.random.stateless_normal([6, 5], [3, 1])
  outputs = []
  for k in _KS:
    with base_layer.Context(training=True, step=4):
      outputs.append(_Pipeline(k, m=3).FPropDefaultTheta(x).numpy())
  for y in outputs[1:]:
    np.testing.assert_allclose(y, outputs[0], rtol=1e-6)


def test_a_checkpoint_saved_at_k2_restores_at_k3(tmp_path):
  two = _Pipeline(2)
  for i, v in enumerate(two.variables):
    v.assign(v + float(i + 1))  # values no fresh build has
  path = tf.train.Checkpoint(pipe=two).save(str(tmp_path / 'ckpt'))
  three = _Pipeline(3)
  tf.train.Checkpoint(pipe=three).restore(path).assert_consumed()
  assert len(two.variables) == len(three.variables)
  for a, b in zip(two.variables, three.variables):
    assert a.name == b.name
    np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize('k', [1, 2, 3])
def test_cell_theta_runs_each_cell(k):
  """Running cells[k] on CellTheta(theta, k) in turn is the layer's math."""
  pipe = _Pipeline(k, m=1)
  x = tf.random.stateless_normal([4, 5], [5, k])
  y = x
  for j, cell in enumerate(pipe.cells):
    y = cell.FProp(pipe.CellTheta(pipe.theta, j), y)
  np.testing.assert_allclose(pipe.FPropDefaultTheta(x), y, rtol=1e-6)


def test_cell_tpl_cells_are_the_model_and_keep_their_names(tmp_path):
  cell_tpl = [dense.Dense.Params().Set(input_dim=3, output_dim=3)
              for _ in range(2)]
  pipe = PipeliningLayer.Params().Set(
      name='pipe', cell_tpl=cell_tpl,
      devices=['/device:CPU:0', '/device:CPU:1']).Instantiate()
  assert [v.name for v in pipe.variables] == [
      'pipe.cell_0.b:0', 'pipe.cell_0.w:0', 'pipe.cell_1.b:0', 'pipe.cell_1.w:0']
  assert _CheckpointKeys(pipe, tmp_path)[0].startswith('pipe/cell_0/')
  assert pipe.CellTheta(pipe.theta, 1).w is pipe.cell_1.theta.w
