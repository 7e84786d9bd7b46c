"""A run resumes with another K or M: GPipe never changes the model.

The trainer binary trains the toy model 4 steps at K=2, M=2, then resumes the
same logdir at K=3 (or M=1) to step 8. The checkpoint must restore (variables
and optimizer slots are named by layer, not by cell), and the weights after
step 8 must be those of a run that trained all 8 steps at K=2: the same math.
"""

import shutil
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import checkpoint as checkpoint_lib
from tests.support import binaries

_FLAGS = ('--model=example.toy.ToyRegression',
          '--params_override=train.save_interval_steps=2')
_RESUME_FLAGS = ('--num_partitions=3', '--num_micro_batches=1')


def _TrainAll(runs):
  """Trains {logdir: flags} at once (2 cores: half the wall time); stderrs."""
  processes = {}
  for logdir, flags in runs.items():
    with open(f'{logdir}.stderr', 'w') as stderr:
      processes[logdir] = binaries.Start(
          binaries.TRAINER, f'--logdir={logdir}', *_FLAGS, *flags,
          stdout=subprocess.DEVNULL, stderr=stderr)
  logs = {}
  for logdir, process in processes.items():
    try:
      returncode = process.wait(timeout=240)
    finally:
      process.kill()  # a no-op once it exited
    with open(f'{logdir}.stderr') as stderr:
      logs[logdir] = stderr.read()
    assert returncode == 0, logs[logdir][-3000:]
  return logs


def _Weights(logdir):
  """The latest checkpoint's step, and its weights and optimizer slots by key."""
  path = tf.train.latest_checkpoint(checkpoint_lib.Directory(str(logdir)))
  reader = tf.train.load_checkpoint(path)
  return checkpoint_lib.StepOf(path), {
      key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
      if key.startswith(('task/', 'optimizer/'))}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Reference weights after 8 steps at K=2, and each resumed run's log and weights."""
  root = tmp_path_factory.mktemp('repartition')
  first, reference = root / 'first', root / 'reference'
  _TrainAll({first: ['--max_steps=4'], reference: ['--max_steps=8']})
  resumed = {}
  for i, flag in enumerate(_RESUME_FLAGS):
    resumed[flag] = root / f'resumed_{i}'
    shutil.copytree(first, resumed[flag])
  logs = _TrainAll({logdir: [flag, '--max_steps=8']
                    for flag, logdir in resumed.items()})
  return _Weights(reference), {flag: (logs[logdir], _Weights(logdir))
                               for flag, logdir in resumed.items()}


@pytest.mark.parametrize('flag', _RESUME_FLAGS)
def test_resume_with_another_partitioning_trains_on(runs, flag):
  (reference_step, reference), resumed = runs
  log, (step, weights) = resumed[flag]
  assert 'Restored checkpoint' in log
  assert 'from step 4 to 8' in log
  assert step == reference_step == 8
  assert sorted(weights) == sorted(reference)
  assert any('/layers/' in key for key in weights)
  for key, value in reference.items():
    np.testing.assert_allclose(weights[key], value, rtol=1e-5, err_msg=key)
