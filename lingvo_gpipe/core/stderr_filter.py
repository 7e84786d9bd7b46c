"""Drops TensorFlow's known start-up noise from a process's stderr.

`tf_env.Setup()` runs this file as a separate process (`python -I -S`, so it
needs only the standard library and cannot fail on a package) reading the
binary's fd 2 through a pipe. What it drops, and only that:

- C++ lines logged before absl's logging is initialized, below
  TF_CPP_MIN_LOG_LEVEL: TensorFlow applies the level only after them, so they
  escape it (oneDNN's notice, 'Could not find cuda drivers', each twice);
- absl's header line that announces them;
- 'failed call to cuInit' after 'Could not find cuda drivers': on a machine
  without a CUDA driver there is nothing to initialize. With a driver
  present, a failed cuInit is a real error and shows.

Everything else passes unchanged, errors and tracebacks included. Being a
separate process it outlives a crash of the binary, so a dying process's last
words still get out; it ignores Ctrl-C and SIGTERM (sent to the whole process
group) and ends at end of input.
"""

import os
import re
import signal
import sys
from typing import Iterable, Iterator

# e.g. I0000 00:00:1795887415.607888    4064 cudart_stub.cc:31] Could not ...
_EARLY_LINE = re.compile(rb'^([IWEF])0000 00:00:\d+\.\d+\s+\d+ \S+:\d+\] ')
_EARLY_HEADER = (b'WARNING: All log messages before absl::InitializeLog() is '
                 b'called are written to STDERR')
_NO_CUDA_DRIVER = re.compile(
    rb'^I\S* \S+\s+\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers')
_CUINIT_FAILED = re.compile(
    rb'^E\S* \S+\s+\d+ cuda_platform\.cc:\d+\] failed call to cuInit')
_SEVERITY = {b'I': 0, b'W': 1, b'E': 2, b'F': 3}


class NoiseFilter:
  """Says which lines are noise; remembers whether CUDA has no driver."""

  def __init__(self, min_log_level: int):
    self._min_log_level = min_log_level
    self._no_cuda_driver = False

  def Keep(self, line: bytes) -> bool:
    """False for the noise lines the module docstring lists."""
    if line.rstrip(b'\r\n') == _EARLY_HEADER:
      return False
    if _NO_CUDA_DRIVER.match(line):
      self._no_cuda_driver = True
      return False
    if _CUINIT_FAILED.match(line):
      return not self._no_cuda_driver
    match = _EARLY_LINE.match(line)
    if match:
      return _SEVERITY[match.group(1)] >= self._min_log_level
    return True


def FilterChunks(chunks: Iterable[bytes],
                 noise: NoiseFilter) -> Iterator[bytes]:
  """The bytes of `chunks` (reads of a pipe) without the noise lines.

  A line split over reads is passed on at once (a progress bar's '\\r'
  updates must not wait for a newline); TensorFlow writes each log line whole.
  """
  at_line_start = True
  for chunk in chunks:
    *lines, partial = chunk.split(b'\n')
    kept = []
    for line in lines:
      if not at_line_start or noise.Keep(line):
        kept.append(line + b'\n')
      at_line_start = True
    if partial:
      kept.append(partial)
      at_line_start = False
    if kept:
      yield b''.join(kept)


def _Reads() -> Iterator[bytes]:
  while True:
    chunk = os.read(0, 65536)
    if not chunk:
      return
    yield chunk


def _Write(data: bytes) -> None:
  try:
    os.write(2, data)
  except OSError:
    pass  # stderr gone: keep draining so the binary never blocks on the pipe


def main(argv: list[str]) -> None:
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  try:
    min_log_level = int(argv[1])
  except (IndexError, ValueError):
    min_log_level = 0
  reads = _Reads()
  try:
    for data in FilterChunks(reads, NoiseFilter(min_log_level)):
      _Write(data)
  except Exception:  # pylint: disable=broad-except
    for data in reads:  # a bug here must not swallow the binary's output
      _Write(data)


if __name__ == '__main__':
  main(sys.argv)
