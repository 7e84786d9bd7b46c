r"""Transfer learning on the bundled digits: warm-started against from scratch.

  python -m bench.transfer_digits --write_results

Pretrains `image.digits.Pretrain04` (digits 0-4), then trains
`image.digits.FineTune59` (digits 5-9, a new 5-class head) twice for the
same few steps: warm-started from the pretrained checkpoint (every network
weight but the head's dense layer, train.warm_start) and from scratch
(train.warm_start=[]). Records the test accuracy on digits 5-9 of both, in
bench/results/transfer_digits.md. In process (TrainProgram and EvalProgram,
as the trainer runs them), so tests/bench/transfer_digits_test.py can run a
shorter version.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Optional

from absl import app
from absl import flags

from lingvo_gpipe.core import tf_env

tf_env.Setup()  # the trainer's environment: its programs run here

import tensorflow as tf  # pylint: disable=g-import-not-at-top

from bench import common  # pylint: disable=g-import-not-at-top
from lingvo_gpipe import eval_program  # pylint: disable=g-import-not-at-top
from lingvo_gpipe import experiment  # pylint: disable=g-import-not-at-top
from lingvo_gpipe import train_program  # pylint: disable=g-import-not-at-top

PRETRAIN = 'image.digits.Pretrain04'
FINETUNE = 'image.digits.FineTune59'
METRIC = 'top1_accuracy'

_PRETRAIN_STEPS = flags.DEFINE_integer('pretrain_steps', 300,
                                       'Steps of Pretrain04.')
_FINETUNE_STEPS = flags.DEFINE_integer('finetune_steps', 30,
                                       'Steps of each FineTune59 run.')
_WRITE = flags.DEFINE_bool('write_results', False,
                           'Write bench/results/transfer_digits.md.')


@dataclasses.dataclass
class Result:
  pretrain: float  # test accuracy on digits 0-4 after pretraining
  warm: float  # on digits 5-9, warm-started
  scratch: float  # on digits 5-9, from scratch
  seconds: float


def Train(model: str, logdir: str, steps: int, override: str = '',
          num_partitions: Optional[int] = None,
          num_micro_batches: Optional[int] = None) -> float:
  """Trains `model` for `steps` in `logdir`; returns its test METRIC."""
  params = experiment.Resolve(experiment.Settings(
      model=model, max_steps=steps, num_partitions=num_partitions,
      num_micro_batches=num_micro_batches,
      params_override=f'train.save_interval_steps={steps}; '
      f'train.log_interval_steps={steps}; {override}'))
  k = experiment.NumPartitions(params)
  cpus = [d.name for d in tf.config.list_logical_devices('CPU')]
  experiment.SetDevices(params, [cpus[i % len(cpus)] for i in range(k)])
  task = params.task.Instantiate()
  program = train_program.TrainProgram(params, logdir, task)
  program.Restore()
  program.Run()
  return eval_program.EvalProgram(params, logdir, task).Evaluate(
      program.step)[METRIC]


def Compare(workdir: str, pretrain_steps: int, finetune_steps: int,
            **layout) -> Result:
  """Pretrains, then fine-tunes warm and from scratch; test accuracies."""
  start = time.time()
  source = os.path.join(workdir, 'pretrain')
  pretrain = Train(PRETRAIN, source, pretrain_steps, **layout)
  warm = Train(FINETUNE, os.path.join(workdir, 'warm'), finetune_steps,
               f'train.warm_start[0].checkpoint={source!r}', **layout)
  scratch = Train(FINETUNE, os.path.join(workdir, 'scratch'), finetune_steps,
                  'train.warm_start=[]', **layout)
  return Result(pretrain, warm, scratch, time.time() - start)


def main(argv):
  del argv
  # Two logical CPUs, for the configs' two cells (as the trainer does).
  tf.config.set_logical_device_configuration(
      tf.config.list_physical_devices('CPU')[0],
      [tf.config.LogicalDeviceConfiguration()] * 2)
  facts = common.MachineFacts()
  with tempfile.TemporaryDirectory() as workdir:
    result = Compare(workdir, _PRETRAIN_STEPS.value, _FINETUNE_STEPS.value)
  body = common.MarkdownTable(
      ['run', 'data', 'steps', f'test {METRIC}'],
      [[PRETRAIN, 'digits 0-4', _PRETRAIN_STEPS.value,
        f'{result.pretrain:.4f}'],
       [f'{FINETUNE}, warm-started from it', 'digits 5-9',
        _FINETUNE_STEPS.value, f'{result.warm:.4f}'],
       [f'{FINETUNE}, from scratch (train.warm_start=[])', 'digits 5-9',
        _FINETUNE_STEPS.value, f'{result.scratch:.4f}']])
  body += (f'\n\nWarm-started minus from scratch: '
           f'{result.warm - result.scratch:+.4f} after {_FINETUNE_STEPS.value} '
           f'steps. Whole comparison: {result.seconds:.0f} s. One run each; '
           'tests/bench/transfer_digits_test.py asserts only warm > scratch.')
  print(body)
  if _WRITE.value:
    path = common.WriteResults(
        'transfer_digits.md', 'Transfer learning on digits: warm start vs '
        'from scratch', 'python -m bench.transfer_digits --write_results',
        facts, {'pretrain': f'{PRETRAIN}, {_PRETRAIN_STEPS.value} steps',
                'fine-tune': f'{FINETUNE}, {_FINETUNE_STEPS.value} steps, '
                'registered configs otherwise unchanged (K=2, M=4)',
                'warm start': 'every network variable but the head\'s dense '
                'layer (params/image/transfer.py)'}, body)
    print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
