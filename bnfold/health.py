"""Static health checks on BN layers: pure functions from `BNLayer` records to `Finding`s.

Thresholds are module constants so reports can quote them and tests can pin them.
"""

from __future__ import annotations

import numpy as np

from bnfold.layers import BNLayer, Finding, Severity

# A gain gamma/sqrt(var+eps) above this multiplies activations so much that float16 overflows and
# int8 quantization of the folded weights loses most of its range.
MAX_GAIN = 1e3
# Channels whose gain is this many times the layer's median gain dominate a per-tensor quantization range.
GAIN_OUTLIER_RATIO = 100.0
# |gamma| below this makes a channel output a constant: a dead channel.
DEAD_GAMMA = 1e-6
# eps outside this range is unusual for any framework's defaults (PyTorch 1e-5, Keras 1e-3).
EPS_RANGE = (1e-7, 1e-2)
# Momentum (weight of the newest batch, PyTorch convention) outside this range is unusual.
MOMENTUM_RANGE = (1e-4, 0.5)


def check_layer(layer: BNLayer) -> list[Finding]:
    """Every finding for one layer, worst first."""
    findings: list[Finding] = []
    add = findings.append
    name = layer.name

    if layer.training_fixed:  # its statistics are never used, so no check of them applies
        add(Finding("training-mode", Severity.ERROR, "BN normalizes with each batch's statistics even in eval mode "
                    "(training mode is fixed in its computation), so outputs depend on the batch", name,
                    "save or export the model after model.eval(), from a BN whose forward passes "
                    "training=self.training"))
        return findings
    if layer.training and layer.track_running_stats and layer.has_running_stats:
        # one without statistics normalizes by its batch in either mode, as no-running-stats says
        add(Finding("training-mode", Severity.WARNING, "module was saved in training mode; "
                    "bnfold evaluates it in eval mode", name, "call model.eval() before saving"))
    if layer.extra.get("hidden_call"):
        add(Finding("hidden-call", Severity.WARNING, f"{layer.extra['hidden_call']}: its statistics are checked, "
                    "but it cannot be recalibrated or folded", name,
                    "call the module as a plain submodule (no torch.jit.interface) so TorchScript inlines it"))
    if layer.extra.get("runtime_params"):  # the rest is checked when the statistics are constants
        what = "parameters" if layer.has_running_stats else "statistics"
        add(Finding("runtime-stats", Severity.WARNING, f"{what} are graph inputs fed at run time "
                    f"({', '.join(layer.extra['runtime_params'])}); they cannot be checked or folded", name,
                    "store them as initializers if they are constants"))
        if not layer.has_running_stats:
            return findings
    if not layer.track_running_stats or not layer.has_running_stats:
        add(Finding("no-running-stats", Severity.WARNING, "no running statistics: the layer normalizes "
                    "with batch statistics at inference and cannot be folded", name,
                    "construct it with track_running_stats=True and run bnfold recalibrate"))
        return findings
    mismatch = layer.mismatch()
    if mismatch:
        add(Finding("malformed-params", Severity.ERROR, f"{mismatch}: the file is damaged", name))
        return findings
    mean, var = layer.running_mean, layer.running_var
    assert mean is not None and var is not None
    bad_mean, bad_var = ~np.isfinite(mean), ~np.isfinite(var)
    if bad_mean.any() or bad_var.any():
        add(Finding("non-finite-stats", Severity.ERROR,
                    f"running statistics hold NaN/Inf in {int((bad_mean | bad_var).sum())} of "
                    f"{layer.channels} channels", name, "run bnfold recalibrate on representative data"))
    negative = np.isfinite(var) & (var < 0)
    if negative.any():
        add(Finding("negative-variance", Severity.ERROR,
                    f"running variance is negative in {int(negative.sum())} channels", name,
                    "run bnfold recalibrate on representative data"))
    for parameter, label in ((layer.weight, "weight (gamma)"), (layer.bias, "bias (beta)")):
        if parameter is not None and not np.isfinite(parameter).all():
            add(Finding("non-finite-params", Severity.ERROR, f"{label} holds NaN/Inf", name))

    gain = layer.effective_gain()  # None: gamma is fed at run time
    finite_gain = np.abs(gain[np.isfinite(gain)]) if gain is not None else np.empty(0)
    if finite_gain.size:
        exploding = finite_gain > MAX_GAIN
        if exploding.any():
            add(Finding("tiny-variance", Severity.WARNING,
                        f"variance so small that the gain gamma/sqrt(var+eps) reaches {finite_gain.max():.3g} "
                        f"in {int(exploding.sum())} channels (> {MAX_GAIN:g})", name,
                        "such channels overflow float16 and quantize badly once folded"))
        median = float(np.median(finite_gain))
        if median > 0:
            outliers = finite_gain > GAIN_OUTLIER_RATIO * median
            if outliers.any() and not exploding.all():
                add(Finding("gain-outliers", Severity.WARNING,
                            f"{int(outliers.sum())} channels have a gain over {GAIN_OUTLIER_RATIO:g}x the "
                            f"median ({median:.3g}); folded weights will quantize poorly", name,
                            "consider per-channel quantization or recalibration"))
    if layer.weight is not None:
        dead = np.isfinite(layer.weight) & (np.abs(layer.weight) < DEAD_GAMMA)
        if dead.any():
            add(Finding("dead-channels", Severity.WARNING,
                        f"{int(dead.sum())} of {layer.channels} channels have gamma ~ 0 and output a constant",
                        name, "prune them"))
    initial = _at_initial_values(layer)
    if initial or layer.num_batches_tracked == 0:
        add(Finding("stale-stats", Severity.WARNING,
                    ("running statistics are still at their initial values (mean 0, var 1)"
                     + (" and num_batches_tracked is 0" if layer.num_batches_tracked == 0 else "")) if initial
                    else "num_batches_tracked is 0: no training batch updated these statistics (converted or "
                         "hand-set weights?)",
                    name, "run bnfold recalibrate on representative data"))
    if layer.extra.get("producer_bias"):
        add(Finding("redundant-bias", Severity.INFO,
                    f"{layer.extra['producer_bias']} has a bias that this BN subtracts again", name,
                    "the bias is redundant before BN; folding absorbs it"))
    low, high, eps = *EPS_RANGE, layer.shown_eps()  # the value the user chose, not its float32 rounding
    if not np.isnan(eps) and not low <= eps <= high:  # NaN: eps unknown (kept in no attribute)
        add(Finding("unusual-eps", Severity.WARNING, f"eps = {eps!r} is outside [{low:g}, {high:g}]", name))
    momentum = torch_momentum(layer)
    if momentum is not None and not MOMENTUM_RANGE[0] <= momentum <= MOMENTUM_RANGE[1]:
        add(Finding("unusual-momentum", Severity.INFO,
                    f"momentum (weight of each new batch) = {momentum:g} is outside "
                    f"[{MOMENTUM_RANGE[0]:g}, {MOMENTUM_RANGE[1]:g}]", name))
    return sorted(findings, key=lambda f: -f.severity.rank)


def torch_momentum(layer: BNLayer) -> float | None:
    """The momentum as the weight of the newest batch: ONNX stores the weight of the old average."""
    if layer.momentum is None:
        return None
    return 1.0 - layer.momentum if layer.framework == "onnx" else layer.momentum


def _at_initial_values(layer: BNLayer) -> bool:
    mean, var = layer.running_mean, layer.running_var
    return bool(mean is not None and var is not None and layer.channels > 0
                and np.all(mean == 0.0) and np.all(var == 1.0))


def fold_refusal(scale: np.ndarray, shift: np.ndarray, var: np.ndarray | None = None) -> str | None:
    """Why a BN's map y = scale * x + shift must stay unfolded wherever it could go (None: it may fold).

    Both engines ask before folding: a NaN or Inf multiplied into weights spreads to every output they
    reach, and a negative running variance means the statistics are corrupt, not just unusual.
    """
    negative = 0 if var is None else int(np.sum(np.asarray(var, np.float64) < 0))
    if negative:
        return (f"its running variance is negative in {negative} channel(s): the statistics are corrupt "
                "(run bnfold recalibrate)")
    bad = ~(np.isfinite(scale) & np.isfinite(shift))
    if bad.any():
        return (f"its statistics give a non-finite scale or shift in {int(bad.sum())} of {bad.size} channel(s) "
                "(NaN/Inf, or variance + eps <= 0); folding would spread it into the weights (run bnfold "
                "recalibrate)")
    return None


def no_statistics(why: str | None = None) -> str:
    """The one reason recalibrate skips and fold keeps a BN without running statistics, whatever the model's
    format; `why` says what shows it where the format can tell ("track_running_stats=False")."""
    return (f"no running statistics{f' ({why})' if why else ''}: it always normalizes by batch statistics, so "
            "there are none to recalibrate and no fixed scale and shift to fold")


def fixed_training(why: str = "its computation fixes it") -> str:
    """The one reason fold keeps and recalibrate skips a BN whose computation fixes training mode
    (`BNLayer.training_fixed`), whatever the model's format: model.eval() would not change it. `why` names
    what fixes it where the format can tell (ONNX: "training_mode=1")."""
    return (f"in training mode whatever the model's mode ({why}): it normalizes each batch with that batch's "
            "statistics and never by its running statistics, so there are none to recalibrate and no fixed "
            "scale and shift to fold")


def check_layers(layers: list[BNLayer]) -> list[Finding]:
    """Findings for all layers, in layer order."""
    return [finding for layer in layers for finding in check_layer(layer)]
