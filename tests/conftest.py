"""Shared pytest setup: runs before any test module imports TensorFlow."""

import os

# TensorFlow reads this once at import; set it first so its C++ INFO/WARNING logs stay out of
# test output. A value already in the environment wins.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import tensorflow as tf  # pylint: disable=g-import-not-at-top

# Pipeline and placement tests place cells on several devices. TensorFlow can
# split the CPU only before it initializes its devices, so do it once here for
# the whole session; single-device tests just use CPU:0.
NUM_TEST_CPUS = 4
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices('CPU')[0],
    [tf.config.LogicalDeviceConfiguration()] * NUM_TEST_CPUS)
