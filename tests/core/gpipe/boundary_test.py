"""What crosses a cell boundary is what passes between two layers of a Sequential.

Each case is one a new user hit: a cut that changed the model, or a wrong
answer without an error. Both executors, local logical CPU devices.
"""

import re

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe.pipelining_layer import PipeliningLayer
from lingvo_gpipe.core.layers import combinators
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.nested_map import NestedMap

_DEVICES = [f'/device:CPU:{k}' for k in range(4)]
_EXECUTORS = ['unrolled', 'loop']


class _Pair(base_layer.BaseLayer):
  """Returns a tuple: (x · w, x + 1)."""

  def __init__(self, params):
    super().__init__(params)
    self.CreateChild('fc', dense.Dense.Params().Set(input_dim=2,
                                                    output_dim=2))

  def FProp(self, theta, x):
    return self.fc.FProp(theta.fc, x), x + 1.


class _Sum(base_layer.BaseLayer):
  """Takes two positional arguments."""

  def __init__(self, params):
    super().__init__(params)
    self.CreateChild('fc', dense.Dense.Params().Set(input_dim=2,
                                                    output_dim=2))

  def FProp(self, theta, x, y):
    return self.fc.FProp(theta.fc, x) * y


class _OneTuple(base_layer.BaseLayer):
  """Takes one argument that is a tuple, as a Sequential hands it over."""

  def FProp(self, theta, pair):
    x, y = pair
    return x - y


class _Padded(base_layer.BaseLayer):
  """Dense on `vec`; whatever `paddings` is passes through."""

  def __init__(self, params):
    super().__init__(params)
    self.CreateChild('fc', dense.Dense.Params().Set(input_dim=2,
                                                    output_dim=2))

  def FProp(self, theta, inputs):
    return NestedMap(vec=self.fc.FProp(theta.fc, inputs.vec),
                     paddings=inputs.paddings)


class _WithAux(base_layer.BaseLayer):
  """Activations and a scalar auxiliary loss."""

  def FProp(self, theta, x):
    return x, tf.reduce_sum(x)


class _Doubles(base_layer.BaseLayer):
  """Returns twice the rows it gets."""

  def FProp(self, theta, x):
    return tf.concat([x, x], axis=0)


class _Count(base_layer.BaseLayer):
  """Returns a Python int beside the activations."""

  def FProp(self, theta, x):
    return x, 3


def _Pipe(layers, executor, **kwargs):
  return PipeliningLayer.Params().Set(
      name='pipe', layers=layers, devices=_DEVICES, executor=executor,
      **kwargs).Instantiate()


def _Sequential(layers, pipe):
  """The same layers in a Sequential, with the pipeline's weights."""
  seq = combinators.Sequential.Params().Set(name='seq',
                                            sub=layers).Instantiate()
  for mine, theirs in zip(tf.nest.flatten(seq.theta.sub),
                          tf.nest.flatten(pipe.theta.layers)):
    mine.assign(theirs)
  return seq


def _LossAndGrads(layer, *inputs):
  """Loss and gradients of all variables and of the float inputs."""

  @tf.function
  def Step():
    with base_layer.Context(training=True):
      with tf.GradientTape() as tape:
        tape.watch(inputs)
        out = layer.FPropDefaultTheta(*inputs)
        loss = tf.add_n([tf.reduce_sum(t ** 2)
                         for t in tf.nest.flatten(out) if t is not None])
    return loss, tape.gradient(loss, list(layer.trainable_variables) +
                               list(inputs))

  return Step()


def _X(batch=6):
  return tf.reshape(tf.range(2. * batch), [batch, 2]) / 10.


def _AssertSame(got, want):
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('executor', _EXECUTORS)
@pytest.mark.parametrize('balance', [[2], [1, 1]])
def test_a_tuple_spreads_over_the_next_layers_arguments_at_any_cut(
    executor, balance):
  layers = [_Pair.Params().Set(name='pair'), _Sum.Params().Set(name='sum')]
  pipe = _Pipe(layers, executor, balance=balance, num_micro_batches=3)
  _AssertSame(_LossAndGrads(pipe, _X()),
              _LossAndGrads(_Sequential(layers, pipe), _X()))


@pytest.mark.parametrize('executor', _EXECUTORS)
@pytest.mark.parametrize('k', [1, 2])
def test_positional_inputs_reach_the_first_layer_as_positional_arguments(
    executor, k):
  layers = [_Sum.Params().Set(name='sum'), _Pair.Params().Set(name='pair')]
  pipe = _Pipe(layers, executor, num_partitions=k, num_micro_batches=2)
  x, y = _X(), _X() + 1.
  _AssertSame(_LossAndGrads(pipe, x, y),
              _LossAndGrads(_Sequential(layers, pipe), x, y))


@pytest.mark.parametrize('executor', _EXECUTORS)
def test_one_tuple_argument_stays_one_argument_as_in_a_sequential(executor):
  layers = [_OneTuple.Params().Set(name='one')]
  pipe = _Pipe(layers, executor, num_micro_batches=2)
  pair = (_X(), _X() * 3.)
  np.testing.assert_allclose(pipe.FPropDefaultTheta(pair),
                             _Sequential(layers, pipe).FPropDefaultTheta(pair))


@pytest.mark.parametrize('executor', _EXECUTORS)
@pytest.mark.parametrize('k', [1, 2])
def test_a_none_leaf_passes_through_untouched(executor, k):
  layers = [_Padded.Params().Set(name=f'p{i}') for i in range(2)]
  pipe = _Pipe(layers, executor, num_partitions=k, num_micro_batches=3)
  inputs = NestedMap(vec=_X(), paddings=None)
  out = pipe.FPropDefaultTheta(inputs)
  assert out.paddings is None
  seq = _Sequential(layers, pipe)
  want = seq.FPropDefaultTheta(inputs)
  np.testing.assert_allclose(out.vec, want.vec, rtol=1e-6)

  @tf.function
  def Grads(layer):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(layer.FPropDefaultTheta(inputs).vec ** 2)
    return tape.gradient(loss, layer.trainable_variables)

  for g, w in zip(Grads(pipe), Grads(seq)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('executor', _EXECUTORS)
def test_a_scalar_output_is_refused_by_its_path_and_shape(executor):
  pipe = _Pipe([_WithAux.Params().Set(name='aux')], executor,
                num_micro_batches=2)
  with pytest.raises(ValueError, match=re.escape(
      'cell_0: layers pipe/layers_0: outputs[1] has shape (), no batch '
      'dimension 0')):
    pipe.FPropDefaultTheta(_X())


@pytest.mark.parametrize('executor', _EXECUTORS)
def test_a_python_value_in_the_outputs_is_refused_by_its_path(executor):
  pipe = _Pipe([_Count.Params().Set(name='count')], executor,
               num_micro_batches=2)
  with pytest.raises(ValueError, match=re.escape(
      'outputs[1] is a int (3), not a tensor')):
    pipe.FPropDefaultTheta(_X())


@pytest.mark.parametrize('executor', _EXECUTORS)
def test_a_cell_that_changes_the_batch_size_is_refused_when_traced(executor):
  # It once came back silently reordered: [0, 2, 0, 2, 4, 6, 4, 6] where the
  # plain model gives [0, 2, 4, 6, 0, 2, 4, 6].
  pipe = _Pipe([dense.Dense.Params().Set(name='fc', input_dim=2,
                                         output_dim=2),
                _Doubles.Params().Set(name='doubles')], executor,
               num_partitions=2, num_micro_batches=2)
  with pytest.raises(ValueError, match=re.escape(
      'cell_1: layers pipe/layers_1: received a micro-batch of 3 rows '
      '(dimension 0) and returned 6 in outputs')):
    pipe.FPropDefaultTheta(_X())


def test_a_batch_change_the_trace_cannot_see_fails_when_it_runs():
  # The loop executor traces cells on ragged micro-batches (7 = 4 + 3) with
  # the batch size unknown: the check runs with the step.
  pipe = _Pipe([_Doubles.Params().Set(name='doubles')], 'loop',
               num_micro_batches=2)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=re.escape('cell_0: layers pipe/layers_0: '
                                     'returned another number of rows in '
                                     'outputs (dimension 0)')):
    tf.function(pipe.FPropDefaultTheta)(_X(7))
