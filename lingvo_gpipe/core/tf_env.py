"""The process set-up every binary needs before TensorFlow is imported.

Invariant: `Setup()` runs before the first `import tensorflow` of the process
(directly or through any lingvo_gpipe module), because TensorFlow reads these
settings once, when its C++ runtime loads, and ignores later changes:

- TF_CPU_ALLOCATOR_USE_BFC=true: TF_CPU_BFC_MEM_LIMIT_IN_MB caps only the BFC
  allocator, and with oneDNN off only it keeps the peak-memory statistics
  `tf.config.experimental.get_memory_info` reports (the trainer's summaries,
  step_memory, partition_method='memory').
- TF_ENABLE_ONEDNN_OPTS=0 under a memory cap (TF_CPU_BFC_MEM_LIMIT_IN_MB): a
  failed allocation in a oneDNN kernel can abort the process, where
  TensorFlow's own kernels raise ResourceExhaustedError, which the trainer
  reports with the knobs that help.
- TensorFlow's log noise is hidden unless --tf_logs is on the command line (see
  `_TF_LOGS`); it is read from sys.argv because absl parses flags only after
  the imports, too late for the C++ settings (stderr_filter.py says which
  lines go).

docs/tensorflow_memory.md says what the first two rest on. A value already in
the environment always wins. This module imports no TensorFlow (it could not
run before it otherwise).
"""

import atexit
import importlib.util
import logging
import os
import subprocess
import sys
from typing import Optional, Sequence

from absl import flags
from absl import logging as absl_logging

from lingvo_gpipe.core import stderr_filter

_TF_LOGS = flags.DEFINE_bool(
    'tf_logs', False, "Show TensorFlow's own log lines, hidden by default: "
    "its Python INFO lines (e.g. functional_saver's 'Sharding callback "
    "duration' at every checkpoint), its C++ INFO and WARNING lines "
    '(TF_CPP_MIN_LOG_LEVEL is then left to the environment) and the CUDA '
    "probing errors of a machine without GPUs ('failed call to cuInit', "
    "'Could not find cuda drivers'). Errors always show.")

_done = False


def WantsTfLogs(argv: Sequence[str]) -> bool:
  """Whether argv asks for TensorFlow's own logs (--tf_logs, --tf_logs=true)."""
  wanted = False
  for arg in argv[1:]:
    if arg == '--':
      break
    if arg in ('--tf_logs', '-tf_logs'):
      wanted = True
    elif arg in ('--notf_logs', '-notf_logs'):
      wanted = False
    elif arg.startswith(('--tf_logs=', '-tf_logs=')):
      wanted = arg.split('=', 1)[1].lower() in ('true', 't', '1', 'yes', 'y')
  return wanted


class QuietTensorFlowInfo(logging.Filter):
  """Drops Python log records below WARNING made in TensorFlow's own files."""

  def __init__(self, package_dir: Optional[str] = None):
    super().__init__()
    if package_dir is None:
      spec = importlib.util.find_spec('tensorflow')  # finds, does not import
      package_dir = (os.path.dirname(spec.origin) if spec and spec.origin
                     else os.path.join(os.sep, 'tensorflow'))
    self._prefix = os.path.join(package_dir, '')

  def filter(self, record: logging.LogRecord) -> bool:
    return (record.levelno >= logging.WARNING or
            not record.pathname.startswith(self._prefix))


def _StartStderrFilter(min_log_level: int) -> None:
  """Sends this process's fd 2 (C++ and Python alike) through stderr_filter.

  Measured on TensorFlow 2.21, CPU only: TF_CPP_MIN_LOG_LEVEL (any value) does
  not hide the INFO lines logged before absl::InitializeLog (oneDNN's notice,
  'Could not find cuda drivers', each twice); only 3 hides the cuInit error,
  and with it every C++ error. Hiding GPUs (CUDA_VISIBLE_DEVICES=-1 or '')
  changes none of them, and TF_CPP_VMODULE governs VLOG lines only. So the
  narrowest cut is by line: a separate process (so it outlives a crash of this
  one) drops exactly those lines and passes everything else.
  """
  if not sys.executable:
    return  # an embedded interpreter: nothing to run the filter with
  read_end, write_end = os.pipe()
  try:
    filter_process = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, '-I', '-S', stderr_filter.__file__,
         str(min_log_level)],
        stdin=read_end, stdout=subprocess.DEVNULL, close_fds=True)
  except OSError:
    os.close(read_end)
    os.close(write_end)
    return  # unfiltered output beats none
  os.close(read_end)
  sys.stderr.flush()
  original = os.dup(2)
  os.dup2(write_end, 2)
  os.close(write_end)

  def Drain() -> None:
    # Lets the filter print the last lines before the shell's prompt returns.
    try:
      sys.stderr.flush()
    except (OSError, ValueError):
      pass
    os.dup2(original, 2)
    try:
      filter_process.wait(timeout=2)
    except subprocess.TimeoutExpired:
      pass  # a child still holds the pipe; the filter ends after it

  atexit.register(Drain)


def Setup(argv: Optional[Sequence[str]] = None) -> None:
  """Sets what TensorFlow reads at import; call before importing it. Idempotent.

  Args:
    argv: the command line (default sys.argv), read for --tf_logs.
  """
  global _done
  if _done:
    return
  _done = True
  os.environ.setdefault('TF_CPU_ALLOCATOR_USE_BFC', 'true')
  if os.environ.get('TF_CPU_BFC_MEM_LIMIT_IN_MB'):
    os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  if WantsTfLogs(sys.argv if argv is None else argv):
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # TensorFlow's Python files log through absl's logger (functional_saver's
  # 'Sharding callback duration' at every save) or their own 'tensorflow'
  # one: keep their warnings and errors, drop their INFO and DEBUG lines.
  quiet = QuietTensorFlowInfo()
  absl_logging.get_absl_logger().addFilter(quiet)
  logging.getLogger('tensorflow').addFilter(quiet)
  try:
    min_log_level = int(os.environ['TF_CPP_MIN_LOG_LEVEL'])
  except ValueError:
    min_log_level = 0
  _StartStderrFilter(min_log_level)
