"""A task says where its pipelines are; the run's K, M and devices reach each, and only there.

One mechanism (BaseTask.PipelinePaths) serves the Params (experiment:
the flags and devices go to each declared pipeline) and the built task
(BaseTask.Pipelines: what the trainer reports on). A pipeline placed deeper
than `task.network.pipeline`, or a second one, gets the flags like the first;
one the task does not declare, or a declared path with no pipeline, is
refused by name instead of silently keeping its config's layout.
"""

import pytest
import tensorflow as tf

from lingvo_gpipe import experiment
from lingvo_gpipe import model_registry
from lingvo_gpipe import train_program
from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core.gpipe import pipelining_layer
from lingvo_gpipe.core.layers import dense
from tasks.example import regression

_TOY = 'example.toy.ToyRegression'
_DEEP, _HEAD = 'task.network.body.pipeline', 'task.network.head'


class _BodyAndHead(base_layer.BaseLayer):
  """x -> body (a PipelinedNetwork: its pipeline one level deeper) -> head (a PipeliningLayer)."""

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('body', regression.MlpNetwork.Params().Set(
        input_dim=4, hidden_dim=8, output_dim=8), 'A PipelinedNetwork.')
    p.Define('head', pipelining_layer.PipeliningLayer.Params().Set(layers=[
        dense.Dense.Params().Set(name='fc', input_dim=8, output_dim=4),
        dense.Dense.Params().Set(name='out', input_dim=4, output_dim=1,
                                 activation='none')]), 'A second pipeline.')
    return p

  def __init__(self, params):
    super().__init__(params)
    self.CreateChild('body', self.params.body)
    self.CreateChild('head', self.params.head)

  def FProp(self, theta, x):
    return self.head.FProp(theta.head, self.body.FProp(theta.body, x))

  def OutputScope(self):
    return self.head.OutputScope()


class _TwoPipelineTask(regression.RegressionTask):
  """Declares both pipelines."""

  @classmethod
  def PipelinePaths(cls, p):
    return ['network.body.pipeline', 'network.head']


class _WrongPathTask(regression.RegressionTask):
  """Declares a path that holds no pipeline (the PipelinedNetwork, not its pipeline)."""

  @classmethod
  def PipelinePaths(cls, p):
    return ['network.body', 'network.head']


def _Params(task_cls, override=''):
  """The toy config with `task_cls` over a _BodyAndHead network."""
  params = model_registry.GetParams(_TOY)
  params.task = task_cls.Params().Set(name='two', network=_BodyAndHead.Params())
  if override:
    hyperparams.ApplyOverrides(params, override)
  return params


def _Bare():
  """The toy config with a network that is no pipeline."""
  params = model_registry.GetParams(_TOY)
  params.task.network = dense.Dense.Params().Set(input_dim=4, output_dim=1,
                                                 activation='none')
  return params


@pytest.fixture
def registered(monkeypatch):
  """experiment.Resolve(model='two.*') resolves the configs above, unregistered."""
  configs = {'two.Declared': lambda: _Params(_TwoPipelineTask),
             'two.Undeclared': lambda: _Params(regression.RegressionTask),
             'two.WrongPath': lambda: _Params(_WrongPathTask),
             'two.Bare': _Bare}
  get = model_registry.GetParams
  monkeypatch.setattr(model_registry, 'GetParams',
                      lambda name: configs[name]() if name in configs else get(name))


def _Resolve(model, **flags):
  return experiment.Resolve(experiment.Settings(model=model, **flags))


def test_the_default_declares_the_network_or_its_pipeline():
  toy = model_registry.GetParams(_TOY)
  assert [path for path, _ in experiment.Pipelines(toy)] == [
      'task.network.pipeline']
  toy.task.network = toy.task.network.pipeline.Copy().Set(
      layers=regression.MlpNetwork.Layers(toy.task.network))
  assert [path for path, _ in experiment.Pipelines(toy)] == ['task.network']
  task = toy.task.Instantiate()
  assert task.Pipelines() == [task.network]


def test_every_declared_pipeline_gets_k_m_and_devices(registered):
  del registered
  params = _Resolve('two.Declared', num_partitions=2, num_micro_batches=4)
  pipelines = experiment.Pipelines(params)
  assert [path for path, _ in pipelines] == [_DEEP, _HEAD]
  for _, template in pipelines:
    assert (template.num_partitions, template.num_micro_batches) == (2, 4)
  assert experiment.NumPartitions(params) == 2
  experiment.SetDevices(params, ['/device:CPU:1', '/device:CPU:2'])
  task = params.task.Instantiate()
  built = task.Pipelines()
  assert [pipe.path for pipe in built] == ['two/network/body/pipeline',
                                           'two/network/head']
  for pipe in built:
    assert pipe.params.num_micro_batches == 4
    assert [pipe.placement.Device(k) for k in range(len(pipe.cells))] == [
        '/device:CPU:1', '/device:CPU:2']
    for k, cell in enumerate(pipe.cells):
      assert {tf.DeviceSpec.from_string(v.device).device_index
              for v in cell.variables} == {k + 1}


def test_a_task_with_two_pipelines_trains(registered, tmp_path):
  del registered
  params = _Resolve('two.Declared', num_partitions=2, num_micro_batches=2)
  experiment.SetDevices(params, ['/device:CPU:1', '/device:CPU:2'])
  program = train_program.TrainProgram(params, str(tmp_path),
                                       params.task.Instantiate())
  assert program.Run(until_step=1) == 1


def test_an_undeclared_pipeline_is_refused_by_name(registered):
  del registered
  with pytest.raises(hyperparams.ConfigError) as raised:
    _Resolve('two.Undeclared')
  message = str(raised.value)
  assert f'{_DEEP}, {_HEAD}' in message and 'PipelinePaths' in message
  with pytest.raises(hyperparams.ConfigError) as raised:
    _Params(regression.RegressionTask).task.Instantiate()
  message = str(raised.value)
  assert 'PipeliningLayer(s) two/network/body/pipeline, two/network/head' in message
  assert 'PipelinePaths' in message


def test_a_declared_path_without_a_pipeline_is_refused_by_name(registered):
  del registered
  with pytest.raises(hyperparams.ConfigError,
                     match='task.network.body: _WrongPathTask.PipelinePaths'):
    _Resolve('two.WrongPath')
  with pytest.raises(hyperparams.ConfigError,
                     match="lists 'network.body', but the task has no "
                     'PipeliningLayer there'):
    _Params(_WrongPathTask).task.Instantiate()


def test_a_flag_that_cannot_apply_is_refused(registered):
  del registered
  with pytest.raises(hyperparams.ConfigError,
                     match=f'--num_partitions=3 cannot apply to {_HEAD}: its '
                     r'balance \[1, 1\]'):
    _Resolve('two.Declared', params_override='task.network.head.balance=[1, 1]',
             num_partitions=3)
  params = _Params(_TwoPipelineTask,
                   'task.network.body.pipeline.num_partitions=3')
  with pytest.raises(hyperparams.ConfigError,
                     match=f'{_DEEP}: 3, {_HEAD}: 1'):
    experiment.NumPartitions(params)


def test_a_task_without_pipelines_takes_no_pipeline_flag(registered):
  del registered
  params = _Resolve('two.Bare')
  assert experiment.Pipelines(params) == [] and experiment.NumPartitions(params) == 1
  with pytest.raises(hyperparams.ConfigError,
                     match="--num_micro_batches: model 'two.Bare' has no pipeline"):
    _Resolve('two.Bare', num_micro_batches=2)
