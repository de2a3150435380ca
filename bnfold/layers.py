"""The shared vocabulary of bnfold: a BN layer, a finding, a fold decision.

The PyTorch and ONNX paths both describe what they see with these records, so health checks, reports,
folding and recalibration never need to know which framework a model came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np


class Severity(str, Enum):
    """How much a finding matters; ordered so that `error` > `warning` > `info`."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return {"info": 0, "warning": 1, "error": 2}[self.value]


@dataclass
class BNLayer:
    """One BatchNorm layer as found in a model, with its statistics as float64 arrays.

    `name` is the module path (PyTorch) or the node name (ONNX). `kind` says what was found, e.g.
    `BatchNorm2d`, `SyncBatchNorm`, `BatchNormAct2d (BatchNorm2d subclass)`, `FrozenBatchNorm2d
    (look-alike)`, `F.batch_norm`, `BatchNormalization-15`. Arrays are `None` when the layer has none
    (no affine parameters, no running statistics).
    """

    name: str
    kind: str
    framework: str
    channels: int | None  # None: unknown (no constant parameter, no declared shape)
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    running_mean: np.ndarray | None
    running_var: np.ndarray | None
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    num_batches_tracked: int | None = None
    dtype: str = "float32"
    training: bool = False
    # `training` is fixed in the layer's computation (an exported graph's training-mode op, a forward passing
    # training=True), so model.eval() does not change it: it normalizes by batch statistics at inference
    training_fixed: bool = False
    # eps is stored as float32 (ONNX's epsilon attribute): `eps` is that exact value, which arithmetic uses
    eps_float32: bool = False
    # Framework-specific facts the health checks may use (e.g. "producer_has_bias").
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def has_running_stats(self) -> bool:
        return self.running_mean is not None and self.running_var is not None

    def mismatch(self) -> str | None:
        """Why the layer's vectors cannot describe one BN (their lengths differ), or None."""
        sizes = {role: array.size for role, array in (("weight", self.weight), ("bias", self.bias),
                                                       ("running_mean", self.running_mean),
                                                       ("running_var", self.running_var)) if array is not None}
        if len(set(sizes.values())) <= 1:
            return None
        return "parameters of different lengths (" + ", ".join(f"{k} {v}" for k, v in sizes.items()) + ")"

    def shown_eps(self) -> float:
        """eps as reports show it: the shortest decimal that reads back as the stored value. ONNX's float32
        1e-5 is 9.999999747378752e-06 as a float64, which nobody wrote."""
        if self.eps_float32 and math.isfinite(self.eps):
            return float(np.format_float_positional(np.float32(self.eps), unique=True))
        return self.eps

    def effective_gain(self) -> np.ndarray | None:
        """gamma / sqrt(var + eps): the per-channel factor a fold multiplies into weights. None when a
        factor is unknown: no statistics, or an affine layer's gamma fed at run time (ONNX graph input)."""
        if not self.has_running_stats or self.mismatch() or (self.affine and self.weight is None):
            return None
        gamma = self.weight if self.weight is not None else 1.0
        with np.errstate(invalid="ignore", divide="ignore"):
            return gamma / np.sqrt(self.running_var + self.eps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "framework": self.framework,
            "channels": self.channels,
            # ONNX spatial=0 on a feature map: `channels` counts activations, (C, *spatial), each with statistics
            "per_activation": bool(self.extra.get("per_activation")),
            "eps": self.shown_eps(),
            "momentum": self.momentum,
            "affine": self.affine,
            "track_running_stats": self.track_running_stats,
            "training": self.training,
            "training_fixed": self.training_fixed,
            "dtype": self.dtype,
            "num_batches_tracked": self.num_batches_tracked,
            "running_mean": summarize(self.running_mean),
            "running_var": summarize(self.running_var),
            "weight": summarize(self.weight),
            "bias": summarize(self.bias),
            "effective_gain": summarize(self.effective_gain()),
        }


def summarize(values: np.ndarray | None) -> dict[str, Any] | None:
    """min/max/mean of the finite values plus how many are not finite; JSON-safe."""
    if values is None:
        return None
    values = np.asarray(values, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"min": None, "max": None, "mean": None, "non_finite": int(values.size)}
    return {
        "min": float(finite.min()),
        "max": float(finite.max()),
        "mean": float(finite.mean()),
        "non_finite": int(values.size - finite.size),
    }


@dataclass(frozen=True)
class Finding:
    """Something worth telling the user about a model, with a stable `code` for machines."""

    code: str
    severity: Severity
    message: str
    layer: str | None = None
    hint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity.value,
            "layer": self.layer,
            "message": self.message,
            "hint": self.hint,
        }


class FoldStatus(str, Enum):
    """What happens (or happened) to one BN layer when folding."""

    FOLDABLE = "foldable"  # analysis only: the layer can be folded exactly
    FOLDED = "folded"  # the layer was folded and the result verified
    KEPT = "kept"  # the layer stays; `reason` says why


class FoldDirection(str, Enum):
    """Where a BN's affine map goes."""

    INTO_PRODUCER = "into-producer"  # Conv/Linear -> BN: scale the producer's weights
    INTO_CONSUMER = "into-consumer"  # BN -> Conv/Linear: fold forward into the next layer
    SPLIT = "split"  # Concat of producers -> BN: one slice of the BN per producer
    SUM = "sum"  # Add of producers -> BN: the whole scale into every producer, the shift into one
    # x -> BN summed with conv(x) or linear(x): into that layer's centre tap (RepVGG's identity branch)
    INTO_SIBLING = "into-sibling"


@dataclass
class FoldDecision:
    """The fold analysis result for one BN layer: one source of truth for `inspect` and `fold`."""

    layer: str
    status: FoldStatus
    targets: list[str] = field(default_factory=list)
    direction: FoldDirection | None = None
    reason: str | None = None
    producer_bias: str | None = None  # the layer feeding this BN, when it has a bias the BN cancels

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "status": self.status.value,
            "targets": list(self.targets),
            "direction": self.direction.value if self.direction else None,
            "reason": self.reason,
        }

    def describe(self) -> str:
        """A short human description for tables."""
        if self.status is FoldStatus.KEPT:
            return f"kept: {self.reason}"
        return f"{self.status.value} {self.destination()}" if self.targets else self.status.value

    def destination(self) -> str:
        """Where the BN went, as every report shows it: '→ conv', '← next conv' (folded forward),
        '→ a, b' (split across a concat), '→ a + b' (every summed layer took it), '→ conv' also for a BN
        beside the conv it went into (into-sibling: the conv reads the BN's input)."""
        arrow = "←" if self.direction is FoldDirection.INTO_CONSUMER else "→"
        return f"{arrow} {(' + ' if self.direction is FoldDirection.SUM else ', ').join(self.targets)}"
