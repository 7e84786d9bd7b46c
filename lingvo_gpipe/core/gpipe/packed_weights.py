"""Packed weights: a small cell's weights as one flat tensor per dtype.

Invariant: packing changes how a cell's weights and their gradient sums
travel through the loop executor's loops, never a value: `Unpack(Pack(w))`
is `w`, and a packed gradient sum unpacks into each weight's own sum.

Why: every tensor a `tf.while_loop` body uses from outside becomes a loop
variable, and every loop variable, and every input and output of a
`tf.cond`, runs control-flow nodes (Merge, Switch, NextIteration, Identity)
at every iteration. A cell of a few small layers does less arithmetic per
clock than that bookkeeping: 16 × Dense(64) in 4 cells, M=8, ran 10k nodes
a step in the loop executor, 6k of them control flow, most of them for
the 32 weights and their 32 running gradient sums. Packed, a cell carries
one weight tensor and one sum per dtype, whatever its layer count; the
price is a copy of the weights per step and of each micro-batch's
gradients, which is why only small cells are packed (`Worth`).

One flat vector per dtype, not one tensor per shape: packing [64, 64]
kernels apart from the biases, split along dimension 0 with no reshape,
saved 3k reshapes a step at M=64 and cost 4k more control-flow nodes for
the second group (32.3k nodes against 31.3k).
"""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

# Cells whose weights hold at most this many elements (4 MiB of float32)
# are packed. 4 × Dense(512) cells, 1.05M elements, stepped alike packed
# or not (0.96x, one run): the bound keeps the copies small, not the time.
PACK_AT_MOST_ELEMENTS = 1 << 20


def Worth(flat_theta: Sequence[tf.Tensor]) -> bool:
  """Whether packing `flat_theta` saves more than it copies.

  Packs a cell of two or more weights, every shape known, of at most
  PACK_AT_MOST_ELEMENTS elements in all.
  """
  if len(flat_theta) < 2 or not all(t.shape.is_fully_defined()
                                     for t in flat_theta):
    return False
  return sum(t.shape.num_elements() for t in flat_theta) <= (
      PACK_AT_MOST_ELEMENTS)


def _Flat(t: tf.Tensor) -> tf.Tensor:
  return t if t.shape.rank == 1 else tf.reshape(t, [-1])


class PackedWeights:
  """Packs and unpacks one cell's flat weights (or their gradients) by dtype."""

  def __init__(self, flat_theta: Sequence[tf.Tensor]):
    self._shapes = [t.shape for t in flat_theta]
    self._dtypes = [t.dtype for t in flat_theta]
    groups: dict[tf.DType, list[int]] = {}
    for i, dtype in enumerate(self._dtypes):
      groups.setdefault(dtype, []).append(i)
    # One group per dtype, in the order the dtypes first appear.
    self._groups = list(groups.values())

  @property
  def num_packed(self) -> int:
    return len(self._groups)

  def Pack(self, leaves: Sequence[Optional[tf.Tensor]]) -> list[tf.Tensor]:
    """One flat tensor per dtype; a None leaf (no gradient) packs as zeros."""
    if len(leaves) != len(self._shapes):
      raise ValueError(f'Packing {len(leaves)} tensors; this cell has '
                       f'{len(self._shapes)} weights.')
    packed = []
    for group in self._groups:
      parts = []
      for i in group:
        leaf = leaves[i]
        if leaf is None:
          parts.append(tf.zeros([self._shapes[i].num_elements()],
                                self._dtypes[i]))
        else:
          parts.append(_Flat(tf.convert_to_tensor(leaf)))
      packed.append(parts[0] if len(parts) == 1 else tf.concat(parts, 0))
    return packed

  def Unpack(self, packed: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """The flat weights (or gradients) `Pack` packed, in their order."""
    if len(packed) != len(self._groups):
      raise ValueError(f'Unpacking {len(packed)} tensors; this cell packs '
                       f'into {len(self._groups)}.')
    leaves: list[Optional[tf.Tensor]] = [None] * len(self._shapes)
    for group, flat in zip(self._groups, packed):
      sizes = [self._shapes[i].num_elements() for i in group]
      parts = [flat] if len(group) == 1 else tf.split(flat, sizes)
      for i, part in zip(group, parts):
        # A vector (a bias) is its own part: no reshape, one op less a clock.
        leaves[i] = (part if self._shapes[i].rank == 1
                     else tf.reshape(part, self._shapes[i]))
    return leaves
