r"""Measures one training step's peak memory and time, plain or pipelined.

Run it in a process of its own: it turns on TensorFlow's BFC allocator for the
CPU (so `get_memory_info` reports peaks) before TensorFlow loads, and a
`TF_CPU_BFC_MEM_LIMIT_IN_MB` cap in the environment makes the CPU behave like
a device of that size. Prints one JSON line; exits non-zero if the step does
not fit. Tests and bench/ scripts run it as a subprocess.

  python -m lingvo_gpipe.tools.step_memory --stack=dense --num_layers=24 \
      --dim=512 --batch=4096 --num_micro_batches=8 --recompute=always
"""

import json
import os
import sys
import time

os.environ.setdefault('TF_CPU_ALLOCATOR_USE_BFC', 'true')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.gpipe import pipeline
from lingvo_gpipe.core.gpipe import pipelining_layer
from lingvo_gpipe.core.gpipe import placement
from lingvo_gpipe.core.layers import dense

_STACK = flags.DEFINE_enum('stack', 'dense', ['dense'],
                           'Which layer stack to build.')
_NUM_LAYERS = flags.DEFINE_integer('num_layers', 24, 'Layers in the stack.')
_DIM = flags.DEFINE_integer('dim', 512, 'Width of every layer.')
_BATCH = flags.DEFINE_integer('batch', 4096, 'Mini-batch size.')
_PLAIN = flags.DEFINE_bool('plain', False, 'Run the layers in sequence under '
                           'one tape, without PipeliningLayer.')
_NUM_PARTITIONS = flags.DEFINE_integer('num_partitions', 1, 'K cells; more '
                                       'than 1 splits the CPU into K devices.')
_NUM_MICRO_BATCHES = flags.DEFINE_integer('num_micro_batches', 1, 'M.')
_RECOMPUTE = flags.DEFINE_enum('recompute', 'always',
                               list(pipeline.RECOMPUTE_MODES),
                               'Re-materialization mode.')
_REPEATS = flags.DEFINE_integer('repeats', 1, 'Measured steps after the '
                                'warm-up; the smallest peak and time are kept.')


def _Layers() -> list:
  return [dense.Dense.Params().Set(name=f'fc{i}', input_dim=_DIM.value,
                                   output_dim=_DIM.value)
          for i in range(_NUM_LAYERS.value)]


def Measure() -> dict:
  """Builds the stack, runs warm-up plus measured steps, returns the figures."""
  k = _NUM_PARTITIONS.value
  if k > 1:
    devices = placement.SplitCpu(k)
  else:
    devices = ['/device:CPU:0']
  layers = _Layers()
  p = pipelining_layer.PipeliningLayer.Params().Set(
      name='stack', layers=layers, num_partitions=k,
      num_micro_batches=_NUM_MICRO_BATCHES.value, recompute=_RECOMPUTE.value,
      devices=devices)
  model = p.Instantiate()
  variables = model.trainable_variables
  x = tf.random.stateless_normal([_BATCH.value, _DIM.value], [0, 1])

  @tf.function
  def Step(x):
    with base_layer.Context(training=True):
      with tf.GradientTape() as tape:
        if _PLAIN.value:
          y = x
          for k_, cell in enumerate(model.cells):
            y = cell.FProp(model.theta[f'cell_{k_}'], y)
        else:
          y = model.FPropDefaultTheta(x)
        loss = tf.reduce_mean(y * y)
      grads = tape.gradient(loss, variables)
    return loss, tf.add_n([tf.reduce_sum(g) for g in grads])

  tf.nest.map_structure(lambda t: t.numpy(), Step(x))
  peaks, times = [], []
  for _ in range(_REPEATS.value):
    before = tf.config.experimental.get_memory_info('CPU:0')['current']
    tf.config.experimental.reset_memory_stats('CPU:0')
    start = time.perf_counter()
    tf.nest.map_structure(lambda t: t.numpy(), Step(x))
    times.append(time.perf_counter() - start)
    peaks.append(tf.config.experimental.get_memory_info('CPU:0')['peak'] -
                 before)
  return dict(peak_bytes=int(min(peaks)), step_seconds=min(times),
              num_params=pipelining_layer.PipeliningLayer.NumParams(p),
              plain=_PLAIN.value, num_partitions=k,
              num_micro_batches=_NUM_MICRO_BATCHES.value,
              recompute=_RECOMPUTE.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    result = Measure()
  except tf.errors.ResourceExhaustedError as e:
    print(json.dumps(dict(error='out of memory', detail=str(e)[:300])))
    sys.exit(3)
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
