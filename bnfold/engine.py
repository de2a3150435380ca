"""The per-framework engine interface: fold planning, rewriting and running a model.

Shared orchestration (`bnfold.api`) talks only to this interface; `engine_for` imports the framework's
engine lazily, so the ONNX path never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from bnfold.model import Model, ModelFormat
from bnfold.plan import FoldOptions, FoldPlan

Batch = dict[str, np.ndarray]  # one batch of inputs, keyed by input name


class Engine(Protocol):
    """What `fold`, `inspect`, `recalibrate`, `check` and `bench` need from a framework."""

    modes: ClassVar[tuple[str, ...]]  # how `prepare` can run a model, the first as `run` does

    def plan(self, model: Model, options: FoldOptions = FoldOptions()) -> FoldPlan:
        """Decide, per BN layer, whether and where it folds exactly; never changes the model."""

    def apply(self, model: Model, plan: FoldPlan, into: ModelFormat | None = None) -> Model:
        """A new model with the plan's folds carried out, in the format `into` when it will be written
        (`folded_format`; a UsageError where it cannot be had); the input model is left untouched."""

    def folded_format(self, model: Model, output: Path | None = None) -> ModelFormat:
        """The format a fold of `model` is written in (to `output`): its own, or another where its own
        cannot hold the fold."""

    def run(self, model: Model, batch: Batch) -> list[np.ndarray]:
        """The model's outputs (eval mode) for one batch, as numpy arrays."""

    def outputs(self, model: Model, batches: Sequence[Batch]) -> list[list[np.ndarray]]:
        """`run` on every batch, with nothing set up for the model (a runtime session holding a copy of
        its weights) kept after the call."""

    def prepare(self, model: Model, batch: Batch, mode: str) -> Callable[[], object]:
        """One forward on `batch` as a zero-argument call, with everything but the forward done up front
        (inputs converted, session created), so that timing it measures the model alone."""


def engine_for(model: Model) -> Engine:
    """The engine of the model's framework."""
    if model.framework == "onnx":
        from bnfold.onnx.engine import OnnxEngine

        return OnnxEngine()
    from bnfold.pytorch.engine import TorchEngine

    return TorchEngine()
