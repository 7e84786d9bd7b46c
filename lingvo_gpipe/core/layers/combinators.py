"""Combinators: layers built only from other layers' Params.

Invariant: a combinator's FProp and its FPropMeta compose the sub-layers the
same way, so its output shapes and FLOPs are those of the sub-layers composed
by hand; its NumParams is the sum of the sub-layers' NumParams, computed from
Params alone (so a Sequential of 1663 Transformer layers is sized without
building 1663 layers). Repeat, N identical layers with stacked weights, has
its own module (repeat.py).

Passing values between layers: a layer's output that is a tuple is splatted
into the next layer's inputs; anything else (a tensor, a NestedMap) is passed
as one input.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Iterator, Optional, Sequence

import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core.nested_map import NestedMap

_MERGES = ('concat', 'sum', 'tuple')


def AsArgs(outputs: Any) -> tuple:
  """A layer's outputs as the next layer's positional inputs.

  The one rule for what passes between two layers, in a Sequential and
  across a pipeline's cell boundaries alike (gpipe/boundary.py): a tuple is
  spread over the positional arguments, anything else is one argument.
  """
  return outputs if isinstance(outputs, tuple) else (outputs,)


def _FromArgs(args: tuple) -> Any:
  """The inverse of AsArgs for an FPropMeta result's out_shapes."""
  return args[0] if len(args) == 1 else args


def _SubMeta(owner: str, index: Any, p: base_layer.Params,
             *input_shapes: Any) -> NestedMap:
  """p's FPropMeta; a shape error says which sub-layer of `owner` raised it."""
  try:
    return p.cls.FPropMeta(p, *input_shapes)
  except ValueError as e:
    raise ValueError(f'{owner}.sub[{index}] ({p.cls.__name__} {p.name!r}): '
                     f'{e}') from e


def ChainFProp(layers: Sequence[base_layer.BaseLayer], thetas: Sequence[Any],
               inputs: tuple) -> Any:
  """Applies `layers` in turn (layer i with thetas[i]), as Sequential does."""
  outputs = inputs
  for layer, theta in zip(layers, thetas):
    outputs = layer.FProp(theta, *AsArgs(outputs))
  return outputs


def LayerMetas(params_list: Sequence[base_layer.Params],
               input_shapes: Sequence[Any],
               meta_fn: Optional[Callable[..., Any]] = None
               ) -> Iterator[Any]:
  """Each layer's Meta in turn, each layer applied to the previous one's outputs.

  The one FPropMeta chain (a Sequential, a cell, a pipeline, a partition by
  FLOPs): outputs become the next layer's arguments by the rule of AsArgs.
  meta_fn(index, p, *shapes) computes one layer's Meta (default its
  FPropMeta). The same Params again on unchanged, fully known shapes (a
  Sequential of equal layers) reuses the Meta instead of pricing it anew.
  """
  meta_fn = meta_fn or (lambda i, p, *shapes: p.cls.FPropMeta(p, *shapes))
  shapes = tuple(input_shapes)
  last_p, last_meta, last_in = None, None, None
  for i, p in enumerate(params_list):
    if p is last_p and _SameShapes(last_in, shapes):
      meta = last_meta
    else:
      meta = meta_fn(i, p, *shapes)
    yield meta
    last_p, last_meta, last_in = p, meta, shapes
    shapes = tuple(meta.out_shapes)


def ChainMeta(params_list: Sequence[base_layer.Params],
              input_shapes: Sequence[Any],
              meta_fn: Optional[Callable[..., Any]] = None) -> NestedMap:
  """The Meta of layers applied in turn: their FLOPs summed, the last outputs."""
  flops, shapes = 0, tuple(input_shapes)
  for meta in LayerMetas(params_list, shapes, meta_fn):
    flops += meta.flops
    shapes = tuple(meta.out_shapes)
  return base_layer.Meta(flops, *shapes)


def _SameShapes(a: Any, b: Any) -> bool:
  """True if a and b are the same structure of equal, fully defined shapes."""
  try:
    tf.nest.assert_same_structure(a, b)
    pairs = [(tf.TensorShape(x), tf.TensorShape(y))
             for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b))]
  except (ValueError, TypeError):
    return False
  return all(x.is_fully_defined() and x == y for x, y in pairs)


def _CheckSubList(p: base_layer.Params) -> None:
  if not isinstance(p.sub, (list, tuple)) or not p.sub:
    raise ValueError(f'{p.cls.__name__} {p.name!r}: sub must be a non-empty '
                     f'list of layer Params, got {p.sub!r}.')


class Sequential(base_layer.BaseLayer):
  """Applies `sub[0]`, `sub[1]`, ... in turn; a tuple output is splatted."""

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('sub', [], 'Layer Params, applied in order; at least one.')
    return p

  def __init__(self, params):
    super().__init__(params)
    _CheckSubList(self.params)
    self.CreateChildren('sub', self.params.sub)

  def FProp(self, theta: NestedMap, *inputs: Any) -> Any:
    return ChainFProp(self.sub, theta.sub, inputs)

  @classmethod
  def NumParams(cls, p) -> int:
    _CheckSubList(p)
    return sum(s.cls.NumParams(s) for s in p.sub)

  @classmethod
  def FPropMeta(cls, p, *input_shapes):
    _CheckSubList(p)
    owner = f'Sequential {p.name!r}'
    return ChainMeta(list(p.sub), input_shapes,
                     lambda i, sp, *shapes: _SubMeta(owner, i, sp, *shapes))


class Residual(base_layer.BaseLayer):
  """inputs + dropout(sub(pre_norm(inputs), *extra_inputs)).

  The Transformer's pre-LN block is Residual(pre_norm=LayerNorm,
  sub=FeedForward, dropout=Dropout). Extra inputs (e.g. attention paddings)
  go to `sub` unchanged after the normalized main input; the output is the
  sum only. `inputs` and the sub's output may be nested (e.g. NestedMaps) of
  the same structure, added leaf by leaf; pre_norm then must accept it.
  """

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('sub', None, 'Params of the residual branch.')
    p.Define('pre_norm', None, 'Params of a normalization applied to the '
             'branch input (e.g. LayerNorm); None means none.')
    p.Define('dropout', None, 'Params of a dropout applied to the branch '
             'output before the add; None means none.')
    return p

  @classmethod
  def _Check(cls, p) -> None:
    if p.sub is None:
      raise ValueError(f'Residual {p.name!r}: sub is None; set it to the '
                       'Params of the residual branch.')

  def __init__(self, params):
    super().__init__(params)
    p = self.params
    self._Check(p)
    if p.pre_norm is not None:
      self.CreateChild('pre_norm', p.pre_norm)
    self.CreateChild('sub', p.sub)
    if p.dropout is not None:
      self.CreateChild('dropout', p.dropout)

  def FProp(self, theta: NestedMap, inputs: Any, *extra_inputs: Any) -> Any:
    p = self.params
    x = inputs
    if p.pre_norm is not None:
      x = self.pre_norm.FProp(theta.pre_norm, x)
    y = self.sub.FProp(theta.sub, x, *extra_inputs)
    if p.dropout is not None:
      y = self.dropout.FProp(theta.dropout, y)
    CheckSameStructure(self.path, inputs, y)
    return tf.nest.map_structure(tf.add, inputs, y)

  @classmethod
  def NumParams(cls, p) -> int:
    cls._Check(p)
    return sum(s.cls.NumParams(s) for s in (p.pre_norm, p.sub, p.dropout)
               if s is not None)

  @classmethod
  def FPropMeta(cls, p, input_shape, *extra_shapes):
    cls._Check(p)
    owner = f'Residual {p.name!r}'
    input_shape = base_layer.ToShape(input_shape)
    flops = 0
    shape = input_shape
    if p.pre_norm is not None:
      meta = _SubMeta(owner, 'pre_norm', p.pre_norm, shape)
      flops += meta.flops
      shape = _FromArgs(meta.out_shapes)
    meta = _SubMeta(owner, 'sub', p.sub, shape, *extra_shapes)
    flops += meta.flops
    shape = _FromArgs(meta.out_shapes)
    if p.dropout is not None:
      meta = _SubMeta(owner, 'dropout', p.dropout, shape)
      flops += meta.flops
      shape = _FromArgs(meta.out_shapes)
    CheckSameStructure(owner, input_shape, shape)
    flops += sum(s.num_elements() for s in tf.nest.flatten(input_shape))
    return base_layer.Meta(flops, input_shape)


def CheckSameStructure(where: str, inputs: Any, outputs: Any,
                       what: str = 'the residual branch',
                       why: str = 'to be added') -> None:
  """Raises unless `outputs` has the structure, shapes and dtypes of `inputs`.

  Residual adds its branch output to its input; Repeat carries its body's
  output into the next iteration. Leaves are tensors, specs or shapes.
  """
  try:
    tf.nest.assert_same_structure(inputs, outputs)
  except (ValueError, TypeError) as e:
    raise ValueError(f'{where}: {what} returned a different structure than '
                     f'its input: {e}') from None
  for a, b in zip(tf.nest.flatten(inputs), tf.nest.flatten(outputs)):
    sa = tf.TensorShape(getattr(a, 'shape', a))
    sb = tf.TensorShape(getattr(b, 'shape', b))
    if not sa.is_compatible_with(sb):
      raise ValueError(f'{where}: {what} output has shape {sb}, but its input '
                       f'has shape {sa}; they must match {why}.')
    da, db = getattr(a, 'dtype', None), getattr(b, 'dtype', None)
    if da is not None and db is not None and da != db:
      raise ValueError(f'{where}: {what} output has dtype {db.name}, but its '
                       f'input has {da.name}; they must match {why}.')


class Parallel(base_layer.BaseLayer):
  """Applies every `sub` to the same inputs and merges their outputs."""

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('sub', [], 'Layer Params, each applied to the same inputs.')
    p.Define('merge', 'concat', f'How outputs combine: one of {_MERGES}. '
             "'concat' joins them along the last dim, 'sum' adds them, "
             "'tuple' returns them as a tuple.")
    return p

  @classmethod
  def _Check(cls, p) -> None:
    _CheckSubList(p)
    if p.merge not in _MERGES:
      close = difflib.get_close_matches(str(p.merge), _MERGES, n=1)
      hint = f' Did you mean {close[0]!r}?' if close else ''
      raise ValueError(f'Parallel {p.name!r}: merge is {p.merge!r}.{hint} '
                       f'Valid: {", ".join(repr(m) for m in _MERGES)}.')

  def __init__(self, params):
    super().__init__(params)
    self._Check(self.params)
    self.CreateChildren('sub', self.params.sub)

  def FProp(self, theta: NestedMap, *inputs: Any) -> Any:
    outputs = [layer.FProp(th, *inputs) for layer, th in zip(self.sub, theta.sub)]
    merge = self.params.merge
    if merge == 'tuple':
      return tuple(outputs)
    for i, out in enumerate(outputs):
      if not isinstance(out, tf.Tensor):
        raise ValueError(f'{self.path}: merge {merge!r} needs one tensor from '
                         f'each sub-layer; sub[{i}] returned '
                         f'{type(out).__name__}. Use merge \'tuple\'.')
    if merge == 'concat':
      return tf.concat(outputs, axis=-1)
    return tf.add_n(outputs)

  @classmethod
  def NumParams(cls, p) -> int:
    cls._Check(p)
    return sum(s.cls.NumParams(s) for s in p.sub)

  @classmethod
  def FPropMeta(cls, p, *input_shapes):
    cls._Check(p)
    owner = f'Parallel {p.name!r}'
    metas = [_SubMeta(owner, i, s, *input_shapes) for i, s in enumerate(p.sub)]
    flops = sum(m.flops for m in metas)
    outs = [_FromArgs(m.out_shapes) for m in metas]
    if p.merge == 'tuple':
      return base_layer.Meta(flops, *outs)
    for i, out in enumerate(outs):
      if not isinstance(out, tf.TensorShape):
        raise ValueError(f'{owner}: merge {p.merge!r} needs one tensor from '
                         f'each sub-layer; sub[{i}] returns {out}. Use merge '
                         "'tuple'.")
    if p.merge == 'concat':
      leading = {tuple(s[:-1].as_list()) for s in outs}
      if len(leading) > 1:
        raise ValueError(f'{owner}: cannot concat outputs of shapes {outs}: '
                         'all but the last dim must match.')
      last = sum(s[-1] for s in outs)
      return base_layer.Meta(flops, outs[0][:-1].concatenate([last]))
    if len({tuple(s.as_list()) for s in outs}) > 1:
      raise ValueError(f'{owner}: cannot sum outputs of different shapes '
                       f'{outs}.')
    return base_layer.Meta(flops + (len(outs) - 1) * outs[0].num_elements(),
                           outs[0])
