"""The trainer's output: its own progress lines, without TensorFlow's noise.

By default a run shows no functional_saver 'Sharding callback duration' line
at its checkpoints and, on a machine without a CUDA driver, none of
TensorFlow's CUDA probing lines; --tf_logs brings them back. A genuine
TensorFlow error still reaches the user.
"""

import ctypes.util

import pytest

from lingvo_gpipe.run_errors import ExitStatus
from tests.support import binaries

_TOY = 'example.toy.ToyRegression'
_SAVER_NOISE = 'Sharding callback duration'
# Printed only where there is no CUDA driver (libcuda) to load.
_CUDA_NOISE = ('Could not find cuda drivers', 'failed call to cuInit',
               'absl::InitializeLog')
_NO_CUDA_DRIVER = ctypes.util.find_library('cuda') is None


def _Train(logdir, *flags, **env):
  result = binaries.Run(binaries.TRAINER, f'--model={_TOY}',
                        f'--logdir={logdir}', '--max_steps=4', *flags,
                        timeout=240, **env)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout + result.stderr


def test_tensorflow_noise_is_hidden_by_default(tmp_path):
  output = _Train(tmp_path)
  assert 'step 4/4' in output, output  # the trainer's own lines stay
  assert 'Saved checkpoint' in output, output
  assert _SAVER_NOISE not in output, output
  for line in _CUDA_NOISE:
    assert line not in output, output


def test_tf_logs_brings_the_noise_back(tmp_path):
  output = _Train(tmp_path, '--tf_logs', TF_CPP_MIN_LOG_LEVEL='0')
  assert 'step 4/4' in output, output
  assert _SAVER_NOISE in output, output
  if _NO_CUDA_DRIVER:
    for line in _CUDA_NOISE:
      assert line in output, output


@pytest.mark.heavy  # about 25 s: the allocation under the cap is slow
def test_a_tensorflow_error_still_reaches_the_user(tmp_path):
  # TensorFlow raises ResourceExhaustedError under the cap (64 MiB a layer).
  result = binaries.Run(
      binaries.TRAINER, f'--model={_TOY}', f'--logdir={tmp_path}',
      '--max_steps=2', '--params_override=input.batch_size=65536; '
      'input.num_examples=65536; task.network.hidden_dim=256', timeout=240,
      TF_CPU_BFC_MEM_LIMIT_IN_MB='48')
  assert result.returncode == ExitStatus.OUT_OF_MEMORY, result.stderr[-3000:]
  assert 'error: out of memory' in result.stderr, result.stderr[-3000:]
