"""Every registered tiny config computes the same loss and gradients at any cut,
and with its loss inside the pipeline.

GPipe's promise, checked on the models users run first: the config's task at
K=1 (one cell) and at K=2 (the partitioner's cut), the same micro-batches,
the same batch, the same weights (named by layer, so equal at any K).
Stacked Repeat weights cut into pieces at K=2 are compared whole.
"""

import collections

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe import experiment
from lingvo_gpipe import model_registry
from lingvo_gpipe.core import base_layer

_DEVICES = ['/device:CPU:0', '/device:CPU:1']


def _TinyModels():
  return [name for name in model_registry.ListModels()
          if 'Tiny' in name or name.startswith('example.')]


def test_there_are_tiny_configs_to_check():
  assert len(_TinyModels()) >= 3, _TinyModels()


def _LossAndGrads(name, num_partitions, loss_inside_pipeline=False):
  params = model_registry.GetParams(name)
  params.task.loss_inside_pipeline = loss_inside_pipeline
  template = experiment.PipelineTemplate(params)
  template.Set(num_partitions=num_partitions, balance=None, devices=_DEVICES)
  batch = next(iter(params.input.Instantiate().Dataset('train',
                                                       training=False)))
  task = params.task.Instantiate()
  variables = task.trainable_variables

  @tf.function
  def Step():
    with base_layer.Context(training=True, step=3):
      with tf.GradientTape() as tape:
        loss = task.FPropDefaultTheta(batch).loss[0]
    return loss, tape.gradient(loss, variables)

  loss, grads = Step()
  # A stacked weight cut into pieces: its pieces' gradients, concatenated.
  pieces = collections.defaultdict(list)
  for v, g in zip(variables, grads):
    owner = getattr(v, 'stacked_owner', None)
    key, index = (owner[0].name, owner[1]) if owner else (v.name, 0)
    pieces[key].append((index, np.asarray(tf.convert_to_tensor(g))))
  return float(loss), {key: np.concatenate([g for _, g in sorted(parts)])
                       if len(parts) > 1 else parts[0][1]
                       for key, parts in pieces.items()}


@pytest.mark.parametrize('name', _TinyModels())
def test_loss_and_gradients_do_not_depend_on_the_cut(name):
  loss_1, grads_1 = _LossAndGrads(name, 1)
  loss_2, grads_2 = _LossAndGrads(name, 2)
  np.testing.assert_allclose(loss_2, loss_1, rtol=1e-6)
  assert sorted(grads_2) == sorted(grads_1)
  for key, g in grads_1.items():
    np.testing.assert_allclose(grads_2[key], g, rtol=1e-4, atol=1e-6,
                               err_msg=key)


@pytest.mark.parametrize('name', _TinyModels())
def test_the_loss_inside_the_pipeline_computes_the_same(name):
  # Each micro-batch's metrics on the last cell, combined by weight
  # (pipelined_loss.py), against the task's metrics of the whole batch.
  loss, grads = _LossAndGrads(name, 2)
  inside_loss, inside_grads = _LossAndGrads(name, 2, loss_inside_pipeline=True)
  np.testing.assert_allclose(inside_loss, loss, rtol=1e-5)
  assert sorted(inside_grads) == sorted(grads)
  for key, g in grads.items():
    np.testing.assert_allclose(inside_grads[key], g, rtol=1e-4, atol=1e-6,
                               err_msg=key)
