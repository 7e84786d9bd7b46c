"""The tiny registered configs train: a few steps through a 2-stage pipeline lower the loss.

Each config is looked up by name, its task built on two logical CPU devices
(one per pipeline cell), and fed batches from its own input generator.
"""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe import model_registry
from lingvo_gpipe.core import base_layer


def _TrainSteps(name, num_steps, learning_rate, traced=True):
  params = model_registry.GetParams(name)
  network = params.task.network
  assert network.pipeline.num_partitions == 2
  network.pipeline.devices = ['/device:CPU:0', '/device:CPU:1']
  task = params.task.Instantiate()
  assert len(task.network.pipeline.cells) == 2
  batch = next(iter(params.input.Instantiate().Dataset(
      params.input.train_split, training=True)))
  optimizer = tf.keras.optimizers.Adam(learning_rate)
  variables = task.trainable_variables

  def Step(step):
    with base_layer.Context(training=True, step=step):
      with tf.GradientTape() as tape:
        loss = task.FPropDefaultTheta(batch).loss[0]
      optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  step_fn = tf.function(Step) if traced else Step
  return [float(step_fn(tf.constant(i, tf.int64))) for i in range(num_steps)]


@pytest.mark.heavy
def test_amoebanet_tiny_on_digits_learns():
  # Eager: tracing this pipeline (36k graph ops) costs more than a few steps.
  losses = _TrainSteps('image.digits.AmoebaNetTiny', 5, 3e-3, traced=False)
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.heavy
def test_transformer_tiny_on_synthetic_copy_learns():
  losses = _TrainSteps('mt.synthetic.TransformerTiny', 8, 3e-3)
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.8 * losses[0], losses
