"""model_size: sizes registered models from Params; its last line is num_params."""

import os
import subprocess
import sys

import pytest

from lingvo_gpipe import model_registry
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.tools import model_size

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


def _NumParams(name, overrides=''):
  params = model_registry.GetParams(name)
  if overrides:
    hyperparams.ApplyOverrides(params, overrides)
  text, error = model_size.SizeReport(params)
  assert error is None, error
  last = text.splitlines()[-1]
  assert last.startswith('num_params: ')
  return int(last.split(': ')[1]), text


# (name, overrides, exact count with the aux head the configs use).
@pytest.mark.parametrize('name,overrides,expected,paper', [
    ('image.imagenet.AmoebaNetD_18_208', '', 81_781_529, 82e6),
    ('image.imagenet.AmoebaNetD_18_208', 'task.network.num_filters=416',
     318_270_652, 318e6),
    ('image.imagenet.AmoebaNetD_18_208', 'task.network.num_filters=544',
     540_977_420, 542e6),
    ('image.imagenet.AmoebaNetD_18_208',
     'task.network.num_cells=36; task.network.num_filters=544',
     1_054_074_956, 1.05e9),
    ('image.imagenet.AmoebaNetD_18_208',
     'task.network.num_cells=72; task.network.num_filters=512',
     1_843_378_372, 1.8e9),
    ('image.imagenet.AmoebaNetB_18_512', '', 558_045_988, 557e6),
])
def test_amoebanet_sizes_match_the_paper(name, overrides, expected, paper):
  # Counted at 224x224 as the paper's table; B_18_512 trains at 480 (no
  # parameter depends on the image size but the aux head's last conv).
  count, text = _NumParams(name, overrides + (
      '; task.network.image_size=224' if overrides else
      'task.network.image_size=224'))
  assert count == expected
  assert abs(count - paper) / paper < 0.05
  assert 'cell ' in text and 'total' in text


@pytest.mark.parametrize('layers,paper', [
    (3, 282.2e6), (13, 785.8e6), (103, 5.3e9), (415, 21.0e9), (1663, 83.9e9)])
def test_transformer_l_sizes_match_table_1(layers, paper):
  # The config's 8 cells need 8 layers; Table 1's L=3 runs on fewer.
  count, _ = _NumParams(
      'lm.lm1b.TransformerL', f'task.network.num_layers={layers}; '
      f'task.network.pipeline.num_partitions={min(8, layers + 2)}')
  assert abs(count - paper) / paper < 0.01


def test_every_registered_model_is_sized_with_flops_per_cell():
  for name in model_registry.ListModels():
    if name.startswith('example.'):
      continue
    count, text = _NumParams(name)
    assert count > 0, name
    total = [l for l in text.splitlines() if l.startswith('total')][0]
    assert total.split()[-1] != '-', (name, total)  # FLOPs are known


def _Run(*flags):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=REPO)
  return subprocess.run(
      [sys.executable, '-m', 'lingvo_gpipe.tools.model_size', *flags],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_command_line_contract():
  out = _Run('--model=mt.synthetic.TransformerTiny',
             '--params_override=task.network.num_layers=3')
  assert out.returncode == 0, out.stderr
  last = out.stdout.strip().splitlines()[-1]
  assert last.startswith('num_params: ') and int(last.split()[1]) > 0
  bad = _Run('--model=image.imagenet.AmoebaNetD_18_20')
  assert bad.returncode != 0
  assert "Did you mean: 'image.imagenet.AmoebaNetD_18_208'" in bad.stderr
  bad_key = _Run('--model=mt.synthetic.TransformerTiny',
                 '--params_override=task.network.num_layerz=3')
  assert bad_key.returncode != 0 and 'num_layers' in bad_key.stderr


def test_a_config_that_cannot_be_cut_gets_one_line_and_still_its_size():
  # 3 layers cannot fill the config's 8 cells: once a raw traceback.
  out = _Run('--model=lm.lm1b.TransformerL',
             '--params_override=task.network.num_layers=3')
  assert out.returncode == 1, out.stderr
  assert 'Traceback' not in out.stderr, out.stderr[-2000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and 'num_partitions=8 exceeds' in errors[0], (
      out.stderr[-2000:])
  last = out.stdout.strip().splitlines()[-1]
  # Table 1's Transformer-L at 3 layers: 282.2M parameters.
  assert last.startswith('num_params: ')
  assert abs(int(last.split()[1]) - 282.2e6) / 282.2e6 < 0.01
