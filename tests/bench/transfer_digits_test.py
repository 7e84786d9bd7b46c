"""The digits transfer demonstration, shortened: warm-started beats from scratch.

bench/transfer_digits.py at K=1, M=1 and fewer steps, to stay well under a
minute; the full run's numbers are in bench/results/transfer_digits.md.
"""

import pytest

from bench import transfer_digits


@pytest.mark.heavy  # ~45 s on 2 busy cores: three traced trainings
def test_warm_started_model_beats_the_same_model_from_scratch(tmp_path):
  result = transfer_digits.Compare(str(tmp_path), pretrain_steps=80,
                                   finetune_steps=20, num_partitions=1,
                                   num_micro_batches=1)
  assert result.pretrain > 0.5, result  # the source learned digits 0-4
  assert result.warm > result.scratch, result
