"""The training loop: one traced step per batch, logs, summaries and checkpoints.

Invariant: no non-finite weight or optimizer slot is ever checkpointed. The
state a step changes (weights, BatchNorm moving averages, optimizer slots,
the global step) changes only when the step's loss, gradient norm and
learning rate are finite; a non-finite step applies nothing (only its batch
is consumed) and stops the run with NonFiniteLossError. An update that is
itself non-finite (finite gradients times a rate too large for float32)
is caught by checking every weight and slot after it, and stops the run
before the next save, so the last checkpoint stays good.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Optional, Union

from absl import logging
import numpy as np
import tensorflow as tf
from tensorflow.python.framework import config as tf_config  # pylint: disable=g-direct-tensorflow-import

from lingvo_gpipe import logdir as logdir_lib
from lingvo_gpipe import warm_start
from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core import checkpoint as checkpoint_lib
from lingvo_gpipe.core import cluster
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core import loss_scale
from lingvo_gpipe.core import lr_schedule
from lingvo_gpipe.core import optimizer as optimizer_lib
from lingvo_gpipe.core import replicas as replicas_lib
from lingvo_gpipe.core import summary
from lingvo_gpipe.core.gpipe import executor_trial
from lingvo_gpipe.core.gpipe import measured
from lingvo_gpipe.core.gpipe import placement
from lingvo_gpipe.core.gpipe import report as report_lib
from lingvo_gpipe.core.nested_map import NestedMap

TRAIN_SUBDIR = 'train'

# The executor trial starts only in a run with this many times its own
# length (executor_trial.CallsToDecide) left to train.
TRIAL_RUN_LENGTHS = 10
# Untimed loop steps before the trial builds the unrolled graph: the run's
# second step, which measure_schedule profiles, runs on the loop.
_TRIAL_WARMUP_STEPS = 1


class NonFiniteLossError(FloatingPointError):
  """A training step produced a NaN or Inf loss, gradient norm or update."""


class TrainingInterrupted(Exception):
  """Training was stopped by Ctrl-C or SIGTERM between two steps."""


def MakeCheckpointer(params: hyperparams.Params, logdir: str,
                     task: base_layer.BaseLayer,
                     global_step: Optional[tf.Variable] = None,
                     optimizer: Optional[optimizer_lib.Optimizer] = None,
                     iterator: Optional[Any] = None,
                     scale: Optional[loss_scale.DynamicLossScale] = None
                     ) -> checkpoint_lib.Checkpointer:
  """The one definition of what a checkpoint of a run holds, by name.

  `global_step`, `task` (its weights and moving averages) and `optimizer`
  (its slots and iteration count), plus the input position (`input`, keyed by
  params.input's text: it holds only for the input settings it was saved
  under) when train.checkpoint_input is set, and the loss scale (`loss_scale`,
  keyed by its settings: a checkpoint without it, or saved with other ones,
  restores all else and starts the scale afresh). The trainer passes all of
  them; an evaluator passes only the task (and restores with partial=True).
  """
  if global_step is None:
    global_step = tf.Variable(0, dtype=tf.int64, trainable=False,
                              name='global_step')
  objects = dict(global_step=global_step, task=task)
  if optimizer is not None:
    objects['optimizer'] = optimizer
  keyed = ({'input': (iterator, params.input.ToText())}
           if iterator is not None and params.train.checkpoint_input else {})
  if scale is not None:
    keyed['loss_scale'] = (scale, scale.Key())
  return checkpoint_lib.Checkpointer(
      logdir, objects, max_to_keep=params.train.max_checkpoints_to_keep,
      keyed=keyed)


class TrainProgram:
  """Trains a task on `params.input` as `params.train` says, checkpointing to logdir.

  With data-parallel replicas (core/replicas.py) every replica runs the same
  step on its shard of the mini-batch; replica 0's state is what is
  checkpointed, summarized and evaluated, and only the chief process writes.
  """

  def __init__(self, params: hyperparams.Params, logdir: str,
               model: Union[base_layer.BaseLayer, replicas_lib.Replicas]):
    """`model` is the task, or its data-parallel Replicas."""
    self.params = params
    self.logdir = logdir
    if isinstance(model, base_layer.BaseLayer):
      model = replicas_lib.Single(model)
    self.replicas = model
    self.task = model.tasks[0]
    p = params.train
    lr_schedule.Validate(p.lr_schedule)
    self.input = params.input.Instantiate()
    self.batch_size = params.input.batch_size
    model.CheckBatchSize(self.batch_size)
    self._iterator = iter(self.input.Dataset(params.input.train_split,
                                             training=True))
    self._variables = [list(t.trainable_variables) for t in model.tasks]
    with model.VariableScope():
      self._optimizers = [optimizer_lib.Create(p) for _ in model.tasks]
      for optimizer, variables in zip(self._optimizers, self._variables):
        optimizer.Build(variables)
    self.optimizer = self._optimizers[0]
    self.variables = self._variables[0]
    with tf.device('/device:CPU:0'):
      self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False,
                                     name='global_step')
    self.compute_dtypes = sorted({layer.fprop_dtype.name for layer in (
        [self.task] + [m for m in self.task.submodules
                       if isinstance(m, base_layer.BaseLayer)])})
    self.loss_scale = loss_scale.DynamicLossScale(
        p.loss_scale_initial, p.loss_scale_growth_steps,
        enabled=loss_scale.Needed(p.loss_scale, self.compute_dtypes))
    if self.compute_dtypes != ['float32']:
      logging.info(
          'Layers compute in %s over float32 variables; loss scaling: %s.',
          ' and '.join(self.compute_dtypes),
          f'dynamic, from {p.loss_scale_initial:g}' if self.loss_scale.enabled
          else 'none')
    self.checkpointer = MakeCheckpointer(params, logdir, self.task,
                                         self.global_step, self.optimizer,
                                         self._iterator, self.loss_scale)
    self.writer = (tf.summary.create_file_writer(
        os.path.join(logdir, TRAIN_SUBDIR)) if model.is_chief else
                   tf.summary.create_noop_writer())
    # The step's code uses tf.cond and tf.while_loop itself; autograph would
    # only re-parse every layer's source at each trace.
    self._step_fn = tf.function(self._Step, autograph=False)
    # The executor trial, if the first Run starts one (_StartTrial).
    self._trial: Optional[executor_trial.ExecutorTrial] = None
    self._trial_considered = False

  @property
  def step(self) -> int:
    return int(self.global_step.numpy())

  def Restore(self) -> int:
    """Resumes from the newest checkpoint that restores; returns the global step.

    With no checkpoint of its own, a run warm-starts from train.warm_start
    (if any) instead; a resumed run never reads those sources again.

    Raises:
      checkpoint.CheckpointMismatchError: the logdir holds another model.
      checkpoint.CheckpointDamagedError: no checkpoint in it restores.
      hyperparams.ConfigError: a warm start that does not fit this model.
    """
    if self.checkpointer.Resume() is None and self.params.train.warm_start:
      self.WarmStart()
    self.replicas.SyncFromFirst(
        [[t, o] for t, o in zip(self.replicas.tasks, self._optimizers)])
    return self.step

  def WarmStart(self) -> warm_start.Plan:
    """Loads replica 0's weights from train.warm_start; logs and summarizes what."""
    plan = warm_start.Apply(self.params.train.warm_start, self.task)
    logging.info('%s', warm_start.LogText(plan))
    with self.writer.as_default():
      summary.Text('warm_start', plan.ToText(), self.step)
    self.writer.flush()
    return plan

  # --- the traced step ----------------------------------------------------------

  def _Step(self) -> dict[str, tf.Tensor]:
    batch = next(self._iterator)
    step = self.global_step.read_value()
    out = self.replicas.Run(self._ReplicaStep,
                            self.replicas.Distribute(batch), step)
    out['step'] = tf.cond(out['finite'],
                          lambda: self.global_step.assign_add(1),
                          lambda: step)
    if self.loss_scale.enabled:
      with tf.control_dependencies([self.loss_scale.Update(
          out['grads_finite'])]):
        out['loss_scale'] = self.loss_scale.scale.read_value()
        out['skipped_steps'] = self.loss_scale.skipped_steps.read_value()
    return out

  def _ReplicaStep(self, batch: NestedMap, step: tf.Tensor
                   ) -> dict[str, tf.Tensor]:
    """One replica's forward, backward and update; all-reduces make it global."""
    p = self.params.train
    index = self.replicas.LocalIndex()
    task, variables = self.replicas.tasks[index], self._variables[index]
    collector = base_layer.StatsCollector()
    with base_layer.Context(training=True, step=step,
                            stats_collector=collector):
      with tf.GradientTape() as tape:
        metrics = task.FPropDefaultTheta(batch)
        with task.OutputScope():
          scaled_loss = self.loss_scale.Scaled(metrics.loss[0])
    local_weight = metrics.loss[1]
    with task.OutputScope():  # the loss's gradient ops, where the loss is
      local_grads = tape.gradient(scaled_loss, variables)
    local_grads = self.loss_scale.Unscaled(local_grads)
    grads = replicas_lib.GlobalGradients(local_grads, local_weight)
    metrics = replicas_lib.GlobalMetrics(metrics)
    loss = metrics['loss'][0]
    stats = collector.Gathered(
        None if replicas_lib.OneReplica() else replicas_lib.CrossReplicaSum)
    grad_norm = tf.linalg.global_norm([g for g in grads if g is not None])
    learning_rate = p.learning_rate * lr_schedule.Factor(p.lr_schedule, step)
    grads_finite = tf.math.is_finite(grad_norm)
    # A float16 overflow under loss scaling skips the step; else a
    # non-finite gradient stops the run (loss_scale.py).
    skipped = self.loss_scale.Overflowed(grads_finite)
    finite = tf.reduce_all([tf.math.is_finite(loss),
                            tf.logical_or(grads_finite, skipped),
                            tf.math.is_finite(learning_rate)])
    if p.clip_gradient_norm > 0:
      grads, _ = tf.clip_by_global_norm(grads, p.clip_gradient_norm,
                                        use_norm=grad_norm)
    optimizer = self._optimizers[index]

    def Apply():
      update = optimizer.Apply(grads, variables, learning_rate)
      with tf.control_dependencies([update]):
        collector.ApplyAll(stats)  # BatchNorm moving averages, once per step
      with tf.control_dependencies([update]):
        return _AllFinite(list(variables) + optimizer.SlotVariables())

    applied = tf.cond(tf.logical_and(finite, grads_finite), Apply,
                      lambda: tf.constant(False))
    out = {f'metrics/{name}': value for name, (value, _) in metrics.items()}
    out.update(loss=loss, grad_norm=grad_norm, learning_rate=learning_rate,
               finite=finite, applied=applied, grads_finite=grads_finite,
               skipped=skipped)
    return out

  # --- the host loop ------------------------------------------------------------

  def Run(self, until_step: Optional[int] = None,
          on_checkpoint: Optional[Callable[[int, str], None]] = None) -> int:
    """Trains to `until_step` (default train.max_steps); returns the global step.

    The chief saves every save_interval_steps and at the end, calling
    `on_checkpoint(step, path)` after each save.

    Raises:
      NonFiniteLossError: a step's loss, gradient norm, learning rate or
        update was NaN or Inf.
      TrainingInterrupted: Ctrl-C (or SIGTERM, which the trainer turns into it).
      checkpoint.StorageError: a checkpoint could not be written.
      tf.errors.ResourceExhaustedError: out of memory.
    """
    p = self.params.train
    target = min(until_step or p.max_steps, p.max_steps)
    if not self._trial_considered:
      self._trial_considered = True
      self._StartTrial()
    meter = _Meter()
    try:
      while self.step < target:
        self._RunStep(meter, target, on_checkpoint)
    except KeyboardInterrupt:
      raise TrainingInterrupted(
          f'Interrupted at global step {self.step}. {self._Kept()}') from None
    self.writer.flush()
    return self.step

  def _StartTrial(self) -> None:
    """Steps on an executor trial (executor_trial.py) where it is wanted.

    Not if train.executor_trial_steps is 0, or TensorFlow's op determinism
    is on (the trial's choice depends on timing), or replicas run in other
    processes (each would choose alone); not in a run with less than
    TRIAL_RUN_LENGTHS times the trial's length left to train. A run whose
    logdir records a trial's choice (logdir.ReadTrial) steps on that
    executor from its first step, without trying again.
    """
    p = self.params.train
    if not p.executor_trial_steps:
      return
    if OpDeterminism():
      logging.info('No executor trial: op determinism is on, and the trial '
                   'chooses by timing; executor=\'auto\' chooses by size.')
      return
    if self.replicas.num_replicas > len(self.replicas.tasks):
      # Each process would time its own steps and could keep another
      # graph than the others, whose all-reduces would then not match.
      logging.info('No executor trial: replicas in other processes would '
                   "have to choose alike; executor='auto' chooses by size.")
      return
    decided = logdir_lib.ReadTrial(self.logdir, self.params)
    length = executor_trial.CallsToDecide(p.executor_trial_steps,
                                          _TRIAL_WARMUP_STEPS)
    if decided is None and p.max_steps - self.step < TRIAL_RUN_LENGTHS * length:
      return
    if decided is not None:
      logging.info('Executor trial: this run kept the %s executor (%s); '
                   'no trial.', decided, os.path.join(
                       self.logdir, logdir_lib.TRIAL_FILE))
    choices = {}  # candidate -> {pipeline path: its choice at that trace}

    def Traced(name: str) -> None:
      choices[name] = {pipe.path: pipe.executor_choice
                       for pipe in self.task.Pipelines()}

    def Decided(decision: executor_trial.Decision) -> None:
      # The pipelines say what runs: the kept candidate's choices.
      for pipe in self.task.Pipelines():
        kept = choices.get(decision.executor, {}).get(pipe.path)
        if kept is not None:
          pipe.RecordChoice(kept)
      if self.replicas.is_chief:
        try:
          logdir_lib.WriteTrial(self.logdir, self.params, decision.executor,
                                decision.Text())
        except logdir_lib.LogdirError as e:  # e.g. a full disk: train on
          logging.warning('%s A resumed run will try the executors again.', e)
        with self.writer.as_default():
          summary.Text('executor_trial', decision.Text(), self.step)

    self._trial = executor_trial.ExecutorTrial(
        self._Step, p.executor_trial_steps, _TRIAL_WARMUP_STEPS,
        decided=decided, on_decision=Decided, on_trace=Traced,
        autograph=False)
    self._step_fn = self._trial

  def _RunStep(self, meter: '_Meter', target: int,
               on_checkpoint: Optional[Callable[[int, str], None]]) -> None:
    """One step and whatever is due after it: log, summaries, checkpoint."""
    p = self.params.train
    summary_every = p.summary_interval_steps or p.log_interval_steps
    # Cells on workers: the third step, its window from the second's time.
    hosts = cluster.ConnectedHosts()
    measure = p.measure_schedule and meter.steps_run == (2 if hosts else 1)
    start = time.time()
    with (measured.Profiled(hosts, min(60.0, 1.0 + 2 * meter.last_time))
          if measure else contextlib.nullcontext()) as trace:
      out = {k: v.numpy() for k, v in self._step_fn().items()}
    traced = meter.steps_run == 0 or (self._trial is not None and
                                      self._trial.last_call_traced)
    meter.Add(time.time() - start, out['loss'], traced)
    if not out['finite'] or not (out['applied'] or out['skipped']):
      self._RaiseNonFinite(out)
    step = int(out['step'])
    if out['skipped']:
      logging.warning(
          'Step %d: the float16 gradients overflowed at loss scale %g; the '
          'update was skipped and the scale halved to %g (%d steps skipped '
          'so far).', step, 2 * float(out['loss_scale']),
          float(out['loss_scale']), int(out['skipped_steps']))
    if meter.first:
      logging.info('Step %d took %.1f s (tracing the step included).',
                   step, meter.last_time)
      self._WriteStaticSummaries(step)
    elif traced:
      logging.info('Step %d took %.1f s (the executor trial building the '
                   'unrolled graph included).', step, meter.last_time)
    if measure:
      try:
        self._WriteMeasuredSchedule(step, trace)
      except Exception as e:  # pylint: disable=broad-except
        # A picture of the schedule must never end a run.
        logging.warning('Schedule not measured: %s: %s', type(e).__name__, e)
    if step % p.log_interval_steps == 0 or step == target:
      logging.info('%s', meter.Line(step, p.max_steps, self.batch_size))
    if step % summary_every == 0 or step == target:
      self._WriteSummaries(step, out, meter)
    if self.replicas.is_chief and (step % p.save_interval_steps == 0 or
                                   step == target):
      path = self.checkpointer.Save(step)
      if on_checkpoint is not None:
        on_checkpoint(step, path)
    if step % p.log_interval_steps == 0:
      meter.Reset()

  def _Kept(self) -> str:
    """What a stopped run leaves to resume from."""
    latest = self.checkpointer.latest
    return (f'The latest checkpoint, {latest} (step '
            f'{checkpoint_lib.StepOf(latest)}), is intact; a rerun resumes '
            'from it.' if latest else 'No checkpoint had been written yet.')

  def _RaiseNonFinite(self, out: dict[str, np.ndarray]) -> None:
    values = (f'loss {float(out["loss"])}, gradient norm '
              f'{float(out["grad_norm"])}, learning rate '
              f'{float(out["learning_rate"])}')
    if out['finite']:
      what = (f'The update made weights or optimizer slots non-finite at '
              f'global step {int(out["step"])} ({values}); nothing was '
              'saved.')
    else:
      what = (f'Non-finite training step at global step {int(out["step"])}: '
              f'{values}. The update was not applied and nothing was saved.')
    raise NonFiniteLossError(
        f'{what} {self._Kept()} Try a lower train.learning_rate (and check '
        'train.lr_schedule), train.clip_gradient_norm > 0, or a warmup '
        '(train.lr_schedule.warmup_steps), or check the input data.')

  # --- summaries ----------------------------------------------------------------

  def _WriteSummaries(self, step: int, out: dict[str, np.ndarray],
                      meter: '_Meter') -> None:
    values = {name: out[name] for name in out if name.startswith('metrics/')}
    values.update(loss=meter.MeanLoss(), learning_rate=out['learning_rate'],
                  grad_norm=out['grad_norm'])
    if 'loss_scale' in out:  # float16: the scale and the steps it skipped
      values.update(loss_scale=out['loss_scale'],
                    skipped_steps=out['skipped_steps'])
    if meter.count:
      values.update(step_time=meter.StepTime(),
                    examples_per_sec=self.batch_size / meter.StepTime())
    values.update(self._MemoryScalars())
    with self.writer.as_default():
      summary.Scalars(values, step)

  def _MemoryScalars(self) -> dict[str, Optional[float]]:
    """Peak bytes per device where the device has its own allocator, else the process's."""
    values = {}
    for pipe in self.task.Pipelines():
      for k in range(len(pipe.cells)):
        values[f'memory/{pipe.path}/cell_{k}_peak_bytes'] = pipe.placement.PeakMemory(k)
    values['memory/process_peak_bytes'] = placement.AllocatorPeak('CPU:0')
    return values

  def _WriteStaticSummaries(self, step: int) -> None:
    """The params, each pipeline's partition report and schedule: once per run."""
    with self.writer.as_default():
      summary.Text('params', self.params.ToText(), step)
      for pipe in self.task.Pipelines():
        report = pipe.Report()
        summary.Text(f'pipeline/report/{pipe.path}', report_lib.FormatTable(report), step)
        summary.Schedule(pipe.Schedule(report.num_micro_batches or 1), step)


  def _WriteMeasuredSchedule(self, step: int, trace: measured.Trace) -> None:
    """The step's schedule as it ran, if its tasks ran in this process."""
    pipes = list(self.task.Pipelines())
    times = measured.TaskTimes(trace)
    if len(pipes) != 1 or not times:
      logging.info('Schedule not measured: %s.', 'no pipeline task ran in '
                   'this process' if not times else
                   f'{len(pipes)} pipelines (one is measured)')
      return
    sched = pipes[0].Schedule(1 + max(t.micro_batch for t in times))
    boxes = measured.Boxes(times, sched)
    bubble = measured.Bubble(boxes, sched.num_devices)
    logging.info('Measured schedule at step %d: bubble %.1f%% (planned '
                 '%.1f%% with equal task times); tasks seen on devices %s.',
                 step, 100 * bubble, 100 * sched.TheoreticalBubble(),
                 sorted({b.row for b in boxes}))
    with self.writer.as_default():
      summary.MeasuredSchedule(sched, boxes, bubble, step)


class _Meter:
  """Step times and losses since the last log line, for logs and summaries."""

  def __init__(self):
    self.steps_run = 0
    self.last_time = 0.0
    self.Reset()

  def Reset(self) -> None:
    self.count, self.seconds, self.loss_sum, self.loss_count = 0, 0.0, 0.0, 0

  @property
  def first(self) -> bool:
    """Whether the last step added was this process's first (mostly tracing)."""
    return self.steps_run == 1

  def Add(self, seconds: float, loss: float, traced: bool = False) -> None:
    """Counts a step; one that `traced` its graph is left out of step times."""
    self.steps_run += 1
    self.last_time = seconds
    self.loss_sum += float(loss)
    self.loss_count += 1
    if not traced:
      self.count += 1
      self.seconds += seconds

  def MeanLoss(self) -> float:
    return self.loss_sum / max(1, self.loss_count)

  def StepTime(self) -> float:
    return self.seconds / max(1, self.count)

  def Line(self, step: int, max_steps: int, batch_size: int) -> str:
    line = f'step {step}/{max_steps}  loss {self.MeanLoss():.4f}'
    if self.count:
      step_time = self.StepTime()
      eta = (max_steps - step) * step_time
      line += (f'  {batch_size / step_time:.1f} examples/s  {step_time:.3f} s/step'
               f'  ETA {_Duration(eta)}')
    return line


def OpDeterminism() -> bool:
  """Whether tf.config.experimental.enable_op_determinism() was called.

  TensorFlow's query for it is not public (pinned in requirements.txt;
  tests/train_program_test.py calls it).
  """
  return tf_config.is_op_determinism_enabled()


def _AllFinite(variables: list[tf.Variable]) -> tf.Tensor:
  """Whether every element of every variable is finite; each checked on its device."""
  checks = []
  for var in variables:
    with tf.device(var.device):
      checks.append(tf.reduce_all(tf.math.is_finite(var)))
  return tf.reduce_all(checks) if checks else tf.constant(True)


def _Duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m{secs:02d}s' if hours else f'{minutes}m{secs:02d}s'
