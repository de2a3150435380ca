"""Discrepancy measures: the formulas against independent computations, and the verdicts they drive."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from bnfold.discrepancy import DriftLimits, OutputComparison, channel_measures, compare_layer
from bnfold.layers import BNLayer
from bnfold.stats import ChannelStatistics
from tests.conftest import SAMPLES


def numeric_kl(mean_p: float, var_p: float, mean_q: float, var_q: float) -> float:
    """KL(N_p || N_q) by integrating p * log(p / q) on a fine grid: independent of the closed form."""
    std = math.sqrt(var_p)
    x = np.linspace(mean_p - 12 * std, mean_p + 12 * std, 200_001)
    log_p = -0.5 * np.log(2 * np.pi * var_p) - (x - mean_p) ** 2 / (2 * var_p)
    log_q = -0.5 * np.log(2 * np.pi * var_q) - (x - mean_q) ** 2 / (2 * var_q)
    return float(np.trapezoid(np.exp(log_p) * (log_p - log_q), x))


@pytest.mark.parametrize("data, running", [((0.0, 1.0), (0.0, 1.0)), ((0.5, 1.0), (0.0, 1.0)),
                                           ((0.0, 4.0), (0.0, 1.0)), ((1.0, 0.25), (-2.0, 3.0))])
def test_kl_matches_numeric_integration_in_the_data_to_running_direction(data, running):
    _, _, kl = channel_measures(np.array([data[0]]), np.array([data[1]]), np.array([running[0]]),
                                np.array([running[1]]), eps=0.0)
    assert kl[0] == pytest.approx(numeric_kl(*data, *running), abs=1e-7)


def test_kl_direction_is_data_to_running():
    _, _, kl = channel_measures(np.zeros(2), np.array([4.0, 1.0]), np.zeros(2), np.array([1.0, 4.0]), eps=0.0)
    assert kl[0] == pytest.approx(0.5 * (4 - 1 - math.log(4)))  # wider data than stored: 0.807
    assert kl[1] == pytest.approx(0.5 * (0.25 - 1 + math.log(4)))  # narrower: 0.318


def test_mean_shift_and_variance_ratio_use_eps_like_the_layer():
    shift, log_ratio, kl = channel_measures(np.array([1.0, 0.0]), np.array([1.0, 3.0 - 1e-3]),
                                            np.array([0.0, 0.0]), np.array([1.0 - 1e-3, 1.0 - 1e-3]), eps=1e-3)
    assert shift[0] == pytest.approx(1.0)  # |1 - 0| / sqrt(var + eps) = 1
    assert log_ratio[1] == pytest.approx(math.log(3.0))
    assert kl[0] == pytest.approx(0.5)  # a pure shift s costs s^2 / 2
    assert shift[1] == 0.0


def test_recalibrate_report_measures_drift_as_inspect_does():
    """Old → new statistics in the recalibrate report are running → data statistics in inspect --data."""
    from bnfold.reports.recalibrate import LayerRecalibration

    old_mean, old_var = np.array([0.0, 1.0, 0.0]), np.array([1.0, 4.0, -1.0])  # -1: a damaged variance
    new_mean, new_var = np.array([0.5, 1.0, 0.0]), np.ones(3)
    layer = LayerRecalibration(name="bn", kind="BatchNorm2d", channels=3, eps=1e-5, pass_number=1, samples=8,
                               values_per_channel=8, batches=1, old_mean=old_mean, old_var=old_var,
                               new_mean=new_mean, new_var=new_var, standard_error=np.zeros(3))
    shift, ratio = layer.drift()
    inspect_shift, inspect_log_ratio, _ = channel_measures(new_mean, new_var, old_mean, old_var, eps=1e-5)
    np.testing.assert_array_equal(shift, inspect_shift)
    np.testing.assert_allclose(np.abs(np.log(ratio[:2])), inspect_log_ratio[:2], rtol=1e-15)
    assert shift[0] == pytest.approx(0.5, rel=1e-4) and ratio[1] == pytest.approx(0.25, rel=1e-4)
    summary = layer.to_dict()["mean_shift_in_old_std"]  # the damaged channel has no deviation to shift by
    assert summary["non_finite"] == 1 and summary["max"] == pytest.approx(0.5, rel=1e-4)

finite = st.floats(-5, 5, allow_nan=False)
positive = st.floats(1e-3, 10, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(finite, positive, finite, positive)
def test_kl_is_never_below_its_mean_and_variance_parts(mean_d, var_d, mean_r, var_r):
    shift, log_ratio, kl = channel_measures(np.array([mean_d]), np.array([var_d]), np.array([mean_r]),
                                            np.array([var_r]), eps=1e-5)
    ratio = math.exp(log_ratio[0])
    variance_part = 0.5 * min(ratio - 1 - math.log(ratio), 1 / ratio - 1 + math.log(ratio))
    assert kl[0] >= (shift[0] ** 2 / 2) * (1 - 1e-9) - 1e-12
    assert kl[0] >= variance_part * (1 - 1e-9) - 1e-12
    assert kl[0] >= 0.0


def make_layer(mean: np.ndarray, var: np.ndarray, name: str = "bn") -> BNLayer:
    return BNLayer(name=name, kind="BatchNorm2d", framework="torch", channels=mean.size, eps=1e-5,
                   momentum=0.1, affine=True, track_running_stats=True, running_mean=mean, running_var=var)


def statistics_of(values: np.ndarray) -> ChannelStatistics:
    stats = ChannelStatistics()
    for batch in np.array_split(values, 4):
        stats.add_array(batch)
    return stats


def test_layer_on_its_own_distribution_is_ok_and_a_shifted_one_drifts():
    rng = np.random.default_rng(0)
    mean, var = rng.normal(size=8), rng.uniform(0.5, 2, size=8)
    clean = rng.normal(mean[None, :, None], np.sqrt(var)[None, :, None], size=(256, 8, 16))
    layer = make_layer(mean, var)
    ok = compare_layer(layer, statistics_of(clean))
    assert ok is not None and ok.verdict == "ok" and ok.fraction_beyond == 0.0
    assert ok.samples == 256 * 16 and ok.kl.mean < 1e-3

    shifted = clean * 0.6 + 0.5 * np.sqrt(var)[None, :, None]  # gain and offset, like a new camera
    drifted = compare_layer(layer, statistics_of(shifted))
    assert drifted is not None and drifted.verdict == "drifted" and drifted.fraction_beyond == 1.0
    expected_shift = np.abs(0.5 - 0.4 * mean / np.sqrt(var))  # data mean 0.6 m + 0.5 sd, over sd
    assert drifted.mean_shift.mean == pytest.approx(expected_shift.mean(), abs=0.02)
    assert drifted.var_log_ratio.mean == pytest.approx(abs(math.log(0.36)), abs=0.05)
    assert drifted.kl.max >= drifted.kl.mean > DriftLimits().max_layer_kl


def test_one_bad_channel_shows_in_the_fraction_not_the_verdict():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(512, 10, 4))
    mean, var = np.zeros(10), np.ones(10)
    mean[3] = 1.0  # one channel's stored mean is off by one standard deviation
    report = compare_layer(make_layer(mean, var), statistics_of(values))
    assert report.fraction_beyond == pytest.approx(0.1)
    assert report.mean_shift.max == pytest.approx(1.0, abs=0.05)
    assert report.verdict == "ok"  # the channel mean of KL (~0.05) stays under the layer limit


def test_layer_without_running_statistics_is_not_compared_and_nan_statistics_drift():
    values = np.random.default_rng(2).normal(size=(64, 3, 2))
    layer = make_layer(np.zeros(3), np.ones(3))
    layer.running_mean = layer.running_var = None
    assert compare_layer(layer, statistics_of(values)) is None
    broken = compare_layer(make_layer(np.zeros(3), np.array([1.0, np.nan, 1.0])), statistics_of(values))
    assert broken.drifted and broken.fraction_beyond == pytest.approx(1 / 3)
    assert broken.severity == math.inf


def test_output_comparison_streams_to_the_one_shot_numbers():
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(100, 5)) * 3
    running = reference + rng.normal(size=(100, 5)) * 0.5
    streamed = OutputComparison()
    for part in range(0, 100, 30):
        streamed.add([running[part:part + 30]], [reference[part:part + 30]])
    assert streamed.samples == 100
    assert streamed.relative_l2 == pytest.approx(np.linalg.norm(running - reference) / np.linalg.norm(reference))
    p = np.exp(reference) / np.exp(reference).sum(1, keepdims=True)
    q = np.exp(running) / np.exp(running).sum(1, keepdims=True)
    assert streamed.softmax_kl == pytest.approx(np.mean(np.sum(p * np.log(p / q), axis=1)))
    assert streamed.top1_agreement == pytest.approx(np.mean(running.argmax(1) == reference.argmax(1)))


def test_identical_outputs_agree_and_large_logits_stay_finite():
    logits = np.array([[1000.0, -1000.0, 0.0], [0.0, 0.0, 1e4]])
    same = OutputComparison()
    same.add([logits], [logits])
    assert (same.relative_l2, same.softmax_kl, same.top1_agreement) == (0.0, 0.0, 1.0)
    assert not same.drifted
    flipped = OutputComparison()
    flipped.add([logits[:, ::-1].copy()], [logits])
    assert flipped.top1_agreement == 0.0 and math.isfinite(flipped.softmax_kl) and flipped.drifted


def test_non_classifier_outputs_have_only_the_relative_distance():
    comparison = OutputComparison(DriftLimits(max_output_l2=0.2))
    comparison.add([np.full((4, 3, 2), 1.1)], [np.ones((4, 3, 2))])
    assert comparison.softmax_kl is None and comparison.top1_agreement is None and not comparison.classifier
    assert comparison.relative_l2 == pytest.approx(0.1)
    assert comparison.to_dict()["verdict"] == "ok"


# ---------------------------------------------------------------- inspect --data on the sample models

SHIFTED = SAMPLES / "shifted_calib.npy"
LAYER_KEYS = {"samples", "mean_shift", "var_log_ratio", "kl", "fraction_beyond", "verdict"}
MODEL_KEYS = {"samples", "relative_l2", "classifier", "softmax_kl", "top1_agreement", "verdict"}


@pytest.fixture(scope="module")
def shifted_cnn():
    """cnn.pt2 inspected on sensor-shifted digits (run once: the tests below read the same report)."""
    from bnfold import inspect

    return inspect(SAMPLES / "cnn.pt2", SHIFTED)


def test_inspect_data_json_fields(shifted_cnn):
    assert shifted_cnn.passed  # drift informs, it does not fail inspect
    document = json.loads(shifted_cnn.to_json())
    assert document["data"] == str(SHIFTED)
    assert document["recommendation"] == "statistics drifted: run bnfold recalibrate"
    assert document["limits"] == DriftLimits().to_dict()
    for layer in document["layers"]:
        drift = layer["discrepancy"]
        assert set(drift) == LAYER_KEYS and drift["samples"] > 0 and drift["verdict"] in ("ok", "drifted")
        for measure in ("mean_shift", "var_log_ratio", "kl"):
            assert set(drift[measure]) == {"mean", "max"} and 0 <= drift[measure]["mean"] <= drift[measure]["max"]
    by_name = {layer["name"]: layer["discrepancy"] for layer in document["layers"]}
    assert by_name["bn3"]["kl"]["mean"] == pytest.approx(0.163, abs=0.002)  # the measured value (discrepancy.py)
    assert by_name["bn3"]["verdict"] == "drifted" and by_name["bn1"]["verdict"] == "ok"
    outputs = document["model_discrepancy"]
    assert set(outputs) == MODEL_KEYS and outputs["samples"] == 256 and outputs["classifier"] is True
    assert outputs["top1_agreement"] == pytest.approx(0.68, abs=0.01) and outputs["verdict"] == "drifted"


def test_inspect_without_data_has_null_drift_fields(cli):
    document = json.loads(cli("inspect", SAMPLES / "cnn.onnx", "--json").stdout)
    assert all(layer["discrepancy"] is None for layer in document["layers"])
    assert (document["data"], document["limits"], document["model_discrepancy"], document["recommendation"]) == (
        None, None, None, None)


def test_inspect_data_table_lists_the_worst_layer_first(shifted_cnn):
    # wide enough that the "outputs on <path>" line never wraps, however deep the checkout lies
    console = Console(width=400, record=True, color_system=None, file=io.StringIO())
    console.print(shifted_cnn)
    lines = console.export_text().splitlines()
    rows = [line.lstrip("│┃ ") for line in lines if line.lstrip("│┃ ").startswith("bn")]
    assert [row.split()[0] for row in rows] == ["bn3", "bn2", "bn1"]
    assert "drifted (0.163, 0.368)" in rows[0]
    outputs = next(i for i, line in enumerate(lines) if line.startswith("outputs on "))
    assert "top-1 agreement 68.0%" in lines[outputs]
    assert lines[outputs + 1] == "statistics drifted: run bnfold recalibrate"


def test_pytorch_and_onnx_measure_the_same_drift(shifted_cnn):
    from bnfold import inspect

    onnx_report = inspect(SAMPLES / "cnn.onnx", SHIFTED)
    pairs = list(zip(shifted_cnn.layers, onnx_report.layers))
    assert len(pairs) == 3
    for torch_layer, onnx_layer in pairs:
        ours, theirs = shifted_cnn.discrepancy[torch_layer.name], onnx_report.discrepancy[onnx_layer.name]
        assert ours.kl.mean == pytest.approx(theirs.kl.mean, rel=1e-3)
        assert ours.mean_shift.max == pytest.approx(theirs.mean_shift.max, rel=1e-3)
    assert shifted_cnn.model_discrepancy.softmax_kl == pytest.approx(onnx_report.model_discrepancy.softmax_kl,
                                                                     rel=1e-3)
