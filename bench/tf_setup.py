"""What a timing benchmark sets up before TensorFlow loads: tf_env's, on TensorFlow's allocator.

`Setup()` is `lingvo_gpipe.core.tf_env.Setup()` (log noise hidden unless --tf_logs, oneDNN off
under a memory cap) but for one setting: tf_env turns on the BFC allocator for the trainer's
memory statistics, while the benchmarks that time steps in their own process (executor_step,
graph_build, jit_compile, overhead) measure them, and graph_build the RSS, under TensorFlow's
default CPU allocator, as these scripts always have (the results in bench/results). A value
already in the environment still wins, and child processes inherit the choice.

Benchmarks that start lingvo_gpipe's binaries, which need the BFC allocator and inherit the
environment, call tf_env.Setup() itself (memory.py). throughput.py calls neither: one
environment reaches both its workers (BFC) and its timed baseline (TensorFlow's default).
"""

import os

from lingvo_gpipe.core import tf_env


def Setup() -> None:
  """tf_env.Setup() on TensorFlow's default CPU allocator; call before importing TensorFlow."""
  os.environ.setdefault('TF_CPU_ALLOCATOR_USE_BFC', 'false')  # TensorFlow's own default
  tf_env.Setup()
