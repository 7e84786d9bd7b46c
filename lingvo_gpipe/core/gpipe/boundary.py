"""What crosses a cell boundary: exactly what passes between two layers of a Sequential.

Invariant: where the cuts fall never changes what a layer receives. A
layer's outputs reach the next layer as its positional arguments (a tuple is
spread over them, anything else is one argument) whether or not a cell
boundary lies between the two, and the pipeline's positional inputs reach its
first layer the same way. None leaves (`NestedMap(vec=x, paddings=None)`)
pass through untouched. Every other leaf that crosses a boundary, or leaves
the pipeline, is a tensor batched along the batch dimension, with as many
rows as the micro-batch the cell received: a cell that returns another
number is refused (when traced if both sizes are known, else when it runs),
naming the cell, its layers and the two sizes, because merging its
micro-batches would silently reorder rows. A scalar (an auxiliary loss
beside the activations) is refused by its path: return it batched and
reduce it after the pipeline.

How: the executors move flat tuples of tensors; `Cell` wraps each cell,
rebuilding its arguments from such a tuple and the structure (with its None
leaves) the cell before it returned, and checking what it returns.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import tensorflow as tf

from lingvo_gpipe.core.gpipe import microbatch
from lingvo_gpipe.core.layers import combinators


class Structure:
  """Where a value's tensors and None leaves go; the value as a flat tuple."""

  def __init__(self, value: Any):
    self._template = tf.nest.map_structure(lambda leaf: leaf is None, value)
    self._none = tf.nest.flatten(self._template)

  def __eq__(self, other: Any) -> bool:
    if not isinstance(other, Structure) or self._none != other._none:
      return False
    try:
      tf.nest.assert_same_structure(self._template, other._template)
    except (ValueError, TypeError):
      return False
    return True

  def __repr__(self) -> str:
    return repr(self._template)

  @staticmethod
  def Tensors(value: Any) -> tuple:
    """`value`'s leaves but its None leaves, in tf.nest order."""
    return tuple(leaf for leaf in tf.nest.flatten(value) if leaf is not None)

  def Rebuild(self, tensors: Sequence[Any]) -> Any:
    """The value whose `Tensors` are `tensors`, None leaves back in place."""
    tensors = iter(tensors)
    return tf.nest.pack_sequence_as(
        self._template, [None if none else next(tensors)
                         for none in self._none])


def _Rows(leaf: Any, batch_dim: int) -> Any:
  """The leaf's rows: an int if known when traced, else a scalar tensor."""
  static = leaf.shape[batch_dim]
  return static if static is not None else tf.shape(leaf)[batch_dim]


class Cell:
  """Cell k behind the boundary rule: takes and returns flat tuples of tensors.

  Attributes:
    cell: the wrapped cell (anything with FProp(theta, *inputs)).
    description: how errors name it ('cell_1: layers pipe/layers_3, ...').
  """

  def __init__(self, cell: Any, index: int, structures: list,
               batch_dim: int):
    """`structures[k]` is what cell k receives; this cell sets [index + 1]."""
    self.cell = cell
    self._index = index
    self._structures = structures
    self._batch_dim = batch_dim
    layers = getattr(cell, 'sub', None)
    own = (getattr(cell, 'path', None) or getattr(cell, 'name', None) or
           type(cell).__name__)
    self.description = f'cell_{index}' if layers is not None else own
    if layers is not None:
      self.description += ': layers ' + ', '.join(
          getattr(l, 'path', None) or type(l).__name__ for l in layers)

  def __getattr__(self, attr: str) -> Any:
    # What else the executors ask of a cell (its path, its sub-layers).
    if attr == 'cell':
      raise AttributeError(attr)
    return getattr(self.cell, attr)

  def FProp(self, theta: Any, tensors: tuple) -> tuple:
    value = self._structures[self._index].Rebuild(tensors)
    outputs = self.cell.FProp(theta, *combinators.AsArgs(value))
    structure = Structure(outputs)
    known = self._structures[self._index + 1]
    if known is not None and known != structure:
      raise ValueError(
          f'{self.description} returned {structure} for one micro-batch and '
          f'{known} for another; a cell must return the same structure '
          'every time.')
    self._structures[self._index + 1] = structure
    return self._Checked(tensors, outputs)

  def _Checked(self, inputs: tuple, outputs: Any) -> tuple:
    """`outputs`' tensors, each checked to be batched like the inputs."""
    rows = _Rows(inputs[0], self._batch_dim) if inputs else None
    checks = []
    for path, leaf in microbatch.LeafPaths(outputs, 'outputs'):
      if leaf is None:
        continue
      if not hasattr(leaf, 'dtype'):  # a tensor, variable or array
        raise ValueError(
            f'{self.description}: {path} is a {type(leaf).__name__} '
            f'({leaf!r:.40}), not a tensor; what a cell returns must be '
            'tensors (or None).')
      leaf = tf.convert_to_tensor(leaf)
      if leaf.shape.rank is not None and leaf.shape.rank <= self._batch_dim:
        raise ValueError(
            f'{self.description}: {path} has shape {leaf.shape}, no batch '
            f'dimension {self._batch_dim}; everything a cell returns crosses '
            'a cell boundary or leaves the pipeline merged over '
            'micro-batches, so it must be batched. Return a scalar (an '
            'auxiliary loss) as one value per example, e.g. '
            'tf.fill([batch], loss), and reduce it after the pipeline.')
      out_rows = _Rows(leaf, self._batch_dim)
      if rows is None:
        continue
      if isinstance(rows, int) and isinstance(out_rows, int):
        if rows != out_rows:
          raise ValueError(self._SizeError(path, rows, out_rows))
      else:
        checks.append(tf.debugging.assert_equal(
            out_rows, rows, message=self._SizeError(path)))
    flat = Structure.Tensors(outputs)
    if checks:
      with tf.control_dependencies(checks):
        flat = tuple(tf.identity(t) for t in flat)
    return flat

  def _SizeError(self, path: str, rows: Optional[int] = None,
                 out_rows: Optional[int] = None) -> str:
    sizes = (f'received a micro-batch of {rows} rows (dimension '
             f'{self._batch_dim}) and returned {out_rows} in {path}'
             if rows is not None else
             f'returned another number of rows in {path} (dimension '
             f'{self._batch_dim}) than its micro-batch had (sizes below)')
    return (f'{self.description}: {sizes}. A cell '
            'must keep the batch size: the pipeline merges micro-batches by '
            'concatenation, so changed sizes would reorder rows. Change the '
            'batch size before or after the pipeline.')


def Cells(cells: Sequence[Any], inputs: Any, batch_dim: int
          ) -> tuple[list[Cell], list[Optional[Structure]]]:
  """`cells` behind the boundary rule, and the structures between them.

  structures[0] is `inputs`' structure; structures[k + 1] what cell k
  returns, set when cell k is first traced (the executors trace the cells in
  order).
  """
  structures: list[Optional[Structure]] = [Structure(inputs)] + [None] * len(
      cells)
  return [Cell(c, k, structures, batch_dim)
          for k, c in enumerate(cells)], structures
