"""BaseInputGenerator: batches of NestedMaps from a tf.data pipeline.

Invariant: `Dataset(split)` yields NestedMaps whose every leaf is batched
along dim 0; training batches have the static size `batch_size` (the
pipeline cuts micro-batches from static shapes) and repeat forever, shuffled
from `seed`; eval batches cover the split exactly once, the last one possibly
smaller. A generator that cannot find its data raises DataNotFoundError
saying how to prepare it.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from lingvo_gpipe.core import hyperparams


class DataNotFoundError(FileNotFoundError):
  """The data set is not where the generator looked; says how to prepare it."""


class BaseInputGenerator:
  """Reads one data set; subclasses implement `_Examples(split)`."""

  @classmethod
  def Params(cls) -> hyperparams.InstantiableParams:
    p = hyperparams.InstantiableParams(cls)
    p.Define('name', cls.__name__, 'Name, for logs.')
    p.Define('batch_size', 32, 'Examples per (mini-)batch.')
    p.Define('data_dir', None, 'Where the prepared data set lives; None: the '
             "generator's default (e.g. ~/tensorflow_datasets).")
    p.Define('seed', 1234, 'Shuffle seed of the training stream.')
    p.Define('shuffle_buffer', 10000, 'Shuffle buffer of the training stream.')
    p.Define('train_split', 'train', 'Split the trainer trains on.')
    p.Define('eval_split', 'test', 'Split the evaluator reports on.')
    return p

  def __init__(self, params: hyperparams.InstantiableParams):
    self.params = params.Copy()

  def _Examples(self, split: str, training: bool) -> tf.data.Dataset:
    """Unbatched examples (NestedMaps) of `split`, preprocessed."""
    raise TypeError(f'{type(self).__name__} must override _Examples.')

  def Dataset(self, split: str, training: bool,
              batch_size: Optional[int] = None) -> tf.data.Dataset:
    """Batches of `split`: shuffled and repeated when training."""
    p = self.params
    batch_size = batch_size or p.batch_size
    ds = self._Examples(split, training)
    if training:
      ds = ds.shuffle(p.shuffle_buffer, seed=p.seed,
                      reshuffle_each_iteration=True).repeat()
    ds = ds.batch(batch_size, drop_remainder=training)
    return ds.prefetch(tf.data.AUTOTUNE)
