r"""Graph-build cost of the pipeline as K·M grows: trace, first step, steady step.

The pipeline unrolls its fill-drain schedule into the traced graph: K cells
times M micro-batches of forward, recomputation and gradient ops. This
measures what that costs on a small stack (compute is negligible, so graph
size dominates): K=4 cells on 4 logical CPU devices, M in --micro_batches.
--stack=dense (default) is --num_layers × Dense(--dim); --stack=transformer
the narrow Transformer LM that `lingvo_gpipe.tools.step_memory` trains
(`lingvo_gpipe.tools.stacks`: embedding, --num_layers causal blocks of
d_model --dim, untied softmax; --seq_len tokens, cross-entropy loss).
--executor takes a list: with unrolled,loop every M is measured with both,
in alternating order (and --rounds repeats the sweep), and the table adds
the ratios of the two. `trial` is 'auto' run by the trainer's executor trial
(core/gpipe/executor_trial.py): its trace and first step are the loop's,
then the trial runs to its decision (a note says what it kept, in how many
steps and seconds), and its steady step is the kept graph's.
Each point runs in a process of its own (fresh TensorFlow, no cached traces or
kernels), recording
  trace         `get_concrete_function` of the training step (autograph,
                Python graph building, the custom gradient's backward);
  first step    the first call (Grappler, partitioning across devices,
                executor creation) plus one run;
  ops           `len(concrete_function.graph.get_operations())`;
  steady step   median wall and CPU time of later steps;
  peak RSS      the point's process's resident-set high-water mark
                (`resource.getrusage` ru_maxrss) after its last step.
A plain row (the same cells in sequence under one tape, no pipeline) gives
the floor.

  python -m bench.graph_build --write_results
  python -m bench.graph_build --stack=transformer --num_layers=16 --dim=32 \
      --seq_len=8 --batch=64 --micro_batches=8,32 --executor=unrolled,loop \
      --write_results
  python -m bench.graph_build --num_layers=16 --dim=64 --batch=64 \
      --micro_batches=8,64 --executor=unrolled,trial --rounds=2 \
      --write_results --results_file=graph_build_trial_dense_d64.md
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from bench import tf_setup

tf_setup.Setup()  # before TensorFlow loads: log noise, TensorFlow's own allocator

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import tensorflow as tf

from bench import common
from lingvo_gpipe.core import graph_optimization
from lingvo_gpipe.core.gpipe import executor_trial
from lingvo_gpipe.core.gpipe import pipeline
from lingvo_gpipe.core.gpipe import placement
from lingvo_gpipe.core.gpipe import recompute
from lingvo_gpipe.tools import stacks

_NUM_PARTITIONS = flags.DEFINE_integer('num_partitions', 4, 'K cells, each on '
                                       'its own logical CPU device.')
_MICRO_BATCHES = flags.DEFINE_list('micro_batches', '1,2,4,8,16,32,64',
                                   'Values of M, one point (process) each.')
_STACK = flags.DEFINE_enum('stack', 'dense',
                           ['dense', 'transformer', 'amoebanet'],
                           'dense: Dense(dim) relu layers on random vectors; '
                           'transformer: the Transformer LM of step_memory '
                           '--stack=transformer on random token ids; '
                           'amoebanet: AmoebaNet-D with num_layers normal '
                           'cells and dim filters on random image_size '
                           'images (run from the repository root).')
_NUM_LAYERS = flags.DEFINE_integer('num_layers', 8, 'Dense layers, or '
                                   'Transformer blocks.')
_DIM = flags.DEFINE_integer('dim', 256, 'Width of every layer (d_model; '
                            'd_ff = 4 d_model).')
_BATCH = flags.DEFINE_integer('batch', 256, 'Mini-batch size (sequences for '
                              'transformer).')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 8, 'transformer: tokens per '
                                'sequence.')
_NUM_HEADS = flags.DEFINE_integer('num_heads', 4, 'transformer: heads.')
_VOCAB = flags.DEFINE_integer('vocab_size', 2048, 'transformer: vocabulary.')
_STACK_LAYERS = flags.DEFINE_bool('stack_layers', False, 'transformer: the '
                                  'blocks as one Repeat layer (stacked '
                                  'weights) instead of listed.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 32, 'amoebanet: image side '
                                   '(the small-image stem).')
_RECOMPUTE = flags.DEFINE_enum('recompute', 'always',
                               list(recompute.RECOMPUTE_MODES),
                               'Re-materialization mode.')
# The executors a point can measure: the pipeline's, and the trainer's
# executor trial (core/gpipe/executor_trial.py) over 'auto'.
EXECUTORS = pipeline.EXECUTORS + ('trial',)
_EXECUTOR = flags.DEFINE_list(
    'executor', ['unrolled'], "The pipeline's executors, comma-separated, of "
    f'{", ".join(EXECUTORS)} (loop: a graph that does not grow with M; '
    "trial: 'auto' through the trainer's executor trial, its trace and first "
    'step the loop\'s, its steady step the kept graph\'s after the trial); '
    'with more than one, each M is measured with each, in alternating order.')
flags.register_validator(
    'executor', lambda v: bool(v) and set(v) <= set(EXECUTORS),
    f'--executor takes a list of {", ".join(EXECUTORS)}.')
_TRIAL_STEPS = flags.DEFINE_integer('trial_steps', 20, 'trial: timed steps '
                                    'per executor (the trainer\'s '
                                    'train.executor_trial_steps).')
_ROUNDS = flags.DEFINE_integer('rounds', 1, 'Sweeps over the pipelined '
                               'points, the order of the executors flipped '
                               'every point and round; the table gives '
                               'medians over rounds.')
_STEADY_STEPS = flags.DEFINE_integer('steady_steps', 10, 'Measured steps after '
                                     'the warm-up steps.')
_WARMUP_STEPS = flags.DEFINE_integer('warmup_steps', 2, 'Steps after the '
                                     'first and before the measured ones.')
_INLINE_BODY = flags.DEFINE_bool('inline_body', True, 'transformer, '
                                  "--stack_layers: the Repeat's inline_body.")
_GRAPH_OPTIMIZATION = flags.DEFINE_enum(
    'graph_optimization', 'lean', graph_optimization.MODES,
    "TensorFlow's graph optimizer (Grappler) on the traced step, as the "
    "trainer's train.graph_optimization (core/graph_optimization.py).")
_TIMEOUT = flags.DEFINE_integer('timeout', 300, 'Seconds allowed per point; '
                                'a point that takes longer is recorded as '
                                'not finished.')
_WRITE_RESULTS = flags.DEFINE_bool('write_results', False, 'Write the table '
                                   'to bench/results/ (see --results_file).')
_RESULTS_FILE = flags.DEFINE_string(
    'results_file', None, 'File name under bench/results/; default '
    'graph_build[_<stack>][_<executor>].md (the executor if only one and not '
    'unrolled; _executors for a dense stack with several).')
_POINT = flags.DEFINE_integer('point', None, 'Internal: measure one point in '
                              'this process (M, or 0 for plain) and print '
                              'one JSON line.')

# Flags a point's process inherits from the driver.
_SHARED_FLAGS = (_STACK, _NUM_PARTITIONS, _NUM_LAYERS, _DIM, _BATCH, _SEQ_LEN,
                 _NUM_HEADS, _VOCAB, _STACK_LAYERS, _IMAGE_SIZE, _RECOMPUTE,
                 _STEADY_STEPS, _WARMUP_STEPS, _GRAPH_OPTIMIZATION,
                 _INLINE_BODY, _TRIAL_STEPS)


def _Stack() -> stacks.Stack:
  if _STACK.value == 'amoebanet':
    return stacks.AmoebaNetStack(_NUM_LAYERS.value, _DIM.value, _BATCH.value,
                                 _IMAGE_SIZE.value)
  if _STACK.value == 'transformer':
    return stacks.TransformerStack(_NUM_LAYERS.value, _DIM.value,
                                   _BATCH.value, _SEQ_LEN.value,
                                   _NUM_HEADS.value, _VOCAB.value,
                                   stacked=_STACK_LAYERS.value,
                                   inline_body=_INLINE_BODY.value)
  return stacks.DenseStack(_NUM_LAYERS.value, _DIM.value, _BATCH.value)


def MeasurePoint(m: int, executor: str) -> dict:
  """One point in this process; m=0 runs the plain stack."""
  k = _NUM_PARTITIONS.value
  devices = placement.SplitCpu(k)  # before any op runs
  graph_optimization.Configure(_GRAPH_OPTIMIZATION.value)
  start = time.perf_counter()
  layers, x, loss_fn = _Stack()
  trial = executor == 'trial'
  model = common.BuildPipeline(layers, k, max(m, 1), _RECOMPUTE.value, devices,
                               executor='auto' if trial else executor)
  build = time.perf_counter() - start
  step = common.TrainStep(model, plain=(m == 0), loss_fn=loss_fn)
  if trial:
    step = executor_trial.ExecutorTrial(step.python_function,
                                        _TRIAL_STEPS.value)

  wall, cpu = time.perf_counter(), time.process_time()
  graph = (step.Trace(x) if trial else step.get_concrete_function(x)).graph
  trace = (time.perf_counter() - wall, time.process_time() - cpu)
  first = common.RunOnce(step, x)
  extra = {}
  if trial:  # to the trial's decision
    wall, calls = time.perf_counter(), 0
    while step.trying:
      common.RunOnce(step, x)
      calls += 1
    decision = step.decision
    extra = dict(trial_steps=calls, trial_seconds=time.perf_counter() - wall,
                 kept=decision.executor if decision else 'no trial',
                 unrolled_build_seconds=(decision.unrolled_build if decision
                                         else 0.0))
  for _ in range(_WARMUP_STEPS.value):
    common.RunOnce(step, x)
  steady = [common.RunOnce(step, x) for _ in range(_STEADY_STEPS.value)]
  rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
  return dict(micro_batches=m, executor=executor if m else 'plain',
              ops=len(graph.get_operations()), peak_rss_mb=rss_kb / 1024,
              build_seconds=build,
              trace_seconds=trace[0], trace_cpu_seconds=trace[1],
              first_step_seconds=first[0], first_step_cpu_seconds=first[1],
              steady_wall_seconds=statistics.median(w for w, _ in steady),
              steady_cpu_seconds=statistics.median(c for _, c in steady),
              **extra)


def RunPoint(m: int, executor: str) -> dict:
  """Measures one point in a fresh process.

  A point that outlives --timeout is stopped and returned as
  {'micro_batches', 'executor', 'timeout_seconds'}.
  """
  argv = [sys.executable, '-m', 'bench.graph_build', f'--point={m}',
          f'--executor={executor}']
  argv += [f'--{f.name}={f.value}' for f in _SHARED_FLAGS]
  env = dict(os.environ, PYTHONPATH=common.REPO)
  try:
    out = subprocess.run(argv, cwd=common.REPO, env=env, capture_output=True,
                         text=True, timeout=_TIMEOUT.value)
  except subprocess.TimeoutExpired:
    return dict(micro_batches=m, executor=executor if m else 'plain',
                timeout_seconds=_TIMEOUT.value)
  if out.returncode:
    raise RuntimeError(f'Point M={m} ({executor}) exited with '
                       f'{out.returncode}:\n{out.stderr[-2000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


HEADER = ('M', 'executor', 'K·M', 'micro-batch', 'graph ops', 'trace s',
          'first step s', 'trace + first s', 'steady step ms', 'peak RSS MB')


def _Finished(r: dict) -> bool:
  return 'timeout_seconds' not in r


def _Median(results: list[dict], key: str) -> float:
  return statistics.median(r[key] for r in results)


def _Merge(results: list[dict]) -> dict:
  """One point's rounds: medians of the figures; not finished if any was not."""
  if not all(_Finished(r) for r in results):
    return next(r for r in results if not _Finished(r))
  merged = dict(results[0])
  for key, value in results[0].items():
    if key not in ('micro_batches', 'executor', 'ops') and isinstance(
        value, (int, float)):
      merged[key] = _Median(results, key)
  return merged


def _WallCpu(r: dict, key: str, scale: float = 1, fmt: str = '.2f') -> str:
  wall = r[f'{key}_seconds' if key != 'steady' else 'steady_wall_seconds']
  cpu = r[f'{key}_cpu_seconds']
  return f'{wall * scale:{fmt}} / {cpu * scale:{fmt}}'


def _Row(r: dict, k: int) -> list:
  m = r['micro_batches']
  head = [m or 'plain', r['executor'], k * m if m else '–',
          _BATCH.value // m if m else _BATCH.value]
  if not _Finished(r):
    return head + [f'did not finish in {r["timeout_seconds"] / 60:.0f} min'
                   ] + ['–'] * 5
  return head + [
      r['ops'], _WallCpu(r, 'trace'), _WallCpu(r, 'first_step'),
      f'{r["trace_seconds"] + r["first_step_seconds"]:.2f} / '
      f'{r["trace_cpu_seconds"] + r["first_step_cpu_seconds"]:.2f}',
      _WallCpu(r, 'steady', 1e3, '.1f'), f'{r["peak_rss_mb"]:.0f}']


def _GrowthNote(executor: str, piped: list[dict], k: int) -> str:
  """How graph ops and costs grow with M, for one executor's points."""
  piped = [r for r in piped if _Finished(r)]
  if len(piped) < 2:
    return ''
  if len({r['ops'] for r in piped}) == 1:
    return (f'{executor}: the graph has {piped[0]["ops"]} ops at every M: it '
            'does not grow with the micro-batches.')
  # Least-squares slopes over the pipelined points: cost per graph op.
  ops = [r['ops'] for r in piped]
  mean_ops = statistics.fmean(ops)
  var = sum((o - mean_ops) ** 2 for o in ops)

  def Slope(key):
    ys = [r[key] for r in piped]
    mean_y = statistics.fmean(ys)
    return sum((o - mean_ops) * (y - mean_y) for o, y in zip(ops, ys)) / var

  per_km = [(r['ops'] - piped[0]['ops']) / (k * (r['micro_batches'] -
                                                 piped[0]['micro_batches']))
            for r in piped[1:]]
  return (
      f'{executor}: graph ops grow by {statistics.median(per_km):.0f} per '
      f'cell micro-batch (K·M). Least-squares cost per graph op over the '
      f'pipelined points: trace {Slope("trace_cpu_seconds") * 1e6:.0f} µs '
      f'and first step {Slope("first_step_cpu_seconds") * 1e6:.0f} µs of '
      f'CPU, steady step {Slope("steady_wall_seconds") * 1e6:.1f} µs of '
      'wall time.')


def _TrialNote(points: list[dict]) -> str:
  """What the trial did at each M: its steps, their time, what it kept."""
  parts = []
  for r in points:
    if not _Finished(r):
      continue
    parts.append(
        f'M={r["micro_batches"]} kept {r["kept"]} after {r["trial_steps"]:.0f} '
        f'more steps in {r["trial_seconds"]:.1f} s (the unrolled graph\'s '
        f'build {r["unrolled_build_seconds"]:.1f} s of them)')
  return ('trial: its trace and first step are the loop\'s (graph ops: the '
          'loop\'s); it then runs the trial to its decision, and its steady '
          'step is the kept graph\'s: ' + '; '.join(parts) + '.')


def _RatioTable(rounds: list[dict], micro_batches: list[int],
                executors: list[str]) -> str:
  """Per M: the first executor's figures over the second's, per round."""
  a, b = executors[:2]
  rows = []
  for m in micro_batches:
    cells = [m]
    for key in ('steady_wall_seconds', 'steady_cpu_seconds', None):
      ratios = []
      for points in rounds:
        ra, rb = points[(m, a)], points[(m, b)]
        if not (_Finished(ra) and _Finished(rb)):
          continue
        if key is None:  # build: trace + first step, wall
          ratios.append((ra['trace_seconds'] + ra['first_step_seconds']) /
                        (rb['trace_seconds'] + rb['first_step_seconds']))
        else:
          ratios.append(ra[key] / rb[key])
      if not ratios:
        cells.append('–')
      elif len(ratios) == 1:
        cells.append(f'{ratios[0]:.2f}')
      else:
        cells.append(f'{statistics.median(ratios):.2f} '
                     f'({min(ratios):.2f}–{max(ratios):.2f})')
    rows.append(cells)
  return common.MarkdownTable(
      ['M', f'steady wall {a}/{b}', f'steady CPU {a}/{b}',
       f'build (trace + first, wall) {a}/{b}'], rows)


def _Model() -> str:
  if _STACK.value == 'amoebanet':
    return (f'AmoebaNet-D (lingvo_gpipe.tools.stacks.AmoebaNetStack): '
            f'{_NUM_LAYERS.value} normal cells, {_DIM.value} filters, the '
            f'small-image stem, {_IMAGE_SIZE.value}×{_IMAGE_SIZE.value} '
            f'random images of 10 classes, batch {_BATCH.value}, fp32')
  if _STACK.value == 'transformer':
    d = _DIM.value
    return (f'Transformer LM (lingvo_gpipe.tools.stacks.TransformerStack, as '
            f'step_memory --stack=transformer): embedding, {_NUM_LAYERS.value} '
            f'causal blocks of d_model {d}, d_ff {4 * d}, {_NUM_HEADS.value} '
            f'heads, untied softmax over {_VOCAB.value} ids; batch '
            f'{_BATCH.value} sequences of {_SEQ_LEN.value} tokens, fp32; '
            + ((f'the blocks stacked in one Repeat (inline_body='
                f'{_INLINE_BODY.value}); ') if _STACK_LAYERS.value else '') +
            f'{_NUM_LAYERS.value + 2} layers (units) for the partitioner')
  return (f'{_NUM_LAYERS.value} × Dense({_DIM.value}→{_DIM.value}, relu), '
          f'batch {_BATCH.value}, fp32')


def Run() -> tuple[str, dict]:
  k = _NUM_PARTITIONS.value
  executors = list(dict.fromkeys(_EXECUTOR.value))
  micro_batches = [int(m) for m in _MICRO_BATCHES.value]
  plain = RunPoint(0, executors[0])
  print(f'M=plain: {json.dumps(plain)}', flush=True)
  rounds = []  # per round: {(M, executor): result}
  flip = False
  for r in range(_ROUNDS.value):
    points = {}
    for m in micro_batches:
      for executor in (executors[::-1] if flip else executors):
        points[(m, executor)] = RunPoint(m, executor)
        print(f'round {r} M={m} {executor}: '
              f'{json.dumps(points[(m, executor)])}', flush=True)
      flip = not flip
    rounds.append(points)
  merged = {key: _Merge([points[key] for points in rounds])
            for key in rounds[0]}
  rows = [_Row(plain, k)]
  for m in micro_batches:
    rows += [_Row(merged[(m, e)], k) for e in executors]
  body = common.MarkdownTable(HEADER, rows)
  notes = [_GrowthNote(e, [merged[(m, e)] for m in micro_batches], k)
           for e in executors]
  body += ''.join(f'\n\n{n}' for n in notes if n)
  if 'trial' in executors:
    body += '\n\n' + _TrialNote([merged[(m, 'trial')] for m in micro_batches])
  builds = [(f'M={m} {e}', merged[(m, e)].get('build_seconds'))
            for m in micro_batches for e in executors]
  body += ('\n\nBefore the trace, building the layers (creating and '
           'initializing the variables on their devices) took: ' + ', '.join(
               f'{name} {b:.1f} s' for name, b in
               [('plain', plain.get('build_seconds'))] + builds
               if b is not None) + '.')
  body += ('\n\nCells show wall / CPU time (CPU: all threads of the point\'s '
           'process; tracing is single-threaded Python, so its CPU time stays '
           'near its unloaded wall time when other processes compete for the '
           'cores). Peak RSS: the point\'s process\'s ru_maxrss (TensorFlow '
           'runtime included; a plain process importing TensorFlow and '
           'running a tiny step is a few hundred MB).')
  if _ROUNDS.value > 1:
    body += (f' Pipelined rows: medians over {_ROUNDS.value} rounds.')
  if len(executors) >= 2:
    body += ('\n\n' + _RatioTable(rounds, micro_batches, executors) +
             f'\n\nRatios of {executors[0]} to {executors[1]} at each M, '
             'from points measured one after the other (their order '
             'alternating from M to M and round to round)' +
             (', median (min–max) over rounds.' if _ROUNDS.value > 1 else '.'))
  config = {
      'model': _Model(),
      'pipeline': f'K={k} cells on {k} logical CPU devices '
                  f'(placement.SplitCpu), recompute={_RECOMPUTE.value}, '
                  f'executor={", ".join(executors)}',
      'graph optimization (Grappler)': _GRAPH_OPTIMIZATION.value,
      'step': 'tf.function: plain GradientTape around the model, loss = '
              + ('average cross-entropy (transformer.XentLoss)'
                 if _STACK.value == 'transformer' else 'mean(y²)') +
              ', gradients of all variables',
      'per point': 'its own process; trace = get_concrete_function; first '
                   'step = first call; steady = median of '
                   f'{_STEADY_STEPS.value} steps after '
                   f'{_WARMUP_STEPS.value} warm-up steps; '
                   f'timeout {_TIMEOUT.value} s',
      'load average at end (1, 5, 15 min)': common.LoadAverage(),
  }
  return body, config


def _ResultsFile() -> str:
  if _RESULTS_FILE.value:
    return _RESULTS_FILE.value
  executors = list(dict.fromkeys(_EXECUTOR.value))
  name = 'graph_build' + ('' if _STACK.value == 'dense' else
                          f'_{_STACK.value}')
  if len(executors) == 1 and executors[0] != 'unrolled':
    name += f'_{executors[0]}'
  elif len(executors) > 1 and _STACK.value == 'dense':
    name += '_executors'
  return name + '.md'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _POINT.value is not None:
    print(json.dumps(MeasurePoint(_POINT.value, _EXECUTOR.value[0])))
    return
  facts = common.MachineFacts()
  body, config = Run()
  print(body)
  if _WRITE_RESULTS.value:
    command = 'python -m bench.graph_build ' + ' '.join(sys.argv[1:])
    path = common.WriteResults(
        _ResultsFile(), f'Graph build and step time as K·M grows, '
        f'{_STACK.value} stack, executor {", ".join(_EXECUTOR.value)}',
        command, facts, config, body)
    print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
