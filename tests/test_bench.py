"""`bnfold bench`: structure and consistency of the timings (never their speed) on every sample format."""

from __future__ import annotations

import json
import math

import pytest

import bnfold
from bnfold.benchmark import time_interleaved
from tests.conftest import SAMPLES
from tests.test_startup import run_probe

QUICK = ("--runs", "3", "--warmup", "1")
FACTORY = ("--model-factory", "sample_models.architectures:make_cnn")
EAGER = ["PyTorch eager"]
ORT = ["onnxruntime, optimizations off", "onnxruntime, all optimizations"]


def bench_json(cli, *args: str, code: int = 0) -> dict:
    result = cli("bench", *args, *QUICK, "--json")
    assert result.code == code, result.stderr
    return json.loads(result.stdout)


def assert_consistent(document: dict, modes: list[str], runs: int = 3) -> None:
    assert document["kind"] == "bench" and document["schema_version"] == 1
    assert [row["mode"] for row in document["results"]] == modes
    assert document["runs"] == runs
    for row in document["results"]:
        for side in ("original", "folded"):
            timing = row[side]
            assert 0 < timing["min_s"] <= timing["median_s"] <= timing["max_s"], timing
            assert timing["samples"] == runs and timing["calls_per_sample"] >= 1
        # both sides of a row repeat a call equally often, so their samples compare
        assert row["original"]["calls_per_sample"] == row["folded"]["calls_per_sample"]
        assert math.isclose(row["speedup"], row["original"]["median_s"] / row["folded"]["median_s"])
        assert row["setup_original_s"] > 0 and row["setup_folded_s"] > 0


def assert_agrees(document: dict) -> None:
    assert document["passed"] is True
    assert 0 <= document["max_rel_error"] <= document["tolerance"]


@pytest.mark.parametrize("args, modes", [
    (("cnn.onnx",), ORT),
    (("cnn.pt2",), EAGER),
    (("cnn.ts", "--input-shape", "1,1,8,8"), EAGER),
    (("cnn_pickle.pt", "--allow-pickle", "--input-shape", "1,1,8,8"), EAGER),
    (("cnn_state_dict.pt", *FACTORY, "--input-shape", "1,1,8,8"), EAGER),
])
def test_every_format_folds_in_memory_and_times_both(cli, args, modes):
    document = bench_json(cli, str(SAMPLES / args[0]), *args[1:])
    assert_consistent(document, modes)
    assert_agrees(document)
    assert document["folded_from"] == "in memory"
    assert document["bn_layers"] == document["folded_layers"] == 3
    assert document["inputs"] == {next(iter(document["inputs"])): [1, 1, 8, 8]}


def test_batch_size_replaces_the_batch_dimension(cli):
    document = bench_json(cli, str(SAMPLES / "mixed.onnx"), "--batch-size", "4")
    assert document["inputs"] == {"input": [4, 1, 8, 8]}
    assert (document["bn_layers"], document["folded_layers"]) == (4, 2)  # two are kept (README)
    assert_consistent(document, ORT)
    assert_agrees(document)


def test_batch_size_overrides_the_given_input_shape(cli):
    document = bench_json(cli, str(SAMPLES / "cnn.ts"), "--input-shape", "1,1,8,8", "--batch-size", "3")
    assert document["inputs"] == {next(iter(document["inputs"])): [3, 1, 8, 8]}


@pytest.mark.parametrize("name", ["cnn.onnx", "cnn.pt2"])
def test_a_folded_file_is_compared_as_given(cli, tmp_path, name):
    folded = tmp_path / f"folded_{name}"
    assert cli("fold", SAMPLES / name, "-o", folded).code == 0
    document = bench_json(cli, str(SAMPLES / name), "--folded", str(folded))
    assert document["folded_from"] == str(folded) and document["folded_layers"] is None
    assert_consistent(document, ORT if name.endswith(".onnx") else EAGER)
    assert_agrees(document)


def test_a_folded_model_that_computes_something_else_fails(cli):
    document = bench_json(cli, str(SAMPLES / "cnn.onnx"), "--folded", str(SAMPLES / "mlp.onnx"), code=1)
    assert document["passed"] is False
    assert document["max_rel_error"] > document["tolerance"]
    assert_consistent(document, ORT)  # timed all the same


def test_table_for_people(cli):
    result = cli("bench", SAMPLES / "cnn.onnx", *QUICK)
    assert result.code == 0, result.stderr
    words = " ".join(result.stdout.split())  # the header wraps where the checkout's path is long
    for fragment in ("folded in memory (3 of 3 BN layers)", "speed-up", *ORT, "median (min-max) of 3",
                     "outputs agree"):
        assert fragment in words
    assert "×" in result.stdout


@pytest.mark.parametrize("args, fragment", [
    (("cnn.onnx", "--folded", str(SAMPLES / "cnn.pt2")), "--folded is a torch model"),
    (("cnn.onnx", "--batch-size", "0"), "--batch-size must be at least 1"),
    (("cnn.onnx", "--runs", "0"), "--runs must be at least 1"),
    (("cnn.ts",), "--input-shape"),
    (("cnn.onnx", "--input-shape", "1,3,32,32"), "cannot time the model on inputs input (1, 3, 32, 32)"),
])
def test_user_errors_are_one_line(cli, args, fragment):
    result = cli("bench", SAMPLES / args[0], *args[1:])
    assert result.code == 2, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert fragment in result.stderr


def test_the_library_returns_the_same_report():
    report = bnfold.bench(SAMPLES / "mlp.onnx", runs=2, warmup=1, batch_size=2)
    assert report and report.folded_layers == 2
    assert json.loads(report.to_json())["inputs"] == {"input": [2, 1, 8, 8]}
    assert [row.mode for row in report.rows] == ORT


def test_onnx_bench_never_imports_torch():
    completed = run_probe("bench", str(SAMPLES / "cnn.onnx"), "--runs", "1", "--warmup", "1")
    assert completed.returncode == 0, completed.stderr
    assert "TORCH-MODULES: 0" in completed.stderr


def test_interleaving_alternates_the_order_and_repeats_calls_equally():
    log: list[str] = []
    calls = {name: (lambda name=name: log.append(name)) for name in ("a", "b")}
    timings = time_interleaved(calls, runs=4, warmup=2, sample_seconds=0.0)
    assert log[:4] == ["a", "a", "b", "b"]  # warm-up
    assert log[4:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # one call per sample, order flips
    assert all(len(t.samples) == 4 and t.calls == 1 and t.min > 0 for t in timings.values())


def test_short_calls_are_repeated_to_fill_a_sample():
    count = {"a": 0}

    def call() -> None:
        count["a"] += 1

    (timing,) = time_interleaved({"a": call}, runs=2, warmup=1, sample_seconds=0.001).values()
    assert timing.calls > 1 and count["a"] == 1 + 2 * timing.calls
