"""BaseLayer: a layer declared by Params, computing only through its theta.

Invariants this module keeps:
- A layer is built from a copy of its Params; its children are built from
  theirs in `__init__`, so a whole model is a Params tree plus one Instantiate.
  A composite declares its children once, in `ChildParams(p)`: `__init__`
  builds them from it and classmethods (FPropMeta) size them from it.
- `FProp(theta, *inputs)` reads variables only through `theta`, a NestedMap of
  this layer's variables and its children's thetas. That lets the pipeline move
  a layer to a device, recompute it, and accumulate its gradients.
- Variables are initialized deterministically from (params seed, variable
  path): building the same Params twice gives the same weights.
- Size and cost are known from Params alone: `NumParams(p)` builds the layer
  tree in an abstract mode that allocates no variable, and `FPropMeta(p,
  *input_shapes)` gives output shapes and FLOPs.
- Mode and randomness come from an `ExecutionContext` (training or not, the
  step and micro-batch that seed random ops, and where batch statistics go).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
import zlib
from typing import Any, Callable, Iterator, Optional, Sequence

import tensorflow as tf

from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core import precision
from lingvo_gpipe.core import stacked_variable
from lingvo_gpipe.core.nested_map import NestedMap

Params = hyperparams.Params


# --- weight initialization --------------------------------------------------

_INIT_METHODS = ('xavier', 'gaussian', 'truncated_gaussian', 'uniform',
                 'constant', 'he')


class WeightInit:
  """Factories of weight-initialization Params (method, scale)."""

  @staticmethod
  def _Make(method: str, scale: float) -> Params:
    p = Params()
    p.Define('method', method, f'One of {_INIT_METHODS}.')
    p.Define('scale', scale, 'Scale, stddev, bound or constant, by method.')
    return p

  @staticmethod
  def Xavier(scale: float = 1.0) -> Params:
    """Uniform in ±scale·sqrt(6 / (fan_in + fan_out)) (Glorot)."""
    return WeightInit._Make('xavier', scale)

  @staticmethod
  def He(scale: float = 2.0) -> Params:
    """Normal with stddev sqrt(scale / fan_in) (He et al.), for ReLU convs."""
    return WeightInit._Make('he', scale)

  @staticmethod
  def Gaussian(stddev: float = 1.0) -> Params:
    return WeightInit._Make('gaussian', stddev)

  @staticmethod
  def TruncatedGaussian(stddev: float = 1.0) -> Params:
    return WeightInit._Make('truncated_gaussian', stddev)

  @staticmethod
  def Uniform(bound: float = 1.0) -> Params:
    return WeightInit._Make('uniform', bound)

  @staticmethod
  def Constant(value: float = 0.0) -> Params:
    return WeightInit._Make('constant', value)


def WeightParams(shape: Sequence[int],
                 init: Optional[Params] = None,
                 dtype: Optional[tf.DType] = None,
                 trainable: bool = True) -> Params:
  """Describes one variable: shape, init (None: the layer's), dtype, trainable."""
  p = Params()
  p.Define('shape', list(shape), 'Variable shape.')
  p.Define('init', init, "WeightInit Params; None uses the layer's params_init.")
  p.Define('dtype', dtype, "Variable dtype; None uses the layer's dtype.")
  p.Define('trainable', trainable, 'Whether optimizers update it.')
  return p


def _Fans(shape: Sequence[int]) -> tuple[int, int]:
  """(fan_in, fan_out) of a dense [in, out] or conv [h, w, in, out] kernel."""
  if not shape:
    return 1, 1
  if len(shape) == 1:
    return shape[0], shape[0]
  receptive = math.prod(shape[:-2]) if len(shape) > 2 else 1
  return shape[-2] * receptive, shape[-1] * receptive


def _InitialValue(init: Params, shape: Sequence[int], dtype: tf.DType,
                  seed: tf.Tensor) -> tf.Tensor:
  method, scale = init.method, init.scale
  fan_in, fan_out = _Fans(shape)
  if method == 'constant':
    return tf.fill(shape, tf.cast(scale, dtype))
  if method == 'xavier':
    bound = scale * math.sqrt(6.0 / (fan_in + fan_out))
    return tf.random.stateless_uniform(shape, seed, -bound, bound, dtype=dtype)
  if method == 'uniform':
    return tf.random.stateless_uniform(shape, seed, -scale, scale, dtype=dtype)
  if method == 'gaussian':
    return tf.random.stateless_normal(shape, seed, stddev=scale, dtype=dtype)
  if method == 'truncated_gaussian':
    return tf.random.stateless_truncated_normal(
        shape, seed, stddev=scale, dtype=dtype)
  if method == 'he':
    stddev = math.sqrt(scale / fan_in)
    return tf.random.stateless_normal(shape, seed, stddev=stddev, dtype=dtype)
  raise ValueError(f'Unknown weight init method {method!r}; valid: '
                   f'{", ".join(_INIT_METHODS)}.')


def StableSeed(*parts: Any) -> int:
  """A 31-bit seed from strings/ints, equal across processes (unlike hash)."""
  return zlib.crc32('/'.join(str(p) for p in parts).encode()) & 0x7FFFFFFF


# --- execution context -------------------------------------------------------


class StatsCollector:
  """Holds statistics that layers record in training instead of applying them.

  BatchNorm records its batch moments on every call. Without a collector they
  update the moving averages at once; the pipeline installs a collector so that
  all micro-batches' moments are merged and applied once per mini-batch.
  """

  def __init__(self):
    self.records: list[tuple['BaseLayer', NestedMap]] = []

  def Add(self, layer: 'BaseLayer', stats: NestedMap) -> None:
    self.records.append((layer, stats))

  def ByLayer(self) -> list[tuple['BaseLayer', list[NestedMap]]]:
    """Records grouped by layer, in the order layers first recorded."""
    groups: dict[int, tuple[BaseLayer, list[NestedMap]]] = {}
    for layer, stats in self.records:
      groups.setdefault(id(layer), (layer, []))[1].append(stats)
    return list(groups.values())

  def Gathered(self, cross_replica_sum: Optional[Callable[[Any], Any]] = None
               ) -> list[tuple['BaseLayer', list[NestedMap]]]:
    """Records by layer; with data-parallel replicas, merged with all replicas'.

    Args:
      cross_replica_sum: sums a nested structure of tensors over the
        replicas (an all-reduce); None when there is one replica.
    """
    groups = self.ByLayer()
    if cross_replica_sum is None:
      return groups
    return [(layer, layer.CrossReplicaStats(stats_list, cross_replica_sum))
            for layer, stats_list in groups]

  def ApplyAll(self, gathered: Optional[list[tuple['BaseLayer',
                                                   list[NestedMap]]]] = None
               ) -> None:
    """Applies every layer's merged statistics once (by default this collector's)."""
    for layer, stats_list in (self.ByLayer() if gathered is None else gathered):
      layer.ApplyStats(stats_list)


@dataclasses.dataclass(frozen=True)
class ExecutionContext:
  """How layers run now. Set with `with Context(...)`; read with CurrentContext.

  Attributes:
    training: training mode (batch statistics, dropout on) vs. inference.
    step: int or scalar tensor; seeds random ops together with micro_batch so
      masks differ per step and micro-batch, yet repeat under recomputation.
    micro_batch: int or scalar tensor, the micro-batch index.
    stats_collector: where training statistics go; None applies them at once.
    repeat_iterations: inside Repeat layers, the iteration (int or scalar
      tensor) of each enclosing Repeat, outermost first; seeds random ops so
      that every iteration draws its own masks.
  """
  training: bool = False
  step: Any = 0
  micro_batch: Any = 0
  stats_collector: Optional[StatsCollector] = None
  repeat_iterations: tuple = ()


_UNSET = object()
_local = threading.local()


def CurrentContext() -> ExecutionContext:
  stack = getattr(_local, 'contexts', None)
  return stack[-1] if stack else ExecutionContext()


@contextlib.contextmanager
def Context(training: Any = _UNSET, step: Any = _UNSET,
            micro_batch: Any = _UNSET,
            stats_collector: Any = _UNSET,
            repeat_iterations: Any = _UNSET) -> Iterator[ExecutionContext]:
  """Sets fields of the execution context; unset fields keep their value."""
  changes = {k: v for k, v in dict(
      training=training, step=step, micro_batch=micro_batch,
      stats_collector=stats_collector,
      repeat_iterations=repeat_iterations).items() if v is not _UNSET}
  ctx = dataclasses.replace(CurrentContext(), **changes)
  if not hasattr(_local, 'contexts'):
    _local.contexts = []
  _local.contexts.append(ctx)
  try:
    yield ctx
  finally:
    _local.contexts.pop()


# --- abstract building (sizes without allocation) ---------------------------


class AbstractVariable:
  """Stands in for a tf.Variable when a layer tree is built only to be sized."""

  def __init__(self, name: str, shape: Sequence[int], dtype: tf.DType,
               trainable: bool):
    self.name = name
    self.shape = tf.TensorShape(shape)
    self.dtype = dtype
    self.trainable = trainable

  def __repr__(self) -> str:
    return f'AbstractVariable({self.name}, {self.shape}, {self.dtype.name})'


@contextlib.contextmanager
def AbstractBuild() -> Iterator[None]:
  """Within it, CreateVariable makes AbstractVariables: nothing is allocated."""
  previous = getattr(_local, 'abstract', False)
  _local.abstract = True
  try:
    yield
  finally:
    _local.abstract = previous


def _IsAbstract() -> bool:
  return getattr(_local, 'abstract', False)


def _InitSeed(p: Params, *path: Any) -> tf.Tensor:
  """The init seed of the variable at `path` (and iteration, if stacked)."""
  return tf.constant([p.random_seed, StableSeed(*path)], tf.int64)


def _NewVariable(full_name: str, shape: Sequence[int], dtype: tf.DType,
                 trainable: bool, initial_value: Callable[[], tf.Tensor]
                 ) -> Any:
  """A tf.Variable named by its path, or an AbstractVariable when sizing."""
  if _IsAbstract():
    return AbstractVariable(full_name, shape, dtype, trainable)
  with tf.init_scope():
    # Under a strategy that mirrors variables (TPUStrategy), a state update
    # such as a moving average is assigned in every replica with the same
    # value; only the first replica's assignment need apply.
    return tf.Variable(
        initial_value(), name=full_name.replace('/', '.'),
        trainable=trainable,
        aggregation=(tf.VariableAggregation.NONE if trainable else
                     tf.VariableAggregation.ONLY_FIRST_REPLICA))


@dataclasses.dataclass(frozen=True)
class _Stacking:
  piece_sizes: tuple[int, ...]
  piece_scopes: Optional[Sequence[Callable[[], Any]]]


@contextlib.contextmanager
def StackedBuild(piece_sizes: Sequence[int],
                 piece_scopes: Optional[Sequence[Callable[[], Any]]] = None
                 ) -> Iterator[None]:
  """Within it, CreateVariable makes StackedVariables of sum(piece_sizes) iterations.

  Piece i (piece_sizes[i] iterations) is created under piece_scopes[i]() if
  given, e.g. the device of the pipeline cell that runs those iterations.
  The Repeat layer builds its body under it.
  """
  if getattr(_local, 'stacking', None) is not None:
    raise ValueError('A Repeat inside a Repeat is not supported: its body '
                     'would need weights stacked twice. Flatten the two into '
                     'one Repeat, or unroll the inner one.')
  if piece_scopes is not None and len(piece_scopes) != len(piece_sizes):
    raise ValueError(f'{len(piece_scopes)} piece scopes for '
                     f'{len(piece_sizes)} pieces.')
  _local.stacking = _Stacking(tuple(piece_sizes), piece_scopes)
  try:
    yield
  finally:
    _local.stacking = None


def _IsShapeLeaf(x: Any) -> bool:
  return (isinstance(x, tf.TensorShape) or hasattr(x, 'shape') or
          (isinstance(x, (list, tuple)) and
           all(d is None or isinstance(d, int) for d in x)))


def ToShape(value: Any) -> Any:
  """Maps a nested structure of shapes, tensors or specs to tf.TensorShapes.

  A leaf is a TensorShape, anything with `.shape`, or a list/tuple of ints;
  dicts (NestedMaps) and other lists/tuples are structure.
  """
  if _IsShapeLeaf(value):
    return tf.TensorShape(getattr(value, 'shape', value))
  if isinstance(value, dict):
    # A NestedMap, also when the shapes were read back from Params text.
    return NestedMap((k, ToShape(v)) for k, v in value.items())
  if isinstance(value, (list, tuple)):
    return type(value)(ToShape(v) for v in value)
  raise TypeError(f'Cannot read a shape from {value!r} ({type(value).__name__}).')


def SizedOncePerConfig(num_params_fn):
  """Memoizes a `NumParams(cls, p)` classmethod body on p's fields but `name`.

  The layers of a deep stack differ only by name, and sizing one by an
  abstract build takes milliseconds: Transformer-L's 1663 layers or
  AmoebaNet's cells are sized once per distinct configuration instead.
  """
  known: dict[type, list[tuple[dict[str, Any], int]]] = {}

  @functools.wraps(num_params_fn)
  def Wrapper(cls, p: Params) -> int:
    fields = {k: v for k, v in p.IterParams() if k != 'name'}
    entries = known.setdefault(cls, [])
    for seen, count in entries:
      if seen == fields:
        return count
    count = num_params_fn(cls, p)
    entries.append(({k: v for k, v in p.Copy().IterParams() if k != 'name'},
                    count))
    return count

  return Wrapper


# --- the layer ---------------------------------------------------------------


class BaseLayer(tf.Module):
  """Base of all layers: Params in, variables and children built, FProp out."""

  # Mixed precision (precision.py): with fprop_dtype set, FProp gets its own
  # float weights and its float inputs cast to it. A layer that casts (or
  # keeps in float32) on its own turns these off.
  cast_theta_to_fprop_dtype = True
  cast_inputs_to_fprop_dtype = True

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    fprop = cls.__dict__.get('FProp')
    if fprop is not None and not getattr(fprop, 'casts_to_fprop_dtype', False):
      cls.FProp = precision.CastingFProp(fprop)

  @classmethod
  def Params(cls) -> hyperparams.InstantiableParams:
    """The knobs every layer has; subclasses extend this with their own."""
    p = hyperparams.InstantiableParams(cls)
    p.Define('name', cls.__name__.lower(), 'Layer name; a child gets the '
             'name its parent gives it.')
    p.Define('dtype', tf.float32, 'Dtype of variables (and of computation '
             'unless fprop_dtype says otherwise).')
    p.Define('fprop_dtype', None, 'Dtype FProp computes in: None (dtype), '
             'or bfloat16 or float16 over float32 variables; numerically '
             'sensitive parts stay in float32 (precision.py).')
    p.Define('params_init', WeightInit.Xavier(1.0),
             'Default weight initialization of this layer and its children.')
    p.Define('random_seed', 0, 'Seed of weight init and random ops; with the '
             'layer path it makes every variable and mask reproducible.')
    return p

  def __init__(self, params: hyperparams.InstantiableParams):
    p = params.Copy()
    if not p.name:
      raise ValueError(f'{type(self).__name__} needs a non-empty params.name.')
    super().__init__(name=_ModuleName(p.name))
    self._params = p
    self._path = getattr(_local, 'child_path', None) or p.name
    self._fprop_dtype = precision.ComputeDtype(p.fprop_dtype, p.dtype,
                                               f'{self._path}.fprop_dtype')
    self._variables_by_name: dict[str, Any] = {}
    self._children_by_name: dict[str, Any] = {}
    for name, child in self.ChildParams(p).items():
      if isinstance(child, (list, tuple)):
        self.CreateChildren(name, child)
      elif child is not None:
        self.CreateChild(name, child)

  @classmethod
  def ChildParams(cls, p: Params) -> NestedMap:
    """name -> Params of the children a layer of Params `p` has, in build order.

    The one declaration of a composite's children: BaseLayer.__init__ builds
    them (CreateChild; a list of Params: CreateChildren; None: no child), so
    they exist when a subclass's `__init__` body runs, and classmethods such
    as FPropMeta read the same Params instead of repeating them. It may
    check `p` (raise ValueError). Default: none; a layer whose children need
    more (a device scope per child) creates them in `__init__` itself.
    """
    del p
    return NestedMap()

  @property
  def params(self) -> hyperparams.InstantiableParams:
    """A copy of the Params this layer was built from; do not mutate."""
    return self._params

  @property
  def fprop_dtype(self) -> tf.DType:
    """The dtype FProp computes in (precision.py)."""
    return self._fprop_dtype

  @property
  def path(self) -> str:
    """Slash-separated position in the layer tree, e.g. `net/layers_0/fc`."""
    return self._path

  # --- building --------------------------------------------------------------

  def _BuildChild(self, name: str, params: Params) -> 'BaseLayer':
    p = params.Copy()
    p.name = name
    _InheritBaseParams(self._params, p)
    previous = getattr(_local, 'child_path', None)
    _local.child_path = f'{self._path}/{name}'
    try:
      return p.Instantiate()
    finally:
      _local.child_path = previous

  def CreateChild(self, name: str, params: Params) -> 'BaseLayer':
    """Builds a child layer from `params` under `name`; available as self.name."""
    self._CheckNewName(name)
    child = self._BuildChild(name, params)
    self._children_by_name[name] = child
    setattr(self, name, child)
    return child

  def CreateChildren(
      self, name: str, params_list: Sequence[Params],
      child_scope: Optional[Callable[[int], contextlib.AbstractContextManager]]
      = None) -> list['BaseLayer']:
    """Builds a list of children `name[0..n)`; available as self.name (a list).

    Args:
      name: the list's name; child i is `name_i` in paths.
      params_list: the children's Params.
      child_scope: if given, child i is built under child_scope(i), e.g. the
        device its variables live on; its path and weights do not depend on it.
    """
    self._CheckNewName(name)
    children = []
    for i, p in enumerate(params_list):
      with child_scope(i) if child_scope else contextlib.nullcontext():
        children.append(self._BuildChild(f'{name}_{i}', p))
    self._children_by_name[name] = children
    setattr(self, name, children)
    return children

  def CreateVariable(self, name: str, weight_params: Params) -> Any:
    """Creates variable `name` (in theta as theta.name) from WeightParams."""
    self._CheckNewName(name)
    p = self._params
    wp = weight_params
    dtype = wp.dtype or p.dtype
    full_name = f'{self._path}/{name}'
    init = wp.init or p.params_init
    stacking = getattr(_local, 'stacking', None)
    if stacking is None:
      var = _NewVariable(full_name, wp.shape, dtype, wp.trainable,
                         lambda: _InitialValue(init, wp.shape, dtype,
                                               _InitSeed(p, full_name)))
    else:
      var = self._CreateStacked(full_name, wp, init, dtype, stacking)
      # tf.Module finds the pieces here (untracked: they save through var).
      setattr(self, f'_pieces_{name}', self._no_dependency(list(var.pieces)))
    self._variables_by_name[name] = var
    setattr(self, f'_var_{name}', var)  # the checkpoint's key
    return var

  def _CreateStacked(self, full_name: str, wp: Params, init: Params,
                     dtype: tf.DType, stacking: _Stacking) -> Any:
    """A StackedVariable: iteration t initialized as if it were its own layer."""
    p = self._params
    pieces, start = [], 0
    for i, size in enumerate(stacking.piece_sizes):
      piece_name = (full_name if len(stacking.piece_sizes) == 1 else
                    f'{full_name}/piece_{i}')
      iterations = range(start, start + size)
      scope = (stacking.piece_scopes[i]() if stacking.piece_scopes else
               contextlib.nullcontext())
      with scope:
        pieces.append(_NewVariable(
            piece_name, [size] + list(wp.shape), dtype, wp.trainable,
            lambda iterations=iterations: tf.stack([
                _InitialValue(init, wp.shape, dtype,
                              _InitSeed(p, full_name, t))
                for t in iterations])))
      start += size
    return stacked_variable.StackedVariable(full_name.replace('/', '.'),
                                            pieces)

  def _CheckNewName(self, name: str) -> None:
    if name in self._variables_by_name or name in self._children_by_name:
      raise ValueError(f'{self._path}: {name!r} is already a variable or child.')

  # --- theta -----------------------------------------------------------------

  def _Nested(self, of: Callable[['BaseLayer'], NestedMap]) -> NestedMap:
    """This layer's variables, and `of(child)` under each child's name."""
    result = NestedMap(self._variables_by_name)
    for name, child in self._children_by_name.items():
      result[name] = ([of(c) for c in child] if isinstance(child, list)
                      else of(child))
    return result

  @property
  def vars(self) -> NestedMap:
    """This layer's and its children's variables, nested like theta."""
    return self._Nested(lambda child: child.vars)

  def StoredVars(self) -> NestedMap:
    """The variables as a checkpoint stores them, nested like the layers.

    As `vars`, but a Repeat's stacked weight is one StackedVariable, where
    its `vars` (and theta) hold one entry per piece the pipeline cut.
    """
    return self._Nested(lambda child: child.StoredVars())

  @property
  def theta(self) -> NestedMap:
    """The values FProp computes from; here the variables themselves."""
    return self.vars

  def ReadTheta(self) -> NestedMap:
    """Theta as tensors (reads every variable once), e.g. to pass to FProp."""
    return self.vars.Transform(tf.convert_to_tensor)

  @property
  def children_layers(self) -> NestedMap:
    return NestedMap(self._children_by_name)

  # --- computation -------------------------------------------------------------

  def FProp(self, theta: NestedMap, *inputs: Any) -> Any:
    """Computes outputs from theta and inputs. Subclasses override."""
    raise TypeError(f'{type(self).__name__} must override FProp.')

  def FPropDefaultTheta(self, *inputs: Any) -> Any:
    """FProp with this layer's own variables as theta."""
    return self.FProp(self.theta, *inputs)

  def __call__(self, *inputs: Any) -> Any:
    return self.FPropDefaultTheta(*inputs)

  def OutputScope(self) -> contextlib.AbstractContextManager:
    """Context for ops that consume this layer's output, e.g. a loss.

    A pipeline's output lives on its last cell's device; running the loss
    (and its gradient) there keeps the output and its gradient from crossing
    to the caller's default device and back every step. Default: no scope.
    """
    return contextlib.nullcontext()

  # --- randomness and statistics ---------------------------------------------

  def StatelessSeed(self, salt: str = '') -> tf.Tensor:
    """A stateless-RNG seed for this layer at the context's step and micro-batch.

    Equal in a cell's forward pass and its recomputation (same context), and
    different across steps, micro-batches, layers and Repeat iterations.
    """
    ctx = CurrentContext()
    seed = tf.constant(
        [self._params.random_seed, StableSeed(self._path, salt)], tf.int64)
    seed = tf.random.experimental.stateless_fold_in(
        seed, tf.cast(ctx.step, tf.int64))
    seed = tf.random.experimental.stateless_fold_in(
        seed, tf.cast(ctx.micro_batch, tf.int64))
    for iteration in ctx.repeat_iterations:
      seed = tf.random.experimental.stateless_fold_in(
          seed, tf.cast(iteration, tf.int64))
    return seed

  def RecordStats(self, stats: NestedMap) -> None:
    """Hands training statistics to the context's collector, or applies them."""
    collector = CurrentContext().stats_collector
    if collector is not None:
      collector.Add(self, stats)
    else:
      self.ApplyStats([stats])

  def ApplyStats(self, stats_list: Sequence[NestedMap]) -> None:
    """Merges statistics recorded over micro-batches and applies them once."""
    raise TypeError(f'{type(self).__name__} records stats but does not '
                    'override ApplyStats.')

  def MergeStats(self, stats_list: Sequence[NestedMap]) -> NestedMap:
    """The statistics of all of `stats_list`'s examples as one record.

    An executor that keeps a running merge over micro-batches (the loop
    executor) calls it with two records at a time; applying the merged
    record must equal applying the list.
    """
    raise TypeError(f'{type(self).__name__} records stats but does not '
                    'override MergeStats, so the loop executor cannot run it.')

  def CrossReplicaStats(self, stats_list: Sequence[NestedMap],
                        cross_replica_sum: Callable[[Any], Any]
                        ) -> list[NestedMap]:
    """This replica's recorded statistics merged with every replica's.

    Data-parallel training calls it (in the same order on every replica)
    before ApplyStats, so that all replicas apply the whole mini-batch's
    statistics and stay equal.
    """
    raise TypeError(f'{type(self).__name__} records stats but does not '
                    'override CrossReplicaStats, so it cannot train with '
                    'data-parallel replicas.')

  # --- static size and cost ---------------------------------------------------

  @classmethod
  @SizedOncePerConfig
  def NumParams(cls, p: Params) -> int:
    """Trainable scalars of the layer `p` describes, without allocating them."""
    with AbstractBuild():
      layer = p.Instantiate()
    return sum(
        v.shape.num_elements() for v in layer.vars.Flatten() if v.trainable)

  @classmethod
  def NumUnits(cls, p: Params) -> int:
    """Units a pipeline may cut this layer into (between them); 1: never cut.

    A Repeat has one per iteration; partition.py balances units.
    """
    del p
    return 1

  @classmethod
  def FPropMeta(cls, p: Params, *input_shapes: Any) -> NestedMap:
    """NestedMap(flops=int, out_shapes=tuple) of FProp on inputs of these shapes.

    Shapes are tf.TensorShapes (or lists, or NestedMaps of them), batch dim
    included. Each layer states its own; FLOPs count a multiply-add as 2.
    """
    raise TypeError(f'{cls.__name__} must override FPropMeta.')


def _InheritBaseParams(parent: Params, child: Params) -> None:
  """A child left at the base defaults takes its parent's dtype, fprop_dtype,
  init and seed.

  So setting them once on a model's top Params reaches every layer, while a
  child that sets its own keeps it.
  """
  defaults = BaseLayer.Params()
  for name in ('dtype', 'fprop_dtype', 'params_init', 'random_seed'):
    if name in child and child.Get(name) == defaults.Get(name):
      child.Set(**{name: parent.Get(name)})


def _ModuleName(name: str) -> str:
  cleaned = ''.join(c if c.isalnum() or c == '_' else '_' for c in name)
  return cleaned if cleaned and not cleaned[0].isdigit() else f'l_{cleaned}'


def Meta(flops: int, *out_shapes: Any) -> NestedMap:
  """The FPropMeta result: FLOPs and a tuple of output shapes."""
  return NestedMap(flops=int(flops), out_shapes=tuple(out_shapes))
