"""Tests of graph_optimization: each mode runs the Grappler passes it says, the same numbers."""

import os
import re
import subprocess
import sys
import threading

import pytest
import tensorflow as tf

from lingvo_gpipe.core import graph_optimization

# Each mode in turn on one traced step, in a process of its own: Grappler
# logs each pass it runs (meta_optimizer at verbosity 1).
_SCRIPT = r'''
import sys
import tensorflow as tf
from lingvo_gpipe.core import graph_optimization

for mode in ('full', 'lean', 'off'):
  graph_optimization.Configure(mode)

  @tf.function
  def Step(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = tf.reduce_sum(tf.tanh(tf.matmul(x, x) + 1.0) * tf.identity(x))
    return y, tape.gradient(y, x)

  print(f'=== {mode}', file=sys.stderr, flush=True)
  loss, _ = Step(tf.ones([4, 4]))
  print(f'=== {mode} done {float(loss)!r}', file=sys.stderr, flush=True)
'''


@pytest.fixture(scope='module')
def passes_by_mode():
  """{mode: [the Grappler passes that ran on the step]}, and the losses."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='0',
             TF_CPP_VMODULE='meta_optimizer=1')
  result = subprocess.run([sys.executable, '-c', _SCRIPT], env=env,
                          capture_output=True, text=True, timeout=240,
                          check=True)
  passes, losses = {}, {}
  for mode, block, loss in re.findall(r'=== (\w+)\n(.*?)=== \1 done (\S+)',
                                      result.stderr, flags=re.S):
    passes[mode] = re.findall(r'meta_optimizer\.cc:\d+\] (\w+)', block)
    losses[mode] = loss
  assert set(passes) == {'full', 'lean', 'off'}, result.stderr[-3000:]
  return passes, losses


def test_full_runs_tensorflows_two_rounds(passes_by_mode):
  passes, _ = passes_by_mode
  assert passes['full'].count('model_pruner') == 2
  assert passes['full'].count('constant_folding') == 2
  assert 'layout' in passes['full']


def test_lean_runs_each_pass_once_and_no_layout_optimizer_without_a_gpu(
    passes_by_mode):
  passes, _ = passes_by_mode
  assert not tf.config.list_physical_devices('GPU')
  for name in ('model_pruner', 'common_subgraph_elimination',
               'constant_folding', 'arithmetic_optimizer', 'remapper',
               'dependency_optimizer', 'memory_optimizer'):
    assert passes['lean'].count(name) == 1, (name, passes['lean'])
  assert 'layout' not in passes['lean']


def test_off_runs_no_pass_and_every_mode_computes_the_same(passes_by_mode):
  passes, losses = passes_by_mode
  assert passes['off'] == []
  assert losses['full'] == losses['lean'] == losses['off']


def test_the_mode_reaches_function_calls_on_other_threads():
  seen = []
  try:
    graph_optimization.Configure('lean')
    assert graph_optimization.Current() == 'lean'
    thread = threading.Thread(
        target=lambda: seen.append(graph_optimization.Current()))
    thread.start()
    thread.join()
    graph_optimization.Configure('off')
    assert graph_optimization.Current() == 'off'
  finally:
    graph_optimization.Configure('full')
  assert seen == ['lean']
  assert graph_optimization.Current() == 'full'


@pytest.mark.parametrize('mode,message', [
    ('leen', "Unknown graph optimization 'leen'; valid: lean, full, off; did "
             "you mean 'lean'?"),
    ('false', "Unknown graph optimization 'false'; valid: lean, full, off "
              "(graph optimization off is 'off')"),
    (True, "Unknown graph optimization True; valid: lean, full, off (it was a "
           "bool: use 'full')"),
])
def test_an_unknown_mode_is_refused_by_name(mode, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    graph_optimization.Configure(mode)
