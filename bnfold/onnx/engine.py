"""The ONNX engine: fold planning, rewriting and running, without torch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bnfold import memory
from bnfold.errors import DataError, first_line
from bnfold.model import ModelFormat
from bnfold.onnx import runtime
from bnfold.onnx.fold import apply_folds, plan_folds
from bnfold.onnx.model import OnnxModel
from bnfold.plan import FoldOptions, FoldPlan


class OnnxEngine:
    """`bnfold.engine.Engine` for ONNX models; sessions are cached per model for repeated batches."""

    modes = ("onnxruntime, optimizations off", "onnxruntime, all optimizations")

    def __init__(self) -> None:
        self._sessions: dict[int, tuple[OnnxModel, object]] = {}

    def plan(self, model: OnnxModel, options: FoldOptions = FoldOptions()) -> FoldPlan:
        return plan_folds(model.proto, options)

    def apply(self, model: OnnxModel, plan: FoldPlan, into: ModelFormat | None = None) -> OnnxModel:
        return OnnxModel(model.path, apply_folds(model.proto, plan), external_data=model.external_data)

    def folded_format(self, model: OnnxModel, output: Path | None = None) -> ModelFormat:
        return model.format

    def run(self, model: OnnxModel, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        cached = self._sessions.get(id(model))
        if cached is None or cached[0] is not model:
            cached = (model, runtime.session(model.proto))
            self._sessions[id(model)] = cached
        return runtime.run(cached[1], batch)

    def outputs(self, model: OnnxModel, batches: Sequence[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        """Every batch's outputs; a DataError naming the sizes given to the dims the graph leaves open
        when the model does not run on them (the likely cause, and the one the user can fix)."""
        sess = runtime.session(model.proto)
        try:
            return [runtime.run(sess, batch) for batch in batches]
        except Exception as error:
            open_dims = _open_dims(model, batches[0]) if batches else ""
            if not open_dims:
                raise
            raise DataError(f"its inputs' open dims were sized {open_dims} (if it needs others, pass "
                            f"--input-shape); onnxruntime: {first_line(error)}") from error
        finally:
            del sess  # its copy of the weights goes back to the OS before the caller's next step
            memory.release()

    def prepare(self, model: OnnxModel, batch: dict[str, np.ndarray], mode: str = modes[0]) -> Callable[[], object]:
        sess = runtime.session(model.proto, optimize=mode == self.modes[1])
        inputs = runtime.feed(sess, batch)
        return lambda: sess.run(None, inputs)


def _open_dims(model: OnnxModel, batch: dict[str, np.ndarray]) -> str:
    """The sizes `batch` gives the input dims that the graph does not fix ("x: N=2, K=8"), or ""."""
    described = []
    for spec in model.input_specs():
        shape = np.shape(batch.get(spec.name))
        if len(shape) != len(spec.shape):
            continue
        names = spec.dim_names or (None,) * len(shape)
        sizes = [f"{name or f'dim {axis}'}={size}"
                 for axis, (fixed, name, size) in enumerate(zip(spec.shape, names, shape)) if fixed is None]
        if sizes:
            described.append(f"{spec.name}: {', '.join(sizes)}")
    return "; ".join(described)
