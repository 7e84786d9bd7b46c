"""pyproject.toml makes an installable distribution of every package in the tree.

`pip install -e .` and a wheel install only the packages pyproject.toml lists, so a package
directory it forgets is missing from every install (and its importers fail only there). The
wheel is built offline (`--no-build-isolation --no-index`) from a copy of the tree, so the test
needs no network and leaves no build/ or *.egg-info in the repository.
"""

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]

# Directories whose packages are not installed: test, benchmark and developer-tool code.
_NOT_INSTALLED = ('tests', 'bench', 'tools')


def _Pyproject() -> dict:
  with open(_ROOT / 'pyproject.toml', 'rb') as f:
    return tomllib.load(f)


def _ListedPackages() -> list[str]:
  return _Pyproject()['tool']['setuptools']['packages']


def PackagesInTree(root: Path) -> set[str]:
  """Dotted names of the directories with an __init__.py, but for the uninstalled ones."""
  found = set()
  for directory, subdirs, files in os.walk(root):
    rel = Path(directory).relative_to(root)
    subdirs[:] = sorted(
        d for d in subdirs
        if not d.startswith(('.', '_')) and not d.endswith('.egg-info') and d != 'build'
        and not (rel == Path('.') and d in _NOT_INSTALLED))
    if rel != Path('.') and '__init__.py' in files:
      found.add('.'.join(rel.parts))
  return found


def test_pyproject_lists_every_package_in_the_tree():
  tree = PackagesInTree(_ROOT)
  listed = set(_ListedPackages())
  assert {'lingvo_gpipe', 'lingvo_gpipe.core.gpipe', 'tasks.image', 'params.image'} <= tree
  missing = sorted(tree - listed)
  assert not missing, (f'pyproject.toml does not install {missing}: add them to '
                       '[tool.setuptools] packages.')
  stale = sorted(listed - tree)
  assert not stale, f'pyproject.toml lists {stale}, which are no package directories.'


def test_packages_in_tree_sees_a_new_package(tmp_path):
  for package in ('lib/sub', 'lib/sub/deeper', 'tests/x', 'bench', '.venv/y', 'lib/data'):
    (tmp_path / package).mkdir(parents=True, exist_ok=True)
  for package in ('lib', 'lib/sub', 'lib/sub/deeper', 'tests/x', 'bench', '.venv/y'):
    (tmp_path / package / '__init__.py').touch()
  assert PackagesInTree(tmp_path) == {'lib', 'lib.sub', 'lib.sub.deeper'}


def test_dependencies_are_requirements_txt():
  project = _Pyproject()
  assert project['project']['dynamic'] == ['dependencies']
  assert project['tool']['setuptools']['dynamic']['dependencies'] == {
      'file': ['requirements.txt']}
  # setuptools reads plain requirement lines only: no pip options such as `-r`.
  lines = [line.strip() for line in (_ROOT / 'requirements.txt').read_text().splitlines()]
  assert not [line for line in lines if line.startswith('-')]
  assert project['project']['requires-python'] == '>=3.11'
  assert sys.version_info >= (3, 11)


@pytest.mark.heavy
def test_the_wheel_holds_every_module_and_imports_from_elsewhere(tmp_path):
  source = tmp_path / 'src'
  source.mkdir()
  for name in ('pyproject.toml', 'README.md', 'requirements.txt'):
    shutil.copy(_ROOT / name, source / name)
  tops = sorted({p.split('.')[0] for p in _ListedPackages()})
  for top in tops:
    shutil.copytree(_ROOT / top, source / top,
                    ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
  pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check', '--no-input']
  subprocess.run(pip + ['wheel', '--no-deps', '--no-build-isolation', '--no-index',
                        '-w', str(tmp_path / 'dist'), str(source)],
                 check=True, capture_output=True, text=True, timeout=300)
  [wheel] = (tmp_path / 'dist').glob('lingvo_gpipe-*.whl')
  in_wheel = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith('.py')}
  in_tree = {p.relative_to(source).as_posix() for top in tops
             for p in (source / top).rglob('*.py')}
  assert in_wheel == in_tree

  site = tmp_path / 'site'
  subprocess.run(pip + ['install', '--no-deps', '--no-index', '--target', str(site),
                        str(wheel)], check=True, capture_output=True, text=True, timeout=300)
  env = dict(os.environ, PYTHONPATH=str(site))
  code = ('import lingvo_gpipe.trainer, tasks.image.amoebanet, params.image.digits\n'
          'print(lingvo_gpipe.trainer.__file__)')
  out = subprocess.run([sys.executable, '-P', '-c', code], cwd=tmp_path, env=env,
                       check=True, capture_output=True, text=True, timeout=300)
  assert out.stdout.strip() == str(site / 'lingvo_gpipe' / 'trainer.py')
