"""Warm start (lingvo_gpipe/warm_start.py) through TrainProgram, on the toy config.

The toy MLP's variables are task/network/pipeline/layers_{0,1,2}/{w,b}
(4 -> 8 -> 8 -> 1). Sources are written by a K=1 run, targets built at K=2.
"""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe import experiment
from lingvo_gpipe import model_params
from lingvo_gpipe import train_program
from lingvo_gpipe import warm_start
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core import stacked_variable
from lingvo_gpipe.core import summary
from lingvo_gpipe.core.gpipe.pipelining_layer import PipeliningLayer
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.layers import repeat

_TOY = 'example.toy.ToyRegression'
_DEVICES = ['/device:CPU:0', '/device:CPU:1']
_LAST = 'task/network/pipeline/layers_2/.*'


def _Program(logdir, k=2, override='', sources=()):
  params = experiment.Resolve(experiment.Settings(
      model=_TOY, num_partitions=k, params_override='train.save_interval_steps=2; '
      'train.log_interval_steps=2; input.shuffle_buffer=64; ' + override))
  params.train.warm_start = list(sources)
  experiment.SetDevices(params, _DEVICES[:k])
  return train_program.TrainProgram(params, str(logdir),
                                    params.task.Instantiate())


def _Values(program):
  return {name: np.asarray(tf.convert_to_tensor(var)) for name, var in
          warm_start.TargetVariables(program.task).items()}


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """A K=1 run trained 3 steps: its logdir and its weights by rule name."""
  logdir = tmp_path_factory.mktemp('source')
  program = _Program(logdir, k=1)
  program.Restore()
  program.Run(until_step=3)
  return str(logdir), _Values(program)


def test_names_are_layer_paths_from_both_sides(source):
  logdir, values = source
  path = warm_start.ResolveCheckpoint(logdir, 'here')
  assert path.endswith(os.path.join('checkpoints', 'ckpt-3'))
  names = set(warm_start.SourceVariables(path))
  assert names == set(values) == {
      f'task/network/pipeline/layers_{j}/{v}' for j in range(3)
      for v in ('w', 'b')}
  assert warm_start.SourceName(
      'task/network/pipeline/layers/6/net/sub/3/_var_w/.ATTRIBUTES/'
      'VARIABLE_VALUE') == 'task/network/pipeline/layers_6/net/sub_3/w'
  assert warm_start.SourceName('optimizer/iterations/.ATTRIBUTES/'
                               'VARIABLE_VALUE') is None


def test_loads_the_mapped_variables_across_k_and_excludes_the_rest(
    source, tmp_path):
  logdir, trained = source
  fresh = _Values(_Program(tmp_path / 'fresh'))
  program = _Program(tmp_path / 'target', k=2, sources=[
      model_params.WarmStartParams(
          logdir, rules=[(r'task/network/(.*)', r'task/network/\1')],
          exclude=[_LAST])])
  assert program.Restore() == 0
  values = _Values(program)
  for name in values:
    if name.startswith('task/network/pipeline/layers_2/'):
      np.testing.assert_array_equal(values[name], fresh[name])  # initializer
      assert not np.array_equal(values[name], trained[name])
    else:
      np.testing.assert_array_equal(values[name], trained[name])
  assert int(program.optimizer.iterations.numpy()) == 0
  # The report, in the log's words and in TensorBoard's text.
  events = summary.ReadEvents(os.path.join(tmp_path / 'target', 'train'))
  text = events['warm_start'][0][1].decode()
  assert ('4 variables loaded; 2 excluded and 0 reached by no rule keep '
          'their initializers') in text
  assert ('task/network/pipeline/layers_0/w <- '
          'task/network/pipeline/layers_0/w [4, 8]') in text
  assert f"task/network/pipeline/layers_2/w <- task/network/pipeline/layers_2/w (exclude {_LAST!r})" in text
  # Training goes on from the loaded weights.
  program.Run(until_step=2)
  assert program.step == 2


def test_rules_rename_and_report_what_matched_nothing(source, tmp_path):
  logdir, trained = source
  program = _Program(tmp_path, sources=[model_params.WarmStartParams(
      logdir, rules=[(r'task/network/pipeline/layers_1/(w|b)',
                      r'task/network/pipeline/layers_1/\1')])])
  plan = warm_start.Apply(program.params.train.warm_start, program.task)
  assert [l.target for l in plan.loads] == [
      'task/network/pipeline/layers_1/b', 'task/network/pipeline/layers_1/w']
  assert len(plan.sources[0].unmapped_sources) == 4
  assert plan.uninitialized == sorted(
      f'task/network/pipeline/layers_{j}/{v}' for j in (0, 2) for v in 'bw')
  np.testing.assert_array_equal(
      _Values(program)['task/network/pipeline/layers_1/w'],
      trained['task/network/pipeline/layers_1/w'])
  text = plan.ToText()
  assert 'source variables no rule matched: 4' in text
  assert "nothing was loaded into (at their initializers, not excluded): 4" in text


def test_first_matching_rule_wins(source, tmp_path):
  logdir, _ = source
  program = _Program(tmp_path, sources=[model_params.WarmStartParams(
      logdir, rules=[(r'task/network/pipeline/layers_2/(.*)',
                      r'task/network/pipeline/layers_2/\1'),
                     (r'.*/layers_2/(.*)', r'task/nothing/\1'),
                     ('(.*)', r'\1')], allow_unmatched=True)])
  plan = warm_start.MakePlan(program.params.train.warm_start,
                             warm_start.TargetVariables(program.task))
  assert plan.sources[0].rule_counts == [2, 0, 4]
  # Rule 1 only sees what rule 0 took: refused as loading nothing.
  with pytest.raises(hyperparams.ConfigError, match=r'rules\[1\].*earlier rule'):
    warm_start.MakePlan(
        [program.params.train.warm_start[0].Copy().Set(
            rules=[(r'(.*)', r'\1'), (r'.*/layers_2/(.*)', r'task/x/\1')],
            allow_unmatched=False)],
        warm_start.TargetVariables(program.task))


def test_mismatched_shapes_are_refused_naming_both(source, tmp_path):
  logdir, _ = source
  program = _Program(tmp_path, override='task.network.hidden_dim=16',
                     sources=[model_params.WarmStartParams(logdir)])
  before = _Values(program)
  with pytest.raises(hyperparams.ConfigError) as raised:
    program.Restore()
  message = str(raised.value)
  assert ('task/network/pipeline/layers_0/w [4, 8] float32 (source) -> '
          'task/network/pipeline/layers_0/w [4, 16] float32 (this model)'
          ) in message
  assert 'exclude' in message
  for name, value in _Values(program).items():  # nothing was assigned
    np.testing.assert_array_equal(value, before[name])


def test_rules_and_excludes_that_match_nothing_are_refused_unless_allowed(
    source, tmp_path):
  logdir, _ = source
  targets = warm_start.TargetVariables(_Program(tmp_path).task)
  typo = model_params.WarmStartParams(
      logdir, rules=[(r'task/netwrok/(.*)', r'task/network/\1'),
                     ('(.*)', r'\1')])
  with pytest.raises(hyperparams.ConfigError) as raised:
    warm_start.MakePlan([typo], targets)
  message = str(raised.value)
  assert "rules[0] ('task/netwrok/(.*)') matches no variable" in message
  assert 'Did you mean' in message and 'allow_unmatched=True' in message
  missing = model_params.WarmStartParams(
      logdir, rules=[(r'task/network/(.*)', r'task/net/\1')])
  with pytest.raises(hyperparams.ConfigError, match=r"to names this model "
                     r"lacks, e\.g\. 'task/net/pipeline/layers_0/b'"):
    warm_start.MakePlan([missing], targets)
  exclude = model_params.WarmStartParams(logdir, exclude=['task/head/.*'])
  with pytest.raises(hyperparams.ConfigError,
                     match=r"exclude 'task/head/\.\*' matches no variable"):
    warm_start.MakePlan([exclude], targets)
  for params in (typo, missing, exclude):
    params.allow_unmatched = True
  assert len(warm_start.MakePlan([typo], targets).loads) == 6
  assert len(warm_start.MakePlan([missing], targets).loads) == 0
  assert len(warm_start.MakePlan([exclude], targets).loads) == 6


def test_bad_sources_are_configuration_errors(source, tmp_path):
  logdir, _ = source
  targets = warm_start.TargetVariables(_Program(tmp_path).task)
  cases = [
      (model_params.WarmStartParams(None), r'checkpoint=None: set it'),
      (model_params.WarmStartParams(str(tmp_path / 'none')),
       r'no such checkpoint'),
      (model_params.WarmStartParams(str(tmp_path)), r'no checkpoint in that'),
      (model_params.WarmStartParams(logdir, rules=[('(.*)',)]),
       r'rules\[0\]=.*\(regex, replacement\) pair'),
      (model_params.WarmStartParams(logdir, rules=[('(', 'x')]),
       r'not a valid regex'),
      (model_params.WarmStartParams(logdir, rules=[('(.*)', r'\2')]),
       r'replacement .* does not fit'),
      (model_params.WarmStartParams(logdir, rules=[]), r'rules is empty'),
  ]
  for params, pattern in cases:
    with pytest.raises(hyperparams.ConfigError, match=pattern):
      warm_start.MakePlan([params], targets)
  twice = [model_params.WarmStartParams(logdir)] * 2
  with pytest.raises(hyperparams.ConfigError, match='would be loaded twice'):
    warm_start.MakePlan(twice, targets)


def test_a_resumed_run_restores_its_own_checkpoint_not_the_source(
    source, tmp_path):
  logdir, trained = source
  copy = str(tmp_path / 'source_copy')
  shutil.copytree(logdir, copy)
  target = tmp_path / 'target'
  first = _Program(target, sources=[model_params.WarmStartParams(copy)])
  first.Restore()
  first.Run(until_step=2)
  own = _Values(first)
  assert not np.array_equal(own['task/network/pipeline/layers_0/w'],
                            trained['task/network/pipeline/layers_0/w'])
  shutil.rmtree(copy)  # a resume must not even look for it
  resumed = _Program(target, sources=[model_params.WarmStartParams(copy)])
  assert resumed.Restore() == 2
  for name, value in _Values(resumed).items():
    np.testing.assert_array_equal(value, own[name])
  events = summary.ReadEvents(os.path.join(target, 'train'))
  assert len(events['warm_start']) == 1  # the first run's only


def test_warm_start_params_read_back_from_text_and_overrides():
  params = experiment.Resolve(experiment.Settings(
      model=_TOY, params_override=(
          'train.warm_start=[Params(...)]; '
          'train.warm_start[0].cls=@lingvo_gpipe.model_params.WarmStartSource;'
          " train.warm_start[0].checkpoint='/tmp/pretrain'; "
          "train.warm_start[0].exclude=['task/network/pipeline/layers_2/.*']")))
  source = params.train.warm_start[0]
  assert source.checkpoint == '/tmp/pretrain'
  assert source.rules == [('(.*)', r'\1')]
  text = params.ToText()
  again = experiment.Resolve(experiment.Settings(model=_TOY))
  assert again.FromText(text).ToText() == text


def test_a_stacked_weight_is_loaded_whole_into_its_pieces():
  # A Repeat's weight cut by the pipeline: its pieces get consecutive rows.
  pieces = [tf.Variable(tf.zeros([1, 2])), tf.Variable(tf.zeros([2, 2]))]
  stacked = stacked_variable.StackedVariable('repeat.w', pieces)
  value = np.arange(6, dtype=np.float32).reshape(3, 2)
  stacked.assign(value)
  np.testing.assert_array_equal(pieces[0].numpy(), value[:1])
  np.testing.assert_array_equal(pieces[1].numpy(), value[1:])


def _RepeatPipeline(k):
  return PipeliningLayer.Params().Set(
      name='pipeline', num_partitions=k, num_micro_batches=2,
      devices=_DEVICES[:k], layers=[
          dense.Dense.Params().Set(name='fc', input_dim=4, output_dim=4),
          repeat.Repeat.Params().Set(name='blocks', num=4, sub=(
              dense.Dense.Params().Set(input_dim=4, output_dim=4)))]
  ).Instantiate()


def test_a_repeat_cut_across_cells_is_loaded_from_an_uncut_one(tmp_path):
  source, target = _RepeatPipeline(1), _RepeatPipeline(2)
  path = tf.train.Checkpoint(task=source).write(str(tmp_path / 'ckpt'))
  plan = warm_start.Apply([model_params.WarmStartParams(path)], target)
  assert not plan.uninitialized
  # Names as the checkpoint has them: the Repeat's weight is one [4, 4, 4].
  assert sorted(load.target for load in plan.loads) == [
      'task/layers_0/b', 'task/layers_0/w', 'task/layers_1/body/b',
      'task/layers_1/body/w']
  for got, want in zip(target.StoredVars().Flatten(),
                       source.StoredVars().Flatten()):
    np.testing.assert_array_equal(_Whole(got), _Whole(want))


def _Whole(var):
  """A variable's value; a stacked one's pieces joined."""
  if isinstance(var, stacked_variable.StackedVariable):
    return tf.concat(var.pieces, 0)
  return tf.convert_to_tensor(var)
