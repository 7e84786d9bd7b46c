"""README.md's Python example runs as written, and its test command is .ci/run's."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parent.parent


def _Readme() -> str:
  return (REPO / 'README.md').read_text()


def test_python_examples_run():
  blocks = re.findall(r'```python\n(.*?)```', _Readme(), re.S)
  assert blocks, 'README.md has no python example'
  for block in blocks:
    exec(compile(block, 'README.md', 'exec'), {})  # pylint: disable=exec-used


def test_ci_runs_the_readme_test_command():
  ci = (REPO / '.ci' / 'run').read_text()
  command = re.search(r"TEST_COMMAND='(.*)'", ci).group(1)
  assert command in _Readme()
