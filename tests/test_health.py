"""Static health findings on BN statistics: each finding fires on its defect and stays quiet otherwise."""

from __future__ import annotations

import numpy as np
import pytest

from bnfold.health import MAX_GAIN, check_layer
from bnfold.layers import BNLayer, Severity


def make_layer(**overrides) -> BNLayer:
    channels = 8
    rng = np.random.default_rng(0)
    fields = dict(
        name="bn", kind="BatchNorm2d", framework="torch", channels=channels, eps=1e-5, momentum=0.1,
        affine=True, track_running_stats=True, running_mean=rng.normal(size=channels),
        running_var=rng.uniform(0.5, 2.0, size=channels), weight=rng.uniform(0.5, 1.5, size=channels),
        bias=rng.normal(size=channels), num_batches_tracked=100,
    )
    fields.update(overrides)
    return BNLayer(**fields)


def codes(layer: BNLayer) -> set[str]:
    return {finding.code for finding in check_layer(layer)}


def test_healthy_layer_has_no_findings():
    assert check_layer(make_layer()) == []


@pytest.mark.parametrize("overrides, code, severity", [
    (dict(running_var=np.array([1.0, np.nan, 1, 1, 1, 1, 1, 1])), "non-finite-stats", Severity.ERROR),
    (dict(running_mean=np.array([np.inf, 0, 0, 0, 0, 0, 0, 0])), "non-finite-stats", Severity.ERROR),
    (dict(running_var=np.array([1.0, -0.5, 1, 1, 1, 1, 1, 1])), "negative-variance", Severity.ERROR),
    (dict(running_var=np.full(8, 1e-12), eps=1e-12), "tiny-variance", Severity.WARNING),
    (dict(weight=np.array([1.0, 0, 1, 1, 1, 1, 1, 1])), "dead-channels", Severity.WARNING),
    (dict(running_mean=np.zeros(8), running_var=np.ones(8)), "stale-stats", Severity.WARNING),
    (dict(num_batches_tracked=0), "stale-stats", Severity.WARNING),
    (dict(eps=0.5), "unusual-eps", Severity.WARNING),
    (dict(momentum=0.9), "unusual-momentum", Severity.INFO),
    (dict(training=True, training_fixed=True), "training-mode", Severity.ERROR),
    (dict(training=True), "training-mode", Severity.WARNING),
    (dict(track_running_stats=False, running_mean=None, running_var=None), "no-running-stats", Severity.WARNING),
    (dict(extra={"producer_bias": "Conv conv1"}), "redundant-bias", Severity.INFO),
    (dict(framework="onnx", running_mean=None, running_var=None, extra={"runtime_params": ["mean", "var"]}),
     "runtime-stats", Severity.WARNING),
    (dict(weight=np.array([1.0, np.nan, 1, 1, 1, 1, 1, 1])), "non-finite-params", Severity.ERROR),
])
def test_each_defect_is_found(overrides, code, severity):
    findings = {f.code: f for f in check_layer(make_layer(**overrides))}
    assert code in findings
    assert findings[code].severity is severity
    assert findings[code].layer == "bn"


def test_gain_outliers_are_reported_when_a_few_channels_dominate():
    var = np.ones(8)
    var[3] = 1e-7  # gain ~ 3000x the others
    found = codes(make_layer(running_var=var, weight=np.ones(8), eps=1e-7))
    assert {"gain-outliers", "tiny-variance"} <= found


def test_onnx_momentum_is_read_in_its_own_convention():
    # ONNX momentum 0.9 keeps 90% of the old average: the same as PyTorch's 0.1, nothing unusual.
    assert "unusual-momentum" not in codes(make_layer(framework="onnx", momentum=0.9))
    assert "unusual-momentum" in codes(make_layer(framework="onnx", momentum=0.1))


def test_findings_are_sorted_worst_first():
    layer = make_layer(running_var=np.array([1.0, -1, 1, 1, 1, 1, 1, 1]), eps=0.5)
    severities = [f.severity.rank for f in check_layer(layer)]
    assert severities == sorted(severities, reverse=True)


def test_max_gain_threshold_is_respected():
    just_below = make_layer(running_var=np.full(8, 1.0 / (MAX_GAIN * 0.9) ** 2), weight=np.ones(8), eps=1e-7)
    assert "tiny-variance" not in codes(just_below)


def test_unknown_eps_is_not_reported_as_unusual():
    """eps NaN means discovery found none (a module keeping it in no attribute), not a strange value."""
    assert "unusual-eps" not in codes(make_layer(eps=float("nan")))


def test_stale_statistics_say_which_sign_of_staleness_they_saw():
    trained_but_untracked = {f.code: f for f in check_layer(make_layer(num_batches_tracked=0))}
    assert "initial values" not in trained_but_untracked["stale-stats"].message
    assert "num_batches_tracked is 0" in trained_but_untracked["stale-stats"].message
    initial = {f.code: f for f in check_layer(make_layer(running_mean=np.zeros(8), running_var=np.ones(8)))}
    assert "initial values (mean 0, var 1)" in initial["stale-stats"].message
