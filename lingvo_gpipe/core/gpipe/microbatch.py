"""Splits a mini-batch into micro-batches and merges them back.

Invariant: `Merge(Split(x, ...)) == x` for any nested structure of tensors
whose leaves share the batch dimension. With `num_micro_batches=M` the batch
is cut into exactly M pieces whose sizes differ by at most one, larger ones
first (B=10, M=4 gives 3, 3, 2, 2); with `micro_batch_size=s` into pieces of s
and a smaller last one. Nothing is truncated or padded.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import tensorflow as tf

from lingvo_gpipe.core import hyperparams


def MicroBatchSizes(batch_size: int,
                    num_micro_batches: Optional[int] = None,
                    micro_batch_size: Optional[int] = None) -> list[int]:
  """Sizes of the micro-batches of a batch of `batch_size` examples.

  Exactly one of `num_micro_batches` and `micro_batch_size` must be given.
  """
  if (num_micro_batches is None) == (micro_batch_size is None):
    raise hyperparams.ConfigError('Give exactly one of num_micro_batches and '
                     f'micro_batch_size; got {num_micro_batches} and '
                     f'{micro_batch_size}.')
  if batch_size < 1:
    raise ValueError(f'Batch size must be >= 1 to split it, got {batch_size}.')
  if micro_batch_size is not None:
    if micro_batch_size < 1:
      raise hyperparams.ConfigError(
          f'micro_batch_size must be >= 1, got {micro_batch_size}.')
    full, rest = divmod(batch_size, micro_batch_size)
    return [micro_batch_size] * full + ([rest] if rest else [])
  if num_micro_batches < 1:
    raise hyperparams.ConfigError(
        f'num_micro_batches must be >= 1, got {num_micro_batches}.')
  if num_micro_batches > batch_size:
    raise hyperparams.ConfigError(
        f'num_micro_batches={num_micro_batches} exceeds the batch size '
        f'{batch_size}: every micro-batch needs at least one example. Use at '
        f'most {batch_size} micro-batches or a larger batch.')
  base, extra = divmod(batch_size, num_micro_batches)
  return [base + 1] * extra + [base] * (num_micro_batches - extra)


def LeafPaths(structure: Any, path: str) -> list[tuple[str, Any]]:
  """(path, leaf) for every leaf tf.nest sees, e.g. ('inputs[1].paddings', t)."""
  if isinstance(structure, dict):
    attr = type(structure).__name__ == 'NestedMap'
    return [item for key in sorted(structure)
            for item in LeafPaths(
                structure[key],
                f'{path}.{key}' if attr else f'{path}[{key!r}]')]
  if isinstance(structure, (list, tuple)):
    return [item for i, v in enumerate(structure)
            for item in LeafPaths(v, f'{path}[{i}]')]
  return [(path, structure)]


def BatchSize(inputs: Any, batch_dim: int = 0, name: str = 'inputs') -> int:
  """The static batch size shared by every leaf of `inputs`.

  Every leaf but None must be a tensor (or array, or TensorSpec) with a batch
  dimension; anything else (a string, a Python number) is refused by its path
  below `name`, since it cannot be cut into micro-batches.
  """
  sizes = set()
  for path, leaf in LeafPaths(inputs, name):
    if leaf is None:  # passes through untouched (boundary.py)
      continue
    if not hasattr(leaf, 'shape') or not hasattr(leaf, 'dtype'):
      raise ValueError(
          f'{path} is a {type(leaf).__name__} ({leaf!r:.40}), not a tensor: '
          f'every input leaf must be a tensor with batch dimension '
          f'{batch_dim} to be cut into micro-batches. Pass it as a tensor, '
          'or give it to the layers through their Params instead.')
    shape = tf.TensorShape(leaf.shape)
    if shape.rank is None or shape.rank <= batch_dim:
      raise ValueError(f'{path} has shape {shape}: no batch dimension '
                       f'{batch_dim}; every input leaf must be batched.')
    sizes.add(shape[batch_dim])
  if not sizes:
    raise ValueError(f'{name} holds no tensor ({inputs!r:.60}); a pipeline '
                     'needs at least one batched input tensor.')
  if None in sizes:
    raise ValueError(
        f'The batch dimension {batch_dim} is not statically known (input '
        'shapes vary); give tf.function an input_signature with a fixed batch '
        'size or fix the shapes, so micro-batches can be sized when tracing.')
  if len(sizes) != 1:
    raise ValueError(
        f'Input leaves disagree on the batch size along dim {batch_dim}: '
        f'{sorted(sizes)}. Every input must have the same batch size.')
  return sizes.pop()


def Split(inputs: Any, sizes: list[int], batch_dim: int = 0) -> list[Any]:
  """Splits every leaf of `inputs` along `batch_dim` into pieces of `sizes`."""
  leaves = tf.nest.flatten(inputs)
  if len(sizes) == 1:
    return [inputs]
  pieces = [tf.split(leaf, sizes, axis=batch_dim) for leaf in leaves]
  return [
      tf.nest.pack_sequence_as(inputs, [p[m] for p in pieces])
      for m in range(len(sizes))
  ]


def Indexed(inputs: Any, sizes: list[int], index: tf.Tensor) -> Any:
  """Micro-batch `index` (a scalar tensor) of `inputs`: `Split(inputs, sizes)[index]`.

  Each leaf's rows of that micro-batch, sliced along dimension 0 at run
  time. Where a row is a whole number of 64-byte blocks (16 floats),
  TensorFlow's slice shares the batch's buffer instead of copying it, so a
  loop that reads every micro-batch this way holds the batch once
  (loop_executor.py).
  """
  ends = np.cumsum(sizes)
  starts = ends - np.asarray(sizes)
  bounds = tf.constant(np.stack([starts, ends], -1)[:, :, None], tf.int32)
  begin, end = tf.unstack(tf.gather(bounds, index))
  return tf.nest.map_structure(
      lambda leaf: tf.strided_slice(leaf, begin, end), inputs)


def Merge(micro_batches: list[Any], batch_dim: int = 0) -> Any:
  """Concatenates micro-batches leaf by leaf along `batch_dim`."""
  if not micro_batches:
    raise ValueError('Merge needs at least one micro-batch.')
  if len(micro_batches) == 1:
    return micro_batches[0]
  flat = [tf.nest.flatten(mb) for mb in micro_batches]
  merged = [tf.concat(list(parts), axis=batch_dim) for parts in zip(*flat)]
  return tf.nest.pack_sequence_as(micro_batches[0], merged)
