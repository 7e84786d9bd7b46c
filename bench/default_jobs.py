r"""How long the default jobs take through the trainer binary, and what they reach.

  python -m bench.default_jobs --write_results

Runs each job as a user would (`python -m lingvo_gpipe.trainer ...
--mode=train_and_eval`, registered config unchanged) in a fresh process and
records the wall time of the whole command (import, tracing, training and
every evaluation), the first step (mostly tracing), the executor the
trainer's executor trial kept (DIR/executor_trial.txt; 'none' if no trial
ran), and every evaluation's metric at its step, read back from the run's
event files. The goals
(issue 6): AmoebaNetTiny at least 97% digits test accuracy within 10
minutes on 2 cores; TransformerTiny at least 95% sequence accuracy.
"""

from __future__ import annotations

import os
import re
import tempfile
import time

from absl import app
from absl import flags

from bench import common
from lingvo_gpipe import logdir as logdir_lib
from lingvo_gpipe.core import summary
from tests.support import binaries

JOBS = (
    ('image.digits.AmoebaNetTiny', 'top1_accuracy', 0.97),
    ('mt.synthetic.TransformerTiny', 'sequence_accuracy', 0.95),
)

_WRITE = flags.DEFINE_bool('write_results', False,
                           'Write bench/results/default_jobs.md.')


def RunJob(model: str, logdir: str) -> tuple[float, float, str]:
  """(wall seconds, first step seconds, stderr) of one train_and_eval run."""
  start = time.time()
  result = binaries.Run(binaries.TRAINER, f'--model={model}',
                        f'--logdir={logdir}', '--mode=train_and_eval',
                        timeout=None)
  wall = time.time() - start
  if result.returncode != 0:
    raise RuntimeError(f'{model} failed ({result.returncode}): '
                       f'{result.stderr[-2000:]}')
  first = re.search(r'Step \d+ took ([\d.]+) s', result.stderr)
  return wall, float(first.group(1)) if first else float('nan'), result.stderr


def _TrialKept(logdir: str) -> str:
  """The executor the run's executor trial kept, from DIR/executor_trial.txt."""
  try:
    with open(os.path.join(logdir, logdir_lib.TRIAL_FILE),
              encoding='utf-8') as f:
      return f.readline().split(': ', 1)[1].strip()
  except FileNotFoundError:
    return 'none'


def main(argv):
  del argv
  facts = common.MachineFacts()
  rows = []
  for model, metric, goal in JOBS:
    with tempfile.TemporaryDirectory() as logdir:
      wall, first, _ = RunJob(model, logdir)
      evals = summary.ReadEvents(os.path.join(logdir, 'eval_test'))[metric]
      kept = _TrialKept(logdir)
    curve = ', '.join(f'{step}: {value:.4f}' for step, value in evals)
    final_step, final = evals[-1]
    rows.append([model, f'{wall / 60:.1f} min', f'{first:.0f} s', kept,
                 final_step,
                 f'{metric} {final:.4f}', f'≥ {goal}', 'met' if final >= goal
                 else 'NOT met', curve])
    print(f'{model}: {wall:.0f} s, {metric} {final:.4f} at step {final_step}',
          flush=True)
  body = common.MarkdownTable(
      ['model', 'wall time (whole command)', 'first step (tracing)',
       'executor after the trial', 'final step', 'final eval', 'goal', 'result', 'eval at each checkpoint'],
      rows)
  print(body)
  if _WRITE.value:
    path = common.WriteResults(
        'default_jobs.md', 'Default jobs through the trainer binary',
        'python -m bench.default_jobs --write_results', facts,
        {'jobs': ', '.join(m for m, _, _ in JOBS),
         'mode': 'train_and_eval, registered configs unchanged'}, body)
    print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
