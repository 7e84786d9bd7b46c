"""The library does not import the application: lingvo_gpipe/ works without tasks/ and params/.

tasks/ (models, inputs) and params/ (configs) build on lingvo_gpipe, never the other way: a
user's own application replaces them. The library reaches them only by name, at run time, when
asked to: model_registry imports the `params` package on the first lookup, step_memory imports
tasks.image.amoebanet for --stack=amoebanet. So no import statement under lingvo_gpipe/ names
them (at module level or in a function), and every module imports with neither on the path.
"""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
_LIBRARY = 'lingvo_gpipe'
_APPLICATION = ('tasks', 'params')


def ImportsOfTheApplication(source: str) -> list[tuple[int, str]]:
  """(line, module) of each import statement in `source` naming a package of the application."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      modules = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and not node.level:
      modules = [node.module]
    else:
      continue  # relative imports stay inside the library
    found += [(node.lineno, m) for m in modules if m.split('.')[0] in _APPLICATION]
  return found


def _LibraryModules() -> list[str]:
  """Dotted names of every module under lingvo_gpipe/, from the files themselves."""
  names = []
  for path in sorted((_ROOT / _LIBRARY).rglob('*.py')):
    parts = path.relative_to(_ROOT).with_suffix('').parts
    names.append('.'.join(parts[:-1] if parts[-1] == '__init__' else parts))
  return names


def test_imports_of_the_application_are_found():
  source = ('import os\n'
            'from tasks.image import amoebanet\n'
            'import params.image.digits as digits, numpy\n'
            'from . import tasks\n'
            'def F():\n'
            '  from params import lm\n'
            "  return importlib.import_module('tasks.lm')\n")
  assert ImportsOfTheApplication(source) == [
      (2, 'tasks.image'), (3, 'params.image.digits'), (6, 'params')]


def test_no_library_module_imports_the_application():
  found = [f'{path.relative_to(_ROOT)}:{line} imports {module}'
           for path in sorted((_ROOT / _LIBRARY).rglob('*.py'))
           for line, module in ImportsOfTheApplication(path.read_text(encoding='utf-8'))]
  assert not found, ('lingvo_gpipe must not import the application (load it by name at run '
                     'time, as model_registry does): ' + '; '.join(found))


# Run in a fresh interpreter: imports each module with `tasks` and `params` unimportable (a
# finder refuses them, even if an install put them on sys.path), then the registry's lookup.
# The binaries define their flags in absl's one FLAGS at import, and some share names
# (--model, --worker_hosts), so each one's own flags are removed before the next import.
_PROBE = r'''
import importlib
import json
import sys

from absl import flags

BLOCKED = ('tasks', 'params')


class Refuse:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in BLOCKED:
      raise ModuleNotFoundError(f'No module named {name!r} (blocked)', name=name)
    return None


sys.meta_path.insert(0, Refuse())
failed, files = {}, {}
for name in json.loads(sys.argv[1]):
  try:
    files[name] = getattr(importlib.import_module(name), '__file__', None)
  except BaseException as e:  # SystemExit and absl's errors included
    failed[name] = f'{type(e).__name__}: {e}'
  for flag in flags.FLAGS.get_flags_for_module(name):
    delattr(flags.FLAGS, flag.name)
from lingvo_gpipe import model_registry
registry = model_registry.ListModels()
loaded = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)
print(json.dumps(dict(failed=failed, files=files, registry=registry, loaded=loaded)))
'''


def test_every_library_module_imports_without_the_application(tmp_path):
  shutil.copytree(_ROOT / _LIBRARY, tmp_path / _LIBRARY,
                  ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
  modules = _LibraryModules()
  assert {'lingvo_gpipe.trainer', 'lingvo_gpipe.tools.step_memory',
          'lingvo_gpipe.model_registry'} <= set(modules)
  # -P: neither the working directory nor the script's is put on sys.path; PYTHONPATH holds the
  # copy of lingvo_gpipe alone, so the repository root (with tasks/, params/) is out of reach.
  result = subprocess.run(
      [sys.executable, '-P', '-c', _PROBE, json.dumps(modules)], cwd=tmp_path,
      env=dict(os.environ, PYTHONPATH=str(tmp_path), TF_CPP_MIN_LOG_LEVEL='2'),
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert not out['failed'], out['failed']
  outside = {n: f for n, f in out['files'].items()
             if not (f and Path(f).is_relative_to(tmp_path / _LIBRARY))}
  assert not outside, f'imported from outside the copy: {outside}'
  assert out['registry'] == [] and out['loaded'] == []
