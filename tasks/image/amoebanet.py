"""AmoebaNet-B and -D (Real et al. 2019) as GPipe sized them, as a flat layer list.

Invariant: every cell takes and returns a NestedMap holding the two most
recent cell outputs, `prev` and `cur`, plus any other keys passed through
untouched, so `AmoebaNetLayers(p)` is a flat sequence a PipeliningLayer can
cut between any two layers:

  Stem:          image (a tensor, or NestedMap.image) -> NestedMap(cur)
  Cell:          NestedMap(prev?, cur) -> NestedMap(prev=cur, cur=cell output)
  AuxHead:       adds `aux_logits` [batch, classes], computed from `cur`
  Head:          NestedMap(prev, cur, ...) -> NestedMap(logits, ...)

The first cell after the stem sees no `prev` and reads `cur` for both inputs,
as the public code does. Keys other than image/prev/cur (labels, aux_logits)
flow through every later layer, so the pipeline carries them.

(L, D) follow AMOEBANET.md: L counts normal cells only (3 stacks of L/3), D
is the first stack's filters, doubled by the reduction cells placed before
normal cells int(L/3) and int(2L/3). Parameter counts are static (from Params
alone) and equal those of the built network.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import tensorflow as tf

from lingvo_gpipe.core import base_layer
from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core.gpipe import pipelined_network
from lingvo_gpipe.core.layers import combinators
from lingvo_gpipe.core.layers import conv
from lingvo_gpipe.core.layers import dense
from lingvo_gpipe.core.layers import dropout
from lingvo_gpipe.core.layers import pooling
from lingvo_gpipe.core.nested_map import NestedMap
from tasks.image import amoebanet_ops as ops

Params = hyperparams.Params

# --- genotypes ----------------------------------------------------------------


class CellSpec(NamedTuple):
  """A genotype's cell: hidden state 2+j is op(in) + op(in) of combos[j]."""
  combos: tuple[tuple[str, int, str, int], ...]
  concat: tuple[int, ...]  # the hidden states concatenated into the output


# s0 = projected current input, s1 = projected previous input. The normal
# concat is s0,s3,s4,s6 as in the public code, not the paper's figure.
GENOTYPES = {
    'D': dict(
        normal=CellSpec((('1x1', 1, 'max3', 1), ('none', 1, '1x7_7x1', 0),
                         ('1x1', 0, '1x7_7x1', 0), ('max3', 2, 'none', 2),
                         ('avg3', 1, '1x1', 5)), (0, 3, 4, 6)),
        reduction=CellSpec((('max2', 0, 'max3', 0), ('none', 2, '3x3', 1),
                            ('1x7_7x1', 2, 'max3', 2), ('none', 3, 'max2', 1),
                            ('avg3', 2, '1x1', 3)), (4, 5, 6))),
    'B': dict(
        normal=CellSpec((('1x1', 1, 'max3', 1), ('none', 1, 'sep3x3_2', 0),
                         ('1x1', 1, 'sep3x3_2', 0), ('1x1', 2, 'none', 2),
                         ('avg3', 1, '1x1', 5)), (0, 3, 4, 6)),
        reduction=CellSpec((('max2', 0, 'max3', 0), ('none', 2, '3x3', 1),
                            ('sep5x5_2', 2, 'max3', 2),
                            ('none', 3, 'sep3x3_2', 1),
                            ('avg3', 4, '1x1', 3)), (5, 6))),
}
CELL_KINDS = ('normal', 'reduction')
STEM_TYPES = ('imagenet', 'basic')
_STATE_KEYS = ('image', 'prev', 'cur')


def _OneOf(where: str, field: str, value: Any, valid: Any) -> None:
  if value not in valid:
    raise ValueError(f'{where}: {field}={value!r}; valid: '
                     f'{", ".join(repr(v) for v in valid)}.')


def _Extras(inputs: Any) -> NestedMap:
  """The keys a layer passes through untouched."""
  if not isinstance(inputs, dict):
    return NestedMap()
  return NestedMap((k, v) for k, v in inputs.items() if k not in _STATE_KEYS)


def _SumParams(children: NestedMap) -> int:
  """Parameters of a ChildParams result: its children's, from Params alone."""
  return sum(c.cls.NumParams(c) for c in tf.nest.flatten(
      [v for v in children.values() if v is not None]))


# --- cell ---------------------------------------------------------------------


def _Combine(spec: CellSpec, s0: Any, s1: Any, apply_op: Any,
             add: Any) -> list[Any]:
  """A genotype's hidden states from s0 and s1; returns those to concatenate.

  FProp passes tensors and FPropMeta shapes: `apply_op(k, x)` runs the cell's
  k-th operation on x and `add(j, a, b)` sums the two results for state j+2.
  """
  states = [s0, s1]
  for j, (_, left, _, right) in enumerate(spec.combos):
    states.append(add(j, apply_op(2 * j, states[left]),
                      apply_op(2 * j + 1, states[right])))
  return [states[i] for i in spec.concat]



class Cell(base_layer.BaseLayer):
  """One normal or reduction cell of a genotype: NestedMap(prev, cur) -> next pair.

  The current input gets ReLU, 1×1 conv, BN to F filters (s0); the previous
  input a factorized reduction when at twice the spatial size, else a 1×1
  conv + BN when its channels differ from F (s1). Each new state is the sum
  of two operations, each but 'none' followed by drop path; the output
  concatenates the genotype's listed states. Reduction cells apply stride 2
  to the operations that read s0 or s1.
  """

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('genotype', 'D', f'One of {sorted(GENOTYPES)}.')
    p.Define('kind', 'normal', f'One of {CELL_KINDS}.')
    p.Define('num_filters', hyperparams.REQUIRED, 'F, filters of every op.')
    p.Define('cur_dim', hyperparams.REQUIRED, 'Channels of inputs.cur.')
    p.Define('prev_dim', None, 'Channels of inputs.prev; None: the inputs '
             'have no prev and cur serves as both (unprojected as prev).')
    p.Define('reduce_prev', False, 'Whether prev is at twice the spatial '
             'size of cur (factorized reduction instead of a 1×1 conv).')
    p.Define('batch_norm_decay', 0.997, 'Moving-average decay of every BN.')
    p.Define('drop_path_keep_prob', 1.0, 'Keep prob of drop path after each '
             "op but 'none'.")
    p.Define('drop_path_ramp_steps', 0, 'If > 0, the drop rate ramps from 0 '
             'to 1 - keep prob over this many steps.')
    return p

  @classmethod
  def Spec(cls, p) -> CellSpec:
    _OneOf(p.name, 'genotype', p.genotype, GENOTYPES)
    _OneOf(p.name, 'kind', p.kind, CELL_KINDS)
    return GENOTYPES[p.genotype][p.kind]

  @classmethod
  def OutputDim(cls, p) -> int:
    return p.num_filters * len(cls.Spec(p).concat)

  @classmethod
  def ChildParams(cls, p) -> NestedMap:
    """cur_proj, prev_proj (None when prev needs no projection) and the ops.

    ops[2j], ops[2j + 1] are the left and right operations of state j + 2.
    """
    spec = cls.Spec(p)
    f, decay = p.num_filters, p.batch_norm_decay
    stride = 2 if p.kind == 'reduction' else 1
    prev_proj = None
    s1_dim = p.cur_dim
    if p.prev_dim is not None:
      prev_proj = ops.InputProjection('prev_proj', p.prev_dim, f,
                                      p.reduce_prev, decay)
      s1_dim = f
    dims = [f, s1_dim]
    op_params = []
    for j, combo in enumerate(spec.combos):
      for side, (op, i) in zip(('left', 'right'), (combo[:2], combo[2:])):
        layers = ops.OpLayers(op, dims[i], f, stride if i < 2 else 1, decay)
        if op != 'none':
          layers.append(dropout.DropPath.Params().Set(
              name='drop_path', keep_prob=p.drop_path_keep_prob,
              ramp_steps=p.drop_path_ramp_steps))
        op_params.append(ops.ChainParams(f's{j + 2}_{side}_{op}', layers))
      dims.append(f)
    return NestedMap(
        cur_proj=ops.ChainParams(
            'cur_proj', ops.OpLayers('1x1', p.cur_dim, f, 1, decay)),
        prev_proj=prev_proj, ops=op_params)

  def FProp(self, theta: NestedMap, inputs: NestedMap) -> NestedMap:
    p = self.params
    spec = self.Spec(p)
    cur = inputs.cur
    s1 = cur
    if p.prev_dim is not None:
      if 'prev' not in inputs:
        raise ValueError(f'{self.path}: prev_dim={p.prev_dim} but the inputs '
                         f'have no prev (keys: {sorted(inputs)}).')
      s1 = inputs.prev
      prev_proj = self.children_layers.get('prev_proj')
      if prev_proj is not None:
        s1 = prev_proj.FProp(theta.prev_proj, s1)
    s0 = self.cur_proj.FProp(theta.cur_proj, cur)
    outputs = _Combine(
        spec, s0, s1, lambda k, x: self.ops[k].FProp(theta.ops[k], x),
        lambda j, a, b: a + b)
    out = _Extras(inputs)
    out.prev = cur
    out.cur = tf.concat(outputs, axis=-1)
    return out

  @classmethod
  @base_layer.SizedOncePerConfig
  def NumParams(cls, p) -> int:
    # The cells of a stack differ only by name: counting each distinct cell
    # once sizes the 1.8B-parameter network in about a second.
    return _SumParams(cls.ChildParams(p))

  @classmethod
  def FPropMeta(cls, p, input_shapes):
    shapes = base_layer.ToShape(input_shapes)
    spec = cls.Spec(p)
    children = cls.ChildParams(p)
    cur = shapes.cur
    metas = [children.cur_proj.cls.FPropMeta(children.cur_proj, cur)]
    if p.prev_dim is None:
      s1 = cur
    elif children.prev_proj is not None:
      metas.append(children.prev_proj.cls.FPropMeta(children.prev_proj,
                                                    shapes.prev))
      s1 = metas[-1].out_shapes[0]
    else:
      s1 = shapes.prev

    def OpMeta(k, shape):
      c = children.ops[k]
      metas.append(c.cls.FPropMeta(c, shape))
      return metas[-1].out_shapes[0]

    def Add(j, a, b):
      if a.as_list() != b.as_list():
        raise ValueError(f'{p.name}: state s{j + 2} adds shapes {a} and {b}; '
                         'check cur_dim, prev_dim and reduce_prev against '
                         f'the input shapes {shapes}.')
      metas.append(base_layer.Meta(conv.NumElements(p.name, a)))
      return a

    outputs = _Combine(spec, metas[0].out_shapes[0], s1, OpMeta, Add)
    out = _Extras(shapes)
    out.prev = cur
    out.cur = outputs[0][:-1].concatenate([cls.OutputDim(p)])
    return base_layer.Meta(sum(m.flops for m in metas), out)


# --- stem and heads -------------------------------------------------------------


class Stem(base_layer.BaseLayer):
  """3×3 conv (no bias) + BN on the image: image -> NestedMap(cur, extras)."""

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('input_dim', 3, 'Image channels.')
    p.Define('num_filters', 32, 'Output channels.')
    p.Define('stride', 2, 'Conv stride.')
    p.Define('padding', 'VALID', 'Conv padding.')
    p.Define('batch_norm_decay', 0.997, 'Moving-average decay of the BN.')
    return p

  @classmethod
  def ChildParams(cls, p) -> NestedMap:
    return NestedMap(
        conv=ops.Conv('conv', (3, 3), p.input_dim, p.num_filters, p.stride,
                      p.padding),
        bn=ops.BatchNorm('bn', p.num_filters, p.batch_norm_decay))

  def FProp(self, theta: NestedMap, inputs: Any) -> NestedMap:
    image = inputs.image if isinstance(inputs, dict) else inputs
    out = _Extras(inputs)
    out.cur = self.bn.FProp(theta.bn, self.conv.FProp(theta.conv, image))
    return out

  @classmethod
  def NumParams(cls, p) -> int:
    return _SumParams(cls.ChildParams(p))

  @classmethod
  def FPropMeta(cls, p, input_shapes):
    shapes = base_layer.ToShape(input_shapes)
    image = shapes.image if isinstance(shapes, dict) else shapes
    children = cls.ChildParams(p)
    meta = combinators.ChainMeta([children.conv, children.bn], [image])
    out = _Extras(shapes)
    out.cur = meta.out_shapes[0]
    return base_layer.Meta(meta.flops, out)


class _HeadBase(base_layer.BaseLayer):
  """A head: a chain of layers from inputs.cur to a new key's logits."""

  _OUTPUT_KEY = ''

  @classmethod
  def _Layers(cls, p) -> list[Params]:
    raise NotImplementedError

  @classmethod
  def _Output(cls, inputs: Any, logits: Any) -> NestedMap:
    raise NotImplementedError

  @classmethod
  def ChildParams(cls, p) -> NestedMap:
    return NestedMap(net=ops.ChainParams('net', cls._Layers(p)))

  def FProp(self, theta: NestedMap, inputs: NestedMap) -> NestedMap:
    return self._Output(inputs, self.net.FProp(theta.net, inputs.cur))

  @classmethod
  def NumParams(cls, p) -> int:
    return _SumParams(cls.ChildParams(p))

  @classmethod
  def FPropMeta(cls, p, input_shapes):
    shapes = base_layer.ToShape(input_shapes)
    net = cls.ChildParams(p).net
    meta = net.cls.FPropMeta(net, shapes.cur)
    return base_layer.Meta(meta.flops, cls._Output(shapes, meta.out_shapes[0]))


class AuxHead(_HeadBase):
  """The auxiliary classifier: adds aux_logits from cur, passes all through.

  ReLU, 5×5 avg-pool stride 3 VALID, 1×1 conv + BN + ReLU, a VALID conv
  covering the whole remaining map + BN + ReLU, dense to classes (with bias).
  """

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('input_dim', hyperparams.REQUIRED, 'Channels of inputs.cur.')
    p.Define('input_size', hyperparams.REQUIRED, '(h, w) of inputs.cur; the '
             'second conv covers the pooled map, so it must be known.')
    p.Define('num_classes', hyperparams.REQUIRED, 'Number of classes.')
    p.Define('aux_scaling', 0.4, 'Widths are int(128·s) and int(768·s).')
    p.Define('batch_norm_decay', 0.997, 'Moving-average decay of every BN.')
    return p

  @classmethod
  def _Layers(cls, p) -> list[Params]:
    h, w = conv.Pair(p.name, 'input_size', p.input_size)
    if min(h, w) < 5:
      raise ValueError(f'{p.name}: the aux head pools 5×5 VALID and needs a '
                       f'map of at least 5×5, got {h}×{w}. Use a larger '
                       'image or use_aux_head=False.')
    pooled = [conv.OutputSize(n, 5, 3, 'VALID') for n in (h, w)]
    proj, feat = int(128 * p.aux_scaling), int(768 * p.aux_scaling)
    decay = p.batch_norm_decay
    return [
        ops.Relu(),
        pooling.Pooling.Params().Set(name='pool', pooling_type='AVG',
                                     window=5, stride=3, padding='VALID'),
        ops.Conv('proj', (1, 1), p.input_dim, proj),
        ops.BatchNorm('proj_bn', proj, decay), ops.Relu('proj_relu'),
        ops.Conv('feat', pooled, proj, feat, padding='VALID'),
        ops.BatchNorm('feat_bn', feat, decay), ops.Relu('feat_relu'),
        pooling.GlobalAvgPool.Params().Set(name='flatten'),  # 1×1 map
        dense.Dense.Params().Set(name='logits', input_dim=feat,
                                 output_dim=p.num_classes, activation='none'),
    ]

  @classmethod
  def _Output(cls, inputs, logits):
    out = NestedMap(inputs)
    out.aux_logits = logits
    return out


class Head(_HeadBase):
  """The classifier: ReLU, global average pool, dropout, dense to classes.

  Returns NestedMap(logits, extras): prev and cur end here.
  """

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('input_dim', hyperparams.REQUIRED, 'Channels of inputs.cur.')
    p.Define('num_classes', hyperparams.REQUIRED, 'Number of classes.')
    p.Define('dropout_keep_prob', 1.0, 'Keep prob of the dropout before the '
             'dense layer.')
    return p

  @classmethod
  def _Layers(cls, p) -> list[Params]:
    return [ops.Relu(), pooling.GlobalAvgPool.Params().Set(name='pool'),
            dropout.Dropout.Params().Set(name='dropout',
                                         keep_prob=p.dropout_keep_prob),
            dense.Dense.Params().Set(name='logits', input_dim=p.input_dim,
                                     output_dim=p.num_classes,
                                     activation='none')]

  @classmethod
  def _Output(cls, inputs, logits):
    out = _Extras(inputs)
    out.logits = logits
    return out


# --- network --------------------------------------------------------------------


class _State(NamedTuple):
  """Channels and (h, w) of a cell output, tracked to size the next cells."""
  dim: int
  size: tuple[int, int]


def _Halved(size: tuple[int, int]) -> tuple[int, int]:
  return tuple(-(-n // 2) for n in size)  # SAME padding, stride 2


def _CheckNetwork(p) -> None:
  _OneOf(p.name, 'genotype', p.genotype, GENOTYPES)
  _OneOf(p.name, 'stem_type', p.stem_type, STEM_TYPES)
  if not isinstance(p.num_cells, int) or p.num_cells < 3:
    raise ValueError(f'{p.name}: num_cells (L, normal cells in 3 stacks) must '
                     f'be an int >= 3, got {p.num_cells!r}.')
  if not isinstance(p.num_filters, int) or p.num_filters < 1:
    raise ValueError(f'{p.name}: num_filters (D, filters of the first normal '
                     f'stack) must be a positive int, got {p.num_filters!r}.')


def NumStemCells(p) -> int:
  """Reduction-genotype cells in the stem: num_stem_cells, or by stem_type."""
  if p.num_stem_cells is not None:
    return p.num_stem_cells
  return 2 if p.stem_type == 'imagenet' else 0


def ReductionIndices(p) -> list[int]:
  """The normal cells that a reduction cell precedes: int(L/3), int(2L/3)."""
  return [int(p.num_cells / 3), int(2 * p.num_cells / 3)]


def AmoebaNetLayers(p) -> list[Params]:
  """The network `p` (AmoebaNet Params) as a flat list of layer Params.

  Stem, stem cells, then for each normal cell i: a reduction cell first if i
  is int(L/3) or int(2L/3), the normal cell, and after normal cell
  int(2L/3) - 1 the aux head (if use_aux_head); the head last.
  """
  _CheckNetwork(p)
  h, w = conv.Pair(p.name, 'image_size', p.image_size)
  decay = p.batch_norm_decay
  stride = 2 if p.stem_type == 'imagenet' else 1
  layers = [Stem.Params().Set(
      name='stem', input_dim=p.input_channels, num_filters=p.stem_filters,
      stride=stride, padding='VALID', batch_norm_decay=decay)]
  cur = _State(p.stem_filters, tuple(
      conv.OutputSize(n, 3, stride, 'VALID', p.name) for n in (h, w)))
  prev = None

  def AddCell(name: str, kind: str, filters: int) -> None:
    nonlocal cur, prev
    reduce_prev = prev is not None and prev.size != cur.size
    if reduce_prev and _Halved(prev.size) != cur.size:
      raise ValueError(f'{p.name}: {name} reads inputs of sizes {prev.size} '
                       f'and {cur.size}; a factorized reduction only halves.')
    cell = Cell.Params().Set(
        name=name, genotype=p.genotype, kind=kind, num_filters=filters,
        cur_dim=cur.dim, prev_dim=None if prev is None else prev.dim,
        reduce_prev=reduce_prev, batch_norm_decay=decay,
        drop_path_keep_prob=p.drop_path_keep_prob,
        drop_path_ramp_steps=p.drop_path_ramp_steps)
    layers.append(cell)
    size = cur.size if kind == 'normal' else _Halved(cur.size)
    prev, cur = cur, _State(Cell.OutputDim(cell), size)

  num_stem = NumStemCells(p)
  for i in range(num_stem):
    AddCell(f'stem_cell_{i}', 'reduction',
            int(p.num_filters / 2**(num_stem - i)))
  reductions = ReductionIndices(p)
  filters = p.num_filters
  for i in range(p.num_cells):
    if i in reductions:
      filters *= 2
      AddCell(f'reduction_cell_{reductions.index(i)}', 'reduction', filters)
    AddCell(f'normal_cell_{i}', 'normal', filters)
    if p.use_aux_head and i == reductions[1] - 1:
      layers.append(AuxHead.Params().Set(
          name='aux_head', input_dim=cur.dim, input_size=cur.size,
          num_classes=p.num_classes, aux_scaling=p.aux_scaling,
          batch_norm_decay=decay))
  layers.append(Head.Params().Set(
      name='head', input_dim=cur.dim, num_classes=p.num_classes,
      dropout_keep_prob=p.dense_dropout_keep_prob))
  return layers


class AmoebaNet(pipelined_network.PipelinedNetwork):
  """AmoebaNet-B/D: its flat layer list run by a PipeliningLayer child.

  FProp(theta, images or NestedMap(image, ...)) returns NestedMap(logits,
  [aux_logits,] other input keys). Its fields are the network's (L, D, ...)
  so a config can set task.network.num_cells; `pipeline` holds how it is
  pipelined. Sizes and FLOPs are static, from Params alone.
  """

  @classmethod
  def Params(cls):
    p = super().Params()
    p.Define('num_cells', 18, 'L: normal cells, in 3 stacks of L/3; >= 3.')
    p.Define('num_filters', 208, 'D: filters of the first normal stack; the '
             'reductions double them to 2D and 4D.')
    p.Define('genotype', 'D', f'AmoebaNet genotype: one of {sorted(GENOTYPES)}.')
    p.Define('num_classes', 1000, 'Number of classes.')
    p.Define('image_size', 224, 'Input (h, w), or one int for both.')
    p.Define('input_channels', 3, 'Input image channels.')
    p.Define('stem_type', 'imagenet', "'imagenet': 3×3 stride-2 VALID conv + "
             "BN, then 2 stem cells; 'basic' (CIFAR 32×32, 8×8 digits): 3×3 "
             'stride-1 VALID conv + BN, no stem cells.')
    p.Define('stem_filters', 32, 'Filters of the stem conv.')
    p.Define('num_stem_cells', None, 'Reduction-genotype cells after the stem '
             'conv, with D/2^n ... D/2 filters; None: by stem_type (2 or 0).')
    p.Define('use_aux_head', False, 'Add the aux head after normal cell '
             'int(2L/3) - 1; its logits travel as aux_logits (always '
             'computed; the task uses them in training).')
    p.Define('aux_scaling', 0.4, 'Aux head widths: int(128·s), int(768·s).')
    p.Define('drop_path_keep_prob', 1.0, 'Drop path keep prob in every cell.')
    p.Define('drop_path_ramp_steps', 0, 'If > 0, drop path ramps in linearly '
             'over this many steps (the public code\'s burn-in).')
    p.Define('dense_dropout_keep_prob', 1.0, 'Keep prob of the head dropout.')
    p.Define('batch_norm_decay', 0.997, 'Moving-average decay of every BN.')
    return p

  @classmethod
  def Layers(cls, p) -> list[Params]:
    return AmoebaNetLayers(p)

  @classmethod
  def DefaultInputShapes(cls, p) -> Any:
    # One image: costs scale with the batch, the balance does not.
    h, w = conv.Pair(p.name, 'image_size', p.image_size)
    return [[1, h, w, p.input_channels]]


def NetworkParams(num_cells: int, num_filters: int, *, num_partitions: int = 1,
                  num_micro_batches: int = 1, partition_method: str = 'params',
                  input_shapes: Any = None, **fields: Any) -> Params:
  """AmoebaNet Params (L, D, other fields), pipelined over num_partitions cells."""
  p = AmoebaNet.Params().Set(num_cells=num_cells, num_filters=num_filters,
                             **fields)
  p.pipeline.Set(num_partitions=num_partitions,
                 num_micro_batches=num_micro_batches,
                 partition_method=partition_method, input_shapes=input_shapes)
  return p
