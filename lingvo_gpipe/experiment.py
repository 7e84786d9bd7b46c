"""From a registry name and command-line settings to the one Params tree a run uses.

Invariant: the resolved Params say everything about a run: they are what
`--print_params` prints and what DIR/params.txt holds, and
`--params_file=DIR/params.txt` with the same model reproduces the run.
Settings apply in a fixed order, later ones winning: the registered config,
`--params_file`, `--params_override`, then the shortcut flags.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Optional

from lingvo_gpipe import model_registry
from lingvo_gpipe.core import hyperparams


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


def PipelineTemplate(params: hyperparams.Params) -> Optional[hyperparams.Params]:
  """The PipeliningLayer Params inside `params.task.network`, or None.

  A network is either a PipeliningLayer itself or a PipelinedNetwork with the
  template at `network.pipeline`; either way this is the node to set
  num_partitions, num_micro_batches and devices on.
  """
  network = params.task.network
  if 'num_micro_batches' in network and 'num_partitions' in network:
    return network
  if 'pipeline' in network and isinstance(network.pipeline,
                                               hyperparams.Params):
    return network.pipeline
  return None


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
  for flag, field in (('num_partitions', 'num_partitions'),
                      ('num_micro_batches', 'num_micro_batches')):
    value = getattr(settings, flag)
    if value is None:
      continue
    _Positive(f'--{flag}', value)
    template = PipelineTemplate(params)
    if template is None:
      raise hyperparams.ConfigError(f'--{flag}: model {settings.model!r} has no pipeline '
                                    '(task.network is neither a PipeliningLayer nor has a '
                                    '`pipeline` field); set its fields with --params_override.')
    template.Set(**{field: value})
    if field == 'num_micro_batches':
      template.micro_batch_size = None
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
    'input.batch_size': 1,
}
_POSITIVE = ('train.learning_rate',)


def Validate(params: hyperparams.Params) -> None:
  """Refuses Params no run can use, naming the field and what is valid.

  Every number in the tree must be finite (a NaN learning rate would write
  NaN weights); the step, interval and batch-size knobs of `train` and
  `input` must be in range.

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
  CheckMicroBatches(params)


def CheckMicroBatches(params: hyperparams.Params, num_replicas: int = 1) -> None:
  """Refuses more micro-batches than a replica's share of the mini-batch has examples."""
  template = PipelineTemplate(params)
  batch = _Get(params, 'input.batch_size')
  if template is None or batch is None or template.micro_batch_size is not None:
    return
  per_replica = batch // max(1, num_replicas)
  if template.num_micro_batches > per_replica:
    where = (f'each of {num_replicas} replicas gets {per_replica} of the '
             f'{batch}' if num_replicas > 1 else f'input.batch_size is {batch}')
    raise hyperparams.ParamsError(
        f'num_micro_batches={template.num_micro_batches} (--num_micro_batches) '
        f'cannot split a batch of {per_replica} examples ({where}): every '
        'micro-batch needs at least one example. Use at most '
        f'{per_replica} micro-batches or a larger input.batch_size.')


def _Get(params: hyperparams.Params, path: str) -> Any:
  """The value at `path`, or None for a config without that field."""
  try:
    return params.Get(path)
  except hyperparams.UnknownParamError:
    return None


def _Numbers(value: Any, path: str = '') -> Iterator[tuple[str, float]]:
  """(path, value) of every float in a Params tree (ints are always finite)."""
  if isinstance(value, hyperparams.Params):
    for name, child in value.IterParams():
      yield from _Numbers(child, f'{path}.{name}' if path else name)
  elif isinstance(value, (list, tuple)):
    for i, child in enumerate(value):
      yield from _Numbers(child, f'{path}[{i}]')
  elif isinstance(value, dict):
    for key, child in value.items():
      yield from _Numbers(child, f'{path}[{key!r}]')
  elif isinstance(value, float):
    yield path, value


def NumPartitions(params: hyperparams.Params) -> int:
  """K, the number of pipeline cells (1 for a network without a pipeline)."""
  template = PipelineTemplate(params)
  if template is None:
    return 1
  if template.cell_tpl is not None:
    return len(template.cell_tpl)
  return template.num_partitions


def SetDevices(params: hyperparams.Params, devices: list[str]) -> None:
  """Places pipeline cell k on devices[k]; no-op for a network without a pipeline."""
  template = PipelineTemplate(params)
  if template is not None:
    template.devices = list(devices)


def _Positive(flag: str, value: int) -> None:
  if value < 1:
    raise hyperparams.ConfigError(f'{flag} must be a positive integer, got {value}.')
