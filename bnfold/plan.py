"""A fold plan: the per-layer decisions plus the engine's own rewrite actions.

Analysis (`plan`) and rewriting (`apply`) are separate so that `inspect` shows exactly the decisions
`fold` would carry out: one source of truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bnfold.layers import FoldDecision, FoldStatus


@dataclass(frozen=True)
class FoldOptions:
    """User choices that change what counts as foldable."""

    # ONNX: treat initializers that are also graph inputs as overridable (onnxruntime's rule) and keep
    # the BN layers that use them. By default they fold, since nobody feeds BN statistics at run time.
    strict_inputs: bool = False
    # One batch of inputs, when the caller has one: lets engines capture graphs that need example inputs
    # (torch.export) and prove shapes (a Linear's features really are the axis a BN normalizes).
    example_batch: dict[str, Any] | None = field(default=None, compare=False, hash=False)


@dataclass
class FoldPlan:
    """Decisions keyed by BN layer name, and opaque engine-specific actions that carry them out."""

    decisions: list[FoldDecision]
    actions: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how the engine got there, for the report
    # Why the engine could not analyse the model at all (no graph captured). Every layer is then kept for
    # that reason, which says nothing about whether it could fold: no report may count it as done.
    failure: str | None = None

    def by_layer(self) -> dict[str, FoldDecision]:
        return {decision.layer: decision for decision in self.decisions}

    @property
    def foldable(self) -> list[FoldDecision]:
        return [d for d in self.decisions if d.status is not FoldStatus.KEPT]

    @property
    def kept(self) -> list[FoldDecision]:
        return [d for d in self.decisions if d.status is FoldStatus.KEPT]
