"""Register experiment configs by name and look them up, as `--model=<name>` does.

Invariant: one name maps to one `ModelParams` subclass, and a lookup sees every config under
the `params` package: the first lookup imports all of its modules, so no config needs to be
imported by hand, and a module that fails to import fails the lookup with its own name.

Usage:

  @model_registry.RegisterModel
  class AmoebaNetD(model_params.ModelParams):  # in params/image/cifar10.py
    ...

  p = model_registry.GetParams('image.cifar10.AmoebaNetD')
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import sys
import threading
from typing import TypeVar

from lingvo_gpipe import model_params
from lingvo_gpipe.core import hyperparams

_ModelParamsT = TypeVar('_ModelParamsT', bound=type)

_registry: dict[str, type[model_params.ModelParams]] = {}
_lock = threading.RLock()
_params_imported = False
_params_importing = False
# Why the `params` package itself could not be imported, if it could not; told on a miss.
_params_missing_reason: str | None = None


class UnknownModelError(ValueError):
  """A model name that no registered config has."""


class ConfigImportError(ImportError):
  """A module under the `params` package failed to import."""


def RegisterModel(cls: _ModelParamsT) -> _ModelParamsT:
  """Class decorator: registers a ModelParams subclass under `cls.RegistryName()`.

  Args:
    cls: a subclass of `model_params.ModelParams`.

  Returns:
    `cls`, unchanged.

  Raises:
    TypeError: if `cls` is not a ModelParams subclass.
    ValueError: if another class is already registered under the same name.
  """
  if not (isinstance(cls, type) and issubclass(cls, model_params.ModelParams)):
    raise TypeError(
        f'@RegisterModel expects a subclass of lingvo_gpipe.model_params.ModelParams, got '
        f'{cls!r}.')
  name = cls.RegistryName()
  with _lock:
    existing = _registry.get(name)
    # The same module and class name again is a re-import (e.g. importlib.reload) of one
    # definition, which replaces the old class, as redefining it in the module would.
    if existing is not None and (existing.__module__, existing.__qualname__) != (
        cls.__module__, cls.__qualname__):
      raise ValueError(
          f'Model name {name!r} is already registered to {_Where(existing)}; cannot also '
          f'register {_Where(cls)}. Rename one of the classes.')
    _registry[name] = cls
  return cls


def GetClass(name: str) -> type[model_params.ModelParams]:
  """Returns the ModelParams subclass registered under `name`.

  Raises:
    UnknownModelError: (a ValueError) if no config is registered under `name`.
    ConfigImportError: if a module under `params` fails to import.
  """
  _ImportAllParams()
  with _lock:
    cls = _registry.get(name)
    if cls is None:
      raise UnknownModelError(_UnknownNameMessage(name, sorted(_registry)))
    return cls


def GetParams(name: str) -> hyperparams.Params:
  """Returns the whole experiment Params of the config registered under `name`.

  The tree has children `task` (the network at `task.network`), `train` and `input`, and
  `name` set to `name`.

  Raises:
    UnknownModelError: (a ValueError) if no config is registered under `name`.
    ConfigImportError: if a module under `params` fails to import.
  """
  p = GetClass(name)().Model()
  p.Set(name=name)
  return p


def ListModels() -> list[str]:
  """Returns every registered model name, sorted."""
  _ImportAllParams()
  with _lock:
    return sorted(_registry)


def _Where(cls: type) -> str:
  return f'{cls.__module__}.{cls.__qualname__}'


def _UnknownNameMessage(name: str, known: list[str]) -> str:
  # A bare class name is a common slip; offer the full names that end in it first.
  suggestions = [k for k in known if k.rsplit('.', 1)[-1] == name]
  suggestions += [
      k for k in difflib.get_close_matches(name, known, n=3, cutoff=0.6)
      if k not in suggestions
  ]
  lines = [f'Unknown model name {name!r}.']
  if suggestions:
    lines.append('Did you mean: ' + ', '.join(repr(s) for s in suggestions) + '?')
  lines.append(
      f'List all {len(known)} registered names with the trainer flag --list_models '
      '(or lingvo_gpipe.model_registry.ListModels()).')
  if _params_missing_reason:
    lines.append(f'Configs were not loaded: {_params_missing_reason}')
  return ' '.join(lines)


def _ImportAllParams() -> None:
  """Imports every module under the `params` package, once, so their configs register."""
  global _params_imported, _params_importing, _params_missing_reason
  with _lock:
    # A config module that looks up another config at import time re-enters here; it sees
    # what is registered so far instead of walking the package again.
    if _params_imported or _params_importing:
      return
    _params_importing = True
    try:
      package_name = model_params.PARAMS_PACKAGE
      try:
        package = importlib.import_module(package_name)
      except ModuleNotFoundError as e:
        if e.name != package_name:
          raise ConfigImportError(
              f'Failed to import config package {package_name!r}: {e}') from e
        # Only configs registered by an explicit import exist then, e.g. when the library is
        # used from outside this repository.
        _params_missing_reason = (
            f'no package {package_name!r} on sys.path (run from the repository root).')
        _params_imported = True
        return
      except Exception as e:
        raise ConfigImportError(
            f'Failed to import config package {package_name!r}: '
            f'{type(e).__name__}: {e}') from e
      _params_missing_reason = None
      for module_info in pkgutil.walk_packages(
          package.__path__, prefix=package_name + '.', onerror=_RaiseForPackage):
        _ImportConfigModule(module_info.name)
      _params_imported = True
    finally:
      _params_importing = False


def _ImportConfigModule(module_name: str) -> None:
  if module_name in sys.modules:
    return
  try:
    importlib.import_module(module_name)
  except Exception as e:
    raise ConfigImportError(
        f'Failed to import config module {module_name!r}: {type(e).__name__}: {e}') from e


def _RaiseForPackage(package_name: str) -> None:
  # pkgutil.walk_packages calls this from inside its `except` when importing a subpackage
  # failed; without it, an ImportError there would be silently skipped.
  error = sys.exc_info()[1]
  raise ConfigImportError(
      f'Failed to import config package {package_name!r}: '
      f'{type(error).__name__}: {error}') from error
