"""A real TensorBoard over a finished run shows what README promises.

Trains a narrow AmoebaNet on digits for two steps through the trainer binary,
starts `tensorboard` on a free loopback port, and reads back through its HTTP
data API the train scalars, the eval accuracy, the params text and the
pipeline schedule image. The server is stopped at the end, also on failure.
"""

import contextlib
import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.core import local_processes
from lingvo_gpipe.core import summary
from lingvo_gpipe.core.gpipe import schedule as schedule_lib
from tests.support import binaries

_STARTUP_SECS = 120


@contextlib.contextmanager
def _TensorBoard(logdir):
  port = local_processes.FreePorts(1)[0]
  process = binaries.Start(
      'tensorboard.main', f'--logdir={logdir}', '--host=127.0.0.1',
      f'--port={port}', '--reload_interval=1', stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE)
  try:
    yield f'http://127.0.0.1:{port}', process
  finally:
    process.terminate()
    try:
      process.wait(timeout=20)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait(timeout=20)


def _Get(base, path, **query):
  url = f'{base}/{path}' + (f'?{urllib.parse.urlencode(query)}' if query else '')
  with urllib.request.urlopen(url, timeout=30) as response:
    return response.read()


def _Json(base, path, **query):
  return json.loads(_Get(base, path, **query))


def _WaitForRuns(base, process, runs):
  """Polls until TensorBoard serves scalars of every run in `runs`."""
  deadline = time.time() + _STARTUP_SECS
  while True:
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    try:
      tags = _Json(base, 'data/plugin/scalars/tags')
      if all(run in tags for run in runs):
        return tags
    except (urllib.error.URLError, ConnectionError):
      pass
    assert time.time() < deadline, 'TensorBoard did not serve the runs in time'
    time.sleep(0.5)


@pytest.fixture(scope='module')
def logdir(tmp_path_factory):
  logdir = tmp_path_factory.mktemp('tb_run')
  result = binaries.Run(
      binaries.TRAINER, '--model=image.digits.AmoebaNetTiny',
      f'--logdir={logdir}', '--mode=train_and_eval', '--max_steps=2',
      '--num_micro_batches=2',
      '--params_override=task.network.num_filters=4; input.batch_size=8; '
      'train.save_interval_steps=2; train.log_interval_steps=1; '
      'train.eval_max_batches=2', timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return logdir


@pytest.mark.heavy
def test_tensorboard_serves_scalars_eval_text_and_schedule(logdir):
  with _TensorBoard(logdir) as (base, process):
    tags = _WaitForRuns(base, process, ['train', 'eval_test'])
    for tag in ('loss', 'learning_rate', 'grad_norm', 'examples_per_sec',
                'step_time', 'memory/process_peak_bytes'):
      assert tag in tags['train'], sorted(tags['train'])
    loss = _Json(base, 'data/plugin/scalars/scalars', run='train', tag='loss')
    assert [step for _, step, _ in loss] == [1, 2]
    assert all(np.isfinite(value) and value > 0 for _, _, value in loss)
    rate = _Json(base, 'data/plugin/scalars/scalars', run='train',
                 tag='learning_rate')
    assert rate[-1][2] == pytest.approx(0.003)

    accuracy = _Json(base, 'data/plugin/scalars/scalars', run='eval_test',
                     tag='top1_accuracy')
    assert [step for _, step, _ in accuracy] == [2]
    assert 0.0 <= accuracy[0][2] <= 1.0

    texts = _Json(base, 'data/plugin/text/tags')['train']
    assert 'params' in texts and 'pipeline/schedule_table' in texts
    params = _Json(base, 'data/plugin/text/text', run='train', tag='params')
    assert 'task.network.num_filters : 4' in params[0]['text']
    assert 'train.max_steps : 2' in params[0]['text']
    report = [t for t in texts if t.startswith('pipeline/report/')]
    assert report, texts

    images = _Json(base, 'data/plugin/images/tags')
    assert 'pipeline/schedule' in images['train']
    assert 'pipeline/schedule_measured' in images['train']
    entries = _Json(base, 'data/plugin/images/images', run='train',
                    tag='pipeline/schedule', sample=0)
    png = _Get(base, 'data/plugin/images/individualImage?' + entries[0]['query'])
    picture = tf.io.decode_png(png, channels=3).numpy()
    # K=2 cells, M=2 micro-batches: the fill-drain picture, bubbles and all.
    np.testing.assert_array_equal(
        picture, summary.ScheduleImage(schedule_lib.FillDrain(2, 2)))
  assert process.poll() is not None  # stopped
