"""experiment.Resolve: config, then --params_file, then overrides, then shortcut flags."""

import re
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


@pytest.mark.parametrize('override,message', [
    ('train.learning_rate=nan', 'train.learning_rate=nan: every numeric'),
    ('train.lr_schedule.decay_rate=inf', 'train.lr_schedule.decay_rate=inf'),
    ('train.learning_rate=-0.1', 'train.learning_rate=-0.1: must be > 0'),
    ('train.max_steps=-1', 'train.max_steps=-1: must be >= 1'),
    ('train.save_interval_steps=0', 'train.save_interval_steps=0: must be >= 1'),
    ('train.log_interval_steps=0', 'train.log_interval_steps=0: must be >= 1'),
    ('input.batch_size=-4', 'input.batch_size=-4: must be >= 1'),
    ('train.executor_trial_steps=-2',
     'train.executor_trial_steps=-2: must be >= 0'),
])
def test_validate_names_a_knob_no_run_can_use(override, message):
  with pytest.raises(hyperparams.ParamsError, match=re.escape(message)):
    _Resolve(model=_TOY, params_override=override)


def test_more_micro_batches_than_examples_is_refused():
  with pytest.raises(hyperparams.ParamsError, match='at most 16 micro-batches'):
    _Resolve(model=_TOY, num_micro_batches=17)
  p = _Resolve(model=_TOY, num_micro_batches=16)
  with pytest.raises(hyperparams.ParamsError, match='each of 2 replicas gets 8'):
    experiment.CheckMicroBatches(p, num_replicas=2)


def test_tpu_backend_runs_a_loop_pipeline_unrolled():
  # lm.lm1b.TransformerL asks for the loop, which XLA cannot compile whole.
  p = _Resolve(model='lm.lm1b.TransformerL')
  assert p.task.network.pipeline.executor == 'loop'
  experiment.SetTpuBackend(p)
  assert p.task.network.pipeline.placement_backend == 'tpu'
  assert p.task.network.pipeline.executor == 'unrolled'
  digits = _Resolve(model=_DIGITS)
  experiment.SetTpuBackend(digits)
  assert digits.task.network.pipeline.executor == 'auto'
