"""What every benchmark shares: paired ratios of interleaved timings, error measures, ONNX helpers, tables.

Timings come from `bnfold.benchmark.time_interleaved`: sample i of every variant was taken in the same
round, so a ratio is computed per round (a slow moment of the shared machine hits both sides) and
reported as the median with the min-max over rounds.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from bnfold.reports.bench import Timing

REPO = Path(__file__).resolve().parents[1]
THREADS = {"intra_op": 1}  # set by `set_threads`; onnxruntime sessions made here use it


def set_threads(count: int) -> None:
    """Intra-op threads for PyTorch, for the onnxruntime sessions made by `ort_session`, and for those
    bnfold makes itself (recalibration, fold verification)."""
    import torch

    from bnfold.onnx import runtime

    torch.set_num_threads(count)
    THREADS["intra_op"] = count
    runtime.intra_op_threads = count


def ratio(numerator: Timing, denominator: Timing) -> dict[str, float]:
    """Per-round ratios of two interleaved timings: median, min, max."""
    values = [a / b for a, b in zip(numerator.samples, denominator.samples)]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt_ratio(value: dict[str, float]) -> str:
    return f"{value['median']:.3f} ({value['min']:.2f}–{value['max']:.2f})"


def fmt_ms(timing: Timing | dict) -> str:
    median = timing.median if isinstance(timing, Timing) else timing["median_s"]
    return f"{median * 1e3:.3g}"


def fmt_err(value: float | None) -> str:
    return "–" if value is None else f"{value:.1e}"


def rel_error(expected, actual) -> float:
    """max |a - b| / max |a|, in float64 (what `bnfold fold` reports as the relative error)."""
    expected, actual = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
    if expected.shape != actual.shape or not np.isfinite(actual).all():
        return float("inf")
    return float(np.abs(expected - actual).max() / np.abs(expected).max())


def ort_session(model, level: str = "disabled", optimized_path: Path | None = None):
    """A CPU session at `level` (disabled, basic, all) on `THREADS`, optionally writing the optimized model."""
    import onnxruntime as ort

    levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.log_severity_level = 4
    options.intra_op_num_threads = THREADS["intra_op"]
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def ort_outputs(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every output of an ONNX model (proto or path) on named inputs, in onnxruntime with optimizations off."""
    return ort_session(model).run(None, feeds)


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
