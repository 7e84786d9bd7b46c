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
replica processes.

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
from lingvo_gpipe import logdir as logdir_lib
from lingvo_gpipe import model_registry
from lingvo_gpipe import run_errors
from lingvo_gpipe import train_program
from lingvo_gpipe.core import checkpoint as checkpoint_lib
from lingvo_gpipe.core import cluster
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core import replicas as replicas_lib
from lingvo_gpipe.core.gpipe import placement

ExitStatus = run_errors.ExitStatus
UsageError = run_errors.UsageError

MODES = ('train', 'eval', 'train_and_eval')
DEVICES = ('auto', 'cpu', 'gpu')
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


def ResolveParams() -> hyperparams.Params:
  """The run's Params from the flags."""
  if not _MODEL.value:
    raise UsageError('--model is required, e.g. --model=image.digits.'
                     'AmoebaNetTiny (--list_models lists them all).')
  hyperparams.AllowImportRoots(
      [r.strip() for r in _PARAMS_IMPORT_ROOTS.value.split(',') if r.strip()])
  num_partitions = _NUM_PARTITIONS.value
  if num_partitions is None and WorkerHosts():
    num_partitions = len(WorkerHosts())  # one pipeline stage per worker
  return experiment.Resolve(experiment.Settings(
      model=_MODEL.value, params_file=_PARAMS_FILE.value,
      params_override=_OVERRIDE.value, max_steps=_MAX_STEPS.value,
      num_partitions=num_partitions,
      num_micro_batches=_NUM_MICRO_BATCHES.value, data_dir=_DATA_DIR.value))


def CheckLayout() -> None:
  """Refuses flag combinations that describe no single layout of the job."""
  if _DEVICE.value not in DEVICES:
    raise UsageError(f'--device={_DEVICE.value!r}; valid: {", ".join(DEVICES)}.')
  if _NUM_REPLICAS.value < 1:
    raise UsageError(f'--num_replicas must be >= 1, got {_NUM_REPLICAS.value}.')
  if not (math.isfinite(_EVAL_TIMEOUT.value) and _EVAL_TIMEOUT.value >= 0):
    raise UsageError(f'--eval_timeout_secs={_EVAL_TIMEOUT.value}: must be a '
                     'finite number of seconds >= 0.')
  chosen = [name for name, value in (('--worker_hosts', _WORKER_HOSTS.value),
                                     ('--replica_hosts', _REPLICA_HOSTS.value),
                                     ('--tpu', _TPU.value)) if value]
  if len(chosen) > 1:
    raise UsageError(f'{" and ".join(chosen)} cannot be combined: stages on '
                     'workers, replicas in processes and TPU cores are three '
                     'separate layouts.')
  if _REPLICA_HOSTS.value and _NUM_REPLICAS.value != 1:
    raise UsageError('--num_replicas: with --replica_hosts every process is '
                     'one replica (R = the number of hosts).')
  if _WORKER_HOSTS.value and _NUM_REPLICAS.value != 1:
    # MirroredStrategy refuses remote devices in eager TF2 ("in-graph
    # multi-worker training"); measured, not assumed.
    raise UsageError('--num_replicas with --worker_hosts: TensorFlow 2 cannot '
                     'mirror replicas over worker processes in one program. '
                     'Run one replica per process with --replica_hosts (each '
                     'process its stages on its own devices) instead.')


def PlaceCells(params: hyperparams.Params) -> list[list[str]]:
  """Chooses each replica's cell devices: R groups of K (workers, GPUs or CPUs).

  Replica r's cell k runs on device r*K + k of the chosen kind; with fewer
  devices than R*K they are used round robin. Under --replica_hosts the
  devices are this process's own; with --worker_hosts there is one replica.
  Sets replica 0's devices on `params`.
  """
  k = experiment.NumPartitions(params)
  num_replicas = _NUM_REPLICAS.value
  total = k * num_replicas
  hosts = WorkerHosts()
  gpus = tf.config.list_physical_devices('GPU')
  if hosts:
    devices = cluster.WorkerDevices(
        len(hosts), 'GPU' if _DEVICE.value == 'gpu' else 'CPU')
  elif _DEVICE.value == 'gpu' or (_DEVICE.value == 'auto' and
                                  len(gpus) >= total):
    if len(gpus) < total:
      raise UsageError(f'--device=gpu: {num_replicas} replica(s) of {k} cells '
                       f'need {total} GPUs but this machine has {len(gpus)} GPUs. '
                       'Use fewer --num_partitions or --num_replicas, or '
                       '--device=cpu.')
    devices = [f'/device:GPU:{i}' for i in range(total)]
  else:
    num_cpus = _NUM_CPU_DEVICES.value or total
    if num_cpus < 1:
      raise UsageError(f'--num_cpu_devices must be >= 1, got {num_cpus}.')
    placement.ConfigureCpuDevices(num_cpus)
    devices = [f'/device:CPU:{i}' for i in range(num_cpus)]
  flat = [devices[i % len(devices)] for i in range(total)]
  groups = [flat[r * k:(r + 1) * k] for r in range(num_replicas)]
  experiment.SetDevices(params, groups[0])
  return groups


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


def MakeStrategy(params: hyperparams.Params
                 ) -> Optional[tf.distribute.Strategy]:
  """The multi-process or TPU strategy the flags ask for; None for local replicas.

  Must run before TensorFlow runs any op.
  """
  if _REPLICA_HOSTS.value:
    hosts = cluster.ParseHosts(_REPLICA_HOSTS.value)
    try:
      return replicas_lib.MakeMultiWorkerStrategy(hosts, _REPLICA_INDEX.value)
    except replicas_lib.ReplicaIndexError as e:
      raise UsageError(f'--replica_index={_REPLICA_INDEX.value} is invalid: '
                       f'{e} Give each process of --replica_hosts its own '
                       'index.') from e
  if _TPU.value:
    replicas = None if _NUM_REPLICAS.value == 1 else _NUM_REPLICAS.value
    if _TPU.value.startswith('grpc://'):
      # TensorFlow waits forever for an address where nothing listens.
      try:
        cluster.WaitForListening([_TPU.value[len('grpc://'):]],
                                 TPU_CONNECT_TIMEOUT_SECS)
      except TimeoutError as e:
        raise UsageError(f'--tpu={_TPU.value!r}: nothing listens there '
                         f'(waited {TPU_CONNECT_TIMEOUT_SECS:.0f} s).') from e
    try:
      return placement.MakeTpuStrategy(
          _TPU.value, experiment.NumPartitions(params), replicas)
    except (ValueError, OSError, RuntimeError, tf.errors.OpError) as e:
      # OSError: the name did not resolve (e.g. no GCE metadata server).
      raise UsageError(f'--tpu={_TPU.value!r}: cannot connect to or lay out '
                       f'the TPU: {e}') from e
  return None


def CheckData(params: hyperparams.Params, mode: str, eval_split: str) -> None:
  """Opens the splits `mode` reads, so a missing data set fails before the build."""
  inputs = params.input.Instantiate()
  if mode != 'eval':
    inputs.Dataset(params.input.train_split, training=True)
  if mode != 'train':
    inputs.Dataset(eval_split, training=False)


def ConfigureGraphOptimization(enabled: bool) -> None:
  """Turns TensorFlow's graph optimizer (Grappler) on or off for this process.

  TensorFlow reads the setting when a traced function first runs, and runs
  it again, optimized anew, if the setting has changed since; so it is set
  once, before anything is traced (train.graph_optimization).
  """
  tf.config.optimizer.set_experimental_options(
      {'disable_meta_optimizer': not enabled})
  if not enabled:
    logging.info('Graph optimization (Grappler) is off '
                 '(train.graph_optimization=False).')


def Run(params: hyperparams.Params, logdir: str, mode: str,
        groups: list[list[str]],
        strategy: Optional[tf.distribute.Strategy] = None) -> None:
  """Builds the task (each replica's, for training) once and runs `mode`."""
  split = _EVAL_SPLIT.value or params.input.eval_split
  CheckData(params, mode, split)
  ConfigureGraphOptimization(params.train.graph_optimization)
  if mode == 'eval':
    # One evaluator per split beside the trainer, which holds the logdir.
    lock = logdir_lib.Lock(os.path.join(logdir, eval_program.Subdir(split)),
                           role=f'evaluator of split {split!r}')
    task = params.task.Instantiate()
    evaluator = eval_program.EvalProgram(params, logdir, task, split)
    checkpointer = checkpoint_lib.Checkpointer(
        logdir, dict(task=task, global_step=tf.Variable(0, dtype=tf.int64)))
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
    CheckLayout()
    params = ResolveParams()
    groups = [] if _TPU.value else PlaceCells(params)
    if _TPU.value:
      template = experiment.PipelineTemplate(params)
      if template is not None:
        template.placement_backend = 'tpu'
    if _PRINT_PARAMS.value:
      print(params.ToText(), end='')
      return
    if not _LOGDIR.value:
      raise UsageError('--logdir is required: where checkpoints, params.txt '
                       'and summaries go.')
    if _MODE.value == 'eval' and (_REPLICA_HOSTS.value or _TPU.value):
      raise UsageError('--mode=eval runs in one process on its own devices; '
                       'drop --replica_hosts / --tpu for the evaluator.')
    # SIGTERM stops a run as Ctrl-C does: between steps, with a message.
    signal.signal(signal.SIGTERM, _RaiseKeyboardInterrupt)
    cluster.CheckTimeout(_WORKER_TIMEOUT.value, '--worker_timeout_secs')
    if WorkerHosts():
      # TensorFlow waits forever for a worker that does not answer: bound the
      # connection, then probe the workers for the whole run (the watchdog
      # exits with WORKER_LOST even while a step is blocked on a lost one).
      cluster.ConnectToWorkers(WorkerHosts(), _WORKER_TIMEOUT.value,
                               '--worker_timeout_secs')
      cluster.WorkerWatchdog(
          WorkerHosts(), _WORKER_TIMEOUT.value,
          cluster.ExitProcessOnLost(ExitStatus.WORKER_LOST),
          '--worker_timeout_secs').Start()
    strategy = MakeStrategy(params)
    Run(params, _LOGDIR.value, _MODE.value, groups, strategy)
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
