"""The `fold` report: per-layer outcome, verification numbers, size before and after."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

from bnfold.layers import FoldDecision, FoldStatus
from bnfold.model import Model
from bnfold.plan import FoldPlan
from bnfold.reports.base import Report, fmt_number
from bnfold.reports.inspect import ModelInfo
from bnfold.verify import OutputDifference


@dataclass
class FoldReport(Report):
    """Passed when the folded model was verified within tolerance (or verification was skipped on request);
    never when the model could not be analysed (`analysis_error`): keeping every BN then proves nothing."""

    kind = "fold"
    model: ModelInfo
    plan: FoldPlan
    tolerance: float
    difference: OutputDifference | None  # None: not verified
    verification_inputs: str  # "random", "data: PATH", or "skipped"
    verify_error: str | None = None  # why verification could not run
    output: str | None = None
    params_before: int = 0
    params_after: int | None = None
    size_before: int | None = None
    size_after: int | None = None
    notes: list[str] = field(default_factory=list)
    folded_model: Model | None = field(default=None, repr=False, compare=False)  # in memory, also when not written

    @property
    def verified(self) -> bool:
        return self.difference is not None and self.difference.within(self.tolerance)

    @property
    def skipped_verification(self) -> bool:
        return self.verification_inputs == "skipped"

    @property
    def analysis_error(self) -> str | None:
        return self.plan.failure

    @property
    def passed(self) -> bool:
        if self.analysis_error is not None:
            return False
        return self.verified or (self.skipped_verification and self.verify_error is None)

    @property
    def decisions(self) -> list[FoldDecision]:
        return self.plan.decisions

    @property
    def folded(self) -> list[FoldDecision]:
        return self.plan.foldable

    @property
    def kept(self) -> list[FoldDecision]:
        return self.plan.kept

    def body(self) -> dict[str, Any]:
        difference = self.difference.to_dict() if self.difference else {}
        return {
            "model": self.model.to_dict(),
            "output": self.output,
            "layers": [d.to_dict() for d in self.decisions],
            "foldable": len(self.folded),
            "folded": len(self.folded) if self.passed else 0,  # a rejected fold folds nothing
            "kept": len(self.kept),
            "verified": self.verified,
            "verification_inputs": self.verification_inputs,
            "verify_error": self.verify_error,
            "analysis_error": self.analysis_error,
            "tolerance": self.tolerance,
            "max_abs_error": difference.get("max_abs_error"),
            "max_rel_error": difference.get("max_rel_error"),
            "verification": difference or None,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "size_before": self.size_before,
            "size_after": self.size_after,
            "notes": self.notes,
        }

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        outcome = "folded" if self.passed else "foldable, none folded"  # a rejected fold folds nothing
        yield Text(f"{self.model.path} ({self.model.format}): {len(self.folded)} of "
                   f"{len(self.decisions)} BN layers {outcome}", style="bold")
        if self.analysis_error:  # above the table, whose rows refer to it
            yield Text(f"not analysed: {self.analysis_error}", style="bold red")
        table = Table()
        table.add_column("BN layer", overflow="fold")
        table.add_column("result", overflow="fold")
        for decision in self.decisions:
            style = "red" if decision.status is FoldStatus.KEPT else "green"
            table.add_row(decision.layer, Text(decision.describe(), style=style))
        yield table
        if self.difference is not None:
            verb = "verified" if self.verified else "compared"  # over the tolerance: compared, not verified
            yield Text(f"{verb} on {self.verification_inputs} inputs ({self.difference.samples} samples): "
                       f"max abs error {fmt_number(self.difference.max_abs)}, max rel error "
                       f"{fmt_number(self.difference.max_rel)} (tolerance {fmt_number(self.tolerance)})")
        if self.verify_error:
            yield Text(f"not verified: {self.verify_error}", style="bold red")
        elif self.skipped_verification:
            yield Text("verification skipped (--no-verify): the folded model was not compared", style="yellow")
        if self.params_after is not None:
            yield Text(f"parameters {self.params_before:,} → {self.params_after:,}")
        if self.size_before is not None and self.size_after is not None:
            yield Text(f"file size {self.size_before:,} → {self.size_after:,} bytes")
        for note in self.notes:
            yield Text(note, style="dim")
        if self.passed:
            yield Text(f"written to {self.output}" if self.output else "dry run: nothing written", style="green")
        else:
            yield Text("fold rejected: nothing written", style="bold red")
