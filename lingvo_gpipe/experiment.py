"""From a registry name and command-line settings to the one Params tree a run uses.

Invariant: the resolved Params say everything about a run: they are what
`--print_params` prints and what DIR/params.txt holds, and
`--params_file=DIR/params.txt` with the same model reproduces the run.
Settings apply in a fixed order, later ones winning: the registered config,
`--params_file`, `--params_override`, then the shortcut flags. The shortcut
flags' K and M, and the run's devices, go to every pipeline the task declares
(BaseTask.PipelinePaths) and only there; Params holding a pipeline the task
does not declare are refused, never silently left at the config's layout.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Optional

from absl import logging

from lingvo_gpipe import model_registry
from lingvo_gpipe.core import graph_optimization
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core import loss_scale
from lingvo_gpipe.core import precision
from lingvo_gpipe.core.gpipe import loop_executor
from lingvo_gpipe.core.gpipe import pipelining_layer


@dataclasses.dataclass
class Settings:
  """What the command line says about the Params (None: leave the config's value)."""
  model: str
  params_file: Optional[str] = None
  params_override: str = ''
  max_steps: Optional[int] = None
  num_partitions: Optional[int] = None
  num_micro_batches: Optional[int] = None
  data_dir: Optional[str] = None
  fprop_dtype: Optional[str] = None


def Pipelines(params: hyperparams.Params) -> list[tuple[str, hyperparams.Params]]:
  """(path, Params) of each pipeline the task declares (BaseTask.PipelinePaths).

  These are the nodes the run's num_partitions, num_micro_batches and
  devices are set on. `path` is the full Params path, e.g.
  'task.network.pipeline'.

  Raises:
    hyperparams.ConfigError: a declared path holds no PipeliningLayer
      Params, or PipeliningLayer Params sit where the task declares none
      (the flags would not reach them).
  """
  task = params.task
  task_cls = getattr(task, 'cls', None)
  declare = getattr(task_cls, 'PipelinePaths', None)
  paths = list(declare(task)) if declare is not None else []
  task_name = getattr(task_cls, '__name__', 'The task')
  found = []
  for path in paths:
    node = _Get(task, path)
    if not _IsPipeline(node):
      raise hyperparams.ConfigError(
          f'task.{path}: {task_name}.PipelinePaths lists it, but it '
          f'holds {_Describe(node)}, not PipeliningLayer Params; list only '
          'the paths of the task\'s pipelines.')
    found.append((f'task.{path}', node))
  undeclared = [path for path, node in _Walk(task, 'task')
                if _IsPipeline(node) and not any(node is f for _, f in found)]
  if undeclared:
    raise hyperparams.ConfigError(
        f'{", ".join(undeclared)}: PipeliningLayer Params that '
        f'{task_name}.PipelinePaths does not list '
        f'({[f"task.{p}" for p in paths]}), so --num_partitions, '
        '--num_micro_batches and the devices would not reach them; override '
        'PipelinePaths to list them.')
  return found


def PipelineTemplate(params: hyperparams.Params) -> Optional[hyperparams.Params]:
  """The task's one declared pipeline's Params, or None if it declares none.

  Raises:
    hyperparams.ConfigError: the task declares several (use Pipelines).
  """
  found = Pipelines(params)
  if len(found) > 1:
    raise hyperparams.ConfigError(
        f'The task has {len(found)} pipelines ({", ".join(p for p, _ in found)}), '
        'not one; set each through experiment.Pipelines.')
  return found[0][1] if found else None


def _Describe(node: Any) -> str:
  cls = getattr(node, 'cls', None) if isinstance(node, hyperparams.Params) else None
  if isinstance(cls, type):
    return f'Params of {cls.__name__}'
  return 'nothing' if node is None else type(node).__name__


def _IsPipeline(node: Any) -> bool:
  cls = getattr(node, 'cls', None) if isinstance(node, hyperparams.Params) else None
  return isinstance(cls, type) and issubclass(cls, pipelining_layer.PipeliningLayer)


def _Walk(value: Any, path: str = '') -> Iterator[tuple[str, Any]]:
  """(path, value) of every node of a Params tree (lists, dicts too), parents first."""
  yield path, value
  if isinstance(value, hyperparams.Params):
    children = ((f'{path}.{name}' if path else name, child)
                for name, child in value.IterParams())
  elif isinstance(value, (list, tuple)):
    children = ((f'{path}[{i}]', child) for i, child in enumerate(value))
  elif isinstance(value, dict):
    children = ((f'{path}[{key!r}]', child) for key, child in value.items())
  else:
    return
  for child_path, child in children:
    yield from _Walk(child, child_path)


def Resolve(settings: Settings) -> hyperparams.Params:
  """The run's Params.

  Raises:
    model_registry.UnknownModelError: unknown model name (with close matches).
    hyperparams.ParamsError: a bad override key or value, or a bad file.
    ValueError: a shortcut flag the model cannot take.
  """
  params = model_registry.GetParams(settings.model)
  if settings.params_file:
    hyperparams.ApplyOverridesFile(params, settings.params_file)
  if settings.params_override:
    hyperparams.ApplyOverrides(params, settings.params_override)
  if settings.max_steps is not None:
    _Positive('--max_steps', settings.max_steps)
    params.train.max_steps = settings.max_steps
  if settings.data_dir is not None:
    params.input.data_dir = settings.data_dir
  if settings.fprop_dtype is not None:
    # Set on the task, every layer under it computes in it (precision.py).
    try:
      params.task.fprop_dtype = precision.ComputeDtype(
          settings.fprop_dtype, params.task.dtype, '--fprop_dtype')
    except ValueError as e:
      raise hyperparams.ParamsError(str(e)) from None
  for flag in ('num_partitions', 'num_micro_batches'):
    value = getattr(settings, flag)
    if value is None:
      continue
    _Positive(f'--{flag}', value)
    pipelines = Pipelines(params)
    if not pipelines:
      raise hyperparams.ConfigError(
          f'--{flag}: model {settings.model!r} has no pipeline (its task '
          'declares none: BaseTask.PipelinePaths); set its fields with '
          '--params_override.')
    for path, template in pipelines:
      if flag == 'num_partitions':
        _CheckCellCount(path, template, value)
        template.num_partitions = value
      else:
        template.Set(num_micro_batches=value, micro_batch_size=None)
  Validate(params)
  return params


# Fields of `train` and `input` and the least value each takes; a knob that
# divides a step count or sizes a batch is refused at 0 before it crashes a
# run (or, negative, silently trains nothing).
_AT_LEAST = {
    'train.max_steps': 1, 'train.log_interval_steps': 1,
    'train.save_interval_steps': 1, 'train.summary_interval_steps': 0,
    'train.max_checkpoints_to_keep': 1, 'train.eval_max_batches': 0,
    'train.clip_gradient_norm': 0, 'train.epsilon': 0,
    'input.batch_size': 1, 'train.loss_scale_growth_steps': 1,
    'train.loss_scale_initial': 1.0, 'train.executor_trial_steps': 0,
}
_POSITIVE = ('train.learning_rate',)


def Validate(params: hyperparams.Params) -> None:
  """Refuses Params no run can use, naming the field and what is valid.

  Every number in the tree must be finite (a NaN learning rate would write
  NaN weights); the step, interval and batch-size knobs of `train` and
  `input` must be in range; every fprop_dtype must name a compute dtype, and
  train.loss_scale and train.graph_optimization a mode.

  Raises:
    hyperparams.ParamsError: the first bad field.
  """
  for path, value in _Numbers(params):
    if not math.isfinite(value):
      raise hyperparams.ParamsError(
          f'{path}={value}: every numeric setting must be a finite number.')
  for path, least in _AT_LEAST.items():
    value = _Get(params, path)
    if value is not None and value < least:
      raise hyperparams.ParamsError(
          f'{path}={value}: must be >= {least}.')
  for path in _POSITIVE:
    value = _Get(params, path)
    if value is not None and value <= 0:
      raise hyperparams.ParamsError(f'{path}={value}: must be > 0.')
  try:
    for path, node in _Walk(params):
      if path.endswith('.fprop_dtype'):
        precision.ComputeDtype(node, 'float32', path)
    mode = _Get(params, 'train.loss_scale')
    if mode is not None:
      loss_scale.CheckMode(mode)
    mode = _Get(params, 'train.graph_optimization')
    if mode is not None:
      graph_optimization.CheckMode(mode)
  except ValueError as e:
    raise hyperparams.ParamsError(str(e)) from None
  CheckMicroBatches(params)


def CheckMicroBatches(params: hyperparams.Params, num_replicas: int = 1) -> None:
  """Refuses more micro-batches than a replica's share of the mini-batch has examples."""
  batch = _Get(params, 'input.batch_size')
  for path, template in Pipelines(params):
    if batch is None or template.micro_batch_size is not None:
      continue
    per_replica = batch // max(1, num_replicas)
    if template.num_micro_batches > per_replica:
      where = (f'each of {num_replicas} replicas gets {per_replica} of the '
               f'{batch}' if num_replicas > 1 else f'input.batch_size is {batch}')
      raise hyperparams.ParamsError(
          f'{path}.num_micro_batches={template.num_micro_batches} '
          f'(--num_micro_batches) cannot split a batch of {per_replica} '
          f'examples ({where}): every micro-batch needs at least one example. '
          f'Use at most {per_replica} micro-batches or a larger '
          'input.batch_size.')


def _Get(params: hyperparams.Params, path: str) -> Any:
  """The value at `path`, or None for a config without that field."""
  try:
    return params.Get(path)
  except hyperparams.UnknownParamError:
    return None


def _Numbers(value: Any) -> Iterator[tuple[str, float]]:
  """(path, value) of every float in a Params tree (ints are always finite)."""
  return ((path, node) for path, node in _Walk(value)
          if isinstance(node, float))


def NumPartitions(params: hyperparams.Params) -> int:
  """K, the number of cells of every pipeline (1 for a task without one).

  Raises:
    hyperparams.ConfigError: the task's pipelines have different K (cell k
      of each goes on device k, so they must agree).
  """
  counts = {path: (len(t.cell_tpl) if t.cell_tpl is not None else
                   t.num_partitions) for path, t in Pipelines(params)}
  if len(set(counts.values())) > 1:
    raise hyperparams.ConfigError(
        'The pipelines have different numbers of cells ('
        + ', '.join(f'{path}: {k}' for path, k in counts.items()) +
        '); cell k of each runs on device k, so give them one K '
        '(--num_partitions).')
  return next(iter(counts.values()), 1)


def SetDevices(params: hyperparams.Params, devices: list[str]) -> None:
  """Places cell k of every pipeline on devices[k]; no-op without a pipeline."""
  for _, template in Pipelines(params):
    template.devices = list(devices)


def SetTpuBackend(params: hyperparams.Params) -> None:
  """Puts every pipeline's cells on TPU logical cores (placement_backend='tpu').

  A pipeline set to executor='loop' (lm.lm1b.TransformerL, for its build
  time on TensorFlow devices) runs unrolled there, with that logged: XLA
  compiles a TPU step whole and cannot compile the loop (loop_executor.py).
  """
  for path, template in Pipelines(params):
    template.placement_backend = 'tpu'
    if template.executor == 'loop':
      logging.warning(
          "%s: executor='loop' runs unrolled on TPU cores (%s); set "
          "executor='unrolled' to silence this.", path,
          loop_executor.XLA_WHOLE_STEP)
      template.executor = 'unrolled'


def _CheckCellCount(path: str, template: hyperparams.Params, k: int) -> None:
  """Refuses --num_partitions=k for a pipeline whose cut fixes another K."""
  if template.cell_tpl is not None and k != len(template.cell_tpl):
    raise hyperparams.ConfigError(
        f'--num_partitions={k} cannot apply to {path}: it is cut by hand into '
        f'{len(template.cell_tpl)} cells (cell_tpl); valid: '
        f'--num_partitions={len(template.cell_tpl)}, or none.')
  if template.balance is not None and k != len(template.balance):
    raise hyperparams.ConfigError(
        f'--num_partitions={k} cannot apply to {path}: its balance '
        f'{list(template.balance)} cuts {len(template.balance)} cells; valid: '
        f'--num_partitions={len(template.balance)}, or also '
        f"--params_override='{path}.balance=None'.")


def _Positive(flag: str, value: int) -> None:
  if value < 1:
    raise hyperparams.ConfigError(f'{flag} must be a positive integer, got {value}.')
