"""Loading a shared params file through the trainer binary runs no code it names.

Params files travel between researchers; `@pkg.module.Name` values in them are
imported only under the project's packages (or ones the user allows), and only
for fields that hold a class, function or enum member. A file that names any
other module fails as a bad invocation, before the module's code can run.
"""

import os
import uuid

import pytest

from lingvo_gpipe.run_errors import ExitStatus
from tests.support import binaries

_TOY = 'example.toy.ToyRegression'


@pytest.fixture
def pwn(tmp_path):
  """(module name, marker path, PYTHONPATH) of a module whose code leaves a marker."""
  site = tmp_path / 'site'
  site.mkdir()
  name = f'pwn_{uuid.uuid4().hex[:12]}'
  marker = tmp_path / 'marker'
  (site / f'{name}.py').write_text(
      f'open({str(marker)!r}, "w").close()\n'
      'class X:\n'
      '  pass\n', encoding='utf-8')
  # Where the trainer would find the module if it tried to import it.
  path = os.pathsep.join([binaries.REPO_ROOT, str(site)])
  return name, marker, path


@pytest.mark.parametrize('field', ['train.max_steps', 'input.cls'])
def test_params_file_naming_a_foreign_module_is_refused_unrun(
    pwn, tmp_path, field):
  name, marker, pythonpath = pwn
  params_file = tmp_path / 'shared_params.txt'
  params_file.write_text(f'{field} : @{name}.X\n', encoding='utf-8')
  result = binaries.Run(
      binaries.TRAINER, f'--model={_TOY}', f'--logdir={tmp_path / "logdir"}',
      f'--params_file={params_file}', timeout=240, PYTHONPATH=pythonpath)
  assert result.returncode == int(ExitStatus.USAGE), result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines()
            if line.startswith('error:')]
  assert errors, result.stderr[-3000:]
  assert field in errors[0] and f'@{name}.X' in errors[0]
  assert 'Traceback' not in result.stderr
  assert not marker.exists(), f'the trainer ran {name}.py'
