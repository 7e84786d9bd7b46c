"""EvalProgram: weighted means over a whole split, decode metrics, each checkpoint once."""

import os
import numpy as np
import tensorflow as tf

from lingvo_gpipe import base_task
from lingvo_gpipe import eval_program
from lingvo_gpipe import experiment
from lingvo_gpipe.core import checkpoint as checkpoint_lib
from lingvo_gpipe.core import summary
from lingvo_gpipe.core.nested_map import NestedMap

_TOY = 'example.toy.ToyRegression'


class _CountRows(base_task.DecodeMetrics):
  """Host-side metric: how many rows Decode produced."""

  def __init__(self):
    self.rows = 0

  def Update(self, decoded):
    self.rows += len(decoded.prediction)

  def Result(self):
    return {'decoded_rows': float(self.rows)}


def _Program(tmp_path, override=''):
  params = experiment.Resolve(experiment.Settings(
      model=_TOY, params_override='input.num_examples=10; input.batch_size=4; '
      + override))
  experiment.SetDevices(params, ['/device:CPU:0', '/device:CPU:1'])
  task = params.task.Instantiate()
  return eval_program.EvalProgram(params, str(tmp_path), task), params


def test_metrics_are_averaged_over_the_split_by_weight(tmp_path):
  program, params = _Program(tmp_path)
  results = program.Evaluate(step=7)
  # The reference: the same network over all 10 examples at once.
  batch = next(iter(params.input.Instantiate().Dataset('test', training=False,
                                                       batch_size=10)))
  prediction = program.task.network.FPropDefaultTheta(batch.x)
  expected = np.mean((prediction.numpy() - batch.y.numpy())**2)
  np.testing.assert_allclose(results['mse'], expected, rtol=1e-5)
  np.testing.assert_allclose(results['loss'], expected, rtol=1e-5)
  written = summary.ReadEvents(program.directory)['mse']
  assert written[0][0] == 7
  np.testing.assert_allclose(written[0][1], results['mse'], rtol=1e-6)


def test_eval_max_batches_and_decode_metrics(tmp_path):
  program, _ = _Program(tmp_path, 'train.eval_max_batches=2')
  program.task.Decode = lambda theta, batch: NestedMap(prediction=batch.x)
  program.task.CreateDecodeMetrics = _CountRows
  results = program.Evaluate(step=1)
  assert results['decoded_rows'] == 8.0  # 2 batches of 4, not all 10


def test_new_checkpoints_yields_each_once_and_stops_at_max_steps(tmp_path):
  program, params = _Program(tmp_path, 'train.max_steps=20')
  variable = tf.Variable(1.0)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), dict(v=variable))
  checkpointer.Save(5)
  checkpointer.Save(10)
  seen = []
  for path in program.NewCheckpoints(str(tmp_path), timeout_secs=0.5,
                                     poll_secs=0.05):
    seen.append(checkpoint_lib.StepOf(path))
    program.MarkEvaluated(path)
  assert seen == [10]  # the newest; the evaluator had fallen behind
  assert program.LastEvaluated() == 'ckpt-10'
  checkpointer.Save(20)
  seen = [checkpoint_lib.StepOf(p) for p in program.NewCheckpoints(
      str(tmp_path), timeout_secs=30, poll_secs=0.05)]
  assert seen == [20]  # and it stopped there: 20 is train.max_steps
  assert params.train.max_steps == 20


def test_new_checkpoints_moves_to_the_next_newest_after_a_skip(tmp_path):
  program, _ = _Program(tmp_path, 'train.max_steps=20')
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path),
                                             dict(v=tf.Variable(1.0)))
  checkpointer.Save(5)
  checkpointer.Save(10)
  seen = []
  for path in program.NewCheckpoints(str(tmp_path), timeout_secs=0.3,
                                     poll_secs=0.05):
    seen.append(checkpoint_lib.StepOf(path))
    if seen == [10]:  # as if the trainer deleted it before it was read
      program.Skip(path, ValueError('gone'))
  assert seen == [10, 5]


def test_a_garbled_marker_is_ignored(tmp_path):
  program, _ = _Program(tmp_path)
  os.makedirs(program.directory, exist_ok=True)
  with open(os.path.join(program.directory, 'last_evaluated'), 'w') as f:
    f.write('not a checkpoint')
  assert program.LastEvaluated() is None
