"""A schedule's value at a step does not depend on the CPU or on how the step
was passed (alone, in an array, or through Schedule.at).

NumPy's vectorized pow/cos/log (SVML on AVX-512 CPUs) round differently from
the scalar C library, and only on long arrays (SIMD loops). These tests use
arrays long enough for those loops and compare BIT FOR BIT, so they fail on
any CPU where a schedule takes a NumPy transcendental again, and they compare
with Python's math module directly, so they do not depend on the CPU model.
"""
import math

import numpy as np
import pytest

from fastbn import schedules

LONG = 4096  # well above any SIMD width and unrolling


def bits(values):
    return np.asarray(values, dtype=np.float64).view(np.int64)


def assert_bitwise_equal(actual, expected):
    np.testing.assert_array_equal(bits(actual), bits(expected))


# Every schedule, with hyperparameters whose curves are not trivial over LONG steps.
PORTABLE_SCHEDULES = [
    schedules.constant(0.1),
    schedules.constant_warmup(0.1, 0.3, 700),
    schedules.linear(0.1, 0.01, 0.9, 3000),
    schedules.warmup(0.1, 1000),
    schedules.exponential_decay(0.1, 0.9),
    schedules.exponential_decay(0.1, 0.999, 3.5),
    schedules.exponential_decay(0.1, 0.97, 7, staircase=True),
    schedules.step_decay(0.1, 30, 0.7),
    schedules.multistep(0.1, [100, 1000, 1000, 3000], 0.3),
    schedules.polynomial(0.1, 3000, 0.9),
    schedules.polynomial(0.1, 5000, 2.0),
    schedules.cosine(0.1, 1000, 1e-4),
    schedules.cosine(0.1, 333.3),
    schedules.cosine_warm_restarts(0.1, 10, 2, 1e-4),
    schedules.cosine_warm_restarts(0.1, 7, 1),
    schedules.cyclical(0.001, 0.1, 50, 70),
    schedules.cyclical(0.001, 0.1, 50, mode="triangular2"),
    schedules.cyclical(0.001, 0.1, 50, mode="exp_range", gamma=0.999),
    schedules.one_cycle(0.1, 5000),
    schedules.one_cycle(0.1, 5000, 0.25, "linear", three_phase=True),
    schedules.one_cycle_momentum(5000, three_phase=True),
    schedules.lambda_schedule(0.1, lambda step: 0.999 ** step),
    schedules.multiplicative(0.1, lambda step: 0.9995),
    schedules.join([schedules.linear(0.1, 0.1, 1.0, 100), schedules.cosine(0.1, 2000)], [100]),
]
IDS = [f"{index}-{schedule.name}" for index, schedule in enumerate(PORTABLE_SCHEDULES)]

INTEGER_STEPS = np.arange(LONG)
FRACTIONAL_STEPS = np.arange(LONG) * 0.9973 + 0.25


def accepts_fractional(schedule):
    return schedule.name != "multiplicative"


def checked_indices(schedule):
    # A multiplicative schedule at step k multiplies k factors (no transcendental
    # function); calling it at every step separately would be quadratic.
    return slice(None, None, 61) if schedule.name == "multiplicative" else slice(None)


@pytest.mark.parametrize("schedule", PORTABLE_SCHEDULES, ids=IDS)
def test_long_array_equals_scalar_calls_bit_for_bit(schedule):
    step_sets = [INTEGER_STEPS, INTEGER_STEPS.astype(np.float64)]
    if accepts_fractional(schedule):
        step_sets.append(FRACTIONAL_STEPS)
    for steps in step_sets:
        values = schedule(steps)[checked_indices(schedule)]
        scalars = [schedule(step) for step in steps[checked_indices(schedule)].tolist()]
        assert all(type(value) is float for value in scalars)
        assert_bitwise_equal(values, scalars)


@pytest.mark.parametrize("schedule", PORTABLE_SCHEDULES, ids=IDS)
def test_at_equals_scalar_calls_bit_for_bit_over_many_blocks(schedule):
    steps = INTEGER_STEPS[checked_indices(schedule)].tolist()
    assert_bitwise_equal([schedule.at(step) for step in steps], [schedule(step) for step in steps])


@pytest.mark.parametrize("schedule", PORTABLE_SCHEDULES, ids=IDS)
def test_two_dimensional_array_equals_the_flat_array(schedule):
    assert_bitwise_equal(schedule(INTEGER_STEPS.reshape(64, 64)).ravel(), schedule(INTEGER_STEPS))


def test_exponential_decay_at_step_12_is_the_c_library_power():
    # The value that differed by an ulp between arrays and scalars on AVX-512.
    schedule = schedules.exponential_decay(0.1, 0.9)
    expected = 0.1 * math.pow(0.9, 12.0)
    assert schedule(12) == expected
    assert schedule(np.arange(LONG))[12] == expected
    assert schedule.at(12) == expected


def test_decays_equal_closed_forms_written_with_math_bit_for_bit():
    k = INTEGER_STEPS.tolist()
    assert_bitwise_equal(schedules.exponential_decay(0.1, 0.9)(INTEGER_STEPS),
                         [0.1 * math.pow(0.9, float(e)) for e in k])
    assert_bitwise_equal(schedules.cosine(0.1, 1000, 1e-4)(INTEGER_STEPS),
                         [1e-4 + (0.1 - 1e-4) * (1.0 + math.cos(math.pi * e / 1000.0)) / 2.0 for e in k])

    def exp_range(e, total=100.0, ratio=0.5):
        cycle = math.floor(1.0 + e / total)
        x = 1.0 + e / total - cycle
        position = x / ratio if x <= ratio else (x - 1.0) / (ratio - 1.0)
        return 0.001 + (0.1 - 0.001) * position * math.pow(0.999, float(e))

    assert_bitwise_equal(schedules.cyclical(0.001, 0.1, 50, mode="exp_range", gamma=0.999)(INTEGER_STEPS),
                         [exp_range(e) for e in k])


# ---- the helper layer: exactly Python's math module, on long arrays ------------------------

RNG = np.random.default_rng(20251)


def test_power_helper_equals_math_pow_bit_for_bit():
    base = RNG.uniform(0.0, 1.2, LONG)  # 1.2 ** 2047 stays finite
    exponent = np.concatenate([np.arange(LONG // 2), RNG.uniform(0.0, 300.0, LONG // 2)])
    assert_bitwise_equal(schedules._power(base, exponent),
                         [math.pow(b, e) for b, e in zip(base.tolist(), exponent.tolist())])
    assert_bitwise_equal(schedules._power(0.9, exponent),
                         [math.pow(0.9, e) for e in exponent.tolist()])


def test_cos_and_log_helpers_equal_math_bit_for_bit():
    angles = RNG.uniform(-50.0, 50.0, LONG)
    positive = RNG.uniform(1e-3, 1e6, LONG)
    assert_bitwise_equal(schedules._cos(angles), [math.cos(x) for x in angles.tolist()])
    assert_bitwise_equal(schedules._log(positive), [math.log(x) for x in positive.tolist()])


def test_helpers_give_ieee_values_where_math_raises():
    # NumPy's (and C99's) results, where math.pow / math.cos / math.log raise.
    with np.errstate(all="ignore"):
        base = np.array([2.0, -2.0, -2.0, 0.0, -0.0, -0.5, 1.5])
        exponent = np.array([5000.0, 5001.0, 5000.0, -1.0, -3.0, 0.5, 2.0])
        # (NaN payloads and signs may differ, so values, not bits.)
        np.testing.assert_array_equal(schedules._power(base, exponent), np.power(base, exponent))
        values = np.array([0.0, -1.0, 2.0])
        np.testing.assert_array_equal(schedules._log(values), np.log(values))
        assert np.isnan(schedules._cos(np.array([np.inf, 1.0]))[0])


def test_helpers_broadcast_and_keep_shapes():
    exponent = np.arange(6.0).reshape(2, 3)
    assert schedules._power(0.5, exponent).shape == (2, 3)
    assert schedules._power(np.array([[0.5], [0.25]]), np.arange(3.0)).shape == (2, 3)
    assert_bitwise_equal(schedules._power(np.array([[0.5], [0.25]]), np.arange(3.0)),
                         [[1.0, 0.5, 0.25], [1.0, 0.25, 0.0625]])
    assert float(schedules._cos(np.array(0.0))) == 1.0
