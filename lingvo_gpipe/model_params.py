"""ModelParams: the base class of a registered experiment config.

Invariant: a config is only Params. `Model()` returns one tree with the children `task`,
`train` and `input` plus the registry `name`, and in every registered config the network's
Params sit at `task.network`, so tools (the trainer, size and cost reports, the partitioner)
find the network in the same place whatever the task.

A config declares, it does not build: this module and the configs import no ML framework.
"""

from __future__ import annotations

from lingvo_gpipe.core import hyperparams

# The package whose modules are registered experiment configs; their names omit it.
PARAMS_PACKAGE = 'params'


class ModelParams:
  """Base class of an experiment config; register a subclass with `@RegisterModel`.

  Subclasses must override `Task()` and may override `Train()` and `Input()`, usually by
  calling the base method and changing a few fields.
  """

  @classmethod
  def RegistryName(cls) -> str:
    """The name this config is registered and looked up under (`--model=`).

    Its module path below the `params` package plus its class name: class `AmoebaNetD` in
    module `params.image.cifar10` is `image.cifar10.AmoebaNetD`. A class defined outside
    `params` keeps its full module path.
    """
    module = cls.__module__
    prefix = PARAMS_PACKAGE + '.'
    if module.startswith(prefix):
      module = module[len(prefix):]
    return f'{module}.{cls.__qualname__}'

  def Task(self) -> hyperparams.Params:
    """Params of what is learned; the network's Params must be the child `network`."""
    raise NotImplementedError(
        f'{type(self).__module__}.{type(self).__qualname__} must override Task() to return '
        'the task Params (with the network Params at task.network).')

  def Train(self) -> hyperparams.Params:
    """Params of the training loop: optimizer, learning rate, steps, checkpoints.

    Read by lingvo_gpipe/core/optimizer.py (the optimizer fields),
    lingvo_gpipe/core/lr_schedule.py (`lr_schedule`) and the trainer.
    """
    p = hyperparams.Params()
    p.Define('optimizer', 'sgd', "Algorithm: 'sgd', 'momentum', 'rmsprop' or 'adam'.")
    p.Define('learning_rate', 0.1, 'Base learning rate, before the schedule.')
    p.Define('momentum', 0.9, 'momentum, rmsprop: momentum coefficient.')
    p.Define('nesterov', False, 'momentum: Nesterov momentum.')
    p.Define('rmsprop_decay', 0.9, 'rmsprop: decay of the mean square.')
    p.Define('beta1', 0.9, 'adam: decay of the first moment.')
    p.Define('beta2', 0.999, 'adam: decay of the second moment.')
    p.Define('epsilon', 1e-7, 'rmsprop, adam: added to the denominator.')
    p.Define('lr_schedule', LrScheduleParams(),
             'Multiplier of learning_rate as a function of the step.')
    p.Define('clip_gradient_norm', 0.0,
             'If > 0, clip the global norm of all gradients to this value; 0 disables.')
    p.Define('loss_scale', 'auto',
             "Loss scaling for 16-bit gradients: 'dynamic', 'none', or "
             "'auto' (dynamic when a layer computes in float16). A step "
             'whose scaled gradients overflow applies nothing, halves the '
             'scale and is counted as skipped (core/loss_scale.py).')
    p.Define('loss_scale_initial', 2.0**15, 'The first loss scale (a power '
             'of two).')
    p.Define('loss_scale_growth_steps', 2000, 'Steps in a row without '
             'overflow after which the loss scale doubles.')
    p.Define('max_steps', 1000, 'Train until the global step reaches this.')
    p.Define('log_interval_steps', 100,
             'Log step, loss, examples/sec, step time and ETA every this many steps.')
    p.Define('summary_interval_steps', 0,
             'Write train summaries every this many steps; 0: log_interval_steps.')
    p.Define('measure_schedule', True,
             "Profile the run's second step (its first is traced; with "
             'cells on workers, the third, each worker tracing itself for '
             'twice the second step plus a second, at most a minute) and '
             'write the schedule as it ran beside the planned one: the image '
             "'pipeline/schedule_measured' (when each cell's tasks started and "
             "ended) and the scalar 'pipeline/measured_bubble', for a task "
             'with one pipeline (core/gpipe/measured.py).')
    p.Define('executor_trial_steps', 20,
             "Where a pipeline's executor is 'auto' and its unrolled graph "
             'would be small, start on the loop executor (it builds in a '
             'time independent of M), build the unrolled graph a step later, '
             'time this many alternating steps of each and keep the faster '
             '(core/gpipe/executor_trial.py); only in a run with at least 10 '
             'times the trial left to train. 0: no trial, as \'auto\' '
             'chooses by size alone.')
    p.Define('save_interval_steps', 500,
             'Write a checkpoint every this many steps (and at the end).')
    p.Define('max_checkpoints_to_keep', 5, 'Checkpoints kept; older ones are deleted.')
    p.Define('checkpoint_input', True,
             'Save the input position in checkpoints, so a resumed run sees the '
             'batches it would have seen (costs the shuffle buffer in each checkpoint).')
    p.Define('graph_optimization', 'lean',
             "How much of TensorFlow's graph optimizer (Grappler) rewrites "
             "each traced step before its first run: 'lean' (one round, no "
             "layout optimizer without a GPU), 'full' (TensorFlow's default), "
             "'off' (the first step starts soonest, each step is slower) "
             '(core/graph_optimization.py).')
    p.Define('eval_max_batches', 0,
             'Batches of the eval split per evaluation; 0: the whole split.')
    p.Define('warm_start', [],
             'Sources of a new run\'s first weights: WarmStartParams(), one per '
             'checkpoint, applied in order (lingvo_gpipe/warm_start.py). Only a '
             'run whose logdir has no checkpoint of its own starts from them.')
    return p

  def Input(self) -> hyperparams.Params:
    """Params of the input generator: batch size, where the data lives, which splits."""
    p = hyperparams.Params()
    p.Define('batch_size', 32, 'Global batch size, before splitting into micro-batches.')
    p.Define('data_dir', None,
             'Directory of the prepared data set; None uses the input generator default.')
    p.Define('train_split', 'train', 'Name of the split to train on.')
    p.Define('eval_split', 'test', 'Name of the split to evaluate on.')
    return p

  def Model(self) -> hyperparams.Params:
    """The whole experiment as one Params tree: `name`, `task`, `train`, `input`."""
    p = hyperparams.Params()
    p.Define('name', self.RegistryName(), 'Registry name of this config (--model=).')
    p.Define('task', self.Task(), 'What is learned; the network Params are at task.network.')
    p.Define('train', self.Train(), 'Training loop settings.')
    p.Define('input', self.Input(), 'Input generator settings.')
    return p


class WarmStartSource:
  """The class of a warm-start source's Params; nothing instantiates it.

  It exists so that a source is InstantiableParams with a class: text and
  overrides can then create one from nothing (`train.warm_start=[Params(...)];
  train.warm_start[0].cls=@lingvo_gpipe.model_params.WarmStartSource`).
  """

  @classmethod
  def Params(cls) -> hyperparams.InstantiableParams:
    """One source checkpoint and how its variables map onto this model's."""
    p = hyperparams.InstantiableParams(cls)
    p.Define('checkpoint', None,
             'A checkpoint prefix (.../checkpoints/ckpt-400), or a logdir or '
             'its checkpoints/ directory (its newest checkpoint), written by '
             'this trainer for any model, K, M or placement.')
    p.Define('rules', [('(.*)', r'\1')],
             'Ordered (regex, replacement) pairs. A source variable takes the '
             'first rule whose regex matches its whole name and is loaded into '
             'the variable named by re.Match.expand(replacement) '
             "(r'\1' is group 1). Names on both sides are layer paths under "
             "'task', e.g. 'task/network/pipeline/layers_6/net/sub_3/w'. "
             'Source variables no rule matches are not loaded.')
    p.Define('exclude', [],
             'Regexes (whole-name matches) of this model\'s variables to leave '
             'at their initializers, e.g. a classifier whose class count '
             'differs.')
    p.Define('allow_unmatched', False,
             'Accept rules that load nothing into this model and exclude '
             'patterns that match none of its variables; otherwise either is '
             'an error (usually a typo).')
    return p


def WarmStartParams(checkpoint: str | None = None, **fields) -> hyperparams.InstantiableParams:
  """A train.warm_start entry: WarmStartSource.Params() with these fields set."""
  return WarmStartSource.Params().Set(checkpoint=checkpoint, **fields)


def LrScheduleParams() -> hyperparams.Params:
  """Learning-rate schedule knobs, at `train.lr_schedule` (lingvo_gpipe/core/lr_schedule.py)."""
  p = hyperparams.Params()
  p.Define('type', 'constant', "'constant', 'exponential', 'cosine' or 'rsqrt'.")
  p.Define('warmup_steps', 0, 'Steps of linear ramp from 0 to the base rate.')
  p.Define('decay_steps', 1000,
           'exponential: steps per factor of decay_rate; cosine: total steps.')
  p.Define('decay_rate', 0.97, 'exponential: factor per decay_steps.')
  p.Define('staircase', True, 'exponential: decay in whole steps of decay_steps.')
  p.Define('min_ratio', 0.0, 'The factor never goes below this.')
  return p
