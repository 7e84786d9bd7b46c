"""Writes small tfds data sets to disk exactly as `tfds build` would, from given examples.

Invariant: `Prepare(name, data_dir, splits)` leaves in `data_dir` a prepared data
set that the real tfds builder of `name` reads back (`tfds.builder(name,
data_dir=data_dir).is_prepared()`): the builder's own `download_and_prepare`
writes it, with its real features, file format and metadata. Only the
builder's `_split_generators` is replaced, so nothing is downloaded and the
examples are the given ones.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence
from unittest import mock

import numpy as np
import tensorflow_datasets as tfds


def Prepare(name: str, data_dir: os.PathLike | str,
            splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
  """Prepares tfds data set `name` ('name[/config]') in `data_dir`.

  Args:
    name: registered tfds name, e.g. 'cifar10' or 'wmt14_translate/de-en'.
    data_dir: the tfds data_dir root to write under.
    splits: split name -> examples, each a dict of the data set's features
      (e.g. {'image': uint8 [32, 32, 3], 'label': 3, 'id': 'x'} for cifar10).

  Returns:
    The directory of the prepared version (e.g. <data_dir>/cifar10/3.0.2).
  """
  tfds.disable_progress_bar()
  builder = tfds.builder(name, data_dir=os.fspath(data_dir))

  def SplitGenerators(unused_self, unused_dl_manager):
    return {split: ((f'{split}_{i}', example)
                    for i, example in enumerate(examples))
            for split, examples in splits.items()}

  with mock.patch.object(type(builder), '_split_generators', SplitGenerators):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP,
        try_download_gcs=False))
  assert builder.is_prepared(), builder.data_dir
  return builder.data_dir


def CifarExamples(n: int, num_classes: int, seed: int = 0,
                  coarse_classes: int | None = None) -> list[dict[str, Any]]:
  """`n` random 32x32 CIFAR examples; labels cycle through the classes."""
  rng = np.random.default_rng(seed)
  examples = []
  for i in range(n):
    example = {'id': f'{seed}_{i:05d}', 'label': i % num_classes,
               'image': rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)}
    if coarse_classes:
      example['coarse_label'] = i % coarse_classes
    examples.append(example)
  return examples
