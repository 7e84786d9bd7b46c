"""Params: the declared, copyable, printable knobs of layers and experiments.

Invariant: a Params tree and its text are interchangeable. For any Params `p`
made by a constructor `f` and then modified (values changed, lists of Params
grown or shrunk, sub-Params swapped), `q = f(); q.FromText(p.ToText())` leaves
`q == p`. Values are held by value: `Define` deep-copies its default, so two
trees never share a mutable default.

No ML framework is imported here: TF dtypes are recognized by duck typing, and
`tensorflow` is imported only to parse a dtype from text.

Text format (written by ToText; read by FromText, ApplyOverrides and
ApplyOverridesFile):
  * One line per leaf, `path : value`, sorted by path (indices numerically).
    Paths are dotted field names; an element of a list or tuple is `name[i]`,
    of a dict `name['key']` (str or int keys), e.g. `layers[0].input_dim : 4`.
  * A value is a Python literal as `repr` writes it (floats round-trip exactly;
    also `inf`, `nan`), or `REQUIRED`, or `tf.float32` for a TF dtype, or
    `@pkg.module.QualName` for a class, function or enum member (found again by
    import; see below).
  * A list, tuple or dict holding Params is written once as a skeleton with a
    `Params(...)` placeholder per Params, e.g. `layers : [Params(...), 3]`,
    followed by each placeholder's own lines; an empty Params is `Params(...)`.
    A placeholder is rebuilt from its `cls` line (`cls.Params()` when the
    class has one, else `InstantiableParams(cls)`), or as a plain `Params`
    without one.
  * Blank lines and lines starting with `#` are ignored; `key=value` and
    `;`-separated assignments are read too, so overrides and dumps share one
    syntax.
  * Reading text runs no code it names: params files are shared, and importing
    a module runs its top-level code. So an `@` path is imported only for a
    field whose current value is a class, function or enum member, or a `cls`
    field (a `Params(...)` placeholder's class), and only if the module is
    already imported (looking it up runs nothing) or lies under an import root:
    the project's own `lingvo_gpipe`, `tasks` and `params`, plus the roots
    given to AllowImportRoots (the trainer's --params_import_roots). A field
    holding None, REQUIRED or a container looks `@` paths up only among
    modules already imported; any other field refuses them. The field's kind
    is checked before anything is imported.
"""

import ast
import copy
import difflib
import enum
import importlib
import inspect
import keyword
import re
import sys
import types
from typing import (Any, Callable, Dict, Iterable, Iterator, List, NamedTuple,
                    Optional, Tuple)


class _Required:
  """Type of REQUIRED; copies and pickles of REQUIRED are REQUIRED itself."""

  def __repr__(self) -> str:
    return 'REQUIRED'

  def __reduce__(self) -> str:
    return 'REQUIRED'  # By reference to the module global.


# Default of a field that must be set before Instantiate.
REQUIRED = _Required()


class ConfigError(ValueError):
  """A Params value no run can use; the message names it and what is valid.

  Raised where Params are checked: their definitions, paths and overrides,
  and a layer's constructor (Instantiate turns a plain ValueError raised
  while constructing into one). A binary reports it as a bad invocation; any
  other error is a bug and keeps its traceback (run_errors.py).
  """


class ParamsError(ConfigError):
  """A bad definition, path, text or override value; the message says which."""


class UnknownParamError(ParamsError, AttributeError):
  """An undefined name or path; an AttributeError, so hasattr() works."""


class _Item(NamedTuple):
  """Path token for `[key]`; a bare str token is a field name."""
  key: Any


class _Slot:
  """Text's `Params(...)` placeholder until loading builds a Params for it."""

  def __init__(self):
    self.reuse = None  # The Params this slot replaces, kept if compatible.


_ABSENT = object()  # A field not (yet) defined in a Params being rebuilt.
_UNPARSED = object()  # Text that is not a value literal.

_QUOTED = r"'(?:[^'\\]|\\.)*'" + r'|"(?:[^"\\]|\\.)*"'
# One path token: a field name, or an int or quoted-string index.
_PATH_TOKEN = re.compile(
    rf'\s*(?:(\.)?\s*([^\W\d]\w*)|\[\s*(-?\d+|{_QUOTED})\s*\])')
# A quoted string (kept as is) or an `@import.path` (not Python: made a call).
_STRING_OR_IMPORT = re.compile(rf'({_QUOTED})|@([^\W\d][\w.]*)')
_BOOL_WORDS = {'true': True, 'True': True, '1': True,
               'false': False, 'False': False, '0': False}


# --- paths --------------------------------------------------------------------


def _ParsePath(key: str) -> Tuple[Any, ...]:
  """`a.b[0]['k'].c` -> ('a', 'b', _Item(0), _Item('k'), 'c')."""
  tokens, pos, key = [], 0, key.strip()
  while pos < len(key):
    m = _PATH_TOKEN.match(key, pos)
    if not m or (m.group(2) and bool(m.group(1)) != bool(tokens)) or (
        m.group(3) and not tokens):
      raise ParamsError(f'Bad param path {key!r} at position {pos}: expected '
                        "`name`, `.name`, `[int]` or `['key']`.")
    tokens.append(m.group(2) or _Item(ast.literal_eval(m.group(3))))
    pos = m.end()
  if not tokens:
    raise ParamsError('Empty param path.')
  return tuple(tokens)


def _Join(prefix: str, tokens: Tuple[Any, ...]) -> str:
  """Formats tokens as a path below `prefix`."""
  path = prefix
  for t in tokens:
    path += f'[{t.key!r}]' if isinstance(t, _Item) else (
        f'.{t}' if path else t)
  return path


def _SortKey(tokens: Tuple[Any, ...]) -> Tuple[Any, ...]:
  return tuple((0, t) if isinstance(t, str) else
               (1, t.key) if isinstance(t.key, int) else (2, repr(t.key))
               for t in tokens)


def _UnknownName(params: 'Params', name: str, path: str,
                 with_methods: bool = False) -> UnknownParamError:
  """The error for an undefined name: full path, close names, valid names."""
  names = list(params._fields)
  pool = names + ([n for n in dir(type(params)) if not n.startswith('_')]
                  if with_methods else [])
  msg = f'{path!r}: no such param'
  close = difflib.get_close_matches(name, pool, n=3, cutoff=0.6)
  if close:
    msg += f"; did you mean: {', '.join(close)}?"
  if len(names) <= 12:
    msg += f" Defined here: {', '.join(names) or '(none)'}."
  return UnknownParamError(msg)


# --- values -------------------------------------------------------------------


def _IsDType(v: Any) -> bool:
  t = type(v)
  return t.__name__ == 'DType' and t.__module__.startswith('tensorflow')


def _IsUnset(v: Any) -> bool:
  """Whether v stands for a value yet to be given (so any value fits)."""
  return v is None or v is REQUIRED or v is _ABSENT or isinstance(v, _Slot)


def _ByPathKind(v: Any) -> Optional[str]:
  """What kind of object, written as its import path, v is; None if none."""
  if isinstance(v, enum.Enum):
    return 'enum member'
  if inspect.isclass(v):
    return 'class'
  if isinstance(v, (types.FunctionType, types.BuiltinFunctionType)):
    return 'function'
  return None


def _ImportPathOf(v: Any) -> Optional[str]:
  """`pkg.module.QualName` of a class, function or enum member, else None."""
  kind = _ByPathKind(v)
  if kind == 'enum member':
    return f'{type(v).__module__}.{type(v).__qualname__}.{v.name}'
  return f'{v.__module__}.{v.__qualname__}' if kind else None


def _FormatValue(v: Any) -> str:
  """One-line text of a value; Params become `Params(...)` placeholders."""
  if v is REQUIRED:
    return 'REQUIRED'
  if isinstance(v, Params):
    return 'Params(...)'
  if _IsDType(v):
    return f'tf.{v.name}'
  path = _ImportPathOf(v)
  if path:
    return '@' + path
  if type(v) is list:
    return '[' + ', '.join(map(_FormatValue, v)) + ']'
  if type(v) is tuple:
    body = ', '.join(map(_FormatValue, v))
    return f'({body},)' if len(v) == 1 else f'({body})'
  if type(v) is dict:
    return '{' + ', '.join(f'{_FormatValue(k)}: {_FormatValue(x)}'
                           for k, x in v.items()) + '}'
  if type(v) is set:  # Sorted, so the text does not depend on hash seeds.
    return '{' + ', '.join(sorted(map(_FormatValue, v))) + '}' if v else 'set()'
  return repr(v)


# Top-level packages whose modules `@` paths may import: the project's own.
_PROJECT_IMPORT_ROOTS = ('lingvo_gpipe', 'params', 'tasks')
_extra_import_roots = set()  # Added by AllowImportRoots.


def AllowImportRoots(roots: Iterable[str]) -> None:
  """Lets `@` paths in text import modules under these top-level packages.

  Text (params files, overrides) may name classes of other libraries; their
  modules are imported only once their root is allowed here, because
  importing runs a module's top-level code (see the module docstring).

  Args:
    roots: top-level module names, e.g. ['mylib'] allows `@mylib.layers.Conv`.

  Raises:
    ParamsError: a root is not a top-level module name.
  """
  roots = [roots] if isinstance(roots, str) else list(roots)
  for root in roots:
    if not isinstance(root, str) or not root.isidentifier():
      raise ParamsError(
          f'AllowImportRoots: {root!r} is not a top-level module name; give '
          "a package's first name, e.g. 'mylib' (not 'mylib.sub' or a path).")
  _extra_import_roots.update(roots)


def ImportRoots() -> Tuple[str, ...]:
  """The top-level packages `@` paths may import from: project and allowed."""
  return tuple(sorted(set(_PROJECT_IMPORT_ROOTS) | _extra_import_roots))


def _Loaded(parts: List[str]) -> Any:
  """The object at `parts` within modules already imported; _ABSENT if none."""
  for i in range(len(parts), 0, -1):
    obj = sys.modules.get('.'.join(parts[:i]))
    if obj is None:
      continue
    for attr in parts[i:]:
      obj = getattr(obj, attr, _ABSENT)
      if obj is _ABSENT:
        return _ABSENT  # Maybe a submodule not imported yet.
    return obj
  return _ABSENT


def _Resolve(path: str, may_import: bool) -> Any:
  """The object `@path` names, importing its module only if the rules allow.

  Args:
    path: `pkg.module.QualName`.
    may_import: whether the field takes a class, function or enum member, so
      its module may be imported (under an import root).
  """
  parts = path.split('.')
  if not all(part.isidentifier() for part in parts):
    raise ParamsError(f'{path!r} is not an import path; expected '
                      '@pkg.module.Name')
  obj = _Loaded(parts)
  if obj is not _ABSENT:
    return obj
  if not may_import:
    raise ParamsError(
        f'cannot import {path!r}: this field holds no class, function or enum '
        'member, so its import paths are looked up only in modules already '
        "imported, and this one is not; set the field in the config's code "
        'instead')
  if parts[0] not in ImportRoots():
    raise ParamsError(
        f'cannot import {path!r}: refusing to import module {parts[0]!r}, as '
        'importing runs its code; text may import only modules under '
        f"{', '.join(ImportRoots())} or already imported. To trust it, call "
        f'hyperparams.AllowImportRoots([{parts[0]!r}]) (trainer: '
        f'--params_import_roots={parts[0]})')
  return _Import(path)


def _Resolver(name: Any, current: Any) -> Callable[[str], Any]:
  """How `@` paths in the text for field `name` (now `current`) resolve.

  Decided from the field alone, before anything is imported.
  """
  if _ByPathKind(current) or (name == 'cls' and _IsUnset(current)):
    return lambda path: _Resolve(path, may_import=True)
  if _IsUnset(current) or isinstance(current, (list, tuple, dict, set)):
    return lambda path: _Resolve(path, may_import=False)

  def Refuse(path: str) -> Any:
    raise ParamsError(
        f'@{path} is an import path, but this field holds a value of type '
        f'{type(current).__name__}; only a field holding a class, function or '
        'enum member takes one (nothing was imported)')

  return Refuse


def _Import(path: str) -> Any:
  """Finds `pkg.module.Outer.Name` by importing the longest module prefix.

  Runs the modules' code: callers check the path with _Resolve first.
  """
  parts = path.split('.')
  for i in range(len(parts), 0, -1):
    module_name = '.'.join(parts[:i])
    try:
      obj = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
      if e.name and module_name.startswith(e.name):
        continue  # Not a module; try a shorter prefix.
      raise ParamsError(f'importing {module_name!r} failed: {e}') from None
    except Exception as e:  # pylint: disable=broad-except
      raise ParamsError(f'importing {module_name!r} failed: {e!r}') from None
    for attr in parts[i:]:
      if not hasattr(obj, attr):
        raise ParamsError(f'cannot import {path!r}: {obj.__name__!r} has no '
                          f'attribute {attr!r}')
      obj = getattr(obj, attr)
    return obj
  raise ParamsError(f'cannot import {path!r}: no module {parts[0]!r}')


def _DType(name: str) -> Any:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    return tf.as_dtype(name)
  except TypeError:
    raise ParamsError(f'{name!r} is not a TF dtype') from None


class _Unparsable(Exception):
  pass


def _Literal(text: str, resolve: Callable[[str], Any]) -> Any:
  """Parses one value of the text format; _UNPARSED if it is none.

  `@` paths are found with `resolve`.
  """
  code = _STRING_OR_IMPORT.sub(
      lambda m: m.group(1) or f'_import_({m.group(2)!r})', text.strip())
  try:
    return _Eval(ast.parse(code, mode='eval').body, resolve)
  except ParamsError:
    raise
  except (SyntaxError, ValueError, _Unparsable):
    return _UNPARSED


def _Eval(node: ast.AST, resolve: Callable[[str], Any]) -> Any:
  """Evaluates the literal subset of Python the text format uses."""
  if isinstance(node, ast.Constant) and node.value is not Ellipsis:
    return node.value
  if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
    kind = {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)]
    return kind(_Eval(e, resolve) for e in node.elts)
  if isinstance(node, ast.Dict) and None not in node.keys:
    return {_Eval(k, resolve): _Eval(v, resolve)
            for k, v in zip(node.keys, node.values)}
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
    v = _Eval(node.operand, resolve)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      return -v
  if isinstance(node, ast.Name):
    named = {'REQUIRED': REQUIRED, 'inf': float('inf'), 'nan': float('nan')}
    if node.id in named:
      return named[node.id]
  if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and
      node.value.id == 'tf'):
    return _DType(node.attr)
  if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and
      not node.keywords and len(node.args) <= 1):
    name, arg = node.func.id, node.args[0] if node.args else None
    constant = arg.value if isinstance(arg, ast.Constant) else None
    if name == 'Params' and constant is Ellipsis:
      return _Slot()
    if name == '_import_' and isinstance(constant, str):
      return resolve(constant)
    if name == 'set' and arg is None:
      return set()
  raise _Unparsable(ast.dump(node))


def _Coerce(text: str, current: Any, resolve: Callable[[str], Any]) -> Any:
  """Parses override `text` for a field whose value is `current`, or raises.

  `None` is accepted by every field (optional knobs are switched off that way).
  """
  text = text.strip()
  if text == 'None':
    return None
  if (isinstance(current, str) and not isinstance(current, enum.Enum) and
      text[:1] not in ('"', "'")):
    return text  # A bare word; parsing it could only mis-read it.
  value = _Literal(text, resolve)
  got = 'not a literal' if value is _UNPARSED else f'got {type(value).__name__}'

  def Expected(expected: str) -> ParamsError:
    return ParamsError(f'{got}; expected {expected}')

  if _IsUnset(current):
    return text if value is _UNPARSED else value
  kind = _ByPathKind(current)
  if kind:
    if value is _UNPARSED:
      value = resolve(text)
    if _ByPathKind(value) != kind:
      raise Expected(f'{kind} given by import path, e.g. @pkg.module.Name')
    return value
  if isinstance(current, bool):
    if isinstance(value, bool) or text in _BOOL_WORDS:
      return _BOOL_WORDS.get(text, value)
    raise Expected('bool (true/false/True/False/1/0)')
  if isinstance(current, (int, float)):
    if isinstance(value, int) and not isinstance(value, bool):
      return float(value) if isinstance(current, float) else value
    if isinstance(value, float) and isinstance(current, float):
      return value
    raise Expected(type(current).__name__)
  if isinstance(current, Params):
    if isinstance(value, _Slot):
      return value
    raise Expected('Params; set its fields with `key.field=value`')
  if _IsDType(current):
    if _IsDType(value):
      return value
    if value is _UNPARSED or isinstance(value, str):
      return _DType(value if isinstance(value, str) else text)
    raise Expected('TF dtype such as float32 or tf.float32')
  for base in (str, list, tuple, dict, set):
    if isinstance(current, base):
      if isinstance(value, base):
        return value
      raise Expected(f'{base.__name__} literal')
  if value is not _UNPARSED and isinstance(value, type(current)):
    return value
  raise Expected(type(current).__name__)


def _ParseValue(key: str, text: str, current: Any, typed: bool,
                name: Any) -> Any:
  """The one value parser: exact (FromText) or type-checked (overrides).

  `name` is the field's own name (last path token), `current` its value.
  """
  resolve = _Resolver(name, current)
  try:
    if typed:
      return _Coerce(text, current, resolve)
    value = _Literal(text, resolve)
    if value is _UNPARSED:
      raise ParamsError('not a value literal (quote strings; classes are '
                        '@pkg.module.Name, dtypes tf.float32)')
    return value
  except ParamsError as e:
    raise ParamsError(f'{key}: cannot set to {text.strip()!r}: {e}.') from None


def _Holds(v: Any, predicate: Callable[[Any], bool]) -> bool:
  """Whether v or an element of containers in v (not inside Params) fits."""
  if predicate(v):
    return True
  items = v.values() if isinstance(v, dict) else v if isinstance(
      v, (list, tuple, set)) else ()
  return any(_Holds(x, predicate) for x in items)


def _HoldsParams(v: Any) -> bool:
  return _Holds(v, lambda x: isinstance(x, (Params, _Slot)))


def _SameKind(container: Any, items: List[Any]) -> Any:
  """`items` as a container of the type of `container` (a list or tuple)."""
  if isinstance(container, tuple) and hasattr(container, '_fields'):
    return type(container)._make(items)  # A namedtuple.
  return type(container)(items)


def _Children(v: Any) -> Iterator[Tuple[Any, Any]]:
  """(path token, child) of a Params or container."""
  if isinstance(v, Params):
    yield from v.IterParams()
  elif isinstance(v, (list, tuple)):
    yield from ((_Item(i), x) for i, x in enumerate(v))
  elif isinstance(v, dict):
    yield from ((_Item(k), x) for k, x in v.items())


def _Leaves(v: Any, tokens: Tuple[Any, ...] = (),
            in_skeleton: bool = False) -> Iterator[Tuple[Tuple[Any, ...], Any]]:
  """(path tokens, value) of each text line for `v` at `tokens`, unsorted.

  A non-empty Params gets no line (its fields' lines imply it), nor does an
  element of a container whose skeleton line already shows it.
  """
  if tokens and not in_skeleton and not (isinstance(v, Params) and v._fields):
    yield tokens, v
  if _HoldsParams(v):
    for token, child in _Children(v):
      yield from _Leaves(child, tokens + (token,), not isinstance(v, Params))


def _Adopt(v: Any, path: str) -> None:
  """Records each Params' dotted path below `v`, so errors can name it."""
  if isinstance(v, Params):
    v.__dict__['_path'] = path
  for token, child in _Children(v):
    _Adopt(child, _Join(path, (token,)))


# --- Params -------------------------------------------------------------------


class _Field:
  __slots__ = ('value', 'description')

  def __init__(self, value: Any, description: str):
    self.value = value
    self.description = description


class Params:
  """An ordered set of named, documented values; nested Params form a tree.

  Fields are read and written as attributes (`p.dim = 4`); unknown names raise
  UnknownParamError naming the full dotted path and the closest defined names.
  """

  def __init__(self):
    self.__dict__['_fields'] = {}
    self.__dict__['_path'] = ''

  # Attribute access maps to fields; `_private` names stay ordinary attributes.
  def __getattr__(self, name: str) -> Any:
    fields = self.__dict__.get('_fields')
    if name.startswith('_') or fields is None:
      raise AttributeError(name)
    if name in fields:
      return fields[name].value
    raise _UnknownName(self, name, _Join(self._path, (name,)),
                       with_methods=True)

  def __setattr__(self, name: str, value: Any) -> None:
    if name.startswith('_'):
      object.__setattr__(self, name, value)
    elif name in self._fields:
      self._Store(name, value)
    else:
      raise _UnknownName(self, name, _Join(self._path, (name,)))

  def _Store(self, name: str, value: Any, description: str = '') -> None:
    """Sets a field, adding it if new, and records the paths below it."""
    field = self._fields.get(name)
    if field is None:
      self._CheckName(name)
      self._fields[name] = _Field(value, description)
    else:
      field.value = value
    if isinstance(value, (Params, list, tuple, dict)):
      _Adopt(value, _Join(self._path, (name,)))

  def _CheckName(self, name: str) -> None:
    if (not isinstance(name, str) or not name.isidentifier() or
        keyword.iskeyword(name) or name.startswith('_') or
        hasattr(type(self), name)):
      raise ParamsError(
          f'Cannot define {name!r} in {self._path or "root"!r}: a param name '
          'must be an identifier, not a keyword, not start with "_" and not '
          f'shadow a {type(self).__name__} method.')

  def Define(self, name: str, default: Any, description: str) -> None:
    """Adds field `name` with a one-line `description`.

    The field holds a deep copy of `default`, so no two Params share a mutable
    default; classes, functions and dtypes are immutable and kept as they are.
    """
    if name in self.__dict__['_fields']:
      raise ParamsError(
          f'Param {_Join(self._path, (name,))!r} is already defined.')
    self._Store(name, copy.deepcopy(default), description)

  def Set(self, **kwargs: Any) -> 'Params':
    """Sets fields; a key may be a path: `p.Set(**{'layers[2].dim': 4})`."""
    walker = _Walker(self._path)
    for key, value in kwargs.items():
      walker.Put(self, _ParsePath(key), lambda _, v=value: v)
    return self

  def Get(self, name: str) -> Any:
    """The value at a dotted path such as `encoder.layers[0].dim`."""
    return _Walker(self._path).Get(self, _ParsePath(name))

  def Delete(self, *names: str) -> 'Params':
    """Removes fields, each given by name or dotted path."""
    for name in names:
      tokens = _ParsePath(name)
      parent = _Walker(self._path).Get(self, tokens[:-1])
      if not isinstance(parent, Params) or not isinstance(tokens[-1], str):
        raise ParamsError(f'{name!r}: only a field of a Params can be deleted.')
      if tokens[-1] not in parent._fields:
        raise _UnknownName(parent, tokens[-1], _Join(self._path, tokens))
      del parent._fields[tokens[-1]]
    return self

  def GetDescription(self, name: str) -> str:
    """The description given to Define for the field at path `name`."""
    tokens = _ParsePath(name)
    parent = _Walker(self._path).Get(self, tokens[:-1])
    if not isinstance(parent, Params) or tokens[-1] not in parent._fields:
      raise UnknownParamError(f'{_Join(self._path, tokens)!r} is not a field.')
    return parent._fields[tokens[-1]].description

  def IterParams(self) -> Iterator[Tuple[str, Any]]:
    """(name, value) of each field in definition order."""
    for name, field in self._fields.items():
      yield name, field.value

  def Copy(self) -> 'Params':
    """A deep copy: nested Params and containers are copied, classes shared."""
    return copy.deepcopy(self)

  def __deepcopy__(self, memo: Dict[int, Any]) -> 'Params':
    new = object.__new__(type(self))
    memo[id(self)] = new
    new.__dict__.update(self.__dict__)
    new.__dict__['_fields'] = {
        name: _Field(copy.deepcopy(f.value, memo), f.description)
        for name, f in self._fields.items()}
    return new

  def __eq__(self, other: Any) -> bool:
    """Same type and same fields with equal values (descriptions ignored)."""
    if not isinstance(other, Params):
      return NotImplemented
    return type(self) is type(other) and (
        {k: f.value for k, f in self._fields.items()} ==
        {k: f.value for k, f in other._fields.items()})

  __hash__ = None  # Mutable.

  def __contains__(self, name: str) -> bool:
    """Whether `name` (a dotted path too) resolves."""
    if not isinstance(name, str):
      return False
    try:
      self.Get(name)
      return True
    except ParamsError:
      return False

  def __dir__(self) -> List[str]:
    return sorted(set(super().__dir__()) | set(self._fields))

  def ToText(self) -> str:
    """Every leaf as a sorted `path : value` line; see the module docstring."""
    lines = sorted(_Leaves(self), key=lambda leaf: _SortKey(leaf[0]))
    return ''.join(f'{_Join("", t)} : {_FormatValue(v)}\n' for t, v in lines)

  def FromText(self, text: str) -> 'Params':
    """Sets the values `text` (in ToText's format) gives; returns self.

    Values are read exactly. Lists of Params take the text's shape, and a
    Params built from the text keeps only the fields the text names, so
    `f().FromText(p.ToText()) == p`. Other fields the text does not name keep
    their values; an undefined name raises. All or nothing: on error self is
    unchanged.
    """
    return _Load(self, text, overrides=False)

  def __repr__(self) -> str:
    return f'{type(self).__name__}(\n{self.ToText()})'

  __str__ = ToText


class InstantiableParams(Params):
  """Params that build an object: `Instantiate()` calls `cls(self, ...)`."""

  def __init__(self, cls: Any = None):
    super().__init__()
    self.Define('cls', cls, 'The class to instantiate with these Params.')

  def Instantiate(self, *args: Any, **kwargs: Any) -> Any:
    """Returns `self.cls(self, *args, **kwargs)` once nothing is REQUIRED."""
    missing = [_Join(self._path, tokens) for tokens, v in _Leaves(self)
               if _Holds(v, lambda x: x is REQUIRED)]
    if missing:
      raise ParamsError(
          f'Cannot instantiate {_FormatValue(self.cls)}: these params are '
          f"REQUIRED but not set: {', '.join(missing)}.")
    if not callable(self.cls):
      raise ParamsError(f'{_Join(self._path, ("cls",))!r} is '
                        f'{self.cls!r}; expected a class.')
    try:
      return self.cls(self, *args, **kwargs)
    except ValueError as e:
      if type(e) is not ValueError:  # ConfigError already, or its own kind
        raise
      # Constructors check their Params with plain ValueErrors.
      raise ConfigError(str(e)) from e


# --- walking paths -----------------------------------------------------------


class _Walker:
  """Reads and replaces values at paths below a root whose path is `prefix`."""

  def __init__(self, prefix: str):
    self._prefix = prefix

  def Field(self, params: Params, name: str, tokens: Tuple[Any, ...]) -> Any:
    if name in params._fields:
      return params._fields[name].value
    raise _UnknownName(params, name, _Join(self._prefix, tokens))

  def Enter(self, parent: Any, value: Any, tokens: Tuple[Any, ...],
            next_token: Any) -> Any:
    """The value to walk into at `tokens`; the loader builds Params here."""
    del parent, tokens, next_token
    return value

  def Step(self, obj: Any, tokens: Tuple[Any, ...], i: int) -> Any:
    token = tokens[i]

    def where() -> str:  # Formatted only for an error: Step is hot.
      return _Join(self._prefix, tokens[:i + 1])

    if isinstance(token, str):
      if isinstance(obj, Params):
        return self.Field(obj, token, tokens[:i + 1])
    elif isinstance(obj, (list, tuple, dict)):
      try:
        return obj[token.key]
      except (IndexError, KeyError, TypeError):
        valid = (f'{len(obj)} elements' if not isinstance(obj, dict) else
                 f"keys {', '.join(map(repr, obj)) or '(none)'}")
        raise UnknownParamError(f'{where()!r}: no such element; it has '
                                f'{valid}.') from None
    raise UnknownParamError(
        f'{where()!r}: {_Join(self._prefix, tokens[:i]) or "root"!r} is a '
        f'{type(obj).__name__}, which has no '
        f'{"fields" if isinstance(token, str) else "elements"}.')

  def Get(self, root: Any, tokens: Tuple[Any, ...]) -> Any:
    for i in range(len(tokens)):
      root = self.Step(root, tokens, i)
    return root

  def Put(self, obj: Any, tokens: Tuple[Any, ...],
          leaf: Callable[[Any], Any], i: int = 0) -> Any:
    """Returns obj with the value at tokens[i:] replaced by leaf(old value)."""
    current = self.Step(obj, tokens, i)
    if i + 1 == len(tokens):
      new = leaf(current)
    else:
      child = self.Enter(obj, current, tokens[:i + 1], tokens[i + 1])
      new = self.Put(child, tokens, leaf, i + 1)
      if new is current:
        return obj  # Changed in place; storing it again would cost O(tree).
    token = tokens[i]
    if isinstance(token, str):
      obj._Store(token, new)
    elif isinstance(obj, tuple):  # Immutable: rebuild it for the parent.
      items = list(obj)
      items[token.key] = new
      return _SameKind(obj, items)
    else:
      obj[token.key] = new
    return obj


# --- loading text -------------------------------------------------------------


def _TopLevel(text: str) -> Iterator[Tuple[int, str]]:
  """(index, char) of chars outside quotes and brackets."""
  depth, quote, escaped = 0, None, False
  for i, c in enumerate(text):
    if quote:
      if escaped:
        escaped = False
      elif c == '\\':
        escaped = True
      elif c == quote:
        quote = None
    elif c in '\'"':
      quote = c
    elif c in '([{':
      depth += 1
    elif c in ')]}':
      depth -= 1
    elif depth == 0:
      yield i, c
  if quote or depth:
    raise ParamsError(f'Unbalanced quote or bracket in {text.strip()!r}.')


def _Assignments(text: str) -> List[Tuple[str, str]]:
  """Splits text into (key, value text) at `;`/newlines, then `=` or `:`."""
  text = '\n'.join(line for line in text.splitlines()
                   if not line.lstrip().startswith('#'))
  statements, start = [], 0
  for i, c in list(_TopLevel(text)) + [(len(text), ';')]:
    if c in ';\n':
      if text[start:i].strip():
        statements.append(text[start:i])
      start = i + 1
  pairs = []
  for statement in statements:
    split = next((i for i, c in _TopLevel(statement) if c in '=:'), None)
    if split is None:
      raise ParamsError(f'{statement.strip()!r} is not `key=value` or '
                        '`key : value`.')
    pairs.append((statement[:split].strip(), statement[split + 1:]))
  return pairs


class _Loader(_Walker):
  """Walks text assignments into a tree, building Params where needed.

  A `Params(...)` placeholder, a None or REQUIRED value with fields below it,
  or (in FromText) a new `cls` line gets a Params built for it. Such rebuilt
  Params, and all below them, take fields the text defines; in FromText they
  also drop the fields it does not mention.
  """

  def __init__(self, prefix: str, texts: Dict[Tuple[Any, ...], str],
               overrides: bool):
    super().__init__(prefix)
    self._texts = texts
    self._overrides = overrides
    # id -> (rebuilt Params or container below one, names the text mentions).
    self._rebuilt: Dict[int, Tuple[Any, set]] = {}
    self._classes: Dict[Tuple[Any, ...], Any] = {}

  def Field(self, params: Params, name: str, tokens: Tuple[Any, ...]) -> Any:
    if id(params) not in self._rebuilt:
      return super().Field(params, name, tokens)
    self._rebuilt[id(params)][1].add(name)
    field = params._fields.get(name)
    return _ABSENT if field is None else field.value

  def Enter(self, parent: Any, value: Any, tokens: Tuple[Any, ...],
            next_token: Any) -> Any:
    if (_IsUnset(value) and isinstance(next_token, str) or
        not self._overrides and self._ClassChanged(value, tokens)):
      value = self._Build(tokens, getattr(value, 'reuse', None))
    elif id(parent) not in self._rebuilt or not isinstance(
        value, (Params, list, tuple, dict)):
      return value
    self._rebuilt.setdefault(id(value), (value, set()))
    return value

  def _Class(self, tokens: Tuple[Any, ...]) -> Any:
    """The class the text's `<tokens>.cls` line names, parsed once."""
    key = tokens + ('cls',)
    if key not in self._classes:
      # `type` as the current value makes overrides type-check a class.
      self._classes[key] = _ParseValue(_Join(self._prefix, key),
                                       self._texts[key], type, self._overrides,
                                       'cls')
    return self._classes[key]

  def _ClassChanged(self, value: Any, tokens: Tuple[Any, ...]) -> bool:
    """Whether the text gives Params `value` a different (or a first) class."""
    return (isinstance(value, Params) and tokens + ('cls',) in self._texts and
            (not isinstance(value, InstantiableParams) or
             self._Class(tokens) is not value.cls))

  def _Build(self, tokens: Tuple[Any, ...], reuse: Any) -> Params:
    """A Params for `tokens`, from its `cls` line; `reuse` if it fits."""
    if tokens + ('cls',) not in self._texts:
      # A full text would name a class; overrides need not repeat it.
      fits = isinstance(reuse, Params) and (
          self._overrides or not isinstance(reuse, InstantiableParams))
      return reuse if fits else Params()
    cls = self._Class(tokens)
    if isinstance(reuse, InstantiableParams) and reuse.cls is cls:
      return reuse
    factory = getattr(cls, 'Params', None) if inspect.isclass(cls) else None
    p = factory() if callable(factory) else None
    if not isinstance(p, InstantiableParams):
      p = InstantiableParams()
    p.cls = cls  # Even if a factory set another, so later lines agree.
    return p

  def Finish(self, v: Any, tokens: Tuple[Any, ...] = ()) -> Any:
    """Builds untouched placeholders and drops unmentioned rebuilt fields."""
    if isinstance(v, _Slot):
      v = self._Build(tokens, v.reuse)
      self._rebuilt.setdefault(id(v), (v, set()))
    if isinstance(v, Params):
      for name, field in v._fields.items():
        field.value = self.Finish(field.value, tokens + (name,))
      if not self._overrides and id(v) in self._rebuilt:
        mentioned = self._rebuilt[id(v)][1]
        for name in [n for n in v._fields if n not in mentioned]:
          del v._fields[name]
    elif isinstance(v, (list, tuple)) and _HoldsParams(v):
      v = _SameKind(v, [self.Finish(x, tokens + (_Item(i),))
                        for i, x in enumerate(v)])
    elif isinstance(v, dict) and _HoldsParams(v):
      v = {k: self.Finish(x, tokens + (_Item(k),)) for k, x in v.items()}
    return v


def _KeepReuse(new: Any, old: Any) -> None:
  """Points each placeholder in `new` at the Params it replaces in `old`."""
  if isinstance(new, _Slot):
    new.reuse = old.reuse if isinstance(old, _Slot) else old
  elif isinstance(new, (list, tuple)) and isinstance(old, (list, tuple)):
    for n, o in zip(new, old):
      _KeepReuse(n, o)
  elif isinstance(new, dict) and isinstance(old, dict):
    for k in new.keys() & old.keys():
      _KeepReuse(new[k], old[k])


def _Load(params: Params, text: str, overrides: bool) -> Params:
  """FromText (exact values, rebuilt structure) or overrides (type-checked).

  Runs on a copy first, so an error leaves params unchanged, then in place, so
  references into params stay valid.
  """
  entries = [(_ParsePath(key), key, value) for key, value in _Assignments(text)]
  # Shorter paths first: a list skeleton must precede its elements' lines.
  entries.sort(key=lambda e: len(e[0]))
  texts = {tokens: value for tokens, _, value in entries}

  def Leaf(current, key, value, name):
    new = _ParseValue(key, value, current, typed=overrides, name=name)
    _KeepReuse(new, current)
    return new

  for target in (params.Copy(), params):
    loader = _Loader(params._path, texts, overrides)
    for tokens, key, value in entries:
      try:
        loader.Put(target, tokens,
                   lambda c, k=key, v=value, n=tokens[-1]: Leaf(c, k, v, n))
      except ParamsError as e:
        if key in str(e) or _Join(params._path, tokens) in str(e):
          raise
        raise type(e)(f'{key}: {e}') from None
    loader.Finish(target)
    _Adopt(target, params._path)
  return params


def ApplyOverrides(params: Params, text: str) -> Params:
  """Applies `key=value` (or `key : value`) assignments to params, in place.

  Assignments are separated by `;` or newlines (not inside quotes or brackets).
  Keys are existing dotted paths, e.g. `task.layers[2].dim=8`. A value must fit
  the field's current value: int takes an int literal; float an int or float;
  bool true/false/True/False/1/0; str a quoted or bare string; list, tuple,
  dict and set their own literal; a class, function or enum member an import
  path (`@pkg.mod.Name` or `pkg.mod.Name`, imported only under ImportRoots()
  or if already imported; see the module docstring); a dtype `float32` or `tf.float32`;
  a None or REQUIRED field any literal (bare words as strings); any field
  `None`. All or nothing: on error params is unchanged.

  Returns:
    `params`, for chaining.
  """
  return _Load(params, text, overrides=True)


def ApplyOverridesFile(params: Params, path: str) -> Params:
  """ApplyOverrides with the text of file `path` (ToText or key=value lines)."""
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except OSError as e:
    raise ParamsError(f'Cannot read overrides file {path!r}: '
                      f'{e.strerror or e}.') from None
  try:
    return ApplyOverrides(params, text)
  except ParamsError as e:
    raise type(e)(f'In overrides file {path!r}: {e}') from None
