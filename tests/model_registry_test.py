"""Model registry: names derived from module and class, lookups see every config under params."""

import sys
import textwrap
import uuid

import pytest

from lingvo_gpipe import model_params
from lingvo_gpipe import model_registry
from lingvo_gpipe.core import hyperparams

_TOY = 'example.toy.ToyRegression'


@pytest.fixture
def registry(monkeypatch):
  """The registry with its state restored after the test (the real configs stay loaded)."""
  model_registry.ListModels()  # Load the real configs first, so tests see and keep them.
  monkeypatch.setattr(model_registry, '_registry', dict(model_registry._registry))
  return model_registry


def _Config(module, qualname, task=None):
  """A ModelParams subclass that looks as if defined as `qualname` in `module`."""
  body = {'__module__': module, '__qualname__': qualname}
  if task is not None:
    body['Task'] = lambda self: task
  return type(qualname.rsplit('.', 1)[-1], (model_params.ModelParams,), body)


@pytest.mark.parametrize('module,qualname,expected', [
    ('params.image.cifar10', 'AmoebaNetD', 'image.cifar10.AmoebaNetD'),
    ('params.mt.wmt', 'Outer.Inner', 'mt.wmt.Outer.Inner'),
    ('my_project.configs', 'Big', 'my_project.configs.Big'),
    ('paramsx.configs', 'Big', 'paramsx.configs.Big'),
    ('params', 'Top', 'params.Top'),
])
def test_registry_name_drops_only_the_params_package(module, qualname, expected):
  assert _Config(module, qualname).RegistryName() == expected


def test_list_models_is_sorted_and_has_the_example():
  names = model_registry.ListModels()
  assert _TOY in names
  assert names == sorted(names)


def test_get_params_returns_the_whole_experiment():
  p = model_registry.GetParams(_TOY)
  assert p.name == _TOY
  assert p.task.network.input_dim == 4
  assert p.train.learning_rate == 0.01  # Overridden by the config.
  assert p.train.optimizer == 'adam'  # Overridden by the config.
  assert p.train.clip_gradient_norm == 0.0  # Base default.
  assert p.input.batch_size == 16
  text = p.ToText()
  for field in ('task.network.input_dim', 'task.network.hidden_dim', 'task.network.output_dim',
                'train.max_steps', 'input.batch_size'):
    assert field in text, f'{field} missing from ToText():\n{text}'


@pytest.mark.parametrize('name', model_registry.ListModels())
def test_every_registered_config_reads_back_from_its_text(name):
  p = model_registry.GetParams(name)
  assert p.task.network is not None, f'{name}: the network Params must be at task.network'
  text = p.ToText()
  assert model_registry.GetParams(name).FromText(text).ToText() == text


def test_get_params_returns_a_fresh_tree_each_time():
  first = model_registry.GetParams(_TOY)
  first.task.network.hidden_dim = 1000
  assert model_registry.GetParams(_TOY).task.network.hidden_dim == 8


def test_get_class_returns_the_registered_class():
  cls = model_registry.GetClass(_TOY)
  assert cls.__name__ == 'ToyRegression'
  assert cls.__module__ == 'params.example.toy'


def test_registering_another_class_under_a_taken_name_raises(registry):
  registry.RegisterModel(_Config('params.x.y', 'C'))
  with pytest.raises(ValueError, match=r"'x\.y\.C' is already registered to params\.x\.y\.C; "
                     r"cannot also register x\.y\.C"):
    registry.RegisterModel(_Config('x.y', 'C'))
  # A nested class can collide with a module-level one too.
  registry.RegisterModel(_Config('params.a', 'b.C'))
  with pytest.raises(ValueError, match=r"'a\.b\.C' is already registered"):
    registry.RegisterModel(_Config('params.a.b', 'C'))


def test_redefining_the_same_class_replaces_it(registry):
  first = registry.RegisterModel(_Config('params.reloaded', 'Config'))
  second = registry.RegisterModel(_Config('params.reloaded', 'Config'))
  assert first is not second
  assert registry.GetClass('reloaded.Config') is second


def test_register_rejects_a_non_model_params_class(registry):
  with pytest.raises(TypeError, match='subclass of lingvo_gpipe.model_params.ModelParams'):
    registry.RegisterModel(dict)


def test_unknown_name_suggests_close_matches():
  with pytest.raises(ValueError) as info:
    model_registry.GetParams('example.toy.ToyRegresion')
  message = str(info.value)
  assert "'example.toy.ToyRegresion'" in message
  assert f"Did you mean: '{_TOY}'" in message
  assert '--list_models' in message
  assert isinstance(info.value, model_registry.UnknownModelError)


def test_bare_class_name_suggests_the_full_name():
  with pytest.raises(ValueError, match=f"Did you mean: '{_TOY}'"):
    model_registry.GetClass('ToyRegression')


def test_task_must_be_overridden():
  config = _Config('my_project.configs', 'NoTask')()
  with pytest.raises(NotImplementedError, match=r'my_project\.configs\.NoTask must override'):
    config.Model()


def test_base_train_and_input_defaults():
  p = _Config('my_project.configs', 'Defaults', task=hyperparams.Params())()
  model = p.Model()
  assert model.name == 'my_project.configs.Defaults'
  assert model.train.learning_rate == 0.1
  assert model.train.momentum == 0.9
  assert model.train.max_steps == 1000
  assert model.train.clip_gradient_norm == 0.0
  assert model.input.data_dir is None


@pytest.fixture
def config_package(tmp_path, monkeypatch, registry):
  """Makes a fresh package the registry walks instead of `params`; returns a file writer."""
  name = f'configs_{uuid.uuid4().hex[:8]}'
  (tmp_path / name).mkdir()
  (tmp_path / name / '__init__.py').write_text('')
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setattr(model_params, 'PARAMS_PACKAGE', name)
  monkeypatch.setattr(model_registry, '_params_imported', False)
  monkeypatch.setattr(model_registry, '_params_missing_reason', None)
  monkeypatch.setattr(model_registry, '_registry', {})

  def Write(rel, text):
    path = tmp_path / name / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))

  yield name, Write
  for module in [m for m in sys.modules if m == name or m.startswith(name + '.')]:
    del sys.modules[module]


_GOOD_CONFIG = '''
    from lingvo_gpipe import model_params
    from lingvo_gpipe import model_registry
    from lingvo_gpipe.core import hyperparams

    @model_registry.RegisterModel
    class Good(model_params.ModelParams):
      def Task(self):
        p = hyperparams.Params()
        p.Define('network', hyperparams.Params(), 'The network.')
        return p
    '''


def test_configs_in_nested_packages_are_found_without_importing_them(config_package):
  name, write = config_package
  write('vision/__init__.py', '')
  write('vision/small.py', _GOOD_CONFIG)
  assert model_registry.ListModels() == ['vision.small.Good']
  assert model_registry.GetParams('vision.small.Good').name == 'vision.small.Good'
  assert f'{name}.vision.small' in sys.modules


def test_a_broken_config_module_is_named_in_the_error(config_package):
  _, write = config_package
  write('good.py', _GOOD_CONFIG)
  write('broken.py', 'raise RuntimeError("bad learning rate table")\n')
  with pytest.raises(model_registry.ConfigImportError) as info:
    model_registry.GetParams('good.Good')
  message = str(info.value)
  assert "config module 'configs_" in message and ".broken'" in message
  assert 'RuntimeError: bad learning rate table' in message
  # Not swallowed on the next lookup either.
  with pytest.raises(model_registry.ConfigImportError, match='broken'):
    model_registry.ListModels()


def test_an_import_error_in_a_config_subpackage_is_not_swallowed(config_package):
  _, write = config_package
  write('lm/__init__.py', 'import no_such_module_anywhere\n')
  write('lm/big.py', _GOOD_CONFIG)
  with pytest.raises(model_registry.ConfigImportError, match=r"\.lm'.*no_such_module_anywhere"):
    model_registry.ListModels()


def test_missing_params_package_is_explained_on_a_miss(monkeypatch, registry):
  monkeypatch.setattr(model_params, 'PARAMS_PACKAGE', f'absent_{uuid.uuid4().hex[:8]}')
  monkeypatch.setattr(model_registry, '_params_imported', False)
  monkeypatch.setattr(model_registry, '_params_missing_reason', None)
  with pytest.raises(ValueError, match='Configs were not loaded: no package'):
    model_registry.GetParams('vision.small.Good')
