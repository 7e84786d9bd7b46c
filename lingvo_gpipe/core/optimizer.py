"""Optimizers whose slots live beside their variables: SGD, momentum, RMSProp, Adam.

Invariant: `Build(variables)` creates every slot once, eagerly, each on its
variable's device (a pipeline cell's weights and their optimizer state stay on
that cell's device), so `Apply` can run inside a traced training step and a
`tf.train.Checkpoint` of the optimizer saves and restores all of its state.
Each update is one fused TensorFlow kernel per variable, which keeps the
traced training step small.

The hyperparameters are fields of `train` (`model_params.ModelParams.Train`):
`optimizer` picks the algorithm by name and the other fields say which one
uses them.
"""

from __future__ import annotations

import difflib
import types
from typing import Optional, Sequence

import tensorflow as tf

from lingvo_gpipe.core import hyperparams
from lingvo_gpipe.core import stacked_variable


class Optimizer(tf.Module):
  """Base: `Build` the slots, then `Apply(grads, variables, learning_rate)`."""

  SLOTS: tuple[str, ...] = ()

  def __init__(self, train_params: hyperparams.Params):
    super().__init__(name=type(self).__name__.lower())
    self.params = train_params.Copy()
    # slot name -> {variable name -> slot variable}; tracked for checkpoints.
    self.slots = {slot: {} for slot in self.SLOTS}
    # variable name -> the variable's ref(), for Build; in a plain object so
    # that checkpoints do not try to track it.
    self._names = types.SimpleNamespace(owners={})
    self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False,
                                  name='iterations')

  def Build(self, variables: Sequence[tf.Variable]) -> None:
    """Creates the slots of `variables` (eagerly; idempotent).

    Raises:
      ValueError: if two different variables share a name: slots are keyed
        by name (what makes them checkpoint by name), so each needs its own.
    """
    for var in variables:
      stacked = _StackedOwner(var)
      identity = var.ref() if stacked is None else id(stacked)
      owner = self._names.owners.setdefault(_Key(var), identity)
      if owner != identity:
        raise ValueError(
            f'{type(self).__name__}: two different variables are named '
            f'{_Key(var)!r}; the optimizer keys its slots by variable name. '
            'Give every variable a unique name (layer variables have their '
            'layer path).')
      for slot, table in self.slots.items():
        if _Key(var) in table:
          continue
        if stacked is None:
          table[_Key(var)] = _ZerosLike(var, f'{_Key(var)}/{slot}')
        else:
          # A piece of a Repeat's stacked weight: the slot is stacked and cut
          # alike (each piece beside its weight), and checkpoints as one.
          table[_Key(var)] = stacked.Map(
              lambda piece, i, slot=slot: _ZerosLike(
                  piece, f"{piece.name.split(':')[0]}/{slot}"),
              f'{_Key(var)}/{slot}')

  def Slot(self, var: tf.Variable, slot: str) -> tf.Variable:
    try:
      entry = self.slots[slot][_Key(var)]
    except KeyError:
      raise ValueError(f'{type(self).__name__}: no {slot!r} slot for '
                       f'{var.name}; call Build(variables) before Apply.'
                       ) from None
    if isinstance(entry, stacked_variable.StackedVariable):
      return entry.pieces[var.stacked_owner[1]]
    return entry

  def SlotVariables(self) -> list[tf.Variable]:
    """Every slot variable, in a fixed order (slot name, then variable name)."""
    out = []
    for _, table in sorted(self.slots.items()):
      for name in sorted(table):
        entry = table[name]
        out.extend(entry.pieces if isinstance(
            entry, stacked_variable.StackedVariable) else [entry])
    return out

  def Apply(self, grads: Sequence[tf.Tensor], variables: Sequence[tf.Variable],
            learning_rate: tf.Tensor) -> tf.Operation:
    """One update of every variable that has a gradient (None: skipped)."""
    updates = []
    lr = tf.cast(learning_rate, tf.float32)
    for grad, var in zip(grads, variables):
      if grad is None:
        continue
      with tf.device(var.device):
        updates.append(self._ApplyOne(tf.convert_to_tensor(grad), var,
                                      tf.cast(lr, var.dtype)))
    with tf.control_dependencies(updates):
      return self.iterations.assign_add(1).op

  def _ApplyOne(self, grad: tf.Tensor, var: tf.Variable,
                lr: tf.Tensor) -> tf.Operation:
    raise NotImplementedError  # every optimizer in OPTIMIZERS overrides it


class Sgd(Optimizer):
  """var -= lr · grad."""

  def _ApplyOne(self, grad, var, lr):
    return tf.raw_ops.ResourceApplyGradientDescent(var=var.handle, alpha=lr,
                                                   delta=grad)


class Momentum(Optimizer):
  """accum = momentum · accum + grad; var -= lr · accum (or Nesterov)."""

  SLOTS = ('momentum',)

  def _ApplyOne(self, grad, var, lr):
    p = self.params
    return tf.raw_ops.ResourceApplyMomentum(
        var=var.handle, accum=self.Slot(var, 'momentum').handle, lr=lr,
        grad=grad, momentum=tf.cast(p.momentum, var.dtype),
        use_nesterov=p.nesterov)


class RmsProp(Optimizer):
  """RMSProp with momentum, as the GPipe/AmoebaNet image experiments use."""

  SLOTS = ('rms', 'momentum')

  def _ApplyOne(self, grad, var, lr):
    p = self.params
    return tf.raw_ops.ResourceApplyRMSProp(
        var=var.handle, ms=self.Slot(var, 'rms').handle,
        mom=self.Slot(var, 'momentum').handle, lr=lr,
        rho=tf.cast(p.rmsprop_decay, var.dtype),
        momentum=tf.cast(p.momentum, var.dtype),
        epsilon=tf.cast(p.epsilon, var.dtype), grad=grad)


class Adam(Optimizer):
  """Adam with bias correction from the update count."""

  SLOTS = ('m', 'v')

  def _ApplyOne(self, grad, var, lr):
    p = self.params
    t = tf.cast(self.iterations + 1, var.dtype)
    beta1 = tf.cast(p.beta1, var.dtype)
    beta2 = tf.cast(p.beta2, var.dtype)
    return tf.raw_ops.ResourceApplyAdam(
        var=var.handle, m=self.Slot(var, 'm').handle,
        v=self.Slot(var, 'v').handle, beta1_power=tf.pow(beta1, t),
        beta2_power=tf.pow(beta2, t), lr=lr, beta1=beta1, beta2=beta2,
        epsilon=tf.cast(p.epsilon, var.dtype), grad=grad)


OPTIMIZERS = {'sgd': Sgd, 'momentum': Momentum, 'rmsprop': RmsProp,
              'adam': Adam}


def Create(train_params: hyperparams.Params) -> Optimizer:
  """The optimizer `train_params.optimizer` names, configured by the others."""
  name = train_params.optimizer
  if name not in OPTIMIZERS:
    close = difflib.get_close_matches(str(name), OPTIMIZERS, n=1)
    hint = f' Did you mean {close[0]!r}?' if close else ''
    raise hyperparams.ConfigError(f'train.optimizer={name!r} is not an optimizer; valid: '
                                  f'{", ".join(OPTIMIZERS)}.{hint}')
  if train_params.learning_rate <= 0:
    raise hyperparams.ConfigError('train.learning_rate must be > 0, got '
                                  f'{train_params.learning_rate}.')
  return OPTIMIZERS[name](train_params)


def _Key(var: tf.Variable) -> str:
  """Layer variables have unique path names ('network.pipeline.layers_0.w').

  A piece of a stacked variable is keyed by the whole (its slots are stacked).
  """
  stacked = _StackedOwner(var)
  if stacked is not None:
    return stacked.name
  return var.name.split(':')[0]


def _StackedOwner(var: tf.Variable) -> Optional[stacked_variable.StackedVariable]:
  owner = getattr(var, 'stacked_owner', None)
  return None if owner is None else owner[0]


def _ZerosLike(var: tf.Variable, name: str) -> tf.Variable:
  with tf.init_scope(), tf.device(var.device):
    return tf.Variable(tf.zeros(var.shape, var.dtype), trainable=False,
                       name=name)
