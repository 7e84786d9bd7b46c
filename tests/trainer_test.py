"""The trainer binary end to end, in subprocesses, on the toy model.

A few steps write params.txt, checkpoints and summaries; a second run resumes;
a run killed mid-way loses no completed checkpoint; eval mode evaluates each
checkpoint once; every bad input gets its message and exit status.
"""

import os
import signal
import subprocess
import time

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe.run_errors import ExitStatus
from lingvo_gpipe.core import checkpoint as checkpoint_lib
from lingvo_gpipe.core import summary
from tests.support import binaries

_TOY = 'example.toy.ToyRegression'
_FAST = ('train.save_interval_steps=3; train.log_interval_steps=2; '
         'train.summary_interval_steps=2')


def _Run(*flags, timeout=240, **env):
  return binaries.Run(binaries.TRAINER, *flags, timeout=timeout, **env)


def _Train(logdir, *flags):
  result = _Run(f'--model={_TOY}', f'--logdir={logdir}', *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _CheckpointSteps(logdir):
  state = tf.train.get_checkpoint_state(checkpoint_lib.Directory(str(logdir)))
  return [checkpoint_lib.StepOf(p) for p in state.all_model_checkpoint_paths]


# Without Grappler, which no other test of the binary turns off; the run
# that resumes from its checkpoints has the default ('lean').
_FIXTURE_OVERRIDES = _FAST + '; train.graph_optimization=off'


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A finished 6-step train_and_eval run of the toy model."""
  logdir = tmp_path_factory.mktemp('run')
  result = _Train(logdir, '--mode=train_and_eval', '--max_steps=6',
                  f'--params_override={_FIXTURE_OVERRIDES}')
  return logdir, result


def test_train_writes_params_checkpoints_and_summaries(trained):
  logdir, result = trained
  printed = _Run(f'--model={_TOY}', '--max_steps=6',
                 f'--params_override={_FIXTURE_OVERRIDES}', '--print_params')
  assert printed.returncode == 0
  assert (logdir / 'params.txt').read_text() == printed.stdout
  assert _CheckpointSteps(logdir) == [3, 6]
  assert 'step 6/6  loss' in result.stderr and 'ETA' in result.stderr
  assert 'Graph optimization (Grappler): off' in result.stderr
  train = summary.ReadEvents(logdir / 'train')
  for tag in ('loss', 'learning_rate', 'grad_norm', 'examples_per_sec',
              'step_time', 'metrics/mse', 'memory/process_peak_bytes'):
    assert [step for step, _ in train[tag]] == [2, 4, 6], tag
  assert all(np.isfinite(v) and v > 0 for _, v in train['loss'])
  assert train['learning_rate'][0][1] == pytest.approx(0.01)
  assert train['memory/process_peak_bytes'][0][1] > 0
  assert b'task.network.pipeline.num_partitions : 2' in train['params'][0][1]
  report = [tag for tag in train if tag.startswith('pipeline/report/')]
  assert len(report) == 1 and b'fc1..out' in train[report[0]][0][1]
  assert 'pipeline/schedule' in train
  # The second step is profiled: the schedule as it ran, and its bubble.
  assert [step for step, _ in train['pipeline/schedule_measured']] == [2]
  [(step, bubble)] = train['pipeline/measured_bubble']
  assert step == 2 and 0.0 <= bubble < 1.0
  evals = summary.ReadEvents(logdir / 'eval_test')
  assert [step for step, _ in evals['mse']] == [3, 6]
  assert evals['mse'][1][1] < evals['mse'][0][1] * 2  # a real, finite number
  assert (logdir / 'eval_test' / 'last_evaluated').read_text() == 'ckpt-6\n'


def test_a_second_run_resumes_at_the_saved_step(trained, tmp_path):
  logdir, _ = trained
  resumed = tmp_path / 'resumed'
  subprocess.run(['cp', '-r', str(logdir), str(resumed)], check=True)
  result = _Train(resumed, '--max_steps=9', f'--params_override={_FAST}')
  assert 'Restored checkpoint' in result.stderr
  assert 'from step 6 to 9' in result.stderr
  assert _CheckpointSteps(resumed) == [3, 6, 9]
  # The resumed run's first logged step is 8: it did not start over.
  assert 'step 2/9' not in result.stderr and 'step 8/9' in result.stderr


def test_eval_mode_evaluates_each_checkpoint_once(trained, tmp_path):
  logdir, _ = trained
  fresh = tmp_path / 'eval'
  subprocess.run(['cp', '-r', str(logdir), str(fresh)], check=True)
  subprocess.run(['rm', '-r', str(fresh / 'eval_test')], check=True)
  flags = (f'--model={_TOY}', f'--logdir={fresh}', '--mode=eval',
           '--max_steps=6', f'--params_override={_FAST}',
           '--eval_timeout_secs=2')
  first = _Run(*flags)
  assert first.returncode == 0, first.stderr[-3000:]
  evals = summary.ReadEvents(fresh / 'eval_test')
  # The newest checkpoint (at max_steps) is evaluated and the evaluator stops.
  assert [step for step, _ in evals['mse']] == [6]
  second = _Run(*flags)
  assert second.returncode == 0
  assert 'Eval test' not in second.stderr
  assert [step for step, _ in summary.ReadEvents(fresh / 'eval_test')['mse']] == [6]


def test_a_kill_mid_run_loses_no_completed_checkpoint(tmp_path):
  logdir = tmp_path / 'killed'
  process = binaries.Start(
      binaries.TRAINER, f'--model={_TOY}', f'--logdir={logdir}',
      '--max_steps=1000000', '--params_override=train.save_interval_steps=5; '
      'train.log_interval_steps=100000; train.max_checkpoints_to_keep=3',
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 180
    state_file = os.path.join(checkpoint_lib.Directory(str(logdir)), 'checkpoint')
    while not os.path.exists(state_file) or max(_CheckpointSteps(logdir)) < 40:
      assert process.poll() is None, 'the trainer exited early'
      assert time.time() < deadline, 'no checkpoint past step 40 in time'
      time.sleep(0.05)
  finally:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
  listed = _CheckpointSteps(logdir)
  on_disk = [checkpoint_lib.StepOf(p) for p in checkpoint_lib.ListCheckpoints(
      checkpoint_lib.Directory(str(logdir)))]
  # TensorFlow writes a checkpoint's files, then lists it in the index, then
  # deletes the one it displaces (max_checkpoints_to_keep=3): a kill in
  # between leaves the newest on disk but not yet listed, or 4 listed, the
  # oldest possibly half deleted. The 3 newest listed are always complete.
  assert len(listed) in (3, 4) and listed == sorted(listed)
  assert set(listed[-3:]) <= set(on_disk) and on_disk[-1] - listed[-1] in (0, 5)
  for step in listed[-3:]:
    reader = tf.train.load_checkpoint(
        os.path.join(checkpoint_lib.Directory(str(logdir)), f'ckpt-{step}'))
    assert reader.get_variable_to_shape_map()
  # The trainer resumes from the newest complete checkpoint on disk.
  target = on_disk[-1] + 5
  result = _Train(logdir, f'--max_steps={target}')
  assert f'from step {on_disk[-1]} to {target}' in result.stderr
  assert max(_CheckpointSteps(logdir)) == target


def test_print_params_and_list_models():
  listed = _Run('--list_models')
  assert listed.returncode == 0 and _TOY in listed.stdout.split()
  printed = _Run(f'--model={_TOY}', '--num_micro_batches=4', '--print_params')
  assert printed.returncode == 0
  assert 'task.network.pipeline.num_micro_batches : 4' in printed.stdout


def test_fprop_dtype_flag_trains_in_float16_with_loss_scaling(tmp_path):
  result = _Train(tmp_path, '--fprop_dtype=float16', '--max_steps=4')
  assert ('Layers compute in float16 over float32 variables; loss scaling: '
          'dynamic, from 32768.') in result.stderr
  params = (tmp_path / 'params.txt').read_text()
  assert 'task.fprop_dtype : tf.float16' in params


_BAD_INPUTS = [
    ('unknown_model', ['--model=example.toy.ToyRegresion', '--logdir={tmp}'],
     ExitStatus.USAGE, ["Unknown model name 'example.toy.ToyRegresion'",
                          'Did you mean', '--list_models']),
    ('bad_override_key', [f'--model={_TOY}', '--logdir={tmp}',
                          '--params_override=train.learning_rat=0.1'],
     ExitStatus.USAGE, ['train.learning_rat', 'learning_rate']),
    ('bad_override_value', [f'--model={_TOY}', '--logdir={tmp}',
                            '--params_override=train.max_steps=lots'],
     ExitStatus.USAGE, ['train.max_steps', 'lots']),
    ('bad_optimizer', [f'--model={_TOY}', '--logdir={tmp}',
                       '--params_override=train.optimizer=adma'],
     ExitStatus.USAGE, ["'adma'", "Did you mean 'adam'"]),
    ('bad_mode', [f'--model={_TOY}', '--logdir={tmp}', '--mode=serve'],
     ExitStatus.USAGE, ["--mode='serve'", 'train_and_eval']),
    ('missing_dataset', ['--model=image.cifar10.AmoebaNetD', '--logdir={tmp}',
                         '--data_dir={tmp}/no_data'],
     ExitStatus.DATA_NOT_FOUND, ['cifar10', 'tfds build', '--data_dir']),
    ('unwritable_logdir', [f'--model={_TOY}', '--logdir=/proc/lingvo_gpipe'],
     ExitStatus.USAGE, ["--logdir='/proc/lingvo_gpipe' is not writable"]),
    ('logdir_is_a_file', [f'--model={_TOY}', '--logdir={tmp}/file/run'],
     ExitStatus.USAGE, ['is not writable']),
    ('no_gpus', [f'--model={_TOY}', '--logdir={tmp}', '--device=gpu'],
     ExitStatus.USAGE, ['2 cells', '0 GPUs', '--device=cpu']),
    ('layouts_combined', [f'--model={_TOY}', '--logdir={tmp}', '--tpu=x',
                          '--worker_hosts=127.0.0.1:1'],
     ExitStatus.USAGE, ['--worker_hosts and --tpu cannot be combined']),
    ('replicas_over_workers', [f'--model={_TOY}', '--logdir={tmp}',
                               '--num_replicas=2', '--worker_hosts=127.0.0.1:1'],
     ExitStatus.USAGE, ['--num_replicas with --worker_hosts', '--replica_hosts']),
    ('replica_index_out_of_range',
     [f'--model={_TOY}', '--logdir={tmp}', '--replica_index=2',
      '--replica_hosts=127.0.0.1:1,127.0.0.1:2'],
     ExitStatus.USAGE, ['--replica_index=2 is invalid', 'out of range', '(0..1)']),
    ('uneven_replicas', [f'--model={_TOY}', '--logdir={tmp}',
                         '--num_replicas=3'],
     ExitStatus.USAGE, ['16 examples', '3 replicas', 'input.batch_size']),
    ('unreachable_tpu', [f'--model={_TOY}', '--logdir={tmp}',
                         '--tpu=no-such-tpu'],
     ExitStatus.USAGE, ["--tpu='no-such-tpu'", 'cannot connect']),
    ('bad_fprop_dtype', [f'--model={_TOY}', '--logdir={tmp}',
                         '--fprop_dtype=bfloat61'],
     ExitStatus.USAGE, ["--fprop_dtype='bfloat61'", 'float32, bfloat16, '
                          'float16', "Did you mean 'bfloat16'"]),
    ('bad_fprop_dtype_override', [f'--model={_TOY}', '--logdir={tmp}',
                                  '--params_override=task.network.'
                                  'fprop_dtype=int8'],
     ExitStatus.USAGE, ["task.network.fprop_dtype='int8'", 'bfloat16']),
    ('bad_loss_scale', [f'--model={_TOY}', '--logdir={tmp}',
                        '--params_override=train.loss_scale=dynamc'],
     ExitStatus.USAGE, ["train.loss_scale='dynamc'", 'auto, dynamic, none']),
    ('bad_graph_optimization', [f'--model={_TOY}', '--logdir={tmp}',
                                '--params_override=train.graph_optimization='
                                'false'],
     ExitStatus.USAGE, ["train.graph_optimization: Unknown graph optimization "
                        "'false'", "lean, full, off", "is 'off'"]),
    ('non_finite_loss', [f'--model={_TOY}', '--logdir={tmp}',
                         '--params_override=train.optimizer=sgd; '
                         'train.learning_rate=1e12'],
     ExitStatus.NON_FINITE, ['Non-finite training step', 'was not applied',
                               'train.learning_rate']),
]


@pytest.mark.parametrize('flags,code,messages',
                         [case[1:] for case in _BAD_INPUTS],
                         ids=[case[0] for case in _BAD_INPUTS])
def test_bad_input_gets_a_clear_message_and_exit_status(tmp_path, flags, code,
                                                        messages):
  (tmp_path / 'file').write_text('not a directory')
  result = _Run(*[f.replace('{tmp}', str(tmp_path)) for f in flags])
  assert result.returncode == code, result.stderr[-3000:]
  error = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert error, result.stderr[-3000:]
  text = result.stderr[result.stderr.index(error[0]):]
  for message in messages:
    assert message in text, text
  assert 'Traceback' not in result.stderr


def test_a_bug_keeps_its_traceback_and_a_status_of_its_own(tmp_path):
  # Data wider than the network's first layer: a shape error while tracing
  # the step, not a bad flag. It once read like one (status 1, no traceback).
  result = _Run(f'--model={_TOY}', f'--logdir={tmp_path}', '--max_steps=2',
                '--params_override=input.input_dim=5')
  assert result.returncode == ExitStatus.INTERNAL, result.stderr[-3000:]
  assert 'Traceback' in result.stderr
  error = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert len(error) == 1, result.stderr[-3000:]
  assert 'input last dim is 5' in error[0] and 'a bug' in error[0], error


def test_out_of_memory_names_the_knobs(tmp_path):
  # Weights are tiny; a 65536-example batch's activations are 64 MiB a layer.
  result = _Run(f'--model={_TOY}', f'--logdir={tmp_path}', '--max_steps=2',
                '--params_override=input.batch_size=65536; '
                'input.num_examples=65536; task.network.hidden_dim=256',
                TF_CPU_BFC_MEM_LIMIT_IN_MB='48')
  assert result.returncode == ExitStatus.OUT_OF_MEMORY, result.stderr[-3000:]
  for knob in ('out of memory', '--num_micro_batches', '--num_partitions',
               "recompute='always'", 'input_grads_first=False',
               'input.batch_size'):
    assert knob in result.stderr
