r"""Prints a registered model's size and cost per pipeline cell, without building it.

  python -m lingvo_gpipe.tools.model_size --model=image.imagenet.AmoebaNetD_18_208
  python -m lingvo_gpipe.tools.model_size --model=lm.lm1b.TransformerL \
      --params_override='task.network.num_layers=1663'

Parameters are counted from Params alone (nothing is allocated), so an 84B
parameter model is sized in seconds. FLOPs need the network's input shapes.
The last line is always `num_params: <integer>`.
"""

import sys
from typing import Optional

from lingvo_gpipe.core import tf_env

tf_env.Setup()  # before TensorFlow loads: log noise

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from lingvo_gpipe import model_registry
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core.gpipe import pipelining_layer
from lingvo_gpipe.core.gpipe import report as report_lib

flags.adopt_module_key_flags(tf_env)  # --tf_logs in --help
_MODEL = flags.DEFINE_string('model', None, 'Registered model name, e.g. '
                             'image.cifar10.AmoebaNetD; see --list_models.')
_OVERRIDE = flags.DEFINE_string('params_override', '', "Overrides, e.g. "
                                "'task.network.num_layers=13; input.batch_size=8'.")
_LIST = flags.DEFINE_bool('list_models', False, 'List registered models.')


def PipelineParams(network):
  """The PipeliningLayer Params a network is, or builds (its PipelineParams)."""
  if issubclass(network.cls, pipelining_layer.PipeliningLayer):
    return network
  build = getattr(network.cls, 'PipelineParams', None)
  return build(network) if build is not None else None


def SizeReport(params) -> tuple[str, Optional[str]]:
  """(the text the tool prints for model Params, a configuration error or None).

  A pipeline the config cannot cut (fewer layers than cells, say) has no
  partition table: the error takes its place, and the parameter count, which
  does not depend on the cut, is still given.
  """
  network = params.task.network
  lines, error = [f'model: {params.name}'], None
  pipe = PipelineParams(network)
  if pipe is not None:
    try:
      lines.append(report_lib.FormatTable(
          pipelining_layer.PipeliningLayer.StaticReport(pipe)))
    except hyperparams.ConfigError as e:
      error = str(e)
      lines.append(f'partition: none ({error})')
  num_params = network.cls.NumParams(network)
  lines.append(f'num_params: {num_params}')
  return '\n'.join(lines), error


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _LIST.value:
    print('\n'.join(model_registry.ListModels()))
    return
  if not _MODEL.value:
    raise app.UsageError('--model is required (see --list_models).')
  try:
    params = model_registry.GetParams(_MODEL.value)
    if _OVERRIDE.value:
      hyperparams.ApplyOverrides(params, _OVERRIDE.value)
  except (ValueError, AttributeError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  text, error = SizeReport(params)
  print(text)
  if error is not None:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
