"""The fine-tune configs' warm starts fit their source models, checked without weights.

Each target and its source are built abstractly (base_layer.AbstractBuild:
variables with shapes, nothing allocated), so the 557M-parameter AmoebaNet-B
configs are checked at full size: every variable of the source maps onto
one of the target's of the same shape, except the classifiers, excluded.
"""

import pytest

from lingvo_gpipe import experiment
from lingvo_gpipe import model_registry
from lingvo_gpipe import warm_start
from lingvo_gpipe.core import base_layer

_CASES = [
    ('image.cifar10.AmoebaNetB_Transfer', 'image.imagenet.AmoebaNetB_18_512', 10),
    ('image.cifar100.AmoebaNetB_Transfer', 'image.imagenet.AmoebaNetB_18_512', 100),
    ('image.digits.FineTune59', 'image.digits.Pretrain04', 5),
]


def _Variables(params):
  """{rule name: AbstractVariable} of params' task, on one device."""
  template = experiment.PipelineTemplate(params)
  template.devices = ['/device:CPU:0'] * template.num_partitions
  with base_layer.AbstractBuild():
    return warm_start.TargetVariables(params.task.Instantiate())


def _Source(variables):
  return {name: warm_start.SourceVariable(name, name, tuple(v.shape.as_list()),
                                          v.dtype)
          for name, v in variables.items()}


@pytest.mark.parametrize('target_name, source_name, num_classes', _CASES)
def test_fine_tune_config_loads_all_but_the_classifiers(
    target_name, source_name, num_classes, tmp_path):
  target = model_registry.GetParams(target_name)
  assert target.task.network.num_classes == num_classes
  source = model_registry.GetParams(source_name)
  # The network is the source's but for its classes (and its pipelining).
  for field in ('num_cells', 'num_filters', 'genotype', 'image_size',
                'stem_type', 'use_aux_head'):
    assert target.task.network.Get(field) == source.task.network.Get(field)
  if 'image_size' in target.input:  # the images the network expects
    assert target.input.image_size == target.task.network.image_size
  (tmp_path / 'checkpoints').mkdir()
  (tmp_path / 'checkpoints' / 'ckpt-1.index').write_text('')
  [spec] = target.train.warm_start
  spec.checkpoint = str(tmp_path)
  targets = _Variables(target)
  sources = _Source(_Variables(source))
  plan = warm_start.MakePlan([spec], targets, read=lambda path: sources)
  heads = plan.excluded_targets
  assert heads and all(h.rsplit('/', 1)[-1] in ('w', 'b') for h in heads)
  assert len(heads) == (4 if target.task.network.use_aux_head else 2)
  assert all(tuple(targets[h].shape.as_list())[-1] == num_classes
             for h in heads)
  assert not plan.uninitialized
  assert not plan.sources[0].unmapped_sources
  assert not plan.sources[0].missing_targets
  assert len(plan.loads) == len(targets) - len(heads)
