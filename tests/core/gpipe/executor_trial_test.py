"""Tests of the executor trial: the loop first, the unrolled graph tried, the faster kept, same numbers."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe import executor_choice
from lingvo_gpipe.core.gpipe import executor_trial
from lingvo_gpipe.core.gpipe.pipelining_layer import PipeliningLayer
from lingvo_gpipe.core.layers import dense

_DEVICES = [f'/device:CPU:{k}' for k in range(4)]
_X = tf.random.stateless_normal([8, 8], [1, 2])


def _Pipeline(**kwargs):
  tf.keras.utils.set_random_seed(3)
  layers = [dense.Dense.Params().Set(name=f'fc{i}', input_dim=8, output_dim=8)
            for i in range(4)]
  return PipeliningLayer.Params().Set(
      name='pipe', layers=layers, num_partitions=2, num_micro_batches=4,
      devices=_DEVICES, **kwargs).Instantiate()


def _TrainingStep(pipe):
  """A Python step: the loss, its gradients, and an SGD update of the weights."""

  def Step():
    with base_layer.Context(training=True, step=1):
      with tf.GradientTape() as tape:
        loss = tf.reduce_sum(pipe.FPropDefaultTheta(_X) ** 2)
    grads = tape.gradient(loss, pipe.trainable_variables)
    for variable, grad in zip(pipe.trainable_variables, grads):
      variable.assign_sub(0.01 * grad)
    return loss

  return Step


def _Clock(durations):
  """A fake timer: each call's (start, end) apart by the next duration."""
  times = itertools.accumulate(
      itertools.chain.from_iterable((0.0, d) for d in durations))
  return lambda: next(times)


def _HasLoop(function) -> bool:
  return any(op.type in ('While', 'StatelessWhile')
             for concrete in function._list_all_concrete_functions()  # pylint: disable=protected-access
             for op in concrete.graph.get_operations())


# The calls of a trial with warmup_steps=1 and steps=2, by what they are.
_PHASES = [('loop', 'trace'), ('loop', 'warmup'), ('unrolled', 'build'),
           ('unrolled', 'warmup'), ('loop', 'timed'), ('unrolled', 'timed'),
           ('loop', 'timed'), ('unrolled', 'timed')]


@pytest.mark.parametrize('loop_time,unrolled_time,kept', [
    (2.0, 1.0, 'unrolled'), (1.0, 3.0, 'loop')])
def test_the_trial_keeps_the_faster_with_the_numbers_of_one_executor(
    loop_time, unrolled_time, kept):
  reference = tf.function(_TrainingStep(_Pipeline(executor='unrolled')))
  expected = [float(reference()) for _ in range(11)]
  pipe = _Pipeline()
  durations = [9.0, 1.0, 7.0, 1.0] + [loop_time, unrolled_time] * 2 + [1.0] * 3
  decisions, traced = [], []
  trial = executor_trial.ExecutorTrial(
      _TrainingStep(pipe), steps=2, timer=_Clock(durations),
      on_decision=decisions.append, on_trace=traced.append)
  losses, ran = [], []
  for _ in range(11):
    ran.append(trial._Phase())  # pylint: disable=protected-access
    losses.append(float(trial()))
    if len(ran) == 1:  # the loop first, although the graph is small
      assert pipe.executor_choice.executor == 'loop'
      assert 'the executor trial runs the loop' in (
          pipe.executor_choice.reason)
  assert ran == _PHASES + [(kept, 'kept')] * 3
  assert traced == ['loop', 'unrolled']
  np.testing.assert_allclose(losses, expected, rtol=1e-5)
  assert decisions == [trial.decision]
  decision = trial.decision
  assert (decision.executor, decision.loop_step, decision.unrolled_step,
          decision.unrolled_build, decision.steps) == (
              kept, loop_time, unrolled_time, 7.0, 2)
  assert 'at most max_unrolled_ops=20000' in decision.switched[0]
  text = decision.Text()
  assert f'Keeping the {kept} executor' in text
  assert f'{max(loop_time, unrolled_time) / min(loop_time, unrolled_time):.2f}x' in text
  assert not trial.trying
  assert _HasLoop(trial.function) == (kept == 'loop')


def test_the_build_and_trace_calls_are_flagged_as_traced():
  trial = executor_trial.ExecutorTrial(_TrainingStep(_Pipeline()), steps=1)
  flags = []
  for _ in range(6):
    trial()
    flags.append(trial.last_call_traced)
  assert flags == [True, False, True, False, False, False]


@pytest.mark.parametrize('kwargs,reason', [
    (dict(max_unrolled_ops=0), 'more than max_unrolled_ops=0'),
    (dict(executor='unrolled'), None),
    (dict(executor='loop'), None),
    (dict(batch_dim=1), 'not batch_dim=1'),
])
def test_with_nothing_to_switch_one_graph_runs_and_nothing_is_tried(
    kwargs, reason):
  pipe = _Pipeline(**kwargs)
  if kwargs.get('batch_dim'):
    x = tf.ones([2, 8, 8])
    step = lambda: tf.reduce_sum(pipe.FPropDefaultTheta(x))
  else:
    step = _TrainingStep(pipe)
  trial = executor_trial.ExecutorTrial(step, steps=1, timer=_Clock([1.0] * 8))
  for _ in range(8):
    trial()
  assert trial.decision is None and not trial.trying
  assert not trial.last_call_traced
  if reason:
    assert reason in pipe.executor_choice.reason
  # One candidate was ever traced: no unrolled graph was built beside it.
  traced = [name for name, function in trial._candidates.items()  # pylint: disable=protected-access
            if function._list_all_concrete_functions()]  # pylint: disable=protected-access
  assert traced == ['loop']


def test_loop_first_switches_only_small_pipelines_and_says_which():
  small, large = _Pipeline(), _Pipeline(max_unrolled_ops=0)
  with executor_choice.LoopFirst() as switched:
    tf.function(lambda: small.FPropDefaultTheta(_X)).get_concrete_function()
    tf.function(lambda: large.FPropDefaultTheta(_X)).get_concrete_function()
  assert [c.executor for c in switched] == ['loop']
  assert switched[0] == small.executor_choice
  assert large.executor_choice.executor == 'loop'
  assert 'trial' not in large.executor_choice.reason
  # Outside, 'auto' chooses by size again.
  tf.function(lambda: small.FPropDefaultTheta(_X)).get_concrete_function()
  assert small.executor_choice.executor == 'unrolled'


@pytest.mark.parametrize('steps', [0, -1, 1.5, True, '3'])
def test_a_bad_number_of_steps_is_refused_by_name(steps):
  with pytest.raises(ValueError, match=r'ExecutorTrial steps=.*at least 1'):
    executor_trial.ExecutorTrial(lambda: None, steps=steps)


def test_a_decided_trial_runs_that_candidate_only():
  pipe = _Pipeline()
  trial = executor_trial.ExecutorTrial(_TrainingStep(pipe), steps=1,
                                       decided='loop')
  for _ in range(4):
    trial()
  assert trial.decision is None and not trial.trying
  assert list(trial._candidates) == ['loop']  # pylint: disable=protected-access
  assert pipe.executor_choice.executor == 'loop'
  with pytest.raises(ValueError, match="decided='fast': give 'loop'"):
    executor_trial.ExecutorTrial(lambda: None, steps=1, decided='fast')


@pytest.mark.heavy  # TensorFlow's allocator retries for 10 s before its OOM
def test_an_unrolled_graph_out_of_memory_keeps_the_loop_and_the_run_goes_on():
  pipe = _Pipeline()
  calls = tf.Variable(0)
  # 2**40 floats, 4 TiB: more than this host has, refused by the allocator
  # when the step runs (a size read from a variable is not folded).
  too_many = tf.Variable(2**40, dtype=tf.int64)

  def Step():
    calls.assign_add(1)
    loss = _TrainingStep(pipe)()
    if pipe.executor_choice.executor == 'unrolled':  # traced unrolled
      loss += tf.reduce_sum(tf.zeros(tf.reshape(too_many, [1])))
    return loss

  trial = executor_trial.ExecutorTrial(Step, steps=2)
  losses = [float(trial()) for _ in range(6)]
  assert np.all(np.isfinite(losses))
  decision = trial.decision
  assert decision.executor == 'loop'
  assert decision.failure.startswith('out of memory')
  assert 'could not run a step' in decision.Text()
  assert list(trial._candidates) == ['loop']  # pylint: disable=protected-access
  # The build's step failed and ran again on the loop: one call more.
  assert int(calls.numpy()) == 7


def test_tracing_first_switches_as_the_first_call_would():
  pipe = _Pipeline()
  trial = executor_trial.ExecutorTrial(_TrainingStep(pipe), steps=1)
  traced = trial.Trace()
  assert any(op.type in ('While', 'StatelessWhile')
             for op in traced.graph.get_operations())
  phases = []
  for _ in range(6):
    phases.append(trial._Phase())  # pylint: disable=protected-access
    trial()
  assert phases[:4] == _PHASES[:4] and trial.decision is not None
  with pytest.raises(ValueError, match='the first call has traced it'):
    trial.Trace()
