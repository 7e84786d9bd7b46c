"""BUILD files describe the tree: every source in one target, every label and import resolved.

Bazel cannot fetch its rules here, so this test stands in for `bazel build //...`: it reads
every BUILD file with tools/build_check.py and fails with the exact BUILD lines to add. To see
them all at once, run `python tools/build_check.py`.
"""

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]


def _LoadBuildCheck():
  # Loaded by path: `tools` is not a package, and a `tools` module elsewhere must not win.
  spec = importlib.util.spec_from_file_location(
      'lingvo_gpipe_build_check', _ROOT / 'tools' / 'build_check.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there.
  spec.loader.exec_module(module)
  return module


build_check = _LoadBuildCheck()


@pytest.fixture(scope='module')
def problems():
  return build_check.Check(_ROOT)


def _AssertNone(problems, *categories):
  found = [p.message for p in problems if p.category in categories]
  if found:
    pytest.fail(
        f'{len(found)} BUILD problem(s); `python tools/build_check.py` lists them all.\n\n' +
        '\n\n'.join(found), pytrace=False)


def test_build_files_are_readable(problems):
  _AssertNone(problems, 'unreadable_build_file', 'duplicate_target')


def test_every_python_file_is_in_exactly_one_target(problems):
  _AssertNone(problems, 'coverage')


def test_every_src_exists(problems):
  _AssertNone(problems, 'missing_src')


def test_every_dep_resolves(problems):
  _AssertNone(problems, 'bad_dep')


def test_every_test_file_is_a_py_test(problems):
  _AssertNone(problems, 'test_rule')


def test_every_import_is_a_dep(problems):
  _AssertNone(problems, 'imports')


def test_every_config_is_reachable_from_all_configs(problems):
  _AssertNone(problems, 'all_configs')


def test_no_unknown_problem_category(problems):
  known = {'unreadable_build_file', 'duplicate_target', 'coverage', 'missing_src', 'bad_dep',
           'test_rule', 'imports', 'all_configs'}
  assert {p.category for p in problems} <= known


# The checker itself, on small trees made for each case.


def _MakeTree(root, files):
  for rel, text in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


_HEADER = '''\
load("@rules_python//python:defs.bzl", "py_library", "py_test")
load("@pypi//:requirements.bzl", "requirement")

package(default_visibility = ["//visibility:public"])
'''


def _Messages(root, category):
  return [p.message for p in build_check.Check(root) if p.category == category]


def test_checker_accepts_a_consistent_tree(tmp_path):
  _MakeTree(tmp_path, {
      'requirements.txt': 'numpy>=1,<3\n',
      'lingvo_gpipe/__init__.py': '',
      'lingvo_gpipe/a.py': 'import numpy as np\n',
      'lingvo_gpipe/b.py': 'from lingvo_gpipe import a\n',
      'lingvo_gpipe/BUILD': _HEADER + textwrap.dedent('''
          py_library(name = "lingvo_gpipe", srcs = ["__init__.py"])
          py_library(name = "a", srcs = ["a.py"], deps = [requirement("numpy")])
          py_library(name = "b", srcs = ["b.py"], deps = [":a"])
          '''),
      'tests/a_test.py': 'from lingvo_gpipe import b\n',
      'tests/BUILD': _HEADER + '\npy_test(name = "a_test", srcs = ["a_test.py"], '
                     'deps = ["//lingvo_gpipe:b"])\n',
  })
  assert build_check.Check(tmp_path) == []


def test_checker_suggests_a_target_for_an_uncovered_file(tmp_path):
  _MakeTree(tmp_path, {
      'lingvo_gpipe/__init__.py': '',
      'lingvo_gpipe/a.py': '',
      'lingvo_gpipe/new_module.py': 'from lingvo_gpipe import a\n',
      'lingvo_gpipe/BUILD': _HEADER + '\npy_library(name = "lingvo_gpipe", '
                            'srcs = ["__init__.py"])\npy_library(name = "a", srcs = ["a.py"])\n',
  })
  [message] = _Messages(tmp_path, 'coverage')
  assert 'lingvo_gpipe/new_module.py is in no target of lingvo_gpipe/BUILD' in message
  assert 'name = "new_module",\n    srcs = ["new_module.py"],\n    deps = [\n        ":a",' in (
      message)


def test_checker_names_the_load_a_build_file_lacks(tmp_path):
  _MakeTree(tmp_path, {
      'requirements.txt': 'numpy\n',
      'tests/x_test.py': 'import numpy\n',
      'tests/BUILD': 'load("@rules_python//python:defs.bzl", "py_library")\n',
  })
  [message] = _Messages(tmp_path, 'coverage')
  assert 'load("@rules_python//python:defs.bzl", "py_test")' in message
  assert 'load("@pypi//:requirements.bzl", "requirement")' in message


def test_checker_gives_a_whole_build_file_for_a_new_directory(tmp_path):
  _MakeTree(tmp_path, {'bench/run_bench.py': 'if __name__ == "__main__":\n  pass\n'})
  [message] = _Messages(tmp_path, 'coverage')
  assert 'Create bench/BUILD with:' in message
  assert 'load("@rules_python//python:defs.bzl", "py_binary")' in message
  assert 'py_binary(\n    name = "run_bench"' in message


def test_checker_flags_test_file_outside_py_test_and_missing_src(tmp_path):
  _MakeTree(tmp_path, {
      'tests/x_test.py': '',
      'tests/BUILD': _HEADER + '\npy_library(name = "x", srcs = ["x_test.py", "gone.py"])\n',
  })
  [test_rule] = _Messages(tmp_path, 'test_rule')
  assert 'py_test(name = "x_test", srcs = ["x_test.py"]' in test_rule
  [missing] = _Messages(tmp_path, 'missing_src')
  assert '"gone.py", which does not exist' in missing


def test_checker_flags_unresolved_dep_and_missing_import_dep(tmp_path):
  _MakeTree(tmp_path, {
      'requirements.txt': 'numpy\n',
      'lingvo_gpipe/a.py': 'import numpy\nimport tensorflow\n',
      'lingvo_gpipe/BUILD': _HEADER + '\npy_library(name = "a", srcs = ["a.py"], '
                            'deps = ["//lingvo_gpipe/core:nope"])\n',
  })
  [bad_dep] = _Messages(tmp_path, 'bad_dep')
  assert '"//lingvo_gpipe/core:nope" does not resolve' in bad_dep
  imports = _Messages(tmp_path, 'imports')
  assert any('add requirement("numpy") to deps of py_library "a"' in m for m in imports)
  assert any('add requirement("tensorflow")' in m for m in imports)


def test_checker_flags_requirement_missing_from_requirements_txt(tmp_path):
  _MakeTree(tmp_path, {
      'requirements.txt': 'numpy\n',
      'lingvo_gpipe/a.py': 'import tensorflow\n',
      'lingvo_gpipe/BUILD': _HEADER + '\npy_library(name = "a", srcs = ["a.py"], '
                            'deps = [requirement("tensorflow")])\n',
  })
  [bad_dep] = _Messages(tmp_path, 'bad_dep')
  assert 'requirement("tensorflow") names a package missing from requirements.txt' in bad_dep


def test_checker_explains_an_unloaded_rule(tmp_path):
  _MakeTree(tmp_path, {
      'tools/t.py': '',
      'tools/BUILD': 'py_library(name = "t", srcs = ["t.py"])\n',
  })
  [message] = _Messages(tmp_path, 'unreadable_build_file')
  assert "name 'py_library' is not defined" in message
  assert 'load("@rules_python//python:defs.bzl"' in message


def test_checker_requires_configs_reachable_from_all_configs(tmp_path):
  _MakeTree(tmp_path, {
      'params/__init__.py': '',
      'params/BUILD': _HEADER + '\npy_library(name = "params", srcs = ["__init__.py"])\n'
                      'py_library(name = "all_configs", deps = [":params"])\n',
      'params/image/cifar.py': '',
      'params/image/BUILD': _HEADER + '\npy_library(name = "cifar", srcs = ["cifar.py"])\n',
  })
  [message] = _Messages(tmp_path, 'all_configs')
  assert '//params/image:cifar is not reachable from //params:all_configs' in message
  assert 'add "//params/image:cifar" to deps of py_library "all_configs"' in message


def test_checker_flags_import_of_a_missing_submodule(tmp_path):
  _MakeTree(tmp_path, {
      'lingvo_gpipe/__init__.py': 'VERSION = 1\n',
      'lingvo_gpipe/a.py': 'from lingvo_gpipe import VERSION\nfrom lingvo_gpipe import nope\n',
      'lingvo_gpipe/BUILD': _HEADER + '\npy_library(name = "lingvo_gpipe", '
                            'srcs = ["__init__.py"])\npy_library(name = "a", srcs = ["a.py"], '
                            'deps = [":lingvo_gpipe"])\n',
  })
  [message] = _Messages(tmp_path, 'imports')
  assert 'imports lingvo_gpipe.nope, which is not a file in the repository' in message
