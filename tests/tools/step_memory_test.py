"""step_memory --worker_hosts: the cells run on the workers, the client holds only the input.

bench/memory.py's Pipeline-K columns cap each worker and not the client, so
they are right only if no weight, activation or gradient stays in the client.
"""

import json
import os
import subprocess
import sys

import pytest

from lingvo_gpipe.core import local_processes

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.heavy  # about 20 s: three TensorFlow processes start
@pytest.mark.parametrize('executor,recompute,schedule', [
    ('unrolled', 'always', 'gpipe'), ('loop', 'always', 'gpipe'),
    ('loop', 'never', 'gpipe'), ('unrolled', 'always', 'zero_bubble_h1'),
    ('unrolled', 'never', 'interleaved_1f1b')])
def test_cells_on_two_workers_leave_the_client_only_the_input(
    executor, recompute, schedule):
  # The loop executor once read the weights before its loops, and a tensor
  # a loop captures enters it on the loop's device: the client held every
  # weight and sent it to the workers at every clock. Kept activations
  # (recompute never) stay on their cell's worker too, as do the delayed
  # weight gradients of ZB-H1 and the two cells per worker of the
  # interleaved schedule.
  interleaved = schedule == 'interleaved_1f1b'
  schedule_flags = [] if schedule == 'gpipe' else [
      f'--schedule={schedule}', '--loss_inside_pipeline',
      f'--cells_per_device={2 if interleaved else 1}']
  hosts, workers = local_processes.StartLocalWorkers(2)
  try:
    # 4 Dense(1024): 16 MiB of weights, 16 MiB of gradients; the input is
    # 64 x 1024 floats, 0.25 MiB (sending it costs the client a few copies).
    out = subprocess.run(
        [sys.executable, '-m', 'lingvo_gpipe.tools.step_memory',
         '--stack=dense', '--num_layers=4', '--dim=1024', '--batch=64',
         '--num_micro_batches=2', f'--worker_hosts={",".join(hosts)}',
         f'--executor={executor}', f'--recompute={recompute}',
         *schedule_flags],
        cwd=_REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2',
                            PYTHONPATH=_REPO),
        capture_output=True, text=True, timeout=120, check=False)
  finally:
    local_processes.StopAll(workers)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['num_partitions'] == 2 and result['num_workers'] == 2
  assert result['num_cells'] == (4 if interleaved else 2)
  assert result['peak_total_bytes'] < 4 * 2**20, result
