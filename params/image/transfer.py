r"""Warm-start rules for fine-tuning a pretrained AmoebaNet with a new classifier.

The rule names are layer paths (lingvo_gpipe/warm_start.py): the pipeline's
j-th layer is `task/network/pipeline/layers_<j>`, and a head's dense layer to
the classes is element `logits` of its chain `net/sub_<i>`. Everything of the
network is loaded except those dense layers, whose shape follows the class
count: they keep their initializers.
"""

from lingvo_gpipe import model_params
from lingvo_gpipe.core import hyperparams
from tasks.image import amoebanet

# Every network variable, under the same name in the source.
NETWORK_RULES = [(r'task/network/(.*)', r'task/network/\1')]


def ClassifierPatterns(network: hyperparams.Params) -> list[str]:
  """Regexes of the head's (and aux head's) dense-to-classes weights of `network`."""
  patterns = []
  for j, layer in enumerate(amoebanet.AmoebaNetLayers(network)):
    if layer.cls in (amoebanet.Head, amoebanet.AuxHead):
      names = [sub.name for sub in layer.cls.ChildParams(layer).net.sub]
      patterns.append(rf'task/network/pipeline/layers_{j}/net/'
                      rf'sub_{names.index("logits")}/.*')
  return patterns


def FineTuneParams(checkpoint: str, network: hyperparams.Params
                   ) -> hyperparams.InstantiableParams:
  """A train.warm_start entry: all of `network` from `checkpoint` but its classifiers."""
  return model_params.WarmStartParams(
      checkpoint, rules=list(NETWORK_RULES),
      exclude=ClassifierPatterns(network))
