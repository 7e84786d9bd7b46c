"""tf_env and stderr_filter: settings made before TensorFlow loads, less noise.

The filter must drop only TensorFlow's known noise: C++ lines logged before
TF_CPP_MIN_LOG_LEVEL applies, and the cuInit error of a machine without a
CUDA driver. Errors, tracebacks and a crashing process's last words pass.
"""

import logging
import signal
import subprocess
import sys
import textwrap

from lingvo_gpipe.core import stderr_filter
from lingvo_gpipe.core import tf_env
from tests.support import binaries

_HEADER = (b'WARNING: All log messages before absl::InitializeLog() is called '
           b'are written to STDERR\n')
_ONEDNN = (b'I0000 00:00:1795887415.607507    4064 port.cc:153] oneDNN custom '
           b'operations are on.\n')
_NO_DRIVER = (b'I0000 00:00:1795887415.607888    4064 cudart_stub.cc:31] Could '
              b'not find cuda drivers on your machine, GPU will not be used.\n')
_CUINIT = (b'E0000 00:00:1795887418.106880    4064 cuda_platform.cc:52] failed '
           b'call to cuInit: INTERNAL: CUDA error: UNKNOWN ERROR (303)\n')
_EARLY_ERROR = (b'E0000 00:00:1795887418.106880    4064 foo.cc:1] a real '
                b'error\n')
_LATE_ERROR = (b'E1128 17:36:58.320671    4064 bar.cc:2] another real error\n')


def _Filter(*chunks, min_log_level=2):
  noise = stderr_filter.NoiseFilter(min_log_level)
  return b''.join(stderr_filter.FilterChunks(chunks, noise))


def test_noise_lines_are_dropped_and_errors_kept():
  text = _Filter(_HEADER + _ONEDNN + _NO_DRIVER + _CUINIT + _EARLY_ERROR +
                 b'progress line\n' + _LATE_ERROR)
  assert text == _EARLY_ERROR + b'progress line\n' + _LATE_ERROR


def test_cuinit_failure_shows_where_a_driver_is_present():
  assert _Filter(_ONEDNN + _CUINIT) == _CUINIT


def test_the_min_log_level_decides_for_early_lines():
  assert _Filter(_ONEDNN, min_log_level=0) == _ONEDNN
  assert _Filter(_EARLY_ERROR, min_log_level=3) == b''


def test_partial_lines_pass_at_once():
  # A progress bar's '\r' update has no newline; it must not wait for one,
  # and its end is not taken for the start of a noise line.
  chunks = list(stderr_filter.FilterChunks(
      [b'10%\r', b'20%\r', _NO_DRIVER], stderr_filter.NoiseFilter(2)))
  assert chunks == [b'10%\r', b'20%\r', _NO_DRIVER]


def test_wants_tf_logs_reads_the_command_line():
  assert tf_env.WantsTfLogs(['prog', '--tf_logs'])
  assert tf_env.WantsTfLogs(['prog', '--tf_logs=true'])
  assert not tf_env.WantsTfLogs(['prog'])
  assert not tf_env.WantsTfLogs(['prog', '--tf_logs', '--notf_logs'])
  assert not tf_env.WantsTfLogs(['prog', '--tf_logs=false'])
  assert not tf_env.WantsTfLogs(['prog', '--', '--tf_logs'])


def test_tensorflow_info_records_are_dropped_others_kept(tmp_path):
  quiet = tf_env.QuietTensorFlowInfo(str(tmp_path / 'tensorflow'))

  def Record(path, level):
    return logging.LogRecord('absl', level, path, 1, 'msg', None, None)

  tf_file = str(tmp_path / 'tensorflow' / 'python' / 'functional_saver.py')
  assert not quiet.filter(Record(tf_file, logging.INFO))
  assert quiet.filter(Record(tf_file, logging.WARNING))
  assert quiet.filter(Record(str(tmp_path / 'trainer.py'), logging.INFO))


def _RunProgram(program, *args, **extra_env):
  env = binaries.Env()
  for name in ('TF_ENABLE_ONEDNN_OPTS', 'TF_CPU_BFC_MEM_LIMIT_IN_MB',
               'TF_CPU_ALLOCATOR_USE_BFC'):
    env.pop(name, None)
  env.update(extra_env)
  return subprocess.run(
      [sys.executable, '-c', textwrap.dedent(program), *args],
      cwd=binaries.REPO_ROOT, env=env, capture_output=True, check=False,
      timeout=120)


_PROGRAM = """
    import os, signal, sys
    from lingvo_gpipe.core import tf_env
    tf_env.Setup()
    assert os.environ['TF_CPU_ALLOCATOR_USE_BFC'] == 'true'
    print('oneDNN', os.environ.get('TF_ENABLE_ONEDNN_OPTS'))
    os.write(2, {noise!r})
    os.write(2, b'last words\\n')
    if sys.argv[1] == 'raise':
      raise RuntimeError('a genuine error')
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_process_filters_its_stderr_and_keeps_its_errors():
  program = _PROGRAM.format(noise=_HEADER + _NO_DRIVER + _CUINIT + _EARLY_ERROR)
  result = _RunProgram(program, 'raise', TF_CPU_BFC_MEM_LIMIT_IN_MB='64')
  assert result.returncode == 1
  assert result.stdout == b'oneDNN 0\n'  # off under a cap
  stderr = result.stderr
  assert stderr.startswith(_EARLY_ERROR + b'last words\n'), stderr
  assert b'Traceback' in stderr and b'a genuine error' in stderr, stderr
  for noise in (_HEADER, _NO_DRIVER, _CUINIT):
    assert noise not in stderr, stderr


def test_a_killed_process_last_words_still_get_out():
  result = _RunProgram(_PROGRAM.format(noise=_NO_DRIVER), 'kill')
  assert result.returncode == -signal.SIGKILL
  assert result.stderr == b'last words\n'
  assert result.stdout == b'oneDNN None\n'  # no cap: oneDNN as TF decides


def test_tf_logs_turns_the_filter_off():
  program = _PROGRAM.format(noise=_NO_DRIVER)
  result = _RunProgram(program, 'raise', '--tf_logs')
  assert _NO_DRIVER in result.stderr, result.stderr


def test_this_module_does_not_import_tensorflow():
  result = _RunProgram(
      'import sys; from lingvo_gpipe.core import tf_env; '
      'print("tensorflow" in sys.modules)')
  assert result.stdout == b'False\n', result.stderr


_CAP_PROGRAM = """
    import sys
    from lingvo_gpipe.core import tf_env
    if sys.argv[1] == 'setup':
      tf_env.Setup()
    import tensorflow as tf
    try:
      tf.config.experimental.reset_memory_stats('CPU:0')
      stats = 'stats'
    except ValueError:
      stats = 'no stats'
    try:
      tf.random.normal([4096, 4096])  # 64 MiB, over a 32 MB cap
      fits = 'fits'
    except tf.errors.ResourceExhaustedError:
      fits = 'out of memory'
    print(stats, fits)
"""


def test_setup_makes_the_cap_bind_and_the_peaks_readable():
  # docs/tensorflow_memory.md: the cap and, with oneDNN off, the statistics
  # exist only with the BFC allocator; Setup turns it on and oneDNN off.
  result = _RunProgram(_CAP_PROGRAM, 'setup', TF_CPU_BFC_MEM_LIMIT_IN_MB='32')
  assert result.stdout == b'stats out of memory\n', result.stderr[-3000:]
  result = _RunProgram(_CAP_PROGRAM, 'no setup', TF_ENABLE_ONEDNN_OPTS='0',
                       TF_CPU_BFC_MEM_LIMIT_IN_MB='32')
  assert result.stdout == b'no stats fits\n', result.stderr[-3000:]
