"""The `bench` report: per runtime, original and folded latency (median, spread) and the speed-up."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

from bnfold.reports.base import Report, fmt_number
from bnfold.reports.inspect import ModelInfo
from bnfold.verify import OutputDifference


@dataclass(frozen=True)
class Timing:
    """Seconds per call, one value per interleaved sample."""

    samples: tuple[float, ...]
    calls: int = 1  # calls averaged in each sample

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def to_dict(self) -> dict:
        return {"median_s": self.median, "min_s": self.min, "max_s": self.max, "samples": len(self.samples),
                "calls_per_sample": self.calls}


@dataclass
class BenchRow:
    """One runtime (mode): both models timed in the same interleaved rounds."""

    mode: str
    original: Timing
    folded: Timing
    setup_original_s: float  # preparing the model to run: session creation, unlifting a program
    setup_folded_s: float

    @property
    def speedup(self) -> float:
        """Original median over folded median: above 1 when the folded model is faster."""
        return self.original.median / self.folded.median

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "original": self.original.to_dict(), "folded": self.folded.to_dict(),
                "speedup": self.speedup, "setup_original_s": self.setup_original_s,
                "setup_folded_s": self.setup_folded_s}


@dataclass
class BenchReport(Report):
    """Passed when the folded model's outputs agree with the original's (a timing itself never fails);
    never when bnfold could not analyse the model (`analysis_error`): nothing was folded or timed."""

    kind = "bench"
    model: ModelInfo
    folded_from: str  # "in memory", or the folded model's path
    inputs: dict[str, list[int]]
    rows: list[BenchRow]
    runs: int
    warmup: int
    bn_layers: int
    folded_layers: int | None  # None: the folded model came from a file
    difference: OutputDifference | None  # None: not analysed, so not compared
    tolerance: float
    analysis_error: str | None = None  # why the in-memory fold could not analyse the model

    @property
    def passed(self) -> bool:
        return self.analysis_error is None and self.difference is not None and self.difference.within(self.tolerance)

    def body(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "folded_from": self.folded_from,
            "inputs": self.inputs,
            "runs": self.runs,
            "warmup": self.warmup,
            "bn_layers": self.bn_layers,
            "folded_layers": self.folded_layers,
            "results": [row.to_dict() for row in self.rows],
            "max_abs_error": self.difference.max_abs if self.difference else None,
            "max_rel_error": self.difference.max_rel if self.difference else None,
            "tolerance": self.tolerance,
            "analysis_error": self.analysis_error,
        }

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        folded = (f"folded: {self.folded_from}" if self.folded_layers is None
                  else "not folded in memory" if self.difference is None
                  else f"folded in memory ({self.folded_layers} of {self.bn_layers} BN layers)")
        inputs = ", ".join(f"{name} {tuple(shape)}" for name, shape in self.inputs.items())
        yield Text(f"{self.model.path} ({self.model.format}), {folded}; inputs {inputs}", style="bold")
        if self.difference is None:  # not analysed: timing the model against itself would say nothing
            yield Text(f"not analysed: {self.analysis_error}", style="bold red")
            yield Text("not timed: without a fold both sides are the same model", style="bold red")
            return
        table = Table(caption=f"median (min-max) of {self.runs} interleaved runs after {self.warmup} warm-up; "
                              "setup: session creation or program unlifting, original → folded",
                      caption_justify="left")
        table.add_column("runtime")
        table.add_column("original ms", justify="right")
        table.add_column("folded ms", justify="right")
        table.add_column("speed-up", justify="right")
        table.add_column("setup ms", justify="right")
        for row in self.rows:
            style = "green" if row.speedup >= 1 else "yellow"
            table.add_row(row.mode, _timing(row.original), _timing(row.folded),
                          Text(f"{row.speedup:.2f}×", style=style),
                          f"{_ms(row.setup_original_s)} → {_ms(row.setup_folded_s)}")
        yield table
        agree = ("outputs agree" if self.passed else "outputs DIFFER" if self.difference.compared
                 else "outputs NOT COMPARED (NaN or Inf everywhere in both models)")
        yield Text(f"{agree}: max abs error {fmt_number(self.difference.max_abs)}, max rel error "
                   f"{fmt_number(self.difference.max_rel)} (tolerance {fmt_number(self.tolerance)})",
                   style="green" if self.passed else "bold red")


def _ms(seconds: float) -> str:
    return fmt_number(seconds * 1e3)


def _timing(timing: Timing) -> str:
    return f"{_ms(timing.median)} ({_ms(timing.min)}-{_ms(timing.max)})"
