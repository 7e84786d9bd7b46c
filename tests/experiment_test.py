"""experiment.Resolve: config, then --params_file, then overrides, then shortcut flags."""

import pytest

from lingvo_gpipe import experiment
from lingvo_gpipe import model_registry
from lingvo_gpipe.core import hyperparams

_TOY = 'example.toy.ToyRegression'
_DIGITS = 'image.digits.AmoebaNetTiny'


def _Resolve(**kwargs):
  return experiment.Resolve(experiment.Settings(**kwargs))


def test_config_alone_is_the_registered_params():
  assert _Resolve(model=_TOY) == model_registry.GetParams(_TOY)


def test_later_settings_win(tmp_path):
  path = tmp_path / 'params.txt'
  path.write_text('train.max_steps : 7\ntrain.learning_rate : 0.5\n')
  p = _Resolve(model=_TOY, params_file=str(path),
               params_override='train.max_steps=9', max_steps=11)
  assert p.train.learning_rate == 0.5  # from the file
  assert p.train.max_steps == 11  # file < override < flag


def test_params_txt_reproduces_the_run(tmp_path):
  p = _Resolve(model=_DIGITS, params_override='task.network.num_filters=8',
               num_micro_batches=2)
  path = tmp_path / 'params.txt'
  path.write_text(p.ToText())
  assert _Resolve(model=_DIGITS, params_file=str(path)) == p


@pytest.mark.parametrize('model', [_TOY, _DIGITS])
def test_shortcuts_set_the_pipeline(model):
  p = _Resolve(model=model, num_partitions=3, num_micro_batches=5)
  template = experiment.PipelineTemplate(p)
  assert template is p.task.network.pipeline
  assert (template.num_partitions, template.num_micro_batches) == (3, 5)
  assert experiment.NumPartitions(p) == 3
  experiment.SetDevices(p, ['/device:CPU:0', '/device:CPU:1', '/device:CPU:0'])
  assert p.task.network.pipeline.devices[1] == '/device:CPU:1'


def test_num_micro_batches_replaces_a_micro_batch_size():
  p = _Resolve(model=_TOY, params_override='task.network.pipeline.micro_batch_size=4')
  assert p.task.network.pipeline.micro_batch_size == 4
  p = _Resolve(model=_TOY, params_override='task.network.pipeline.micro_batch_size=4',
               num_micro_batches=3)
  assert p.task.network.pipeline.micro_batch_size is None


def test_data_dir_shortcut():
  assert _Resolve(model=_TOY, data_dir='/data/x').input.data_dir == '/data/x'


def test_errors_name_the_bad_thing():
  with pytest.raises(model_registry.UnknownModelError, match='Did you mean'):
    _Resolve(model='example.toy.ToyRegresion')
  with pytest.raises(hyperparams.ParamsError, match='train.max_stpes'):
    _Resolve(model=_TOY, params_override='train.max_stpes=3')
  with pytest.raises(hyperparams.ParamsError, match='max_steps'):
    _Resolve(model=_TOY, params_override='train.max_steps=many')
  with pytest.raises(ValueError, match='--num_micro_batches must be a positive'):
    _Resolve(model=_TOY, num_micro_batches=0)
  with pytest.raises(hyperparams.ParamsError, match='nowhere.txt'):
    _Resolve(model=_TOY, params_file='/nowhere.txt')
