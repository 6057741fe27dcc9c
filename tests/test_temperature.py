"""Temperature policies: convergence on a synthetic entropy model, bounds, exact resume."""

from __future__ import annotations

import json
import math
import random

import pytest

from megatron_ace.algorithms.temperature import (
    EntropyTargetTemperature,
    FixedTemperature,
    TemperatureConfig,
    TemperaturePolicyKind,
    build_temperature_policy,
)


def _entropy_model(a: float, b: float, noise: float, seed: int):
    """Synthetic monotone entropy-vs-temperature curve a * T^b with multiplicative noise."""
    rng = random.Random(seed)
    return lambda t: a * t**b * math.exp(rng.gauss(0.0, noise))


def _run(policy, model, steps: int) -> list[float]:
    temperatures = []
    for _ in range(steps):
        temperatures.append(policy.temperature)
        policy.update(model(policy.temperature))
    return temperatures


@pytest.mark.parametrize(
    "a, b, initial, seed",
    [(0.25, 2.0, 0.6, 0), (0.6, 1.5, 1.2, 1), (0.15, 3.0, 1.0, 2), (0.4, 1.0, 0.5, 3), (0.2, 4.0, 0.5, 4)],
)
def test_converges_to_target_entropy(a, b, initial, seed):
    config = TemperatureConfig(initial_temperature=initial, target_entropy=0.3, min_temperature=0.3,
                               max_temperature=2.0)  # default gain and window
    policy = build_temperature_policy(config)
    _run(policy, _entropy_model(a, b, noise=0.05, seed=seed), steps=40)
    # The temperature where the noiseless model gives exactly the target: (0.3 / a)^(1/b).
    t_star = (0.3 / a) ** (1 / b)
    assert policy.temperature == pytest.approx(t_star, rel=0.05)
    # Over the next steps the (noise-free) entropy at the chosen temperatures stays near 0.3.
    tail = _run(policy, _entropy_model(a, b, noise=0.05, seed=seed + 100), steps=20)
    mean_entropy = sum(a * t**b for t in tail) / len(tail)
    assert mean_entropy == pytest.approx(0.3, rel=0.1)


def test_respects_bounds_and_step_limit():
    config = TemperatureConfig(initial_temperature=1.0, min_temperature=0.8, max_temperature=1.2,
                               max_log_step=0.1, gain=5.0)
    policy = EntropyTargetTemperature(config)
    temps = _run(policy, lambda t: 5.0, steps=10) + [policy.temperature]  # entropy far too high
    assert min(temps) == pytest.approx(0.8) and all(t >= 0.8 for t in temps)
    assert all(abs(math.log(b / a)) <= 0.1 + 1e-12 for a, b in zip(temps, temps[1:]))
    temps = _run(policy, lambda t: 0.0, steps=10) + [policy.temperature]  # greedy: entropy zero
    assert temps[-1] == pytest.approx(1.2) and all(t <= 1.2 for t in temps)


def test_state_round_trip_continues_identically():
    config = TemperatureConfig(initial_temperature=0.7, window=4)
    model = _entropy_model(0.3, 2.0, noise=0.1, seed=5)
    measurements = [model(1.0) for _ in range(30)]
    original = EntropyTargetTemperature(config)
    for m in measurements[:13]:
        original.update(m)
    state = json.loads(json.dumps(original.state_dict()))  # survives a JSON checkpoint
    resumed = EntropyTargetTemperature(config)
    resumed.load_state_dict(state)
    assert resumed.metrics() == original.metrics()
    for m in measurements[13:]:
        assert resumed.update(m) == original.update(m)
    assert resumed.state_dict() == original.state_dict()
    with pytest.raises(ValueError, match="kind"):
        FixedTemperature(TemperatureConfig(policy=TemperaturePolicyKind.FIXED)).load_state_dict(state)


def test_fixed_policy_never_moves_and_logs():
    policy = build_temperature_policy(TemperatureConfig(policy="fixed", initial_temperature=0.85))
    assert isinstance(policy, FixedTemperature)
    assert {policy.update(e) for e in (0.01, 0.3, 3.0)} == {0.85}
    assert policy.metrics() == {"temperature": 0.85, "entropy_measured": 3.0}
    fresh = FixedTemperature(policy.config)
    fresh.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    assert fresh.metrics() == policy.metrics()


def test_metrics_are_log_friendly():
    policy = EntropyTargetTemperature(TemperatureConfig())
    assert math.isnan(policy.metrics()["entropy_measured"])
    json.dumps(policy.state_dict(), allow_nan=False)  # strict JSON before the first update
    policy.update(0.5)
    policy.update(0.3)
    metrics = policy.metrics()
    assert set(metrics) == {"temperature", "entropy_target", "entropy_measured", "entropy_smoothed"}
    assert metrics["entropy_smoothed"] == pytest.approx(0.4) and metrics["entropy_measured"] == 0.3


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(target_entropy=0.0), "target_entropy"),
        (dict(gain=-1.0), "gain"),
        (dict(window=0), "window"),
        (dict(min_temperature=1.2, max_temperature=1.0, initial_temperature=1.1), "min_temperature"),
        (dict(initial_temperature=3.0), "initial_temperature"),
        (dict(max_log_step=float("nan")), "max_log_step"),
        (dict(policy="bogus"), "bogus"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TemperatureConfig(**kwargs)


def test_rejects_bad_measurement_and_holds_on_missing_one():
    policy = EntropyTargetTemperature(TemperatureConfig())
    for bad in (-0.1, float("inf")):
        with pytest.raises(ValueError, match="measured_entropy"):
            policy.update(bad)
    policy.update(0.6)
    before = policy.state_dict()
    # A step without an update has no entropy: the temperature and the window stay put.
    assert policy.update(float("nan")) == before["temperature"]
    assert policy.update(None) == before["temperature"]
    assert policy.state_dict()["history"] == before["history"]
    assert math.isnan(policy.metrics()["entropy_measured"])
