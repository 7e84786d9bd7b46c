"""From a registry name and command-line settings to the one Params tree a run uses.

Invariant: the resolved Params say everything about a run: they are what
`--print_params` prints and what DIR/params.txt holds, and
`--params_file=DIR/params.txt` with the same model reproduces the run.
Settings apply in a fixed order, later ones winning: the registered config,
`--params_file`, `--params_override`, then the shortcut flags.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

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
      raise ValueError(f'--{flag}: model {settings.model!r} has no pipeline '
                       '(task.network is neither a PipeliningLayer nor has a '
                       '`pipeline` field); set its fields with --params_override.')
    template.Set(**{field: value})
    if field == 'num_micro_batches':
      template.micro_batch_size = None
  return params


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
    raise ValueError(f'{flag} must be a positive integer, got {value}.')
