r"""Measures one training step's peak memory and time, plain or pipelined.

Run it in a process of its own: it turns on TensorFlow's BFC allocator for the
CPU (so `get_memory_info` reports peaks) before TensorFlow loads, and a
`TF_CPU_BFC_MEM_LIMIT_IN_MB` cap in the environment makes the CPU behave like
a device of that size. Prints one JSON line; exits non-zero if the step does
not fit. Tests and bench/ scripts run it as a subprocess.

With --worker_hosts, cell k runs on TensorFlow worker k
(lingvo_gpipe.tools.worker, each capped by its own environment) and this
process is only the client: the variables, every cell's forward and
backward, the loss (on the last cell's worker) and each gradient's reduction
(on its variable's worker) stay on the workers. The client creates the input
batch, runs the tape's first backward ops (the loss's gradient with respect
to the last cell's output, sent to that worker) and receives two scalars. The
peaks reported are then this client's; a worker's allocator is not readable
from here.

  python -m lingvo_gpipe.tools.step_memory --stack=dense --num_layers=24 \
      --dim=512 --batch=4096 --num_micro_batches=8 --recompute=always
"""

import json
import sys
import time

from lingvo_gpipe.core import tf_env

tf_env.Setup()  # before TensorFlow loads: allocator, oneDNN, log noise

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core import cluster
from lingvo_gpipe.core import precision
from lingvo_gpipe.core.gpipe import pipelining_layer
from lingvo_gpipe.core.gpipe import placement
from lingvo_gpipe.core.gpipe import pipeline
from lingvo_gpipe.core.gpipe import recompute
from lingvo_gpipe.core.nested_map import NestedMap
from lingvo_gpipe.tools import stacks

flags.adopt_module_key_flags(tf_env)  # --tf_logs in --help
_STACK = flags.DEFINE_enum(
    'stack', 'dense', ['dense', 'transformer', 'amoebanet'], 'dense: '
    'Dense(dim) relu layers on random vectors; transformer: a Transformer-L '
    'shaped language model (d_ff = 4 dim, untied softmax) on random token '
    'ids; amoebanet: AmoebaNet-D with num_layers normal cells and dim '
    'filters on random image_size images, 10 classes.')
_NUM_LAYERS = flags.DEFINE_integer('num_layers', 24, 'Layers in the stack '
                                   '(Transformer blocks for transformer).')
_DIM = flags.DEFINE_integer('dim', 512, 'Width of every layer (d_model).')
_BATCH = flags.DEFINE_integer('batch', 4096, 'Mini-batch size (sequences '
                              'for transformer).')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 128, 'transformer: tokens per '
                                'sequence.')
_NUM_HEADS = flags.DEFINE_integer('num_heads', 4, 'transformer: heads.')
_VOCAB = flags.DEFINE_integer('vocab_size', 2048, 'transformer: vocabulary.')
_STACK_LAYERS = flags.DEFINE_bool('stack_layers', False, 'transformer: the '
                                  'blocks as one Repeat layer (stacked '
                                  'weights) instead of listed.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 32, 'amoebanet: image side '
                                   '(the small-image stem).')
_PLAIN = flags.DEFINE_bool('plain', False, 'Run the layers in sequence under '
                           'one tape, without PipeliningLayer.')
_NUM_PARTITIONS = flags.DEFINE_integer(
    'num_partitions', None, 'K cells (default: one per --worker_hosts entry, '
    'else 1); without workers, more than 1 splits the CPU into K devices.')
_WORKER_HOSTS = flags.DEFINE_string(
    'worker_hosts', None, 'Comma-separated host:port of TensorFlow workers '
    '(lingvo_gpipe.tools.worker); cell k runs on worker k (round robin if '
    'fewer), and this process only feeds the input and reads the results.')
_NUM_MICRO_BATCHES = flags.DEFINE_integer('num_micro_batches', 1, 'M.')
_RECOMPUTE = flags.DEFINE_enum('recompute', 'always',
                               list(recompute.RECOMPUTE_MODES),
                               'Re-materialization mode.')
_INPUT_GRADS_FIRST = flags.DEFINE_bool(
    'input_grads_first', False, "PipeliningLayer's input_grads_first: cells "
    'compute the gradient for the previous cell before their weight '
    'gradients.')
_EXECUTOR = flags.DEFINE_enum('executor', 'unrolled',
                              list(pipeline.EXECUTORS),
                              "PipeliningLayer's executor.")
_SCHEDULE = flags.DEFINE_enum('schedule', 'gpipe', list(pipeline.SCHEDULES),
                              "PipeliningLayer's schedule; one other than "
                              "'gpipe' needs --loss_inside_pipeline.")
_CELLS_PER_DEVICE = flags.DEFINE_integer(
    'cells_per_device', 1, "PipeliningLayer's cells_per_device (V): with "
    "--schedule=interleaved_1f1b, K·V cells, cell c on device c mod K.")
_LOSS_INSIDE = flags.DEFINE_bool(
    'loss_inside_pipeline', False, "Compute the loss per micro-batch on the "
    "last cell (PipeliningLayer.FPropLoss) instead of on the whole batch's "
    'outputs under the tape.')
_FPROP_DTYPE = flags.DEFINE_enum(
    'fprop_dtype', 'float32', list(precision.FPROP_DTYPES),
    "PipeliningLayer's fprop_dtype: the dtype its layers compute in "
    '(variables stay float32; the loss is computed in float32).')
_REPEATS = flags.DEFINE_integer('repeats', 1, 'Measured steps after the '
                                'warm-up; the smallest peak and time are kept.')

def _DenseStack() -> stacks.Stack:
  return stacks.DenseStack(_NUM_LAYERS.value, _DIM.value, _BATCH.value)


def _TransformerStack() -> stacks.Stack:
  return stacks.TransformerStack(_NUM_LAYERS.value, _DIM.value, _BATCH.value,
                                 _SEQ_LEN.value, _NUM_HEADS.value,
                                 _VOCAB.value, stacked=_STACK_LAYERS.value)


def _AmoebaNetStack() -> stacks.Stack:
  try:
    return stacks.AmoebaNetStack(_NUM_LAYERS.value, _DIM.value, _BATCH.value,
                                 _IMAGE_SIZE.value)
  except stacks.NotOnPath as e:
    raise app.UsageError(f'--stack=amoebanet: {e}') from e


def _Stack():
  return {'dense': _DenseStack, 'transformer': _TransformerStack,
          'amoebanet': _AmoebaNetStack}[_STACK.value]()


def _Devices() -> tuple[int, list[str]]:
  """(K, the cells' devices): workers, logical CPU devices, or CPU:0.

  With fewer workers than K, the pipeline places cells on them round robin.

  Connects to the workers, so it must run before any tensor is created.
  """
  if _WORKER_HOSTS.value:
    workers = cluster.ConnectToWorkers(cluster.ParseHosts(_WORKER_HOSTS.value))
    return _NUM_PARTITIONS.value or len(workers), workers
  k = _NUM_PARTITIONS.value or 1
  return k, placement.SplitCpu(k) if k > 1 else ['/device:CPU:0']


def Measure() -> dict:
  """Builds the stack, runs warm-up plus measured steps, returns the figures."""
  k, devices = _Devices()
  layers, x, stack_loss = _Stack()

  def loss_fn(y):  # float32, whatever the layers compute in (precision.py)
    return stack_loss(precision.CastFloats(y, tf.float32))
  p = pipelining_layer.PipeliningLayer.Params().Set(
      name='stack', layers=layers, num_partitions=k,
      num_micro_batches=_NUM_MICRO_BATCHES.value, recompute=_RECOMPUTE.value,
      input_grads_first=_INPUT_GRADS_FIRST.value, devices=devices,
      executor=_EXECUTOR.value, schedule=_SCHEDULE.value,
      cells_per_device=_CELLS_PER_DEVICE.value,
      fprop_dtype=_FPROP_DTYPE.value)
  model = p.Instantiate()
  variables = model.trainable_variables

  # Device scopes keep the loss and the gradient sums where their inputs are:
  # with workers, unplaced ops would run in (and copy tensors to) this client.
  @tf.function(autograph=False)  # nothing to convert; tracing is shorter
  def Step(x):
    with base_layer.Context(training=True):
      with tf.GradientTape() as tape:
        if _LOSS_INSIDE.value and not _PLAIN.value:
          # Each stack's loss is a mean over examples: weighted by rows,
          # the micro-batches' losses combine into the batch's.
          loss = model.FPropLoss(model.theta, x, None, lambda y, _: NestedMap(
              loss=(loss_fn(y), tf.cast(tf.shape(tf.nest.flatten(y)[0])[0],
                                        tf.float32)))).loss[0]
        else:
          if _PLAIN.value:
            y = x
            for k_, cell in enumerate(model.cells):
              with tf.device(model.placement.Device(k_)):
                y = cell.FProp(model.CellTheta(model.theta, k_), y)
          else:
            y = model.FPropDefaultTheta(x)
          with model.OutputScope():
            loss = loss_fn(y)
      with model.OutputScope():
        grads = tape.gradient(loss, variables)
    sums = []
    for v, g in zip(variables, grads):
      with tf.device(v.device):
        sums.append(tf.reduce_sum(g))
    return loss, tf.add_n(sums)

  tf.nest.map_structure(lambda t: t.numpy(), Step(x))
  peaks, times = [], []
  for _ in range(_REPEATS.value):
    before = tf.config.experimental.get_memory_info('CPU:0')['current']
    tf.config.experimental.reset_memory_stats('CPU:0')
    start = time.perf_counter()
    tf.nest.map_structure(lambda t: t.numpy(), Step(x))
    times.append(time.perf_counter() - start)
    peaks.append(tf.config.experimental.get_memory_info('CPU:0')['peak'])
    base = before
  return dict(peak_bytes=int(min(peaks)) - base, peak_total_bytes=min(peaks),
              step_seconds=min(times),
              num_params=pipelining_layer.PipeliningLayer.NumParams(p),
              plain=_PLAIN.value, num_partitions=k,
              num_workers=len(devices) if _WORKER_HOSTS.value else 0,
              num_micro_batches=_NUM_MICRO_BATCHES.value,
              recompute=_RECOMPUTE.value, schedule=_SCHEDULE.value,
              cells_per_device=_CELLS_PER_DEVICE.value,
              num_cells=len(model.cells),
              loss_inside_pipeline=_LOSS_INSIDE.value,
              fprop_dtype=_FPROP_DTYPE.value)


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
