"""The default jobs learn their tasks, run through the trainer binary as a user would.

`image.digits.AmoebaNetTiny` is README's run command; it must reach 97% test
accuracy. `mt.synthetic.TransformerTiny` must copy its sequences with 95%
sequence accuracy. Both train their registered configs unchanged, through a
2-cell pipeline on two logical CPU devices; only --logdir differs. Each also
in bfloat16 (--fprop_dtype=bfloat16, variables float32), to the same goal:
the two trainings of a model run at once, as two processes: both models
took 6.5 minutes so, against about 8.7 one after the other (float32's alone
4.5), each process keeping little more than one of the two cores busy.
"""

import concurrent.futures
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


_DTYPE_FLAGS = {'float32': [], 'bfloat16': ['--fprop_dtype=bfloat16']}


def _TrainEachDtype(flags, tmp_path):
  """Trains `flags` in each of _DTYPE_FLAGS at once; dtype -> its logdir."""
  flags = [f for f in flags if not f.startswith('--logdir')]
  logdirs = {dtype: tmp_path / dtype for dtype in _DTYPE_FLAGS}
  with concurrent.futures.ThreadPoolExecutor(len(_DTYPE_FLAGS)) as pool:
    runs = {dtype: pool.submit(binaries.Run, binaries.TRAINER, *flags,
                               *extra, f'--logdir={logdirs[dtype]}',
                               timeout=1800)
            for dtype, extra in _DTYPE_FLAGS.items()}
  for dtype, run in runs.items():
    result = run.result()
    assert result.returncode == 0, (dtype, result.stderr[-3000:])
  return logdirs


def _FinalEval(logdir, tag):
  """(step, value) of the last eval summary `tag` in DIR/eval_test."""
  return max(summary.ReadEvents(os.path.join(logdir, 'eval_test'))[tag])


@pytest.mark.heavy
def test_readme_default_job_reaches_97_percent_on_digits(tmp_path):
  flags = _ReadmeRunFlags()
  assert '--model=image.digits.AmoebaNetTiny' in flags
  assert '--mode=train_and_eval' in flags
  for dtype, logdir in _TrainEachDtype(flags, tmp_path).items():
    step, accuracy = _FinalEval(logdir, 'top1_accuracy')
    assert step == 800, dtype
    assert accuracy >= 0.97, (dtype, accuracy)


@pytest.mark.heavy
def test_transformer_tiny_learns_to_copy(tmp_path):
  logdirs = _TrainEachDtype(
      ['--model=mt.synthetic.TransformerTiny', '--mode=train_and_eval'],
      tmp_path)
  for dtype, logdir in logdirs.items():
    step, accuracy = _FinalEval(logdir, 'sequence_accuracy')
    assert step == 1000, dtype
    assert accuracy >= 0.95, (dtype, accuracy)
