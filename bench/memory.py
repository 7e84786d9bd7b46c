r"""GPipe Table 1 on this machine: the largest model under a memory cap.

--model=transformer (default) searches the most Transformer-L layers;
--model=amoebanet the most AmoebaNet-D filters D at a fixed number of cells.

Each probe is one training step of a Transformer-L shaped language model
(d_ff = 4 d_model, causal self-attention, untied softmax over a small
vocabulary) run by `lingvo_gpipe.tools.step_memory` in fresh processes,
with TF_CPU_BFC_MEM_LIMIT_IN_MB making the CPU a device of that size: an out
of memory (an error or a crash) must not poison the next probe. The layer
count is searched by doubling, then bisection, for:
- without GPipe: the layers in sequence under one tape;
- with GPipe: PipeliningLayer, K=1, M micro-batches, recompute always.
The cap is calibrated as the paper's setting implies: 5% above the smallest
cap under which the plain model fits 3 layers.

--num_workers=1,2,4 gives Table 1's Pipeline-K columns instead: for each K,
the same GPipe step with its K cells on K fresh TensorFlow worker processes
(`local_processes.StartLocalWorkers`, not pinned), each capped at the same
cap, fed by an uncapped client that holds no variables (the input batch and the
loss's first gradient; step_memory says what). Any failure of the
client or of a worker counts as not fitting, and the workers are stopped
after every probe. The goal (issue 7) is near-linear growth: at least
0.9 K times the layers at K=1. It writes its own section of the results
file, and the one-device table keeps that section when it is rewritten.

  python -m bench.memory --write_results
  python -m bench.memory --num_workers=1,2,4 --num_micro_batches=8 \
      --cap_mb=351 --write_results
  python -m bench.memory --model=amoebanet --calibration_size=4 \
      --num_micro_batches=4 --write_results
  python -m bench.memory --num_workers=2 --num_micro_batches=8 \
      --cap_mb=351 --schedules=gpipe:always,1f1b:always,1f1b:never \
      --write_results
  python -m bench.memory --fprop_dtypes=float32,bfloat16 \
      --num_micro_batches=8 --cap_mb=351 --write_results

--fprop_dtypes compares the dtypes layers compute in (variables stay
float32): per dtype the most layers without GPipe and with GPipe K=1 under
the one-device cap, then the step time at one size, the dtypes alternating
over --timing_rounds rounds, uncapped and with oneDNN on (its bfloat16
kernels use the CPU's AVX512-BF16/AMX; without it TensorFlow's own bfloat16
kernels ran a step 2.4x as long as float32's here); writes
memory_precision.md.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple, Optional, Sequence

from lingvo_gpipe.core import tf_env

# Before TensorFlow loads (bench.common): this process's log noise. It times nothing in
# TensorFlow itself; each probe's processes get _ProbeEnv() and their own tf_env.Setup().
tf_env.Setup()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from bench import common
from lingvo_gpipe.core import local_processes

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
_NUM_WORKERS = flags.DEFINE_list(
    'num_workers', [], "Table 1's Pipeline-K columns instead of the one-device "
    'table: for each K listed (e.g. 1,2,4), GPipe with its K cells on K '
    'worker processes, each capped at the cap.')
_EXECUTOR = flags.DEFINE_enum(
    'executor', 'unrolled', ['unrolled', 'loop'], "PipeliningLayer's executor "
    '(step_memory --executor) for the GPipe probes; loop writes '
    'memory_loop.md (memory_amoebanet_loop.md) instead of memory.md.')
_SCHEDULES = flags.DEFINE_list(
    'schedules', [], 'With --num_workers=K (one K): compare schedules '
    "instead, each 'schedule:recompute' (e.g. gpipe:always,1f1b:always,"
    '1f1b:never): the most layers each fits on K capped workers, then '
    'their step times at the smallest of those sizes, alternating over '
    '--timing_rounds rounds; writes memory_schedules.md. A schedule other '
    'than gpipe computes the loss inside the pipeline.')
_TIMING_ROUNDS = flags.DEFINE_integer('timing_rounds', 3, '--schedules: '
                                      'alternating timing rounds.')
_CAPACITIES = flags.DEFINE_list(
    'capacities', [], "--schedules: 'schedule:recompute=layers' found by an "
    'earlier run (its log), whose search is then skipped.')
_TIMING_SIZE = flags.DEFINE_integer('timing_size', 0, '--schedules: layers '
                                    'to time at; 0: the smallest capacity.')
_FPROP_DTYPES = flags.DEFINE_list(
    'fprop_dtypes', [], 'Compare these compute dtypes instead (step_memory '
    '--fprop_dtype; the first is the baseline): capacity under the '
    'one-device cap, then step time; writes memory_precision.md.')
_WRITE = flags.DEFINE_bool('write_results', False,
                           'Write bench/results/memory.md (with --num_workers, '
                           'its Pipeline-K section; see --executor).')

_PIPELINE_K_HEADING = '## Pipeline-K: K worker processes, each capped'
_PIPELINE_K_NOTES = (
    'Goal (issue 7): near-linear growth, at least 0.9 K times the K=1 '
    'layers. K=1 is one capped worker fed by a client; the one-device table '
    'above runs the same step inside one capped process. client peak MB: the '
    "client's allocator peak during the measured step. A worker's allocator "
    'peak is not readable from the client and is not measured; worker RSS '
    'growth MB is what the OS saw instead, per worker: its resident-set '
    'high-water mark (VmHWM) at the end of the probe minus its resident set '
    'when it started listening. It includes the traced graphs, gRPC buffers '
    'and runtime as well as the capped allocator, so it bounds the latter '
    'from above, roughly. The last column is the smallest layer count that '
    'did not fit and why.')


def _ModelFlags(size: int) -> list[str]:
  """step_memory flags of the model at `size` (layers, or filter steps)."""
  if _MODEL.value == 'transformer':
    return ['--stack=transformer', f'--num_layers={size}', f'--dim={_DIM.value}',
            f'--num_heads={_HEADS.value}', f'--seq_len={_SEQ_LEN.value}',
            f'--batch={_BATCH.value}', f'--vocab_size={_VOCAB.value}']
  return ['--stack=amoebanet', f'--num_layers={_NUM_CELLS.value}',
          f'--dim={size * _FILTER_STEP.value}', f'--batch={_BATCH.value}',
          f'--image_size={_IMAGE_SIZE.value}']


class _Outcome(NamedTuple):
  """A probe's result (None if it did not fit) and, if not, why not."""
  result: Optional[dict]
  why_not: str = ''


def _StepCommand(size: int, extra: Sequence[str],
                 hosts: Sequence[str] = ()) -> list[str]:
  cmd = [sys.executable, '-m', 'lingvo_gpipe.tools.step_memory',
         *_ModelFlags(size), *extra]
  return cmd + [f'--worker_hosts={",".join(hosts)}'] if hosts else cmd


def _Status(pid: int, field: str) -> Optional[int]:
  """A /proc/<pid>/status field in kB (VmRSS, VmHWM), or None if unreadable."""
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def _RunClient(cmd: list[str], env: dict, workers: Sequence[subprocess.Popen]
               ) -> tuple[Optional[int], str, str, str]:
  """(exit code, stdout, stderr, why it was stopped) of the step's process.

  Stops it at the timeout, or as soon as a worker dies: a client waiting on
  a crashed worker may otherwise wait until the timeout. The exit code is
  None if it was stopped.
  """
  with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
    client = subprocess.Popen(cmd, env=env, cwd=common.REPO, stdout=out,
                              stderr=err, text=True)
    deadline, stopped = time.time() + _TIMEOUT.value, ''
    try:
      while client.poll() is None and not stopped:
        if time.time() > deadline:
          # Counted as not fitting, but said: a slow probe is no measurement.
          stopped = (f'timed out after {_TIMEOUT.value} s (raise '
                     '--probe_timeout)')
        elif any(w.poll() is not None for w in workers):
          stopped = 'stopped after a worker died'
        else:
          time.sleep(1.0)
    finally:
      local_processes.StopAll([client])
    out.seek(0)
    err.seek(0)
    return (None if stopped else client.returncode, out.read(), err.read(),
            stopped)


def _ProbeEnv() -> dict:
  """The environment of a probe's processes, before its cap.

  oneDNN stays off unless the caller's environment turns it on: under a cap
  its kernels can abort on a failed allocation (a failed check) instead of
  raising ResourceExhaustedError.
  """
  env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC='true',
             TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=common.REPO)
  env.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  env.pop('TF_CPU_BFC_MEM_LIMIT_IN_MB', None)
  return env


def _Probe(size: int, cap_mb: Optional[int], extra: Sequence[str] = (),
           num_workers: int = 0) -> _Outcome:
  """One step in fresh processes: its JSON result, or why it did not fit.

  num_workers=0 runs the step in one process capped at cap_mb. Otherwise
  the step's K cells run on num_workers fresh worker processes, each capped
  at cap_mb, fed by an uncapped client, and any failure of the client or of
  a worker counts as not fitting (out of memory under a cap sometimes
  ends in a segmentation fault rather than ResourceExhaustedError); the workers are stopped whatever happens.
  """
  env = _ProbeEnv()
  if cap_mb and not num_workers:
    env['TF_CPU_BFC_MEM_LIMIT_IN_MB'] = str(cap_mb)
  hosts, workers = [], []
  try:
    if num_workers:
      hosts, workers = local_processes.StartLocalWorkers(
          num_workers, mem_limit_mb=cap_mb)
    start_rss = [_Status(w.pid, 'VmRSS') for w in workers]
    code, stdout, stderr, stopped = _RunClient(
        _StepCommand(size, extra, hosts), env, workers)
    peak_rss = [_Status(w.pid, 'VmHWM') for w in workers]
    reasons = [f'worker {k} exited with {w.poll()}'
               for k, w in enumerate(workers) if w.poll() is not None]
  finally:
    local_processes.StopAll(workers)
  if stopped:
    reasons.append(stopped)
  elif code == 3:  # step_memory's exit on ResourceExhaustedError
    reasons.append('out of memory')
  elif code < 0:  # out of memory can also end in a crash
    reasons.append(f'client crashed (signal {-code})')
  elif code and not num_workers:
    raise RuntimeError(f'Probe failed (exit {code}), not for memory: '
                       f'{_StepCommand(size, extra)}\n{stderr[-2000:]}')
  elif code:
    lines = stderr.strip().splitlines() or ['no stderr']
    reasons.append(f'client exited with {code}: {lines[-1][:160]}')
  print(f'  size={size:4d} cap={cap_mb} workers={num_workers} '
        f'{" ".join(extra)}: {"; ".join(reasons) or "fits"}', flush=True)
  if reasons:
    return _Outcome(None, '; '.join(reasons))
  result = json.loads(stdout.strip().splitlines()[-1])
  result['worker_rss_growth_mb'] = [
      round((peak - start) / 1024) if peak and start else None
      for peak, start in zip(peak_rss, start_rss)]
  return _Outcome(result)


def _LargestFitting(cap_mb: int, extra: Sequence[str] = (),
                    num_workers: int = 0, start: int = 1
                    ) -> tuple[int, Optional[dict], str]:
  """Largest size that fits under the cap: doubling from start, then bisection.

  Returns (size, its result, why the smallest size that failed did not fit).
  """
  best, best_result, low, high, why_not = 0, None, 0, None, ''
  size = start
  while size <= _MAX_SIZE.value:
    outcome = _Probe(size, cap_mb, extra, num_workers)
    if outcome.result is None:
      high, why_not = size, f'{size}: {outcome.why_not}'
      break
    best, best_result, low = size, outcome.result, size
    size *= 2
  if high is None:
    return best, best_result, why_not
  while high - low > 1:
    mid = (low + high) // 2
    outcome = _Probe(mid, cap_mb, extra, num_workers)
    if outcome.result is None:
      high, why_not = mid, f'{mid}: {outcome.why_not}'
    else:
      best, best_result, low = mid, outcome.result, mid
  return best, best_result, why_not


def _Calibrate() -> int:
  """5% above the smallest cap (to 4 MB) under which the plain model fits.

  The allocator needs more than the measured peak (a capped BFC allocator
  fragments), so the cap is searched, not computed from peaks; and the
  plain model's unordered graph peaks differently from run to run, so the
  cap keeps a 5% margin over the smallest one that fitted once.
  """
  size = _CALIBRATION_SIZE.value
  base = _Probe(size, None, ['--plain']).result
  if base is None:
    raise RuntimeError(f'The plain model at size {size} fails without a cap.')
  low = int(base['peak_total_bytes'] / 2**20)  # below this it cannot fit
  high = 2 * low
  while _Probe(size, high, ['--plain']).result is None:
    low, high = high, 2 * high
  while high - low > 4:
    mid = (low + high) // 2
    if _Probe(size, mid, ['--plain']).result is None:
      low = mid
    else:
      high = mid
  return int(high * 1.05)


def _GPipeFlags(m: str) -> list[str]:
  return [f'--num_micro_batches={m}', '--recompute=always',
          f'--executor={_EXECUTOR.value}']


def _Unit() -> tuple[str, int]:
  """(what the size counts, model units per size step)."""
  if _MODEL.value == 'transformer':
    return 'layers', 1
  return 'filters D', _FILTER_STEP.value


def _Config(cap: int) -> dict:
  """The model's configuration and the cap, for the results file."""
  if _MODEL.value == 'transformer':
    config = dict(d_model=_DIM.value, d_ff=4 * _DIM.value,
                  num_heads=_HEADS.value, seq_len=_SEQ_LEN.value,
                  batch=_BATCH.value, vocab=_VOCAB.value)
  else:
    config = dict(genotype='D', num_cells=_NUM_CELLS.value,
                  image_size=_IMAGE_SIZE.value, batch=_BATCH.value,
                  filter_step=_FILTER_STEP.value)
  config['cap_mb'] = cap if _CAP_MB.value else (
      f'{cap} (calibrated: 5% above the smallest cap, to 4 MB, that fitted '
      f'the plain model at size {_CALIBRATION_SIZE.value} once)')
  config['executor'] = (f'{_EXECUTOR.value} (PipeliningLayer executor of the '
                        'GPipe probes; the plain probes use none)')
  config['oneDNN'] = ('TF_ENABLE_ONEDNN_OPTS='
                      f'{_ProbeEnv().get("TF_ENABLE_ONEDNN_OPTS")} in every '
                      'probe (a failed allocation under a cap can crash a '
                      'oneDNN kernel instead of raising)')
  return config


def _ResultsPath() -> str:
  name = 'memory' if _MODEL.value == 'transformer' else 'memory_amoebanet'
  if _EXECUTOR.value != 'unrolled':
    name += f'_{_EXECUTOR.value}'
  return os.path.join(common.RESULTS_DIR, name + '.md')


def _ExecutorFlag() -> str:
  """The --executor flag for a results file's command line ('' by default)."""
  return ('' if _EXECUTOR.value == 'unrolled' else
          f' --executor={_EXECUTOR.value}')


def _SplitPipelineK(path: str) -> tuple[str, str]:
  """(a results file without its Pipeline-K section, that section or '')."""
  try:
    with open(path) as f:
      text = f.read()
  except FileNotFoundError:
    return '', ''
  at = text.find('\n' + _PIPELINE_K_HEADING)
  return (text, '') if at < 0 else (text[:at + 1], text[at + 1:])


def OneDevice(cap: int, facts: dict) -> None:
  """The one-device table: without GPipe, and GPipe K=1 at each M."""
  rows = []
  plain_size, plain, _ = _LargestFitting(cap, ['--plain'])
  rows.append(('without GPipe', '-', plain_size, plain))
  for m in _MICRO_BATCHES.value:
    size, result, _ = _LargestFitting(cap, _GPipeFlags(m))
    rows.append(('GPipe K=1, recompute', m, size, result))
  unit, scale = _Unit()
  table = common.MarkdownTable(
      ['config', 'M', f'max {unit}', 'ratio', 'params', 'peak MB (total)',
       'step s'],
      [(name, m, size * scale, f'{size / max(plain_size, 1):.1f}x',
        f'{r["num_params"] / 1e6:.1f}M' if r else '-',
        f'{r["peak_total_bytes"] / 2**20:.0f}' if r else '-',
        f'{r["step_seconds"]:.1f}' if r else '-')
       for name, m, size, r in rows])
  print(table)
  if _MODEL.value == 'transformer':
    title = 'Largest Transformer-L under a memory cap (GPipe Table 1)'
    paper = ('Paper (Table 1, 8 GB accelerator): 3 layers without GPipe, 13 '
             'with GPipe on one accelerator (4.3x); our goal >= 5x.')
  else:
    title = 'Widest AmoebaNet-D under a memory cap (GPipe Table 1)'
    paper = ('Paper (Table 1, 8 GB accelerator): AmoebaNet-D (18, 208), 82M '
             'parameters, without GPipe; (18, 416), 318M, with GPipe on one '
             'accelerator.')
  if _WRITE.value:
    path = _ResultsPath()
    _, pipeline_k = _SplitPipelineK(path)  # another run's: keep it
    common.WriteResults(
        os.path.basename(path), f'{title}, executor {_EXECUTOR.value}',
        'python -m bench.memory ' + ' '.join(sys.argv[1:]), facts,
        _Config(cap), table + '\n\n' + paper)
    if pipeline_k:
      with open(path, 'a') as f:
        f.write('\n' + pipeline_k)
    print(f'wrote {path}')


def _WritePipelineK(cap: int, facts: dict, table: str) -> str:
  """Replaces (or appends) the Pipeline-K section of the results file."""
  workers = ','.join(_NUM_WORKERS.value)
  command = ('python -m bench.memory' +
             ('' if _MODEL.value == 'transformer' else ' --model=amoebanet') +
             f' --num_workers={workers} --num_micro_batches='
             f'{",".join(_MICRO_BATCHES.value)}' +
             (f' --cap_mb={_CAP_MB.value}' if _CAP_MB.value else '') +
             _ExecutorFlag() +
             ' --write_results')
  config = _Config(cap)
  config.update({
      'cap applies to': 'each worker process (TF_CPU_BFC_MEM_LIMIT_IN_MB); '
                        'the client is not capped',
      'pipeline': 'PipeliningLayer, K cells on K workers (cell k on worker '
                  'k), recompute always, partition_method params (the '
                  'default)',
      'workers': 'lingvo_gpipe.tools.worker via '
                 'local_processes.StartLocalWorkers, fresh for every probe, not pinned (all share the cores); '
                 'under a cap worker.py sets TF_ENABLE_ONEDNN_OPTS=0, though '
                 "Einsum still runs oneDNN's kernel",
      'client': 'lingvo_gpipe.tools.step_memory --worker_hosts: creates the '
                'input batch, traces the step, runs the first backward ops '
                "(the loss's gradient with respect to the last cell's output, "
                'one value per token or example) and reads back two scalars; '
                'no variables, activations or weight gradients',
  })
  body = table + '\n\n' + _PIPELINE_K_NOTES
  path = _ResultsPath()
  with tempfile.TemporaryDirectory() as tmp:
    # common.WriteResults formats a whole file; one level down it is a
    # section (an absolute file name puts it outside bench/results).
    section = common.WriteResults(
        os.path.join(tmp, 'section.md'),
        f'{_PIPELINE_K_HEADING[3:]}, executor {_EXECUTOR.value}', command,
        facts, config, body)
    with open(section) as f:
      section = ''.join('#' + line if line.startswith('#') else line
                        for line in f)
  head, _ = _SplitPipelineK(path)
  with open(path, 'w') as f:
    f.write((head.rstrip('\n') + '\n\n' if head else '') + section)
  return path


def PipelineK(cap: int, facts: dict) -> None:
  """Table 1's Pipeline-K columns: K cells on K workers, each capped."""
  unit, scale = _Unit()
  rows, at_k1 = [], {}
  for m in _MICRO_BATCHES.value:
    for k in (int(k) for k in _NUM_WORKERS.value):
      # start=k: each of the K cells needs at least one layer.
      size, r, why_not = _LargestFitting(cap, _GPipeFlags(m), num_workers=k,
                                         start=k)
      if k == 1:
        at_k1[m] = size
      ratio = size / at_k1[m] if at_k1.get(m) else None
      rows.append((
          k, m, size * scale, f'{ratio:.2f}x' if ratio is not None else '-',
          ('yes' if ratio >= 0.9 * k else 'no') if ratio is not None else '-',
          f'{r["num_params"] / 1e6:.1f}M' if r else '-',
          f'{r["step_seconds"]:.1f}' if r else '-',
          f'{r["peak_total_bytes"] / 2**20:.1f}' if r else '-',
          ', '.join(str(g) for g in r['worker_rss_growth_mb']) if r else '-',
          why_not or f'none up to {_MAX_SIZE.value}'))
      table = common.MarkdownTable(
          ['K (workers)', 'M', f'max {unit}', 'ratio to K=1',
           'goal >= 0.9 K', 'params', 'step s', 'client peak MB',
           'worker RSS growth MB', 'smallest failing size: why'], rows)
      print(table, flush=True)
      if _WRITE.value:  # after every K, so a run cut short keeps its rows
        print(f'wrote {_WritePipelineK(cap, facts, table)}', flush=True)


def _ComparisonCommand(*flags: str) -> str:
  """The command line of a --schedules or --fprop_dtypes results file."""
  tail = [f'--timing_size={_TIMING_SIZE.value}' if _TIMING_SIZE.value else '',
          f'--timing_rounds={_TIMING_ROUNDS.value}',
          f'--cap_mb={_CAP_MB.value}' if _CAP_MB.value else '']
  return ' '.join(['python -m bench.memory', *[f for f in (*flags, *tail) if f]]
                  ) + _ExecutorFlag() + ' --write_results'


def _ScheduleFlags(entry: str, m: str) -> list[str]:
  """step_memory flags of a --schedules entry 'schedule:recompute'."""
  schedule, _, recompute = entry.partition(':')
  inside = ['--loss_inside_pipeline'] if schedule != 'gpipe' else []
  return [f'--num_micro_batches={m}', f'--recompute={recompute or "always"}',
          f'--executor={_EXECUTOR.value}', f'--schedule={schedule}', *inside]


def Schedules(cap: int, facts: dict) -> None:
  """Capacity and step time of each schedule on K capped workers."""
  if len(_NUM_WORKERS.value) != 1 or len(_MICRO_BATCHES.value) != 1:
    raise app.UsageError('--schedules compares at one K and one M: give one '
                         'value to --num_workers and --num_micro_batches.')
  k, m = int(_NUM_WORKERS.value[0]), _MICRO_BATCHES.value[0]
  known = dict(c.split('=') for c in _CAPACITIES.value)
  sizes, why = {}, {}
  for entry in _SCHEDULES.value:
    if entry in known:
      sizes[entry], why[entry] = int(known[entry]), 'an earlier search (log)'
      continue
    sizes[entry], _, why[entry] = _LargestFitting(
        cap, _ScheduleFlags(entry, m), num_workers=k, start=max(k, 8))
    print(f'{entry}: {sizes[entry]} layers', flush=True)
  common_size = _TIMING_SIZE.value or min(sizes.values())
  times = {entry: [] for entry in _SCHEDULES.value}
  for round_index in range(_TIMING_ROUNDS.value):
    for entry in _SCHEDULES.value:
      outcome = _Probe(common_size, cap, _ScheduleFlags(entry, m) +
                       ['--repeats=3'], num_workers=k)
      if outcome.result is None:
        raise RuntimeError(f'{entry} no longer fits {common_size} layers: '
                           f'{outcome.why_not}')
      times[entry].append(outcome.result['step_seconds'])
    print(f'round {round_index}: ' + ', '.join(
        f'{e} {t[-1]:.2f} s' for e, t in times.items()), flush=True)
  first = _SCHEDULES.value[0]
  rows = []
  for entry in _SCHEDULES.value:
    schedule, _, recompute = entry.partition(':')
    ratios = [t / b for t, b in zip(times[entry], times[first])]
    median, low, high = common.Spread(ratios)
    rows.append((schedule, recompute or 'always', sizes[entry],
                 f'{sorted(times[entry])[len(times[entry]) // 2]:.2f}',
                 f'{median:.2f}× ({low:.2f}–{high:.2f})',
                 why[entry] or f'none up to {_MAX_SIZE.value}'))
  table = common.MarkdownTable(
      ['schedule', 'recompute', f'max layers (K={k}, M={m})',
       f'step s at {common_size} layers (median)',
       f'step ÷ {first}\'s, median (min–max) over rounds',
       'smallest failing size: why'], rows)
  print(table, flush=True)
  if _WRITE.value:
    config = _Config(cap)
    config.update({
        'cap applies to': 'each worker process; the client is not capped',
        'pipeline': f'PipeliningLayer, K={k} cells on {k} workers, M={m}, '
                    f'executor {_EXECUTOR.value}; a schedule other than gpipe '
                    'computes the loss inside the pipeline (FPropLoss)',
        'timing': f'{_TIMING_ROUNDS.value} rounds, the schedules alternating, '
                  f'each a fresh probe at {common_size} layers on capped '
                  'workers, its best of 3 measured steps',
    })
    command = _ComparisonCommand(
        f'--num_workers={k} --num_micro_batches={m}',
        f'--schedules={",".join(_SCHEDULES.value)}',
        f'--capacities={",".join(_CAPACITIES.value)}'
        if _CAPACITIES.value else '')
    path = common.WriteResults(
        'memory_schedules.md', 'Capacity and step time by schedule on '
        'capped workers', command, facts, config, table)
    print(f'wrote {path}', flush=True)


def _Timed(size: int, extra: Sequence[str]) -> float:
  """Best of 3 steps at `size`, uncapped, oneDNN on (its bfloat16 kernels)."""
  env = dict(_ProbeEnv(), TF_ENABLE_ONEDNN_OPTS='1')
  code, stdout, stderr, stopped = _RunClient(
      _StepCommand(size, [*extra, '--repeats=3']), env, [])
  if code or stopped:
    raise RuntimeError(f'Timing probe failed ({stopped or code}): '
                       f'{stderr[-1000:]}')
  return json.loads(stdout.strip().splitlines()[-1])['step_seconds']


def Precisions(cap: int, facts: dict) -> None:
  """Capacity per compute dtype under the one-device cap, then step times."""
  dtypes = _FPROP_DTYPES.value
  configs = [('without GPipe', '-', ['--plain'])] + [
      ('GPipe K=1, recompute', m, _GPipeFlags(m))
      for m in _MICRO_BATCHES.value]
  sizes = {}
  for dtype in dtypes:
    for name, m, flags_ in configs:
      size, result, why = _LargestFitting(
          cap, [*flags_, f'--fprop_dtype={dtype}'])
      sizes[dtype, name, m] = (size, result, why)
      print(f'{dtype} {name} M={m}: {size} layers', flush=True)
  first = dtypes[0]
  rows = []
  for name, m, _ in configs:
    for dtype in dtypes:
      size, result, why = sizes[dtype, name, m]
      rows.append((name, m, dtype, size,
                   f'{size / max(sizes[first, name, m][0], 1):.2f}×',
                   f'{result["peak_total_bytes"] / 2**20:.0f}' if result
                   else '-', why or f'none up to {_MAX_SIZE.value}'))
  table = common.MarkdownTable(
      ['config', 'M', 'fprop_dtype', 'max layers', f'÷ {first}',
       'peak MB (total)', 'smallest failing size: why'], rows)
  print(table, flush=True)
  # Time the GPipe step (the first M) at the size every dtype fits.
  name, m, flags_ = configs[1] if len(configs) > 1 else configs[0]
  size = _TIMING_SIZE.value or min(sizes[d, name, m][0] for d in dtypes)
  times = {d: [] for d in dtypes}
  for round_index in range(_TIMING_ROUNDS.value):
    for dtype in dtypes:
      times[dtype].append(_Timed(size, [*flags_, f'--fprop_dtype={dtype}']))
    print(f'round {round_index}: ' + ', '.join(
        f'{d} {t[-1]:.2f} s' for d, t in times.items()), flush=True)
  timing = common.MarkdownTable(
      ['fprop_dtype', f'step s at {size} layers (median)',
       f'step ÷ {first}\'s, median (min–max) over rounds'],
      [(d, f'{sorted(times[d])[len(times[d]) // 2]:.2f}',
        '{:.2f}× ({:.2f}–{:.2f})'.format(*common.Spread(
            [t / b for t, b in zip(times[d], times[first])])))
       for d in dtypes])
  print(timing, flush=True)
  if _WRITE.value:
    config = _Config(cap)
    config.update({
        'compute dtypes': f'{", ".join(dtypes)} (PipeliningLayer.fprop_dtype;'
                          ' variables, gradients and the loss float32)',
        'timing': f'{name}, M={m}, {size} layers: {_TIMING_ROUNDS.value} '
                  'rounds, the dtypes alternating, each a fresh uncapped '
                  'process with oneDNN on, its best of 3 measured steps',
    })
    command = _ComparisonCommand(
        f'--fprop_dtypes={",".join(dtypes)}',
        f'--num_micro_batches={",".join(_MICRO_BATCHES.value)}')
    path = common.WriteResults(
        'memory_precision.md', 'Capacity and step time by compute dtype',
        command, facts, config, table + '\n\n' + timing)
    print(f'wrote {path}', flush=True)


def main(argv):
  del argv
  facts = common.MachineFacts()
  cap = _CAP_MB.value or _Calibrate()
  print(f'cap: {cap} MB', flush=True)
  if _FPROP_DTYPES.value:
    Precisions(cap, facts)
  elif _SCHEDULES.value:
    Schedules(cap, facts)
  elif _NUM_WORKERS.value:
    PipelineK(cap, facts)
  else:
    OneDevice(cap, facts)


if __name__ == '__main__':
  app.run(main)
