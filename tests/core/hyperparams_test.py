"""Tests of hyperparams: the Params API, and its invariant that a Params tree
reads back from its own text unchanged (FromText, overrides, files)."""

import enum
import importlib
import os
import pickle
import subprocess
import sys
import uuid

import pytest
import tensorflow as tf

from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core.hyperparams import (
    REQUIRED, ApplyOverrides, ApplyOverridesFile, InstantiableParams, Params,
    ParamsError, UnknownParamError)


# --- classes and values the params refer to (module level, so importable) ----


class Dense:
  """A fake layer with the Lingvo `Params()` classmethod."""

  @classmethod
  def Params(cls):
    p = InstantiableParams(cls)
    p.Define('input_dim', 0, 'Input size.')
    p.Define('output_dim', REQUIRED, 'Output size.')
    p.Define('activation', 'relu', 'Activation name.')
    return p

  def __init__(self, params, extra=None):
    self.params = params
    self.extra = extra


class Conv(Dense):

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('filter_shape', (3, 3), 'Kernel (h, w).')
    p.Define('init', _Init('xavier', 1.0), 'Weight init.')
    return p


class Plain:
  """A class without a Params() classmethod."""

  def __init__(self, params):
    self.params = params


class Color(enum.Enum):
  RED = 1
  GREEN = 2


def Relu(x):
  return max(x, 0)


def _Init(method, scale):
  p = Params()
  p.Define('method', method, 'Init method.')
  p.Define('scale', scale, 'Init scale.')
  return p


def _Encoder():
  p = Params()
  p.Define('num_layers', 2, 'Number of layers.')
  p.Define('layers', [Dense.Params(), Dense.Params()], 'Layer Params.')
  p.Define('residual', None, 'Optional residual layer Params.')
  return p


def _Model():
  """A large tree: several levels, lists of Params, dicts, tuples, oddities."""
  p = InstantiableParams(Plain)
  p.Define('name', 'model', 'Name.')
  p.Define('learning_rate', 0.1, 'Learning rate.')
  p.Define('epsilon', 1e-8, 'Epsilon.')
  p.Define('use_bias', True, 'Bias.')
  p.Define('dtype', tf.float32, 'Dtype.')
  p.Define('index_dtype', tf.int32, 'Index dtype.')
  p.Define('optimizer_cls', Dense, 'A class.')
  p.Define('fn', Relu, 'A function.')
  p.Define('color', Color.RED, 'An enum member.')
  p.Define('notes', None, 'Free text.')
  p.Define('shape', (2, 3), 'A tuple.')
  p.Define('dims', [1, 2, 3], 'A list.')
  p.Define('empty', [], 'An empty list.')
  p.Define('table', {'a': 1, 'b': [1.5, None]}, 'A dict.')
  p.Define('nothing', Params(), 'An empty Params.')
  p.Define('encoder', _Encoder(), 'The encoder.')
  p.Define('heads', {'cls': Dense.Params()}, 'Dict of layer Params.')
  p.Define('towers', ([Conv.Params()], Params()), 'Nested containers.')
  p.Define('batch_size', REQUIRED, 'Batch size.')
  return p


def _Modified():
  """_Model() changed in every way FromText must reproduce."""
  p = _Model()
  p.name = ('ünïcödé ✓ "quoted" \'single\' a:b=c;d # not a comment\n'
            '2nd line')
  p.learning_rate = 3e-4
  p.epsilon = float('inf')
  p.use_bias = False
  p.dtype = tf.bfloat16
  p.optimizer_cls = Conv
  p.fn = len
  p.color = Color.GREEN
  p.notes = {'k': (1, 2), 'set': {3, 1, 2}}
  p.shape = (7,)
  p.dims = []
  p.empty = [[], (), {}, '']
  p.table = {1: 'one', 'x;y': -2}
  p.batch_size = 64
  enc = p.encoder
  enc.num_layers = 3
  enc.layers[0].input_dim = 8
  enc.layers[1] = Conv.Params().Set(input_dim=4, output_dim=5)
  enc.layers[1].init.scale = 0.5
  extra = InstantiableParams(Plain)
  extra.Define('k', 1, 'An ad hoc field.')
  enc.layers.append(extra)
  enc.layers.append(Params())
  adhoc = Params()
  adhoc.Define('x', [1], 'x')
  adhoc.Define('inner', _Init('he', 2.0), 'Nested plain Params.')
  enc.layers.append(adhoc)
  enc.residual = Dense.Params().Set(output_dim=7)
  p.heads['cls'].Delete('activation')
  p.heads['aux'] = Conv.Params()
  p.towers = ([], Params(), [Dense.Params(), 3])
  return p


# --- Define, attribute access, Set, Get, Delete -------------------------------


def test_define_and_attribute_access():
  p = Params()
  p.Define('dim', 4, 'Size.')
  assert p.dim == 4
  p.dim = 5
  assert p.Get('dim') == 5
  assert p.GetDescription('dim') == 'Size.'
  assert list(p.IterParams()) == [('dim', 5)]


def test_define_twice_names_full_path():
  p = _Model()
  with pytest.raises(ParamsError, match=r"'encoder\.num_layers' is already"):
    p.encoder.Define('num_layers', 1, 'again')


@pytest.mark.parametrize('name', ['1x', 'a-b', 'class', '_private', 'Set',
                                  'Copy', 'Instantiate', ''])
def test_define_rejects_bad_names(name):
  with pytest.raises(ParamsError):
    InstantiableParams().Define(name, 1, 'bad')


def test_defaults_are_stored_by_value():
  default = [1, 2]
  a, b = Params(), Params()
  a.Define('x', default, '')
  b.Define('x', default, '')
  a.x.append(3)
  assert default == [1, 2] and b.x == [1, 2]
  a.Define('cls', Dense, '')
  a.Define('dtype', tf.float32, '')
  a.Define('fn', Relu, '')
  assert a.cls is Dense and a.dtype is tf.float32 and a.fn is Relu


def test_unknown_get_and_set_name_full_path_and_close_names():
  p = _Model()
  with pytest.raises(AttributeError) as e:
    _ = p.encoder.num_layerz
  assert "'encoder.num_layerz'" in str(e.value)
  assert 'did you mean: num_layers' in str(e.value)
  assert 'Defined here: num_layers, layers, residual.' in str(e.value)
  with pytest.raises(UnknownParamError, match=r"'encoder\.layers\[0\]\."
                     r"input_dimm'.*did you mean: input_dim"):
    p.encoder.layers[0].input_dimm = 3
  assert not hasattr(p, 'nope')
  with pytest.raises(AttributeError, match='did you mean: Instantiate'):
    p.Instantiat()  # pylint: disable=not-callable


def test_set_with_dotted_and_indexed_keys():
  p = _Model()
  assert p.Set(**{'encoder.num_layers': 6,
                  'encoder.layers[1].input_dim': 9,
                  "heads['cls'].output_dim": 3,
                  'towers[0][0].filter_shape': (5, 5),
                  'shape[1]': 4}) is p
  assert p.encoder.num_layers == 6
  assert p.encoder.layers[1].input_dim == 9
  assert p.heads['cls'].output_dim == 3
  assert p.towers[0][0].filter_shape == (5, 5)
  assert p.shape == (2, 4)
  assert p.Get('encoder.layers[-1].input_dim') == 9
  with pytest.raises(UnknownParamError, match=r"'encoder\.layers\[5\]'.*2 el"):
    p.Set(**{'encoder.layers[5].input_dim': 1})
  with pytest.raises(UnknownParamError, match='did you mean: encoder'):
    p.Set(**{'encodr.num_layers': 1})
  with pytest.raises(ParamsError, match='Bad param path'):
    p.Get('encoder..x')


def test_delete_and_contains():
  p = _Model()
  assert 'encoder.layers[1].activation' in p
  assert p.Delete('name', 'encoder.layers[1].activation') is p
  assert 'name' not in p and 'encoder.layers[1].activation' not in p
  assert 'encoder.layers[0].activation' in p and 'encoder.layers[9]' not in p
  with pytest.raises(UnknownParamError, match="'encoder.nme'"):
    p.Delete('encoder.nme')


def test_copy_is_deep_but_shares_classes_and_dtypes():
  p = _Model()
  q = p.Copy()
  assert q == p and q is not p
  q.dims.append(4)
  q.encoder.layers[0].input_dim = 100
  q.encoder.layers.pop()
  q.table['b'].append(0)
  assert p.dims == [1, 2, 3] and p.table['b'] == [1.5, None]
  assert p.encoder.layers[0].input_dim == 0 and len(p.encoder.layers) == 2
  assert q.dtype is tf.float32 and q.optimizer_cls is Dense and q.fn is Relu
  assert q != p


def test_equality_is_structural():
  assert _Model() == _Model()
  p, q = _Model(), _Model()
  q.encoder.layers[1].activation = 'gelu'
  assert p != q
  assert Params() != InstantiableParams()
  a, b = Params(), Params()
  a.Define('x', 1, 'one doc')
  b.Define('x', 1, 'another doc')
  assert a == b  # Descriptions are documentation, not value.


def test_str_and_repr_are_the_text_dump():
  assert str(_Model()) == _Model().ToText()
  assert repr(_Model()) == f'InstantiableParams(\n{_Model().ToText()})'


def test_pickle_keeps_required_identity():
  p = pickle.loads(pickle.dumps(_Model()))
  assert p == _Model() and p.batch_size is REQUIRED


# --- Instantiate -------------------------------------------------------------


def test_instantiate_lists_every_required_path():
  p = _Model()
  with pytest.raises(ParamsError) as e:
    p.Instantiate()
  for path in ('batch_size', 'encoder.layers[0].output_dim',
               'encoder.layers[1].output_dim', "heads['cls'].output_dim",
               'towers[0][0].output_dim'):
    assert path in str(e.value)


def test_instantiate_builds_the_class_with_its_params():
  p = Dense.Params().Set(output_dim=3)
  layer = p.Instantiate(extra='x')
  assert isinstance(layer, Dense) and layer.params is p and layer.extra == 'x'
  with pytest.raises(ParamsError, match='expected a class'):
    InstantiableParams().Instantiate()


# --- ToText / FromText -------------------------------------------------------


def test_to_text_is_sorted_path_value_lines():
  lines = _Model().ToText().splitlines()
  assert 'encoder.layers[0].input_dim : 0' in lines
  assert 'encoder.layers : [Params(...), Params(...)]' in lines
  assert 'learning_rate : 0.1' in lines and 'epsilon : 1e-08' in lines
  assert 'dtype : tf.float32' in lines and 'batch_size : REQUIRED' in lines
  assert f'optimizer_cls : @{__name__}.Dense' in lines
  assert 'nothing : Params(...)' in lines and 'empty : []' in lines
  assert "heads['cls'].activation : 'relu'" in lines
  assert 'towers[0][0].init.method : \'xavier\'' in lines
  assert lines == sorted(lines)
  assert all(' : ' in line for line in lines)


def test_from_text_round_trips_unmodified_tree():
  q = _Model().Set(learning_rate=0.5)
  assert q.FromText(_Model().ToText()) is q
  assert q == _Model()


def test_from_text_round_trips_a_heavily_modified_tree():
  p = _Modified()
  text = p.ToText()
  q = _Model()
  q.FromText(text)
  assert q == p, _Diff(p, q)
  assert q.ToText() == text
  assert q.encoder.layers[1].init.scale == 0.5
  assert type(q.encoder.layers[2]) is InstantiableParams
  assert q.encoder.layers[2].cls is Plain
  assert q.encoder.layers[4].inner.method == 'he'
  assert 'activation' not in q.heads['cls']
  assert q.dtype is tf.bfloat16 and q.fn is len and q.color is Color.GREEN
  # Descriptions survive where the Params is reused or rebuilt by its class.
  assert q.encoder.GetDescription('layers[0].input_dim') == 'Input size.'


def test_from_text_swaps_a_sub_params_class_and_shrinks_lists():
  p = _Model()
  p.encoder.layers = [Conv.Params()]
  p.heads['cls'] = Conv.Params()
  q = _Model()
  q.FromText(p.ToText())
  assert q == p and len(q.encoder.layers) == 1


def test_from_text_builds_params_where_the_constructor_has_none_or_plain():
  p = _Model()
  p.nothing = Dense.Params()  # A plain, empty Params becomes a layer's.
  p.notes = [Conv.Params(), Params()]  # None becomes a list of Params.
  q = _Model()
  q.FromText(p.ToText())
  assert q == p and type(q.nothing) is InstantiableParams


def test_from_text_ignores_comments_and_blank_lines():
  q = _Model()
  q.FromText('# A comment: with \'quotes\'\n\n  name : "x"\n\n# end\n')
  assert q.name == 'x'


def test_from_text_rejects_unknown_top_level_keys():
  q = _Model()
  with pytest.raises(ParamsError, match=r"'encoder\.num_layer'.*did you mean: "
                     'num_layers'):
    q.FromText('encoder.num_layer : 3\nname : "changed"')
  assert q == _Model()  # All or nothing.


def test_from_text_requires_literals():
  with pytest.raises(ParamsError, match=r"name: cannot set to 'x y'"):
    _Model().FromText('name : x y')
  with pytest.raises(ParamsError, match='cannot import'):
    _Model().FromText('optimizer_cls : @no_such_module.Layer')


def test_from_text_keeps_references_into_the_tree_valid():
  p = _Model()
  encoder = p.encoder
  p.FromText('encoder.num_layers : 7')
  assert encoder.num_layers == 7


def test_module_imports_no_tensorflow_until_a_dtype_is_parsed():
  code = (
      'import sys\n'
      'from lingvo_gpipe.core import hyperparams as h\n'
      'p = h.InstantiableParams(dict)\n'
      'p.Define("x", [h.Params()], "")\n'
      'q = h.InstantiableParams(dict)\n'
      'q.Define("x", [], "")\n'
      'assert q.FromText(p.ToText()) == p\n'
      'h.ApplyOverrides(q, "x[0] : Params(...)")\n'
      'assert "tensorflow" not in sys.modules, "tensorflow imported"\n')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, check=False,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                              os.path.abspath(hyperparams.__file__)))))
  assert result.returncode == 0, result.stderr


# --- ApplyOverrides ----------------------------------------------------------


def test_overrides_with_both_syntaxes():
  p = _Model()
  ApplyOverrides(p, "name=big; learning_rate = 1; encoder.num_layers : 4\n"
                 "encoder.layers[1].activation='a;b=c'; use_bias=0\n"
                 'dtype=bfloat16; index_dtype : tf.int64\n'
                 f'optimizer_cls={__name__}.Conv; fn=@{__name__}.Relu\n'
                 f'color=@{__name__}.Color.GREEN\n'
                 "notes=[1, 'x']; shape=(4, 5); table={'z': 1}; dims=[]\n"
                 'batch_size=32; encoder.residual : Params(...)')
  assert p.name == 'big'
  assert p.learning_rate == 1.0 and isinstance(p.learning_rate, float)
  assert p.encoder.num_layers == 4 and p.use_bias is False
  assert p.encoder.layers[1].activation == 'a;b=c'
  assert p.dtype is tf.bfloat16 and p.index_dtype is tf.int64
  assert p.optimizer_cls is Conv and p.fn is Relu and p.color is Color.GREEN
  assert p.notes == [1, 'x'] and p.shape == (4, 5) and p.table == {'z': 1}
  assert p.batch_size == 32 and p.encoder.residual == Params()


def test_overrides_accept_a_to_text_dump():
  p = _Modified()
  q = _Model()
  ApplyOverrides(q, p.ToText())
  assert q.encoder.layers[1].init.scale == 0.5
  assert len(q.encoder.layers) == 5 and q.name == p.name


@pytest.mark.parametrize('text,value', [
    ('use_bias=true', True), ('use_bias=False', False), ('use_bias=1', True),
    ('use_bias=0', False), ('name="quoted"', 'quoted'), ('name=123', '123'),
    ('name=a b@c', 'a b@c'), ('notes=word', 'word'), ('notes=1.5', 1.5),
    ('batch_size=[1]', [1]), ('learning_rate=None', None),
    ('learning_rate=-2', -2.0), ('dims=[4, 5]', [4, 5]),
    ('table={}', {}), ('shape=()', ()),
    ("encoder.layers[0].activation='x'", 'x'),
])
def test_override_values(text, value):
  p = _Model()
  ApplyOverrides(p, text)
  assert p.Get(text.split('=')[0]) == value


def test_override_splitting_needs_balanced_quotes():
  with pytest.raises(ParamsError, match='Unbalanced quote'):
    ApplyOverrides(_Model(), "name=it's")


@pytest.mark.parametrize('text,expected', [
    ('encoder.num_layers=0.1', 'int'),
    ('encoder.num_layers=true', 'int'),
    ('learning_rate=fast', 'float'),
    ('use_bias=yes', 'bool'),
    ('dims=(1, 2)', 'list literal'),
    ('shape=[1, 2]', 'tuple literal'),
    ('table=3', 'dict literal'),
    ('optimizer_cls=no_such_module.Layer', 'cannot import'),
    (f'optimizer_cls={__name__}.Relu', 'class given by import path'),
    (f'fn={__name__}.Dense', 'function given by import path'),
    ('color=2', 'enum member'),
    ('dtype=float33', 'not a TF dtype'),
    ('dtype=3', 'TF dtype'),
    ('encoder=3', 'Params'),
])
def test_override_type_errors_name_key_value_and_expected(text, expected):
  key, value = text.split('=')
  p = _Model()
  with pytest.raises(ParamsError) as e:
    ApplyOverrides(p, text)
  assert str(e.value).startswith(f'{key}: cannot set to {value!r}')
  assert expected in str(e.value)
  assert p == _Model()


def test_override_bad_key_names_closest():
  with pytest.raises(ParamsError, match=r"'encoder\.layers\[0\]\.input_dm'.*"
                     'did you mean: input_dim'):
    ApplyOverrides(_Model(), 'encoder.layers[0].input_dm=3')
  with pytest.raises(ParamsError, match='not `key=value`'):
    ApplyOverrides(_Model(), 'learning_rate')


def test_overrides_grow_a_list_of_params():
  p = _Model()
  ApplyOverrides(p, 'encoder.layers : [Params(...), Params(...), Params(...)]\n'
                 f'encoder.layers[2].cls : @{__name__}.Conv\n'
                 'encoder.layers[2].input_dim : 16\n'
                 'encoder.layers[0].input_dim : 2\n')
  assert p.encoder.layers[2].input_dim == 16
  assert p.encoder.layers[2].filter_shape == (3, 3)  # Conv.Params() default.
  assert p.encoder.layers[0].input_dim == 2 and p.encoder.layers[1] == (
      Dense.Params())


def test_override_changing_cls_keeps_other_fields():
  p = _Model()
  ApplyOverrides(p, f'encoder.layers[0].cls=@{__name__}.Conv')
  assert p.encoder.layers[0].cls is Conv
  assert p.encoder.layers[0].activation == 'relu'


def test_overrides_file(tmp_path):
  path = tmp_path / 'overrides.txt'
  path.write_text('# tuned\nname : "file"\nencoder.num_layers=5\n',
                  encoding='utf-8')
  p = ApplyOverridesFile(_Model(), str(path))
  assert p.name == 'file' and p.encoder.num_layers == 5
  dump = tmp_path / 'dump.txt'
  dump.write_text(_Modified().ToText(), encoding='utf-8')
  assert ApplyOverridesFile(_Model(), str(dump)).encoder.num_layers == 3
  path.write_text('encoder.num_layers=x\n', encoding='utf-8')
  with pytest.raises(ParamsError, match='overrides.txt.*encoder.num_layers'):
    ApplyOverridesFile(_Model(), str(path))
  with pytest.raises(ParamsError, match='missing.txt'):
    ApplyOverridesFile(_Model(), str(tmp_path / 'missing.txt'))


# --- import paths: loading text runs no code it names ------------------------


def _Run():
  """A tree with an int field and a class field, like a trainer config."""
  p = Params()
  train = Params()
  train.Define('max_steps', 100, 'Steps.')
  train.Define('optimizer_cls', Dense, 'A class.')
  train.Define('notes', None, 'Anything.')
  train.Define('dims', [1], 'A list.')
  p.Define('train', train, 'Training.')
  p.Define('layers', [Dense.Params()], 'Layer Params.')
  return p


def _FromTextLoader(p, text, tmp_path):
  del tmp_path
  return p.FromText(text)


def _OverridesLoader(p, text, tmp_path):
  del tmp_path
  return ApplyOverrides(p, text)


def _FileLoader(p, text, tmp_path):
  path = tmp_path / 'shared_params.txt'
  path.write_text(text, encoding='utf-8')
  return ApplyOverridesFile(p, str(path))


_LOADERS = pytest.mark.parametrize(
    'load', [_FromTextLoader, _OverridesLoader, _FileLoader],
    ids=['FromText', 'ApplyOverrides', 'ApplyOverridesFile'])


class _Pwn:
  """A module on sys.path whose top-level code leaves a marker file."""

  def __init__(self, directory):
    self.name = f'pwn_{uuid.uuid4().hex[:12]}'
    self.marker = directory / 'marker'
    (directory / f'{self.name}.py').write_text(
        f'open({str(self.marker)!r}, "w").close()\n'
        'class X:\n'
        '  pass\n', encoding='utf-8')

  @property
  def ran(self):
    return self.marker.exists()


@pytest.fixture
def pwn(tmp_path, monkeypatch):
  module_dir = tmp_path / 'site'
  module_dir.mkdir()
  module = _Pwn(module_dir)
  monkeypatch.syspath_prepend(str(module_dir))
  # Each test starts with only the project's roots, and leaves none behind.
  monkeypatch.setattr(hyperparams, '_extra_import_roots', set())
  yield module
  sys.modules.pop(module.name, None)


@_LOADERS
def test_import_path_for_an_int_field_imports_nothing(load, pwn, tmp_path):
  p = _Run()
  with pytest.raises(ParamsError) as e:
    load(p, f'train.max_steps : @{pwn.name}.X', tmp_path)
  assert 'train.max_steps' in str(e.value)
  assert f'@{pwn.name}.X' in str(e.value)
  assert 'int' in str(e.value)
  assert not pwn.ran and pwn.name not in sys.modules
  assert p == _Run()
  # Allowing the root does not make an int field take a class.
  hyperparams.AllowImportRoots([pwn.name])
  with pytest.raises(ParamsError, match='train.max_steps'):
    load(p, f'train.max_steps : @{pwn.name}.X', tmp_path)
  assert not pwn.ran


@_LOADERS
def test_import_path_outside_the_roots_needs_an_explicit_opt_in(
    load, pwn, tmp_path):
  p = _Run()
  text = f'train.optimizer_cls : @{pwn.name}.X'
  with pytest.raises(ParamsError) as e:
    load(p, text, tmp_path)
  message = str(e.value)
  assert 'train.optimizer_cls' in message and f'{pwn.name}.X' in message
  assert f'AllowImportRoots([{pwn.name!r}])' in message
  assert f'--params_import_roots={pwn.name}' in message
  assert not pwn.ran and pwn.name not in sys.modules
  assert p == _Run()

  hyperparams.AllowImportRoots([pwn.name])
  assert pwn.name in hyperparams.ImportRoots()
  load(p, text, tmp_path)
  assert pwn.ran
  assert p.train.optimizer_cls is sys.modules[pwn.name].X


def test_bare_import_path_override_is_checked_too(pwn):
  with pytest.raises(ParamsError, match=r'train\.optimizer_cls.*'
                     'AllowImportRoots'):
    ApplyOverrides(_Run(), f'train.optimizer_cls={pwn.name}.X')
  assert not pwn.ran


@_LOADERS
def test_placeholder_cls_outside_the_roots_is_refused(load, pwn, tmp_path):
  text = (f'layers : [Params(...), Params(...)]\n'
          f'layers[1].cls : @{pwn.name}.X\n')
  with pytest.raises(ParamsError, match=r'layers\[1\]\.cls.*AllowImportRoots'):
    load(_Run(), text, tmp_path)
  assert not pwn.ran
  hyperparams.AllowImportRoots(pwn.name)
  p = load(_Run(), text, tmp_path)
  assert pwn.ran and p.layers[1].cls is sys.modules[pwn.name].X


@_LOADERS
def test_fields_of_no_class_kind_never_import(load, pwn, tmp_path):
  hyperparams.AllowImportRoots([pwn.name])  # Even allowed: the field decides.
  for text, field in ((f'train.notes : @{pwn.name}.X', 'train.notes'),
                      (f'train.dims : [@{pwn.name}.X]', 'train.dims')):
    with pytest.raises(ParamsError) as e:
      load(_Run(), text, tmp_path)
    assert field in str(e.value) and 'already imported' in str(e.value)
  assert not pwn.ran


def test_already_imported_modules_resolve_without_running_again(pwn):
  module = importlib.import_module(pwn.name)
  pwn.marker.unlink()
  p = _Run()
  ApplyOverrides(p, f'train.optimizer_cls : @{pwn.name}.X')
  p.FromText(f'train.notes : @{pwn.name}.X\n'
             f'train.dims : [@{pwn.name}.X, @collections.OrderedDict]')
  assert p.train.optimizer_cls is module.X and p.train.notes is module.X
  assert p.train.dims == [module.X, __import__('collections').OrderedDict]
  assert not pwn.ran  # Looked up, not imported again.
  # Being imported does not let a non-class field take a class.
  with pytest.raises(ParamsError, match='train.max_steps'):
    p.FromText(f'train.max_steps : @{pwn.name}.X')


def test_project_classes_import_in_a_fresh_process(tmp_path):
  pwn = _Pwn(tmp_path)
  code = (
      'import sys\n'
      'from lingvo_gpipe.core import hyperparams as h\n'
      'module = "lingvo_gpipe.core.nested_map"\n'
      'assert module not in sys.modules, "imported too early"\n'
      'p = h.Params()\n'
      'p.Define("layers", [], "")\n'
      'p.Define("opt", dict, "")\n'
      'p.FromText("layers : [Params(...)]\\n"\n'
      '           f"layers[0].cls : @{module}.NestedMap")\n'
      'h.ApplyOverrides(p, f"opt : @{module}.NestedMap")\n'
      'assert p.layers[0].cls is sys.modules[module].NestedMap\n'
      'assert p.opt is p.layers[0].cls\n'
      'try:\n'
      f'  h.ApplyOverrides(p, "opt : @{pwn.name}.X")\n'
      'except h.ParamsError as e:\n'
      '  print(e)\n')
  root = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(hyperparams.__file__))))
  result = subprocess.run(
      [sys.executable, '-c', code], capture_output=True, text=True,
      check=False, cwd=root,
      env=dict(os.environ, PYTHONPATH=os.pathsep.join([root, str(tmp_path)])))
  assert result.returncode == 0, result.stderr
  assert f"opt: cannot set to '@{pwn.name}.X'" in result.stdout
  assert not pwn.ran


def test_allow_import_roots_takes_top_level_names_only(monkeypatch):
  monkeypatch.setattr(hyperparams, '_extra_import_roots', set())
  for bad in ('mylib.sub', 'my-lib', '', '/tmp/mylib', 3):
    with pytest.raises(ParamsError, match='top-level module name'):
      hyperparams.AllowImportRoots([bad])
  hyperparams.AllowImportRoots(['mylib'])
  assert hyperparams.ImportRoots() == ('lingvo_gpipe', 'mylib', 'params',
                                       'tasks')


def _Diff(p, q):
  a, b = set(p.ToText().splitlines()), set(q.ToText().splitlines())
  return f'only in p: {sorted(a - b)}\nonly in q: {sorted(b - a)}'
