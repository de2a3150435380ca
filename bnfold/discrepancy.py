"""Train/inference discrepancy: how far the data a model meets is from the statistics its BN layers use.

Pure numpy in float64. For one BN layer with stored (running) mean m_r, variance v_r and eps, and the
mean m_d and population variance v_d of the inputs it sees at inference over the data, per channel:

    mean_shift    = |m_d - m_r| / sqrt(v_r + eps)          the shift in units of the stored deviation
    var_log_ratio = |log((v_d + eps) / (v_r + eps))|       eps included: it is what the layer divides by
    kl            = KL(N(m_d, v_d + eps) || N(m_r, v_r + eps))

The KL runs from the data to the stored statistics: the expected log-likelihood ratio under the data, the
information lost when the stored Gaussian stands in for the data's. A pure mean shift s gives s²/2, which
is why the default mean-shift limit is sqrt(2 x the KL limit).

For the whole model, outputs computed with the running statistics are compared with outputs computed
with the data's own statistics: relative L2 distance over all outputs, and for classifier-like outputs
(2-D, at least two columns, read as logits) the mean KL(softmax(data-stat) || softmax(running)) and the
top-1 agreement.

Default limits (`DriftLimits`) come from the four sample models (sample_models/README.md), whose .pt2 and
.onnx files agree to within 0.002. Worst layer (channel-mean KL, mean shift) and outputs (relative L2,
softmax KL), clean digits vs sensor-shifted digits that cost 4 to 69 accuracy points; 256 calibration
images (450 test images in brackets where they are worse):

    model   worst-layer KL    worst mean shift   output L2        output KL
            clean   shifted   clean   shifted    clean  shifted   clean          shifted
    cnn     0.005   0.163     0.059   0.368      0.069  0.592     0.001 (0.003)  0.728
    mlp     0.008   0.122     0.053   0.238      0.073  0.289     0.001 (0.005)  0.088 (0.080)
    resnet  0.041   0.084     0.226   0.257      0.232  0.469     0.019 (0.031)  0.297
    mixed   0.018   0.352     0.146   0.609      0.167  0.898     0.007 (0.016)  2.660

Each limit sits between the worst clean and the mildest shifted value (KL 0.06, output KL 0.05), or
catches the gross shifts only, leaving the rest to the KL limits (mean shift 0.35, output L2 0.5).
After `bnfold recalibrate` on the shifted images every value falls to at most 0.004 (KL), 0.05 (mean
shift, output L2) and 0.003 (output KL), even on the held-out shifted test images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnfold.layers import BNLayer
from bnfold.stats import ChannelStatistics


@dataclass(frozen=True)
class DriftLimits:
    """When a layer or the whole model counts as drifted; the defaults of `bnfold check`."""

    max_layer_kl: float = 0.06  # channel-mean KL of one layer
    max_mean_shift: float = 0.35  # channel-mean mean shift of one layer (a pure shift of 0.35 has KL 0.06)
    max_output_kl: float = 0.05  # mean softmax KL of classifier-like outputs
    max_output_l2: float = 0.5  # relative L2 distance of all outputs

    def to_dict(self) -> dict[str, float]:
        return {"max_layer_kl": self.max_layer_kl, "max_mean_shift": self.max_mean_shift,
                "max_output_kl": self.max_output_kl, "max_output_l2": self.max_output_l2}


def shift_and_ratio(data_mean: np.ndarray, data_var: np.ndarray, running_mean: np.ndarray,
                    running_var: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the mean shift |m_d - m_r| / sqrt(v_r + eps) and the variance ratio
    (v_d + eps) / (v_r + eps); also the `recalibrate` report's old-to-new drift. A stored variance below
    -eps has no deviation: the shift is NaN there, as the layer's output is."""
    data_var = np.asarray(data_var, np.float64) + eps
    running_var = np.asarray(running_var, np.float64) + eps
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = np.asarray(data_mean, np.float64) - np.asarray(running_mean, np.float64)
        return np.abs(delta) / np.sqrt(running_var), data_var / running_var


def channel_measures(data_mean: np.ndarray, data_var: np.ndarray, running_mean: np.ndarray,
                     running_var: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per channel (mean_shift, var_log_ratio, kl), as defined in the module docstring."""
    mean_shift, ratio = shift_and_ratio(data_mean, data_var, running_mean, running_var, eps)
    with np.errstate(invalid="ignore", divide="ignore"):
        log_ratio = np.log(ratio)
        kl = 0.5 * (ratio - 1.0 - log_ratio + mean_shift * mean_shift)
    return mean_shift, np.abs(log_ratio), kl


@dataclass(frozen=True)
class Spread:
    """Mean and maximum of a per-channel measure (NaN when a channel is not finite)."""

    mean: float
    max: float

    @classmethod
    def of(cls, values: np.ndarray) -> Spread:
        if values.size == 0:
            return cls(math.nan, math.nan)
        return cls(float(np.mean(values)), float(np.max(values)))

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "max": self.max}


@dataclass(frozen=True)
class LayerDiscrepancy:
    """One BN layer's running statistics against the data it sees at inference."""

    layer: str
    samples: int  # values per channel behind the data statistics
    mean_shift: Spread
    var_log_ratio: Spread
    kl: Spread
    fraction_beyond: float  # channels whose own KL or mean shift exceeds the layer limits
    drifted: bool

    @property
    def verdict(self) -> str:
        return "drifted" if self.drifted else "ok"

    @property
    def severity(self) -> float:
        """Sort key, larger is worse: the channel-mean KL, with non-finite values worst of all."""
        return self.kl.mean if math.isfinite(self.kl.mean) else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "mean_shift": self.mean_shift.to_dict(),
                "var_log_ratio": self.var_log_ratio.to_dict(), "kl": self.kl.to_dict(),
                "fraction_beyond": self.fraction_beyond, "verdict": self.verdict}


def compare_layer(layer: BNLayer, data: ChannelStatistics, limits: DriftLimits = DriftLimits()) -> LayerDiscrepancy | None:
    """The discrepancy of one layer; None when it has no running statistics to compare with."""
    if not layer.has_running_stats or data.count == 0:
        return None
    mean_shift, log_ratio, kl = channel_measures(data.mean, data.variance(), layer.running_mean,
                                                 layer.running_var, layer.eps)
    within = (kl <= limits.max_layer_kl) & (mean_shift <= limits.max_mean_shift)  # NaN counts as beyond
    kl_spread, shift_spread = Spread.of(kl), Spread.of(mean_shift)
    drifted = not (kl_spread.mean <= limits.max_layer_kl and shift_spread.mean <= limits.max_mean_shift)
    return LayerDiscrepancy(layer.name, data.count, shift_spread, Spread.of(log_ratio), kl_spread,
                            float(1.0 - within.mean()) if within.size else 0.0, drifted)


class OutputComparison:
    """Streams pairs of output lists (running statistics, data statistics) into model-level measures."""

    def __init__(self, limits: DriftLimits = DriftLimits()) -> None:
        self.limits = limits
        self.samples = 0
        self._squared_difference = 0.0
        self._squared_reference = 0.0
        self._rows = 0  # classifier rows compared
        self._kl_sum = 0.0
        self._agreeing = 0

    def add(self, running: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> None:
        """One batch: the outputs with running statistics and those with the data's statistics."""
        if len(running) != len(reference):
            raise ValueError(f"output count differs: {len(running)} vs {len(reference)}")
        for ours, theirs in zip(running, reference):
            ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
            difference = ours - theirs
            self._squared_difference += float(np.sum(difference * difference))
            self._squared_reference += float(np.sum(theirs * theirs))
            if ours.ndim == 2 and ours.shape[1] >= 2:
                log_p, log_q = log_softmax(theirs), log_softmax(ours)
                self._kl_sum += float(np.sum(np.exp(log_p) * (log_p - log_q)))
                self._agreeing += int(np.sum(ours.argmax(axis=1) == theirs.argmax(axis=1)))
                self._rows += ours.shape[0]
        if running:
            self.samples += int(np.shape(running[0])[0]) if np.ndim(running[0]) else 1

    @property
    def classifier(self) -> bool:
        return self._rows > 0

    @property
    def relative_l2(self) -> float:
        """||running - data-stat|| / ||data-stat|| over all outputs and samples."""
        if self._squared_reference == 0.0:
            return 0.0 if self._squared_difference == 0.0 else math.inf
        return math.sqrt(self._squared_difference / self._squared_reference)

    @property
    def softmax_kl(self) -> float | None:
        return self._kl_sum / self._rows if self._rows else None

    @property
    def top1_agreement(self) -> float | None:
        return self._agreeing / self._rows if self._rows else None

    @property
    def drifted(self) -> bool:
        kl = self.softmax_kl
        return not (self.relative_l2 <= self.limits.max_output_l2 and (kl is None or kl <= self.limits.max_output_kl))

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "relative_l2": self.relative_l2, "classifier": self.classifier,
                "softmax_kl": self.softmax_kl, "top1_agreement": self.top1_agreement,
                "verdict": "drifted" if self.drifted else "ok"}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64, stable for large logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))


__all__ = ["DriftLimits", "LayerDiscrepancy", "OutputComparison", "Spread", "channel_measures", "compare_layer",
           "shift_and_ratio"]
