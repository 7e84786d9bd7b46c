"""TrainProgram in-process: exact resume, a non-finite step that changes nothing, no autograph."""

import logging

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe import experiment
from lingvo_gpipe import logdir as logdir_lib
from lingvo_gpipe import train_program
from lingvo_gpipe.core import checkpoint as checkpoint_lib
from lingvo_gpipe.core import replicas as replicas_lib
from lingvo_gpipe.core import summary

_TOY = 'example.toy.ToyRegression'


def _Program(logdir, override=''):
  params = experiment.Resolve(experiment.Settings(
      model=_TOY, params_override='train.save_interval_steps=3; '
      'train.log_interval_steps=2; input.shuffle_buffer=64; ' + override))
  experiment.SetDevices(params, ['/device:CPU:0', '/device:CPU:1'])
  return train_program.TrainProgram(params, str(logdir),
                                    params.task.Instantiate())


def _Weights(program):
  return [v.numpy() for v in program.task.trainable_variables]


def _Slots(program):
  return [s.numpy() for table in program.optimizer.slots.values()
          for s in table.values()]


def _RunInTwo(logdir, override=''):
  """Trains to step 3, then a fresh program in the same logdir to step 6."""
  first = _Program(logdir, override)
  assert first.Restore() == 0
  first.Run(until_step=3)
  resumed = _Program(logdir, override)
  assert resumed.Restore() == 3
  resumed.Run(until_step=6)
  return resumed


def test_resume_takes_the_same_steps_as_an_uninterrupted_run(tmp_path):
  straight = _Program(tmp_path / 'straight')
  straight.Run(until_step=6)
  resumed = _RunInTwo(tmp_path / 'resumed')
  assert resumed.step == straight.step == 6
  assert int(resumed.optimizer.iterations.numpy()) == 6
  for a, b in zip(_Weights(straight) + _Slots(straight),
                  _Weights(resumed) + _Slots(resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_without_the_input_position_a_resume_sees_other_batches(tmp_path):
  # The control for the test above: it would notice a lost input position.
  straight = _Program(tmp_path / 'straight', 'train.checkpoint_input=False')
  straight.Run(until_step=6)
  resumed = _RunInTwo(tmp_path / 'resumed', 'train.checkpoint_input=False')
  assert not all(np.allclose(a, b) for a, b in zip(_Weights(straight),
                                                   _Weights(resumed)))


def test_non_finite_step_changes_nothing_and_keeps_the_checkpoint(tmp_path):
  program = _Program(tmp_path, 'train.optimizer=sgd; train.learning_rate=1e12')
  with pytest.raises(train_program.NonFiniteLossError) as raised:
    program.Run()
  message = str(raised.value)
  step = program.step
  assert f'global step {step}' in message
  assert 'learning_rate' in message and 'clip_gradient_norm' in message
  # The failed step was not applied: had it been, its NaN would be in the
  # weights and slots, and the step counters would have moved on.
  assert all(np.all(np.isfinite(w)) for w in _Weights(program) + _Slots(program))
  assert int(program.optimizer.iterations.numpy()) == step
  latest = program.checkpointer.latest
  if step >= 3:
    assert latest is not None and checkpoint_lib.StepOf(latest) <= step
    assert 'is intact' in message
    restored = _Program(tmp_path, 'train.optimizer=sgd; train.learning_rate=1e12')
    assert restored.Restore() == checkpoint_lib.StepOf(latest)
    assert all(np.all(np.isfinite(w)) for w in _Weights(restored))
  else:
    assert latest is None and 'No checkpoint' in message


def test_find_pipelines():
  program_params = experiment.Resolve(experiment.Settings(model=_TOY))
  experiment.SetDevices(program_params, ['/device:CPU:0', '/device:CPU:1'])
  task = program_params.task.Instantiate()
  pipes = task.Pipelines()
  assert [p.path for p in pipes] == [task.network.pipeline.path]


def test_a_checkpoint_holds_what_make_checkpointer_defines(tmp_path):
  """The trainer's checkpoint: global step, task, optimizer and input position;
  an evaluator's checkpointer (the same function, the task only) restores the
  trained weights and step from it."""
  program = _Program(tmp_path)
  program.Run(until_step=3)
  path = program.checkpointer.latest
  saved = {key.split('/')[0] for key, _ in tf.train.list_variables(path)}
  assert {'global_step', 'task', 'optimizer', 'input'} <= saved, saved
  params = program.params
  task = params.task.Instantiate()
  step = tf.Variable(0, dtype=tf.int64)
  evaluator = train_program.MakeCheckpointer(params, str(tmp_path), task, step)
  assert evaluator.Restore(partial=True) == path and int(step.numpy()) == 3
  for a, b in zip(_Weights(program), [v.numpy() for v in task.trainable_variables]):
    np.testing.assert_array_equal(a, b)


def test_step_keeps_activations_on_the_cells_devices(tmp_path):
  """Only scalars touch the caller's default device (here CPU:0, no cell).

  (And the gradient norm's vector of per-variable squares, one float each.)

  With remote stages, an op there means a round trip to the client: the loss
  and its gradient run where the network's output is (BaseTask.OutputScope).
  """
  params = experiment.Resolve(experiment.Settings(model=_TOY))
  experiment.SetDevices(params, ['/device:CPU:1', '/device:CPU:2'])
  program = train_program.TrainProgram(params, str(tmp_path),
                                       params.task.Instantiate())
  graph = program._step_fn.get_concrete_function().graph
  control_flow = ('If', 'StatelessIf', 'While', 'StatelessWhile')
  unplaced = [(op.type, op.name) for op in graph.get_operations()
              if not op.device and op.type not in control_flow
              and not op.name.startswith('global_norm/') and any(
                  t.dtype.is_floating and t.shape.num_elements() != 1
                  for t in op.inputs)]
  assert not unplaced
  losses = [op for op in graph.get_operations() if op.type == 'Square']
  assert losses and all(op.device.endswith('CPU:2') for op in losses)


def test_float16_overflow_skips_steps_changes_no_weight_and_goes_on(
    tmp_path, caplog):
  """Scaled by 2^100 the float16 backward overflows: each such step applies
  nothing (weights, slots, iterations, BatchNorm) and halves the scale,
  counted and logged; once the scale fits the run trains as usual, and
  TensorBoard has the scale and the count."""
  program = _Program(tmp_path, 'task.fprop_dtype=float16; '
                     'train.loss_scale_initial=1.2676506002282294e30')
  assert program.loss_scale.enabled
  before = _Weights(program)
  with caplog.at_level(logging.WARNING):
    program.Run(until_step=1)
  assert 'overflowed at loss scale 1.26765e+30' in caplog.text
  assert 'halved to 6.33825e+29 (1 steps skipped so far)' in caplog.text
  assert program.step == 1
  assert int(program.optimizer.iterations.numpy()) == 0
  assert int(program.loss_scale.skipped_steps.numpy()) == 1
  assert float(program.loss_scale.scale.numpy()) == 2.0**99
  for a, b in zip(before, _Weights(program)):
    np.testing.assert_array_equal(a, b)
  program.Run()  # to train.max_steps, 100
  skipped = int(program.loss_scale.skipped_steps.numpy())
  # 2^100 halved to 2^16 (84 halvings) before the toy's gradients fit.
  assert 80 < skipped < 95, skipped
  assert int(program.optimizer.iterations.numpy()) == program.step - skipped
  assert float(program.loss_scale.scale.numpy()) <= 2.0**16
  assert not all(np.array_equal(a, b) for a, b in zip(before,
                                                      _Weights(program)))
  events = summary.ReadEvents(str(tmp_path / train_program.TRAIN_SUBDIR))
  assert events['skipped_steps'][-1] == (100, skipped)
  assert events['loss_scale'][-1][1] == float(program.loss_scale.scale.numpy())


def test_the_loss_scale_resumes_and_other_settings_restart_it(tmp_path):
  first = _Program(tmp_path, 'task.fprop_dtype=float16; '
                   'train.loss_scale_growth_steps=2')
  first.Run(until_step=3)  # 3 good steps: doubled once
  assert float(first.loss_scale.scale.numpy()) == 2.0**16
  resumed = _Program(tmp_path, 'task.fprop_dtype=float16; '
                     'train.loss_scale_growth_steps=2')
  assert resumed.Restore() == 3
  assert float(resumed.loss_scale.scale.numpy()) == 2.0**16
  # The same checkpoint in float32: weights and step restore, no scaling.
  plain = _Program(tmp_path)
  assert plain.Restore() == 3 and not plain.loss_scale.enabled
  for a, b in zip(_Weights(first), _Weights(plain)):
    np.testing.assert_array_equal(a, b)


def test_the_step_is_traced_without_autograph(tmp_path, monkeypatch):
  # README: layers branch on tensors with tf.cond; autograph, which would
  # turn this Python `if` into one, re-parsed every layer at each trace.
  program = _Program(tmp_path)
  fprop = program.task.FPropDefaultTheta

  def BranchingFProp(batch):
    metrics = fprop(batch)
    if metrics.loss[0] > 0:  # a Python bool of a tensor
      pass
    return metrics

  monkeypatch.setattr(program.task, 'FPropDefaultTheta', BranchingFProp)
  with pytest.raises(tf.errors.OperatorNotAllowedInGraphError):
    program.Run(until_step=1)


def _TrialRun(logdir, trial_steps, until_step=12):
  program = _Program(logdir, f'train.max_steps=70; train.executor_trial_steps={trial_steps}')
  program.Run(until_step=until_step)
  return program


def test_a_long_run_tries_both_executors_and_trains_as_one_executor(
    tmp_path, caplog):
  # 70 steps left, at least 10 times a trial of 2 timed steps each (7 steps).
  caplog.set_level(logging.INFO)
  tried = _TrialRun(tmp_path / 'tried', 2)
  plain = _TrialRun(tmp_path / 'plain', 0)
  assert tried._trial is not None and plain._trial is None  # pylint: disable=protected-access
  decision = tried._trial.decision  # pylint: disable=protected-access
  assert decision is not None and decision.steps == 2
  for a, b in zip(_Weights(tried) + _Slots(tried), _Weights(plain) + _Slots(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert any(r.getMessage().startswith('Executor trial: the loop stepped in')
             for r in caplog.records)
  assert any('the executor trial building the unrolled graph included' in
             r.getMessage() for r in caplog.records)
  texts = summary.ReadEvents(str(tmp_path / 'tried' / 'train'))['executor_trial']
  assert len(texts) == 1 and decision.Text() in texts[0][1].decode()
  # The pipeline says what runs on: the kept candidate's choice.
  (pipe,) = tried.task.Pipelines()
  assert pipe.executor_choice.executor == decision.executor
  assert ('the executor trial runs the loop' in
          pipe.executor_choice.reason) == (decision.executor == 'loop')


def test_a_short_run_builds_one_graph(tmp_path):
  program = _Program(tmp_path, 'train.max_steps=69; train.executor_trial_steps=2')
  program.Run(until_step=4)
  assert program._trial is None  # pylint: disable=protected-access
  (pipe,) = program.task.Pipelines()
  assert pipe.executor_choice.executor == 'unrolled'


def test_a_resumed_run_steps_on_the_executor_its_trial_kept(tmp_path):
  straight = _TrialRun(tmp_path / 'straight', 2, until_step=14)
  first = _TrialRun(tmp_path / 'resumed', 2, until_step=10)
  kept = first._trial.decision.executor  # pylint: disable=protected-access
  trial_file = tmp_path / 'resumed' / logdir_lib.TRIAL_FILE
  assert trial_file.read_text().startswith(f'executor: {kept}\n')
  resumed = _Program(tmp_path / 'resumed',
                     'train.max_steps=70; train.executor_trial_steps=2')
  assert resumed.Restore() == 10  # the checkpoint at the end of Run
  resumed.Run(until_step=14)
  trial = resumed._trial  # pylint: disable=protected-access
  assert trial.decision is None and not trial.trying
  assert list(trial._candidates) == [kept]  # pylint: disable=protected-access
  for a, b in zip(_Weights(straight) + _Slots(straight),
                  _Weights(resumed) + _Slots(resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Under another task the record does not hold: the trial runs again.
  other = _Program(tmp_path / 'resumed', 'train.max_steps=70; '
                   'train.executor_trial_steps=2; '
                   'task.network.pipeline.num_micro_batches=1')
  assert logdir_lib.ReadTrial(str(tmp_path / 'resumed'), other.params) is None


@pytest.mark.parametrize('why', ['op determinism is on',
                                 'replicas in other processes'])
def test_no_trial_where_a_timed_choice_would_not_do(tmp_path, monkeypatch,
                                                    caplog, why):
  caplog.set_level(logging.INFO)
  assert train_program.OpDeterminism() is False  # TensorFlow's query works
  if why == 'op determinism is on':
    monkeypatch.setattr(train_program, 'OpDeterminism', lambda: True)
  else:  # as under MultiWorker: this process holds 1 of 2 replicas
    monkeypatch.setattr(replicas_lib.Replicas, 'num_replicas',
                        property(lambda self: 2))
  program = _TrialRun(tmp_path, 2, until_step=3)
  assert program._trial is None  # pylint: disable=protected-access
  assert any(r.getMessage().startswith(f'No executor trial: {why}')
             for r in caplog.records)
