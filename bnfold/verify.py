"""Numerical proof that a rewritten model computes the same function: inputs and error measures."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from bnfold.errors import UsageError
from bnfold.model import InputSpec

Batch = dict[str, np.ndarray]
# A dynamic batch dimension gets this many samples in random verification batches.
RANDOM_BATCH = 2
# Relative output error (max |a-b| / max |a|) over which a fold is rejected, by the model's float type.
DEFAULT_TOLERANCE = {"float16": 1e-2, "bfloat16": 5e-2}
DEFAULT_TOLERANCE_FLOAT32 = 1e-4


def default_tolerance(dtypes: Iterable[str]) -> float:
    """The tolerance of the least precise float type involved (a float16 conv may feed a float32 BN)."""
    return max((DEFAULT_TOLERANCE.get(dtype, DEFAULT_TOLERANCE_FLOAT32) for dtype in dtypes),
               default=DEFAULT_TOLERANCE_FLOAT32)


# What `input_shape` takes in the library: the CLI's text, one shape, or one shape per model input.
InputShapes = str | Sequence[int] | Sequence[Sequence[int]]


def parse_input_shapes(given: InputShapes | None) -> list[tuple[int, ...]] | None:
    """'1,3,224,224' or '1,3,32,32;1,10' (one shape per model input); from Python also (1, 3, 224, 224) or
    [(1, 3, 32, 32), (1, 10)]."""
    if given is None or len(given) == 0:
        return None
    if isinstance(given, str):
        parts = [part.split(",") for part in given.split(";") if part.strip()]
    else:
        parts = [given] if all(isinstance(d, (int, np.integer)) for d in given) else list(given)
    try:
        return [tuple(_dimension(d) for d in part) for part in parts]
    except (TypeError, ValueError):
        raise UsageError(f"--input-shape must look like 1,3,224,224 (';' between inputs), got {given!r}") from None


def _dimension(value: object) -> int:
    if isinstance(value, (bool, float)):  # int(True) and int(2.5) would pass for sizes
        raise TypeError(value)
    return int(value)  # type: ignore[call-overload]


def random_batches(specs: Sequence[InputSpec], shapes: list[tuple[int, ...]] | None, count: int = 2,
                   seed: int = 0) -> list[Batch]:
    """Deterministic random inputs honouring the model's input shapes (dynamic dims: batch 2, else 8;
    dims sharing a symbolic name get one size, so `seq` agrees between `input_ids` and `mask`)."""
    if shapes is not None:
        names = [s.name for s in specs] or [f"input_{i}" for i in range(len(shapes))]
        if len(shapes) != len(names):
            raise UsageError(f"--input-shape gives {len(shapes)} shapes but the model has {len(names)} inputs")
        dtypes = [s.dtype for s in specs] or ["float32"] * len(shapes)
        specs = [InputSpec(n, tuple(shape), d) for n, shape, d in zip(names, shapes, dtypes)]
    if not specs:
        raise UsageError("the model does not record its input shape",
                         "pass --input-shape (e.g. 1,3,224,224) or --data")
    rng = np.random.default_rng(seed)
    named: dict[str, int] = {}
    batches = []
    for _ in range(count):
        batch = {}
        for spec in specs:
            names = spec.dim_names or (None,) * len(spec.shape)
            shape = tuple(d if d is not None else _dynamic_size(named, name, i)
                          for i, (d, name) in enumerate(zip(spec.shape, names)))
            array = _random_array(rng, shape, spec.dtype)
            batch[spec.name] = np.abs(array) if spec.positive else array
        batches.append(batch)
    return batches


def _dynamic_size(named: dict[str, int], name: str | None, axis: int) -> int:
    size = RANDOM_BATCH if axis == 0 else 8
    return named.setdefault(name, size) if name else size


def example_batch(specs: Sequence[InputSpec], shapes: list[tuple[int, ...]] | None, seed: int = 0) -> Batch | None:
    """One random batch for shape-aware analysis, or None when the input shape is unknown."""
    if not specs and shapes is None:
        return None
    return random_batches(specs, shapes, count=1, seed=seed)[0]


def _random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    if dtype.startswith(("int", "uint")):
        return rng.integers(0, 8, size=shape).astype(dtype)
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype in ("unknown", "bfloat16"):
        dtype = "float32"
    return rng.standard_normal(shape).astype(dtype)


@dataclass
class OutputDifference:
    """How far two models' outputs are apart, over all compared batches."""

    max_abs: float = 0.0
    max_rel: float = 0.0  # max |a - b| / max |a| per output, worst output
    batches: int = 0
    samples: int = 0
    non_finite: bool = False  # one model produced NaN/Inf where the other did not
    compared: int = 0  # output values finite in both models: where none is, nothing was verified
    dtypes: set[str] = field(default_factory=set)  # of the reference outputs: they set the default tolerance

    def add(self, reference: Iterable[np.ndarray], candidate: Iterable[np.ndarray]) -> None:
        reference, candidate = list(reference), list(candidate)
        if len(reference) != len(candidate):
            raise ValueError(f"output count differs: {len(reference)} vs {len(candidate)}")
        for a, b in zip(reference, candidate):
            self.dtypes.add(np.asarray(a).dtype.name)
            a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
            if a64.shape != b64.shape:
                raise ValueError(f"output shape differs: {a64.shape} vs {b64.shape}")
            if not np.array_equal(np.isfinite(a64), np.isfinite(b64)):
                self.non_finite = True
            finite = np.isfinite(a64) & np.isfinite(b64)
            self.compared += int(finite.sum())
            if not finite.any():
                continue
            diff = float(np.max(np.abs(a64[finite] - b64[finite])))
            scale = float(np.max(np.abs(a64[finite])))
            self.max_abs = max(self.max_abs, diff)
            self.max_rel = max(self.max_rel, diff / scale if scale > 0 else diff)
        self.batches += 1
        self.samples += int(np.asarray(reference[0]).shape[0]) if reference and np.ndim(reference[0]) else 1

    def within(self, tolerance: float) -> bool:
        return not self.non_finite and self.compared > 0 and self.max_rel <= tolerance

    def to_dict(self) -> dict:
        return {"max_abs_error": self.max_abs, "max_rel_error": self.max_rel, "batches": self.batches,
                "samples": self.samples, "non_finite_mismatch": self.non_finite, "values_compared": self.compared}
