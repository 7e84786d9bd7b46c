"""Shared pytest setup: runs before any test module imports TensorFlow."""

import os

# TensorFlow reads this once at import; set it first so its C++ INFO/WARNING logs stay out of
# test output. A value already in the environment wins.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# The allocator the binaries run on (tf_env.Setup), which reports peaks: read
# when TensorFlow creates its first device, so without it here a test of
# memory passed or failed by whether another file's import had set it first.
os.environ.setdefault('TF_CPU_ALLOCATOR_USE_BFC', 'true')

import signal  # pylint: disable=g-import-not-at-top

# The binaries the tests start inherit this process's SIGINT: a suite started
# in the background by a non-interactive shell (`... &` in a script) has it
# ignored, and then the tests' Ctrl-C reached no trainer (two Ctrl-C tests
# timed out that way). Handle it as a foreground run does.
signal.signal(signal.SIGINT, signal.default_int_handler)

import tensorflow as tf  # pylint: disable=g-import-not-at-top

# Pipeline and placement tests place cells on several devices. TensorFlow can
# split the CPU only before it initializes its devices, so do it once here for
# the whole session; single-device tests just use CPU:0.
NUM_TEST_CPUS = 4
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices('CPU')[0],
    [tf.config.LogicalDeviceConfiguration()] * NUM_TEST_CPUS)


def pytest_collection_modifyitems(items):
  """Files with heavy tests first, in their collected order, then the rest.

  pytest.ini runs the suite in two processes, each taking a whole file at a
  time (pytest-xdist's loadfile, in this order: --no-loadscope-reorder; by
  default xdist puts the files with most tests first). Either way the
  longest file (tests/params/default_jobs_test.py, two trainings at once)
  started 19 minutes into the run; in this order it starts within 3. The
  run took as long (1722 s against 1690 s): both cores are busy throughout,
  so the order only keeps the longest file off the run's tail.
  """
  heavy_files = {item.path for item in items
                 if item.get_closest_marker('heavy') is not None}
  items.sort(key=lambda item: item.path not in heavy_files)  # stable
