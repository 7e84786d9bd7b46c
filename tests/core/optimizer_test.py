"""Tests of the optimizers: updates against numpy references, slots and errors.

Each optimizer runs 3 steps with different gradients and learning rates and is
compared with an independent numpy implementation of its update rule. The
other tests cover skipped (None) gradients, slot placement, tracing, `Create`'s
validation and checkpointing of slots and the update count.
"""

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe import model_params
from lingvo_gpipe.core import optimizer

_LRS = (0.1, 0.05, 0.2)  # a different learning rate at each step
_INIT = {'a/w': np.array([[1.0, -2.0, 0.5], [3.0, 0.0, -1.5]], np.float32),
         'b/bias': np.array([0.25, -0.75], np.float32)}
_DEVICES = {'a/w': '/device:CPU:1', 'b/bias': '/device:CPU:2'}


def _Train(name, **kwargs):
  return model_params.ModelParams().Train().Set(optimizer=name, **kwargs)


def _Grads(step):
  """Different gradients (signs and scales) at every step."""
  rng = np.random.default_rng(100 + step)
  return {k: (rng.normal(size=v.shape) * (step + 1)).astype(np.float32)
          for k, v in _INIT.items()}


def _Variables():
  """The variables of _INIT, each on its own device of the 4 test CPUs."""
  out = {}
  for name, value in _INIT.items():
    with tf.device(_DEVICES[name]):
      out[name] = tf.Variable(value, name=name)
  return out


# Independent numpy references (float64). Each takes (var, grad, lr, state, t)
# and returns the new var; `state` is a dict of slots it updates in place.


def _RefSgd(p, var, g, lr, state, t):
  del p, state, t
  return var - lr * g


def _RefMomentum(p, var, g, lr, state, t):
  del t
  accum = p.momentum * state.get('momentum', 0.0) + g
  state['momentum'] = accum
  if p.nesterov:
    return var - lr * (g + p.momentum * accum)
  return var - lr * accum


def _RefRmsProp(p, var, g, lr, state, t):
  del t
  ms = p.rmsprop_decay * state.get('rms', 0.0) + (1 - p.rmsprop_decay) * g**2
  mom = p.momentum * state.get('momentum', 0.0) + lr * g / np.sqrt(
      ms + p.epsilon)
  state['rms'], state['momentum'] = ms, mom
  return var - mom


def _RefAdam(p, var, g, lr, state, t):
  m = p.beta1 * state.get('m', 0.0) + (1 - p.beta1) * g
  v = p.beta2 * state.get('v', 0.0) + (1 - p.beta2) * g**2
  state['m'], state['v'] = m, v
  lr_t = lr * np.sqrt(1 - p.beta2**t) / (1 - p.beta1**t)
  return var - lr_t * m / (np.sqrt(v) + p.epsilon)


# name, train overrides, reference. Non-default hyperparameters, and an
# epsilon large enough to matter, so a dropped or misplaced term shows.
_CASES = [
    ('sgd', {}, _RefSgd),
    ('momentum', dict(momentum=0.8, nesterov=False), _RefMomentum),
    ('momentum', dict(momentum=0.8, nesterov=True), _RefMomentum),
    ('rmsprop', dict(momentum=0.7, rmsprop_decay=0.85, epsilon=1e-2),
     _RefRmsProp),
    ('adam', dict(beta1=0.8, beta2=0.95, epsilon=1e-3), _RefAdam),
]
_IDS = ['sgd', 'momentum', 'nesterov', 'rmsprop', 'adam']


def _Reference(p, ref, num_steps):
  """Variables and slots after `num_steps` reference updates."""
  values = {k: v.astype(np.float64) for k, v in _INIT.items()}
  states = {k: {} for k in _INIT}
  for step in range(num_steps):
    grads = _Grads(step)
    for k in values:
      values[k] = ref(p, values[k], grads[k].astype(np.float64), _LRS[step],
                      states[k], step + 1)
  return values, states


@pytest.mark.parametrize('traced', [False, True], ids=['eager', 'tf_function'])
@pytest.mark.parametrize('name,overrides,ref', _CASES, ids=_IDS)
def test_matches_numpy_reference_over_three_steps(name, overrides, ref, traced):
  p = _Train(name, **overrides)
  opt = optimizer.Create(p)
  variables = _Variables()
  names = sorted(variables)
  var_list = [variables[k] for k in names]
  opt.Build(var_list)

  def Step(grads, lr):
    opt.Apply(grads, var_list, lr)

  if traced:
    Step = tf.function(Step)
  for step in range(3):
    grads = _Grads(step)
    Step([tf.constant(grads[k]) for k in names], tf.constant(_LRS[step]))

  expected, states = _Reference(p, ref, 3)
  for k in names:
    np.testing.assert_allclose(variables[k].numpy(), expected[k], rtol=1e-5,
                               atol=1e-6, err_msg=k)
    # The slots hold the reference state too (one per slot name).
    assert set(opt.SLOTS) == set(states[k])
    for slot in opt.SLOTS:
      np.testing.assert_allclose(opt.Slot(variables[k], slot).numpy(),
                                 states[k][slot], rtol=1e-5, atol=1e-7,
                                 err_msg=f'{k}/{slot}')
  assert int(opt.iterations.numpy()) == 3
  # The update actually moved every variable.
  for k in names:
    assert not np.allclose(variables[k].numpy(), _INIT[k])


@pytest.mark.parametrize('name,overrides,ref', _CASES, ids=_IDS)
def test_none_gradient_leaves_variable_and_slots_unchanged(name, overrides,
                                                           ref):
  p = _Train(name, **overrides)
  opt = optimizer.Create(p)
  variables = _Variables()
  w, bias = variables['a/w'], variables['b/bias']
  opt.Build([w, bias])
  for step in range(2):
    opt.Apply([tf.constant(_Grads(step)['a/w']), None], [w, bias], _LRS[step])
  np.testing.assert_array_equal(bias.numpy(), _INIT['b/bias'])
  for slot in opt.SLOTS:
    np.testing.assert_array_equal(opt.Slot(bias, slot).numpy(), 0.0)
  # The variable with gradients is updated as if it were alone.
  values = _INIT['a/w'].astype(np.float64)
  state = {}
  for step in range(2):
    values = ref(p, values, _Grads(step)['a/w'].astype(np.float64), _LRS[step],
                 state, step + 1)
  np.testing.assert_allclose(w.numpy(), values, rtol=1e-5, atol=1e-6)
  assert int(opt.iterations.numpy()) == 2


@pytest.mark.parametrize('name', ['momentum', 'rmsprop', 'adam'])
def test_slots_live_on_their_variables_device(name):
  opt = optimizer.Create(_Train(name))
  variables = _Variables()
  opt.Build(list(variables.values()))
  for k, var in variables.items():
    device = _DEVICES[k].split('/')[-1]  # 'device:CPU:1'
    assert var.device.endswith(device)
    for slot in opt.SLOTS:
      s = opt.Slot(var, slot)
      assert s.device == var.device, (k, slot, s.device)
      assert s.shape == var.shape and s.dtype == var.dtype
      assert not s.trainable


def test_slots_follow_devices_when_applied_in_tf_function():
  opt = optimizer.Create(_Train('adam'))
  variables = _Variables()
  var_list = list(variables.values())
  opt.Build(var_list)

  @tf.function
  def Step():
    opt.Apply([tf.ones_like(v) for v in var_list], var_list, 0.1)

  Step()
  for var in var_list:
    assert opt.Slot(var, 'm').device == var.device
    # m after one step of ones: (1 - beta1) * 1.
    np.testing.assert_allclose(opt.Slot(var, 'm').numpy(), 0.1, rtol=1e-6)


def test_build_is_idempotent_and_adds_new_variables():
  opt = optimizer.Create(_Train('rmsprop'))
  variables = _Variables()
  w, bias = variables['a/w'], variables['b/bias']
  opt.Build([w])
  rms = opt.Slot(w, 'rms')
  rms.assign(tf.fill(rms.shape, 3.0))
  opt.Build([w, bias])  # keeps w's slots (and their state), adds bias's
  assert opt.Slot(w, 'rms') is rms
  np.testing.assert_array_equal(opt.Slot(w, 'rms').numpy(), 3.0)
  np.testing.assert_array_equal(opt.Slot(bias, 'momentum').numpy(), 0.0)
  assert sorted(opt.slots['rms']) == ['a/w', 'b/bias']


def test_build_inside_tf_function_creates_slots_eagerly():
  opt = optimizer.Create(_Train('momentum', momentum=0.5))
  var = tf.Variable([1.0, 2.0], name='traced/w')

  @tf.function
  def Step(g):
    opt.Build([var])
    opt.Apply([g], [var], 0.1)

  Step(tf.constant([1.0, -1.0]))
  Step(tf.constant([1.0, -1.0]))
  # accum: g, then 0.5 g + g; var -= 0.1 * (1 + 1.5) g.
  np.testing.assert_allclose(var.numpy(), [0.75, 2.25], rtol=1e-6)
  np.testing.assert_allclose(opt.Slot(var, 'momentum').numpy(), [1.5, -1.5])


@pytest.mark.parametrize('name', ['momentum', 'rmsprop', 'adam'])
def test_apply_without_build_raises(name):
  opt = optimizer.Create(_Train(name))
  var = tf.Variable([1.0], name='unbuilt/w')
  with pytest.raises(ValueError, match=r"no '\w+' slot for unbuilt/w.*"
                     r'call Build\(variables\) before Apply'):
    opt.Apply([tf.constant([1.0])], [var], 0.1)
  np.testing.assert_array_equal(var.numpy(), [1.0])


def test_sgd_needs_no_build():
  opt = optimizer.Create(_Train('sgd'))
  var = tf.Variable([1.0, 2.0], name='sgd/w')
  opt.Apply([tf.constant([1.0, -2.0])], [var], 0.5)
  np.testing.assert_allclose(var.numpy(), [0.5, 3.0])


@pytest.mark.parametrize('name,cls', [('sgd', optimizer.Sgd),
                                      ('momentum', optimizer.Momentum),
                                      ('rmsprop', optimizer.RmsProp),
                                      ('adam', optimizer.Adam)])
def test_create_returns_named_optimizer(name, cls):
  opt = optimizer.Create(_Train(name))
  assert type(opt) is cls  # pylint: disable=unidiomatic-typecheck
  assert set(opt.slots) == set(cls.SLOTS)
  assert int(opt.iterations.numpy()) == 0


def test_create_copies_train_params():
  p = _Train('momentum', momentum=0.5)
  opt = optimizer.Create(p)
  p.momentum = 0.0
  assert opt.params.momentum == 0.5


def test_create_unknown_name_suggests_close_match():
  with pytest.raises(ValueError) as e:
    optimizer.Create(_Train('adma'))
  msg = str(e.value)
  assert "train.optimizer='adma'" in msg
  assert 'sgd, momentum, rmsprop, adam' in msg
  assert "Did you mean 'adam'?" in msg


def test_create_unknown_name_without_close_match_has_no_hint():
  with pytest.raises(ValueError, match='valid: sgd, momentum') as e:
    optimizer.Create(_Train('lbfgs'))
  assert 'Did you mean' not in str(e.value)


@pytest.mark.parametrize('lr', [0.0, -0.1])
def test_create_rejects_non_positive_learning_rate(lr):
  with pytest.raises(ValueError, match=f'learning_rate must be > 0, got {lr}'):
    optimizer.Create(_Train('sgd', learning_rate=lr))


@pytest.mark.parametrize('name,overrides,ref', _CASES[1:], ids=_IDS[1:])
def test_checkpoint_round_trips_slots_and_iterations(name, overrides, ref,
                                                     tmp_path):
  del ref
  p = _Train(name, **overrides)
  opt = optimizer.Create(p)
  variables = _Variables()
  names = sorted(variables)
  opt.Build([variables[k] for k in names])
  for step in range(2):
    grads = _Grads(step)
    opt.Apply([grads[k] for k in names], [variables[k] for k in names],
              _LRS[step])
  path = tf.train.Checkpoint(opt=opt, **{
      k.replace('/', '_'): v for k, v in variables.items()}).save(
          str(tmp_path / 'ckpt'))

  fresh_opt = optimizer.Create(p)
  fresh_vars = {k: tf.Variable(tf.zeros_like(v), name=k)
                for k, v in _INIT.items()}
  fresh_opt.Build([fresh_vars[k] for k in names])
  tf.train.Checkpoint(opt=fresh_opt, **{
      k.replace('/', '_'): v for k, v in fresh_vars.items()}).restore(
          path).assert_consumed()

  assert int(fresh_opt.iterations.numpy()) == 2
  for k in names:
    np.testing.assert_array_equal(fresh_vars[k].numpy(), variables[k].numpy())
    for slot in opt.SLOTS:
      restored = fresh_opt.Slot(fresh_vars[k], slot).numpy()
      assert np.any(restored != 0.0), (k, slot)
      np.testing.assert_array_equal(restored,
                                    opt.Slot(variables[k], slot).numpy())

  # The restored optimizer takes the same next step as the original.
  grads = _Grads(2)
  opt.Apply([grads[k] for k in names], [variables[k] for k in names], _LRS[2])
  fresh_opt.Apply([grads[k] for k in names], [fresh_vars[k] for k in names],
                  _LRS[2])
  for k in names:
    np.testing.assert_array_equal(fresh_vars[k].numpy(), variables[k].numpy())


def test_same_named_variables_are_refused():
  """Slots are keyed by name: two variables named alike would share one."""
  opt = optimizer.Create(_Train('momentum', momentum=0.5))
  a = tf.Variable([1.0, 1.0])  # both named 'Variable:0'
  b = tf.Variable([1.0, 1.0])
  with pytest.raises(ValueError, match="two different variables are named 'Variable'"):
    opt.Build([a, b])
  opt.Build([a, a])  # the same variable twice is fine
