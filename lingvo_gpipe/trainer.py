r"""The trainer/evaluator binary: trains and evaluates any registered model.

  python -m lingvo_gpipe.trainer --model=image.digits.AmoebaNetTiny \
      --logdir=/tmp/digits
  python -m lingvo_gpipe.trainer --model=mt.synthetic.TransformerTiny \
      --logdir=/tmp/copy --num_micro_batches=8 \
      --params_override='train.learning_rate=3e-3; input.task=reverse'
  tensorboard --logdir=/tmp/digits

Modes: `train` (train to train.max_steps, checkpointing), `eval` (watch
DIR/checkpoints and evaluate each new checkpoint once), `train_and_eval`
(train, and evaluate every checkpoint as it is written). A rerun with the
same --logdir resumes from its latest checkpoint.

What lands in DIR: params.txt (the resolved Params; --params_file takes it
back), checkpoints/, train/ and eval_<split>/ event files for TensorBoard.

Exit status: 0 done; 1 bad invocation (unknown model, bad override or flag,
unwritable logdir, a checkpoint of another model); 2 data set not found;
3 out of memory; 4 non-finite loss.
"""

import os
import sys

# Before TensorFlow starts: the CPU allocator keeps peak-memory statistics
# only when it is the BFC allocator; the summaries report them.
os.environ.setdefault('TF_CPU_ALLOCATOR_USE_BFC', 'true')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Under a CPU memory cap (TF_CPU_BFC_MEM_LIMIT_IN_MB, a CPU made to behave like
# an accelerator of that size) oneDNN's kernels crash the process on a failed
# allocation instead of raising ResourceExhaustedError; TensorFlow's own
# kernels raise, and the trainer can then say which knobs help.
if os.environ.get('TF_CPU_BFC_MEM_LIMIT_IN_MB'):
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import tensorflow as tf

from lingvo_gpipe import eval_program
from lingvo_gpipe import experiment
from lingvo_gpipe import model_registry
from lingvo_gpipe import run_errors
from lingvo_gpipe import train_program
from lingvo_gpipe.core import checkpoint as checkpoint_lib
from lingvo_gpipe.core import cluster
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core.gpipe import placement

ExitStatus = run_errors.ExitStatus
UsageError = run_errors.UsageError

MODES = ('train', 'eval', 'train_and_eval')
DEVICES = ('auto', 'cpu', 'gpu')
PARAMS_FILE = 'params.txt'


_MODEL = flags.DEFINE_string(
    'model', None, 'Registered model name, e.g. image.digits.AmoebaNetTiny; '
    'see --list_models.')
_LOGDIR = flags.DEFINE_string(
    'logdir', None, 'Directory of the run: params.txt, checkpoints/, train/ '
    'and eval_<split>/ summaries. Reusing it resumes the run.')
_MODE = flags.DEFINE_string('mode', 'train', f'One of {", ".join(MODES)}.')
_PARAMS_FILE = flags.DEFINE_string(
    'params_file', None, "A file of 'key : value' or 'key=value' lines (e.g. "
    'a params.txt) applied over the config.')
_OVERRIDE = flags.DEFINE_string(
    'params_override', '', "Overrides applied after --params_file, e.g. "
    "'train.learning_rate=1e-3; task.network.num_layers=4'.")
_MAX_STEPS = flags.DEFINE_integer('max_steps', None,
                                  'Shortcut for train.max_steps.')
_NUM_PARTITIONS = flags.DEFINE_integer(
    'num_partitions', None, 'Shortcut: K, the number of pipeline cells.')
_NUM_MICRO_BATCHES = flags.DEFINE_integer(
    'num_micro_batches', None, 'Shortcut: M, micro-batches per mini-batch.')
_DATA_DIR = flags.DEFINE_string('data_dir', None,
                                'Shortcut for input.data_dir (tfds data).')
_DEVICE = flags.DEFINE_string(
    'device', 'auto', "Where the cells run: 'gpu' (cell k on GPU k), 'cpu' "
    "(cell k on logical CPU device k), or 'auto' (GPUs if there are enough).")
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    'num_cpu_devices', None, 'Logical CPU devices to split the CPU into '
    '(default: one per pipeline cell).')
_WORKER_HOSTS = flags.DEFINE_string(
    'worker_hosts', None, 'Comma-separated host:port of TensorFlow workers '
    '(lingvo_gpipe.tools.worker); cell k runs on worker k, and K defaults to '
    'their number. lingvo_gpipe.tools.local_cluster starts local ones.')
_EVAL_SPLIT = flags.DEFINE_string('eval_split', None,
                                  'Split to evaluate; default input.eval_split.')
_EVAL_TIMEOUT = flags.DEFINE_float(
    'eval_timeout_secs', 3600.0, '--mode=eval stops when no new checkpoint '
    'appears for this long (or after the one at train.max_steps).')
_LIST_MODELS = flags.DEFINE_bool('list_models', False,
                                 'Print every registered model name and exit.')
_PRINT_PARAMS = flags.DEFINE_bool(
    'print_params', False, 'Print the resolved Params as text and exit.')


def WorkerHosts() -> list[str]:
  """--worker_hosts as a list; empty when the cells run in this process."""
  return cluster.ParseHosts(_WORKER_HOSTS.value) if _WORKER_HOSTS.value else []


def ResolveParams() -> hyperparams.Params:
  """The run's Params from the flags."""
  if not _MODEL.value:
    raise UsageError('--model is required, e.g. --model=image.digits.'
                     'AmoebaNetTiny (--list_models lists them all).')
  num_partitions = _NUM_PARTITIONS.value
  if num_partitions is None and WorkerHosts():
    num_partitions = len(WorkerHosts())  # one pipeline stage per worker
  return experiment.Resolve(experiment.Settings(
      model=_MODEL.value, params_file=_PARAMS_FILE.value,
      params_override=_OVERRIDE.value, max_steps=_MAX_STEPS.value,
      num_partitions=num_partitions,
      num_micro_batches=_NUM_MICRO_BATCHES.value, data_dir=_DATA_DIR.value))


def PlaceCells(params: hyperparams.Params) -> list[str]:
  """Chooses cell k's device: worker k, GPU k, or logical CPU device k.

  With --worker_hosts the devices are the workers' (round robin if there
  are fewer workers than cells); nothing connects to them yet.
  """
  if _DEVICE.value not in DEVICES:
    raise UsageError(f'--device={_DEVICE.value!r}; valid: {", ".join(DEVICES)}.')
  k = experiment.NumPartitions(params)
  hosts = WorkerHosts()
  if hosts:
    workers = cluster.WorkerDevices(
        len(hosts), 'GPU' if _DEVICE.value == 'gpu' else 'CPU')
    devices = [workers[i % len(workers)] for i in range(k)]
    experiment.SetDevices(params, devices)
    return devices
  gpus = tf.config.list_physical_devices('GPU')
  if _DEVICE.value == 'gpu' or (_DEVICE.value == 'auto' and len(gpus) >= k):
    if len(gpus) < k:
      raise UsageError(f'--device=gpu: the pipeline has {k} cells but this '
                       f'machine has {len(gpus)} GPUs. Use --num_partitions='
                       f'{max(1, len(gpus))} or --device=cpu.')
    devices = placement.LocalDevices('GPU')[:k]
  else:
    num_cpus = _NUM_CPU_DEVICES.value or k
    if num_cpus < 1:
      raise UsageError(f'--num_cpu_devices must be >= 1, got {num_cpus}.')
    cpus = placement.SplitCpu(num_cpus)
    devices = [cpus[i % len(cpus)] for i in range(k)]
  experiment.SetDevices(params, devices)
  return devices


def PrepareLogdir(logdir: str, params: hyperparams.Params) -> None:
  """Creates logdir and writes params.txt atomically; says what blocks it."""
  text = params.ToText()
  path = os.path.join(logdir, PARAMS_FILE)
  try:
    os.makedirs(logdir, exist_ok=True)
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        old = f.read()
      if old != text:
        changed = sorted(set(text.splitlines()) ^ set(old.splitlines()))
        logging.warning('%s differs from this run\'s Params (%d lines, e.g. '
                        '%s); it is replaced.', path, len(changed), changed[:4])
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      f.write(text)
    os.replace(path + '.tmp', path)
  except OSError as e:
    raise UsageError(f'--logdir={logdir!r} is not writable: {e.strerror or e} '
                     f'({e.filename or logdir}). Choose a directory you can '
                     'write to.') from e


def CheckData(params: hyperparams.Params, mode: str, eval_split: str) -> None:
  """Opens the splits `mode` reads, so a missing data set fails before the build."""
  inputs = params.input.Instantiate()
  if mode != 'eval':
    inputs.Dataset(params.input.train_split, training=True)
  if mode != 'train':
    inputs.Dataset(eval_split, training=False)


def Run(params: hyperparams.Params, logdir: str, mode: str) -> None:
  """Builds the task once and runs `mode`."""
  split = _EVAL_SPLIT.value or params.input.eval_split
  CheckData(params, mode, split)
  task = params.task.Instantiate()
  if mode == 'eval':
    evaluator = eval_program.EvalProgram(params, logdir, task, split)
    checkpointer = checkpoint_lib.Checkpointer(
        logdir, dict(task=task, global_step=tf.Variable(0, dtype=tf.int64)))
    for path in evaluator.NewCheckpoints(logdir, _EVAL_TIMEOUT.value):
      checkpointer.Restore(path, partial=True)
      evaluator.Evaluate(checkpoint_lib.StepOf(path))
      evaluator.MarkEvaluated(path)
    return
  trainer = train_program.TrainProgram(params, logdir, task)
  start = trainer.Restore()
  logging.info('Training %s from step %d to %d in %s.', params.name, start,
               params.train.max_steps, logdir)
  on_checkpoint = None
  if mode == 'train_and_eval':
    evaluator = eval_program.EvalProgram(params, logdir, task, split)

    def on_checkpoint(step, path):
      evaluator.Evaluate(step)
      evaluator.MarkEvaluated(path)

    if start >= params.train.max_steps and trainer.checkpointer.latest and (
        evaluator.LastEvaluated() != os.path.basename(trainer.checkpointer.latest)):
      on_checkpoint(start, trainer.checkpointer.latest)
  trainer.Run(on_checkpoint=on_checkpoint)
  logging.info('Done: %s at step %d.', params.name, trainer.step)


def main(argv):
  if len(argv) > 1:
    _Fail(ExitStatus.USAGE, f'unexpected arguments {argv[1:]}; every setting '
          'is a --flag (see --help).')
  try:
    if _LIST_MODELS.value:
      print('\n'.join(model_registry.ListModels()))
      return
    if _MODE.value not in MODES:
      raise UsageError(f'--mode={_MODE.value!r}; valid: {", ".join(MODES)}.')
    params = ResolveParams()
    PlaceCells(params)
    if _PRINT_PARAMS.value:
      print(params.ToText(), end='')
      return
    if not _LOGDIR.value:
      raise UsageError('--logdir is required: where checkpoints, params.txt '
                       'and summaries go.')
    if WorkerHosts():
      cluster.ConnectToWorkers(WorkerHosts())
    PrepareLogdir(_LOGDIR.value, params)
    Run(params, _LOGDIR.value, _MODE.value)
  except Exception as e:  # pylint: disable=broad-except
    report = run_errors.Report(e)
    if report is None:
      raise  # a bug: keep the traceback
    _Fail(*report)


def _Fail(status: ExitStatus, message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(int(status))


if __name__ == '__main__':
  app.run(main)
