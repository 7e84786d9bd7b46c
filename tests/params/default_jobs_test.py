"""The default jobs learn their tasks, run through the trainer binary as a user would.

`image.digits.AmoebaNetTiny` is README's run command; it must reach 97% test
accuracy. `mt.synthetic.TransformerTiny` must copy its sequences with 95%
sequence accuracy. Both train their registered configs unchanged, through a
2-cell pipeline on two logical CPU devices; only --logdir differs. Each also
in bfloat16 (--fprop_dtype=bfloat16, variables float32), to the same goal.
"""

import os
import re
import shlex

import pytest

from lingvo_gpipe.core import summary
from tests.support import binaries



def _ReadmeRunFlags():
  """The trainer flags of README's run command."""
  with open(os.path.join(binaries.REPO_ROOT, 'README.md'), encoding='utf-8') as f:
    readme = f.read()
  command = re.search(r'python -m lingvo_gpipe\.trainer ([^\n`]*)', readme).group(1)
  return shlex.split(command)


def _Train(flags, logdir):
  flags = [f for f in flags if not f.startswith('--logdir')]
  result = binaries.Run(binaries.TRAINER, *flags, f'--logdir={logdir}',
                        timeout=1800)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _FinalEval(logdir, tag):
  """(step, value) of the last eval summary `tag` in DIR/eval_test."""
  return max(summary.ReadEvents(os.path.join(logdir, 'eval_test'))[tag])


_DTYPES = pytest.mark.parametrize('dtype_flags', [[], ['--fprop_dtype=bfloat16']],
                                  ids=['float32', 'bfloat16'])


@pytest.mark.heavy
@_DTYPES
def test_readme_default_job_reaches_97_percent_on_digits(tmp_path, dtype_flags):
  flags = _ReadmeRunFlags() + dtype_flags
  assert '--model=image.digits.AmoebaNetTiny' in flags
  assert '--mode=train_and_eval' in flags
  _Train(flags, tmp_path)
  step, accuracy = _FinalEval(tmp_path, 'top1_accuracy')
  assert step == 800
  assert accuracy >= 0.97, accuracy


@pytest.mark.heavy
@_DTYPES
def test_transformer_tiny_learns_to_copy(tmp_path, dtype_flags):
  _Train(['--model=mt.synthetic.TransformerTiny', '--mode=train_and_eval',
          *dtype_flags], tmp_path)
  step, accuracy = _FinalEval(tmp_path, 'sequence_accuracy')
  assert step == 1000
  assert accuracy >= 0.95, accuracy
