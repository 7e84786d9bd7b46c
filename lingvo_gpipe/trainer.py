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

Layouts: the K cells on local devices (default), on TensorFlow workers
(--worker_hosts), and R data-parallel replicas of the pipeline in this process
(--num_replicas), one per process (--replica_hosts, --replica_index) or on
TPU cores (--tpu); lingvo_gpipe.tools.local_cluster starts local workers or
replica processes. lingvo_gpipe/layout.py computes the layout from these
flags; --num_partitions, --num_micro_batches and the devices go to every
pipeline the task declares (BaseTask.PipelinePaths).

What lands in DIR: params.txt (the resolved Params; --params_file takes it
back), checkpoints/, train/ and eval_<split>/ event files for TensorBoard.

Exit status: 0 done; 1 bad invocation (unknown model, bad override or flag,
unwritable or busy logdir, a checkpoint of another model, no checkpoint that
restores); 2 data set not found; 3 out of memory; 4 non-finite loss or
update; 5 a worker lost; 6 the logdir's disk full or read-only; 130 stopped
by Ctrl-C or SIGTERM. README.md's "Faults and what happens" says what is
kept in each case.
"""

import math
import os
import signal
import sys
import traceback
from typing import Optional

from lingvo_gpipe.core import tf_env

tf_env.Setup()  # before TensorFlow loads: allocator, oneDNN, log noise

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import tensorflow as tf

from lingvo_gpipe import eval_program
from lingvo_gpipe import experiment
from lingvo_gpipe import layout as layout_lib
from lingvo_gpipe import logdir as logdir_lib
from lingvo_gpipe import model_registry
from lingvo_gpipe import run_errors
from lingvo_gpipe import train_program
from lingvo_gpipe.core import checkpoint as checkpoint_lib
from lingvo_gpipe.core import cluster
from lingvo_gpipe.core import graph_optimization
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core import local_processes
from lingvo_gpipe.core import replicas as replicas_lib
from lingvo_gpipe.core.gpipe import placement

ExitStatus = run_errors.ExitStatus
UsageError = run_errors.UsageError

MODES = ('train', 'eval', 'train_and_eval')
TPU_CONNECT_TIMEOUT_SECS = 60.0


flags.adopt_module_key_flags(tf_env)  # --tf_logs in --help
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
_PARAMS_IMPORT_ROOTS = flags.DEFINE_string(
    'params_import_roots', '', 'Comma-separated top-level modules (besides '
    "lingvo_gpipe, tasks and params) whose classes a params file's or "
    "override's `@module.Name` may import. Importing runs a module's code, so "
    'name only modules you trust.')
_OVERRIDE = flags.DEFINE_string(
    'params_override', '', "Overrides applied after --params_file, e.g. "
    "'train.learning_rate=1e-3; task.network.num_layers=4'.")
_MAX_STEPS = flags.DEFINE_integer('max_steps', None,
                                  'Shortcut for train.max_steps.')
_NUM_PARTITIONS = flags.DEFINE_integer(
    'num_partitions', None, 'Shortcut: K, the number of pipeline cells.')
_NUM_MICRO_BATCHES = flags.DEFINE_integer(
    'num_micro_batches', None, 'Shortcut: M, micro-batches per mini-batch.')
_FPROP_DTYPE = flags.DEFINE_string(
    'fprop_dtype', None, 'Shortcut: task.fprop_dtype, the dtype every layer '
    'computes in (bfloat16 or float16; variables stay float32; float16 turns '
    'on dynamic loss scaling). Default: the config\'s.')
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
_WORKER_TIMEOUT = flags.DEFINE_float(
    'worker_timeout_secs', 120.0, 'With --worker_hosts: how long a worker may '
    'take to answer, at start and to the liveness probe sent to each worker '
    'every few seconds during the run; one that does not (not listening, '
    'stopped, hung, unreachable or killed) ends the run with status 5, named. '
    'A finite number > 0; generous, so a slow machine is not taken for a '
    'lost worker.')
_NUM_REPLICAS = flags.DEFINE_integer(
    'num_replicas', 1, 'R, data-parallel replicas of the K-cell pipeline in '
    'this process (MirroredStrategy): replica r runs on devices r*K..r*K+K-1 '
    '(GPUs or logical CPUs). input.batch_size is the '
    'whole mini-batch, cut into R equal shards. With --tpu: replicas on the '
    'TPU (default: all cores / K).')
_REPLICA_HOSTS = flags.DEFINE_string(
    'replica_hosts', None, 'Comma-separated host:port of every process of a '
    'multi-process data-parallel job (MultiWorkerMirroredStrategy): each '
    'process is one replica, its K cells on its own devices. Run the same '
    'command in every process with its own --replica_index; process 0 is the '
    'chief (checkpoints, summaries, evaluation).')
_REPLICA_INDEX = flags.DEFINE_integer(
    'replica_index', 0, "With --replica_hosts: this process's index.")
_TPU = flags.DEFINE_string(
    'tpu', None, 'TPU name or grpc:// address (TPUClusterResolver): cells on '
    'K logical cores per replica of a TPUStrategy. Needs a TPU host; not '
    'exercised in this repository\'s tests.')
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


def LayoutSettings() -> layout_lib.Settings:
  """The layout flags' values, for layout.Compute."""
  return layout_lib.Settings(
      device=_DEVICE.value, num_cpu_devices=_NUM_CPU_DEVICES.value,
      worker_hosts=tuple(WorkerHosts()), num_replicas=_NUM_REPLICAS.value,
      replica_hosts=tuple(cluster.ParseHosts(_REPLICA_HOSTS.value)
                          if _REPLICA_HOSTS.value else ()),
      replica_index=_REPLICA_INDEX.value, tpu=_TPU.value)


def ResolveParams(settings: layout_lib.Settings) -> hyperparams.Params:
  """The run's Params from the flags."""
  if not _MODEL.value:
    raise UsageError('--model is required, e.g. --model=image.digits.'
                     'AmoebaNetTiny (--list_models lists them all).')
  hyperparams.AllowImportRoots(
      [r.strip() for r in _PARAMS_IMPORT_ROOTS.value.split(',') if r.strip()])
  num_partitions = _NUM_PARTITIONS.value
  if num_partitions is None:
    num_partitions = layout_lib.DefaultNumCells(settings)
  return experiment.Resolve(experiment.Settings(
      model=_MODEL.value, params_file=_PARAMS_FILE.value,
      params_override=_OVERRIDE.value, max_steps=_MAX_STEPS.value,
      num_partitions=num_partitions,
      num_micro_batches=_NUM_MICRO_BATCHES.value, data_dir=_DATA_DIR.value,
      fprop_dtype=_FPROP_DTYPE.value))


def ApplyLayout(params: hyperparams.Params, layout: layout_lib.Layout) -> None:
  """Carries `layout` out: splits the CPU if asked, places every pipeline of `params`.

  The pipelines get replica 0's devices (MakeReplicas gives each replica its
  own), or the TPU backend. Must run before TensorFlow runs any op.
  """
  if layout.cpu_devices:
    placement.ConfigureCpuDevices(layout.cpu_devices)
  if layout.kind == layout_lib.TPU:
    experiment.SetTpuBackend(params)
  else:
    experiment.SetDevices(params, list(layout.devices))


def MakeReplicas(params: hyperparams.Params, groups: list[list[str]],
                 strategy: Optional[tf.distribute.Strategy]
                 ) -> replicas_lib.Replicas:
  """The task's replicas as the flags lay them out."""
  if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return replicas_lib.MultiWorker(strategy, params.task)
  if strategy is not None:  # a TPUStrategy
    return replicas_lib.Tpu(strategy, params.task)
  per_replica = []
  for group in groups:
    replica = params.Copy()
    experiment.SetDevices(replica, group)
    per_replica.append(replica.task)
  return replicas_lib.Local(per_replica, [group[0] for group in groups])


def MakeStrategy(layout: layout_lib.Layout) -> Optional[tf.distribute.Strategy]:
  """The multi-process or TPU strategy `layout` needs; None for local replicas.

  Must run before TensorFlow runs any op.
  """
  settings = layout.settings
  if layout.kind == layout_lib.PROCESSES:
    try:
      return replicas_lib.MakeMultiWorkerStrategy(list(settings.replica_hosts),
                                                  settings.replica_index)
    except replicas_lib.ReplicaIndexError as e:
      raise UsageError(f'--replica_index={settings.replica_index} is invalid: '
                       f'{e} Give each process of --replica_hosts its own '
                       'index.') from e
  if layout.kind == layout_lib.TPU:
    tpu = settings.tpu
    if tpu.startswith('grpc://'):
      # TensorFlow waits forever for an address where nothing listens.
      try:
        local_processes.WaitForListening([tpu[len('grpc://'):]],
                                         TPU_CONNECT_TIMEOUT_SECS)
      except TimeoutError as e:
        raise UsageError(f'--tpu={tpu!r}: nothing listens there '
                         f'(waited {TPU_CONNECT_TIMEOUT_SECS:.0f} s).') from e
    try:
      return placement.MakeTpuStrategy(tpu, layout.num_cells,
                                       layout.tpu_replicas)
    except (ValueError, OSError, RuntimeError, tf.errors.OpError) as e:
      # OSError: the name did not resolve (e.g. no GCE metadata server).
      raise UsageError(f'--tpu={tpu!r}: cannot connect to or lay out '
                       f'the TPU: {e}') from e
  return None


def CheckData(params: hyperparams.Params, mode: str, eval_split: str) -> None:
  """Opens the splits `mode` reads, so a missing data set fails before the build."""
  inputs = params.input.Instantiate()
  if mode != 'eval':
    inputs.Dataset(params.input.train_split, training=True)
  if mode != 'train':
    inputs.Dataset(eval_split, training=False)


def Run(params: hyperparams.Params, logdir: str, mode: str,
        groups: list[list[str]],
        strategy: Optional[tf.distribute.Strategy] = None) -> None:
  """Builds the task (each replica's, for training) once and runs `mode`."""
  split = _EVAL_SPLIT.value or params.input.eval_split
  CheckData(params, mode, split)
  graph_optimization.Configure(params.train.graph_optimization)
  if mode == 'eval':
    # One evaluator per split beside the trainer, which holds the logdir.
    lock = logdir_lib.Lock(os.path.join(logdir, eval_program.Subdir(split)),
                           role=f'evaluator of split {split!r}')
    task = params.task.Instantiate()
    evaluator = eval_program.EvalProgram(params, logdir, task, split)
    checkpointer = train_program.MakeCheckpointer(params, logdir, task)
    for path in evaluator.NewCheckpoints(logdir, _EVAL_TIMEOUT.value):
      try:
        checkpointer.Restore(path, partial=True)
      except checkpoint_lib.CheckpointDamagedError as e:
        evaluator.Skip(path, e)
        continue
      evaluator.Evaluate(checkpoint_lib.StepOf(path))
      evaluator.MarkEvaluated(path)
    lock.Release()
    return
  lock = (logdir_lib.Lock(logdir) if _REPLICA_INDEX.value == 0 else None)
  replicas = MakeReplicas(params, groups, strategy)
  experiment.CheckMicroBatches(params, replicas.num_replicas)
  trainer = train_program.TrainProgram(params, logdir, replicas)
  start = trainer.Restore()
  if lock is not None:
    # Only now: a run refused above (another model's checkpoint) must not
    # change the params.txt that describes the checkpoints in logdir.
    logdir_lib.WriteParams(logdir, params)
  logging.info('Training %s from step %d to %d in %s on %d replica(s).',
               params.name, start, params.train.max_steps, logdir,
               replicas.num_replicas)
  on_checkpoint = None
  if mode == 'train_and_eval' and replicas.is_chief:
    evaluator = eval_program.EvalProgram(params, logdir, trainer.task, split)

    def EvaluateCheckpoint(step, path):
      evaluator.Evaluate(step)
      evaluator.MarkEvaluated(path)

    on_checkpoint = EvaluateCheckpoint
    if start >= params.train.max_steps and trainer.checkpointer.latest and (
        evaluator.LastEvaluated() != os.path.basename(trainer.checkpointer.latest)):
      on_checkpoint(start, trainer.checkpointer.latest)
  trainer.Run(on_checkpoint=on_checkpoint)
  logging.info('Done: %s at step %d.', params.name, trainer.step)
  if lock is not None:
    lock.Release()


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
    settings = LayoutSettings()
    layout_lib.Check(settings)
    if not (math.isfinite(_EVAL_TIMEOUT.value) and _EVAL_TIMEOUT.value >= 0):
      raise UsageError(f'--eval_timeout_secs={_EVAL_TIMEOUT.value}: must be a '
                       'finite number of seconds >= 0.')
    params = ResolveParams(settings)
    num_gpus = 0 if settings.tpu else len(
        tf.config.list_physical_devices('GPU'))
    layout = layout_lib.Compute(settings, experiment.NumPartitions(params),
                                num_gpus)
    ApplyLayout(params, layout)
    if _PRINT_PARAMS.value:
      print(params.ToText(), end='')
      return
    if not _LOGDIR.value:
      raise UsageError('--logdir is required: where checkpoints, params.txt '
                       'and summaries go.')
    if _MODE.value == 'eval' and layout.kind in (layout_lib.PROCESSES,
                                                 layout_lib.TPU):
      raise UsageError('--mode=eval runs in one process on its own devices; '
                       'drop --replica_hosts / --tpu for the evaluator.')
    # SIGTERM stops a run as Ctrl-C does: between steps, with a message.
    signal.signal(signal.SIGTERM, _RaiseKeyboardInterrupt)
    cluster.CheckTimeout(_WORKER_TIMEOUT.value, '--worker_timeout_secs')
    hosts = list(settings.worker_hosts)
    if hosts:
      # TensorFlow waits forever for a worker that does not answer: bound the
      # connection, then probe the workers for the whole run (the watchdog
      # exits with WORKER_LOST even while a step is blocked on a lost one).
      cluster.ConnectToWorkers(hosts, _WORKER_TIMEOUT.value,
                               '--worker_timeout_secs')
      cluster.WorkerWatchdog(
          hosts, _WORKER_TIMEOUT.value,
          cluster.ExitProcessOnLost(ExitStatus.WORKER_LOST),
          '--worker_timeout_secs').Start()
    strategy = MakeStrategy(layout)
    Run(params, _LOGDIR.value, _MODE.value,
        [list(group) for group in layout.groups], strategy)
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    report = run_errors.Report(e)
    if report is None:  # a bug: its traceback, and a status of its own
      traceback.print_exc()
      _Fail(ExitStatus.INTERNAL,
            f'{type(e).__name__}: {run_errors.UserMessage(e)} -- a bug, not '
            'a configuration error (traceback above); please report it.')
    _Fail(*report)


def _RaiseKeyboardInterrupt(signum, frame) -> None:
  del signum, frame
  raise KeyboardInterrupt()


def _Fail(status: ExitStatus, message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(int(status))


if __name__ == '__main__':
  app.run(main)
