"""Tests of the learning-rate schedules: factor values at chosen steps, and Validate."""

import math

import numpy as np
import pytest
import tensorflow as tf

from lingvo_gpipe import model_params
from lingvo_gpipe.core import lr_schedule


def _P(**kwargs):
  return model_params.LrScheduleParams().Set(**kwargs)


def _Factors(p, steps):
  return [float(lr_schedule.Factor(p, step)) for step in steps]


def _Check(p, expected):
  """expected: {step: factor}."""
  steps = sorted(expected)
  np.testing.assert_allclose(_Factors(p, steps), [expected[s] for s in steps],
                             rtol=1e-6, atol=1e-7)


def test_defaults_are_constant_one():
  p = model_params.LrScheduleParams()
  lr_schedule.Validate(p)
  _Check(p, {0: 1.0, 1: 1.0, 999: 1.0, 10**7: 1.0})


def test_factor_is_float32_scalar_for_int_and_tensor_steps():
  p = _P(type='cosine', decay_steps=10)
  for step in (3, tf.constant(3), tf.constant(3, tf.int64),
               tf.Variable(3, dtype=tf.int64)):
    f = lr_schedule.Factor(p, step)
    assert f.dtype == tf.float32 and f.shape == []
    assert float(f) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))


def test_factor_in_tf_function_matches_eager():
  p = _P(type='exponential', decay_steps=7, decay_rate=0.8, staircase=False,
         warmup_steps=5)
  traced = tf.function(lambda step: lr_schedule.Factor(p, step))
  steps = [0, 2, 4, 5, 11, 40]
  eager = _Factors(p, steps)
  graph = [float(traced(tf.constant(s, tf.int64))) for s in steps]
  np.testing.assert_allclose(graph, eager, rtol=1e-6)


def test_constant_with_warmup_ramps_linearly():
  # (step + 1) / warmup: the first step already trains; the last warmup step
  # is at the full rate.
  _Check(_P(type='constant', warmup_steps=4),
         {0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, 4: 1.0, 100: 1.0})


def test_exponential_staircase():
  _Check(_P(type='exponential', decay_steps=10, decay_rate=0.5,
            staircase=True),
         {0: 1.0, 9: 1.0, 10: 0.5, 19: 0.5, 20: 0.25, 25: 0.25, 30: 0.125})


def test_exponential_smooth():
  _Check(_P(type='exponential', decay_steps=10, decay_rate=0.5,
            staircase=False),
         {0: 1.0, 5: 0.5**0.5, 10: 0.5, 25: 0.5**2.5})


def test_exponential_decay_starts_after_warmup():
  p = _P(type='exponential', warmup_steps=5, decay_steps=10, decay_rate=0.5,
         staircase=True)
  # Ramp over steps 0..4, full rate until 5 + 10, then halving every 10.
  _Check(p, {0: 0.2, 2: 0.6, 4: 1.0, 5: 1.0, 14: 1.0, 15: 0.5, 25: 0.25})
  p.staircase = False
  _Check(p, {4: 1.0, 5: 1.0, 10: 0.5**0.5, 15: 0.5})


def test_cosine_start_middle_end():
  p = _P(type='cosine', decay_steps=100)
  _Check(p, {0: 1.0, 25: 0.5 * (1 + math.cos(math.pi / 4)), 50: 0.5,
             100: 0.0, 150: 0.0})


def test_cosine_decays_monotonically_to_min_ratio():
  p = _P(type='cosine', decay_steps=100, min_ratio=0.1)
  _Check(p, {0: 1.0, 50: 0.55, 100: 0.1, 1000: 0.1})
  values = _Factors(p, range(0, 101, 5))
  assert all(a > b for a, b in zip(values, values[1:]))


def test_cosine_after_warmup():
  p = _P(type='cosine', warmup_steps=10, decay_steps=100)
  _Check(p, {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 60: 0.5, 110: 0.0})


def test_rsqrt_peaks_at_end_of_warmup_then_decays():
  p = _P(type='rsqrt', warmup_steps=100)
  _Check(p, {0: 0.01, 49: 0.5, 98: 0.99, 99: 1.0,
             # sqrt(warmup / (step + 1)) afterwards.
             100: math.sqrt(100 / 101), 399: 0.5, 9999: 0.1})
  values = _Factors(p, range(400))
  assert int(np.argmax(values)) == 99
  assert max(values) == pytest.approx(1.0)


def test_rsqrt_with_one_warmup_step():
  _Check(_P(type='rsqrt', warmup_steps=1), {0: 1.0, 3: 0.5, 99: 0.1})


def test_min_ratio_floors_every_type():
  _Check(_P(type='exponential', decay_steps=1, decay_rate=0.5, min_ratio=0.2),
         {0: 1.0, 2: 0.25, 3: 0.2, 50: 0.2})
  _Check(_P(type='rsqrt', warmup_steps=4, min_ratio=0.4),
         {0: 0.4, 3: 1.0, 15: 0.5, 99: 0.4})
  # Including during the warmup ramp: the factor never goes below min_ratio.
  _Check(_P(type='constant', warmup_steps=10, min_ratio=0.3),
         {0: 0.3, 1: 0.3, 2: 0.3, 3: 0.4, 9: 1.0})


def test_unknown_type_suggests_close_match():
  with pytest.raises(ValueError) as e:
    lr_schedule.Validate(_P(type='cosin'))
  msg = str(e.value)
  assert "train.lr_schedule.type='cosin'" in msg
  assert 'valid: constant, exponential, cosine, rsqrt' in msg
  assert "Did you mean 'cosine'?" in msg


def test_unknown_type_without_close_match_has_no_hint():
  with pytest.raises(ValueError, match='is not a schedule') as e:
    lr_schedule.Validate(_P(type='polynomial'))
  assert 'Did you mean' not in str(e.value)


def test_factor_validates():
  with pytest.raises(ValueError, match="Did you mean 'exponential'"):
    lr_schedule.Factor(_P(type='exponentail'), 0)


def test_negative_warmup_is_rejected():
  with pytest.raises(ValueError, match='warmup_steps must be >= 0, got -1'):
    lr_schedule.Validate(_P(warmup_steps=-1))


def test_rsqrt_needs_warmup():
  with pytest.raises(ValueError, match="'rsqrt' needs warmup_steps >= 1"):
    lr_schedule.Validate(_P(type='rsqrt', warmup_steps=0))


@pytest.mark.parametrize('schedule_type', ['exponential', 'cosine'])
@pytest.mark.parametrize('decay_steps', [0, -5])
def test_decay_steps_must_be_positive(schedule_type, decay_steps):
  with pytest.raises(ValueError, match=f'decay_steps must be >= 1 for '
                     f"'{schedule_type}', got {decay_steps}"):
    lr_schedule.Validate(_P(type=schedule_type, decay_steps=decay_steps))


def test_decay_steps_is_ignored_where_unused():
  for schedule_type, warmup in (('constant', 0), ('rsqrt', 10)):
    lr_schedule.Validate(_P(type=schedule_type, decay_steps=0,
                            warmup_steps=warmup))


@pytest.mark.parametrize('min_ratio', [-0.1, 1.5])
def test_min_ratio_outside_unit_interval_is_rejected(min_ratio):
  with pytest.raises(ValueError,
                     match=rf'min_ratio must be in \[0, 1\], got {min_ratio}'):
    lr_schedule.Validate(_P(min_ratio=min_ratio))


@pytest.mark.parametrize('min_ratio', [0.0, 1.0])
def test_min_ratio_bounds_are_valid(min_ratio):
  p = _P(type='cosine', decay_steps=10, min_ratio=min_ratio)
  lr_schedule.Validate(p)
  assert _Factors(p, [10])[0] == pytest.approx(min_ratio)
