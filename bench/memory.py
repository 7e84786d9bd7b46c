r"""GPipe Table 1 on this machine: the largest model under a memory cap.

--model=transformer (default) searches the most Transformer-L layers;
--model=amoebanet the most AmoebaNet-D filters D at a fixed number of cells.


Each probe is one training step of a Transformer-L shaped language model
(d_ff = 4 d_model, causal self-attention, untied softmax over a small
vocabulary) run by `lingvo_gpipe.tools.step_memory` in a process of its own,
with TF_CPU_BFC_MEM_LIMIT_IN_MB making the CPU a device of that size: an out
of memory (an error or a crash) must not poison the next probe. The layer
count is searched by doubling, then bisection, for:
- without GPipe: the layers in sequence under one tape;
- with GPipe: PipeliningLayer, K=1, M micro-batches, recompute always.
The cap is calibrated as the paper's setting implies: 5% above the smallest
cap under which the plain model fits 3 layers.

  python -m bench.memory --write_results
  python -m bench.memory --model=amoebanet --calibration_size=4 \
      --num_micro_batches=4 --write_results
"""

import json
import os
import subprocess
import sys
from typing import Optional

from absl import app
from absl import flags

from bench import common

_MODEL = flags.DEFINE_enum('model', 'transformer', ['transformer', 'amoebanet'],
                           'transformer: search the most layers (Table 1); '
                           'amoebanet: the most filters D at fixed cells.')
_DIM = flags.DEFINE_integer('dim', 256, 'transformer: d_model (d_ff = 4 '
                            'd_model).')
_NUM_CELLS = flags.DEFINE_integer('num_cells', 6, 'amoebanet: normal cells L.')
_FILTER_STEP = flags.DEFINE_integer('filter_step', 8, 'amoebanet: D is '
                                    'searched in multiples of this.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 32, 'amoebanet: image side.')
_HEADS = flags.DEFINE_integer('num_heads', 4, 'Attention heads.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 128, 'Tokens per sequence.')
_BATCH = flags.DEFINE_integer('batch', 32, 'Sequences (images) per mini-batch.')
_VOCAB = flags.DEFINE_integer('vocab_size', 2048, 'Vocabulary (softmax).')
_MICRO_BATCHES = flags.DEFINE_list('num_micro_batches', ['8', '16'],
                                   'M values to probe with GPipe.')
_CAP_MB = flags.DEFINE_integer('cap_mb', 0, 'Memory cap in MB; 0 calibrates '
                               'it: 5% above the smallest that fits the plain '
                               'model at --calibration_size.')
_CALIBRATION_SIZE = flags.DEFINE_integer(
    'calibration_size', 3, 'Size the plain model must just fit: layers '
    '(transformer; the paper: 3) or filter steps (amoebanet).')
_MAX_SIZE = flags.DEFINE_integer('max_size', 256, 'Search limit (layers or '
                                 'filter steps).')
_TIMEOUT = flags.DEFINE_integer('probe_timeout', 1800, 'Seconds per probe.')
_WRITE = flags.DEFINE_bool('write_results', False,
                           'Write bench/results/memory.md.')


def _ModelFlags(size: int) -> list[str]:
  """step_memory flags of the model at `size` (layers, or filter steps)."""
  if _MODEL.value == 'transformer':
    return ['--stack=transformer', f'--num_layers={size}', f'--dim={_DIM.value}',
            f'--num_heads={_HEADS.value}', f'--seq_len={_SEQ_LEN.value}',
            f'--batch={_BATCH.value}', f'--vocab_size={_VOCAB.value}']
  return ['--stack=amoebanet', f'--num_layers={_NUM_CELLS.value}',
          f'--dim={size * _FILTER_STEP.value}', f'--batch={_BATCH.value}',
          f'--image_size={_IMAGE_SIZE.value}']


def _Probe(size: int, cap_mb: Optional[int], *extra: str) -> Optional[dict]:
  """One step in a fresh process; its JSON result, or None if it did not fit."""
  env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC='true',
             TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=common.REPO)
  if cap_mb:
    env['TF_CPU_BFC_MEM_LIMIT_IN_MB'] = str(cap_mb)
  cmd = [sys.executable, '-m', 'lingvo_gpipe.tools.step_memory',
         *_ModelFlags(size), *extra]
  try:
    out = subprocess.run(cmd, env=env, cwd=common.REPO, capture_output=True,
                         text=True, timeout=_TIMEOUT.value)
  except subprocess.TimeoutExpired:
    # Counted as not fitting, but said: a slow probe is not a measurement.
    print(f'  size={size:4d} cap={cap_mb} {" ".join(extra)}: timed out after '
          f'{_TIMEOUT.value} s (counted as not fitting; raise '
          '--probe_timeout)', flush=True)
    return None
  # step_memory exits 3 on ResourceExhaustedError; an OOM can also end in a
  # crash (a signal). Anything else is a bug, not a measurement.
  if out.returncode not in (0, 3) and out.returncode > 0:
    raise RuntimeError(f'Probe failed (exit {out.returncode}): {cmd}\n'
                       f'{out.stderr[-2000:]}')
  fits = out.returncode == 0
  print(f'  size={size:4d} cap={cap_mb} {" ".join(extra)}: '
        f'{"fits" if fits else f"does not fit (exit {out.returncode})"}',
        flush=True)
  return json.loads(out.stdout.strip().splitlines()[-1]) if fits else None


def _LargestFitting(cap_mb: int, *extra: str) -> tuple[int, Optional[dict]]:
  """Largest size that fits under the cap: doubling, then bisection."""
  best, best_result, low, high = 0, None, 0, None
  size = 1
  while size <= _MAX_SIZE.value:
    result = _Probe(size, cap_mb, *extra)
    if result is None:
      high = size
      break
    best, best_result, low = size, result, size
    size *= 2
  if high is None:
    return best, best_result
  while high - low > 1:
    mid = (low + high) // 2
    result = _Probe(mid, cap_mb, *extra)
    if result is None:
      high = mid
    else:
      best, best_result, low = mid, result, mid
  return best, best_result


def _Calibrate() -> int:
  """5% above the smallest cap (to 4 MB) under which the plain model fits.

  The allocator needs more than the measured peak (a capped BFC allocator
  fragments), so the cap is searched, not computed from peaks; and the
  plain model's unordered graph peaks differently from run to run, so the
  cap keeps a 5% margin over the smallest one that fitted once.
  """
  size = _CALIBRATION_SIZE.value
  base = _Probe(size, None, '--plain')
  if base is None:
    raise RuntimeError(f'The plain model at size {size} fails without a cap.')
  low = int(base['peak_total_bytes'] / 2**20)  # below this it cannot fit
  high = 2 * low
  while _Probe(size, high, '--plain') is None:
    low, high = high, 2 * high
  while high - low > 4:
    mid = (low + high) // 2
    if _Probe(size, mid, '--plain') is None:
      low = mid
    else:
      high = mid
  return int(high * 1.05)


def main(argv):
  del argv
  facts = common.MachineFacts()
  cap = _CAP_MB.value or _Calibrate()
  print(f'cap: {cap} MB', flush=True)
  rows = []
  plain_size, plain = _LargestFitting(cap, '--plain')
  rows.append(('without GPipe', '-', plain_size, plain))
  for m in _MICRO_BATCHES.value:
    size, result = _LargestFitting(cap, f'--num_micro_batches={m}',
                                   '--recompute=always')
    rows.append(('GPipe K=1, recompute', m, size, result))
  transformer = _MODEL.value == 'transformer'
  unit = 'layers' if transformer else 'filters D'
  scale = 1 if transformer else _FILTER_STEP.value
  table = common.MarkdownTable(
      ['config', 'M', f'max {unit}', 'ratio', 'params', 'peak MB (total)',
       'step s'],
      [(name, m, size * scale, f'{size / max(plain_size, 1):.1f}x',
        f'{r["num_params"] / 1e6:.1f}M' if r else '-',
        f'{r["peak_total_bytes"] / 2**20:.0f}' if r else '-',
        f'{r["step_seconds"]:.1f}' if r else '-')
       for name, m, size, r in rows])
  print(table)
  if transformer:
    config = dict(d_model=_DIM.value, d_ff=4 * _DIM.value,
                  num_heads=_HEADS.value, seq_len=_SEQ_LEN.value,
                  batch=_BATCH.value, vocab=_VOCAB.value)
    title = 'Largest Transformer-L under a memory cap (GPipe Table 1)'
    paper = ('Paper (Table 1, 8 GB accelerator): 3 layers without GPipe, 13 '
             'with GPipe on one accelerator (4.3x); our goal >= 5x.')
  else:
    config = dict(genotype='D', num_cells=_NUM_CELLS.value,
                  image_size=_IMAGE_SIZE.value, batch=_BATCH.value,
                  filter_step=_FILTER_STEP.value)
    title = 'Widest AmoebaNet-D under a memory cap (GPipe Table 1)'
    paper = ('Paper (Table 1, 8 GB accelerator): AmoebaNet-D (18, 208), 82M '
             'parameters, without GPipe; (18, 416), 318M, with GPipe on one '
             'accelerator.')
  config['cap_mb'] = cap if _CAP_MB.value else (
      f'{cap} (calibrated: 5% above the smallest cap, to 4 MB, that fitted '
      f'the plain model at size {_CALIBRATION_SIZE.value} once)')
  if _WRITE.value:
    name = 'memory.md' if transformer else 'memory_amoebanet.md'
    path = common.WriteResults(
        name, title, 'python -m bench.memory --write_results ' +
        ('' if transformer else '--model=amoebanet'), facts, config,
        table + '\n\n' + paper)
    print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
