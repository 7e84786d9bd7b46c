"""Generated regression data: y = tanh(x·W) for Gaussian x and a fixed W.

Every split is made from the seed alone (no files), so runs repeat exactly.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from lingvo_gpipe import base_input_generator
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core.nested_map import NestedMap

SPLIT_OFFSETS = {'train': 0, 'test': 1}


class SyntheticRegressionInput(base_input_generator.BaseInputGenerator):
  """`num_examples` pairs per split; train and test differ in their draw of x."""

  @classmethod
  def Params(cls) -> hyperparams.InstantiableParams:
    p = super().Params()
    p.Define('input_dim', 4, 'Size of x.')
    p.Define('output_dim', 1, 'Size of y.')
    p.Define('num_examples', 512, 'Examples per split.')
    p.Define('data_seed', 0, 'Seed of W and of every split.')
    return p

  def _Examples(self, split: str, training: bool) -> tf.data.Dataset:
    del training
    p = self.params
    if split not in SPLIT_OFFSETS:
      raise base_input_generator.DataNotFoundError(
          f'{p.name}: no split {split!r}; valid: {", ".join(SPLIT_OFFSETS)}.')
    weights = np.random.default_rng(p.data_seed).normal(
        size=(p.input_dim, p.output_dim))
    rng = np.random.default_rng([p.data_seed, 1 + SPLIT_OFFSETS[split]])
    x = rng.normal(size=(p.num_examples, p.input_dim)).astype(np.float32)
    y = np.tanh(x @ weights).astype(np.float32)
    return tf.data.Dataset.from_tensor_slices(NestedMap(x=x, y=y))
