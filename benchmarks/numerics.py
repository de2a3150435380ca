"""Fold numerics: folded weights and outputs against a float64 reference, bnfold vs torch.nn.utils.fusion.

Each case is one layer followed by BN with random weights and statistics. The reference is the unfolded
pair with the model's own parameters computed in float64, on the same inputs. For each model dtype we measure: the unfolded model's own
error (the floor any deployment of it already has), bnfold's fold (`bnfold.fold`: float64 arithmetic,
rounded once) and PyTorch's `fuse_conv_bn_eval` / `fuse_linear_bn_eval` (arithmetic in the model's
dtype, as `torch.fx.experimental.optimization.fuse` uses it). Weight errors are in units in the last
place (ulp) of the dtype, against the float64 fold rounded once; output errors are relative
(max |y - y64| / max |y64|).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

import bnfold
from benchmarks.common import rel_error, table

SAMPLES = 16


def _layer(kind: str) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    if kind == "conv":
        return nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), (SAMPLES, 64, 16, 16)
    if kind == "linear":
        return nn.Linear(256, 256), nn.BatchNorm1d(256), (SAMPLES, 256)
    return nn.ConvTranspose2d(64, 64, 3, stride=2, groups=4), nn.BatchNorm2d(64), (SAMPLES, 64, 8, 8)


# name, layer kind, dtype, running-mean scale (the producer's bias is set to match: its output really has
# that mean, as after a layer whose activations sit far from zero)
CASES = [
    ("Conv2d 3x3 + BN, typical statistics", "conv", torch.float32, 1.0),
    ("Conv2d + BN, large running means (~1e3)", "conv", torch.float32, 1e3),
    ("Linear + BatchNorm1d", "linear", torch.float32, 1.0),
    ("ConvTranspose2d, groups 4 + BN", "transpose", torch.float32, 1.0),
    ("Conv2d + BN, float16", "conv", torch.float16, 1.0),
    ("Conv2d + BN, float16, large running means (~1e2)", "conv", torch.float16, 1e2),
]


def build(kind: str, mean_scale: float, seed: int) -> tuple[nn.Sequential, tuple[int, ...]]:
    """The float64 pair with non-trivial statistics whose means match the producer's output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer, bn, shape = _layer(kind)
    model = nn.Sequential(layer, bn).double().eval()
    channels = bn.num_features
    with torch.no_grad():
        offset = torch.randn(channels, generator=gen, dtype=torch.float64) * mean_scale
        layer.bias.add_(offset)
        bn.running_mean.copy_(offset + torch.randn(channels, generator=gen, dtype=torch.float64) * 0.1)
        bn.running_var.copy_(torch.rand(channels, generator=gen, dtype=torch.float64) * 0.5 + 0.05)
        bn.weight.copy_(torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=gen, dtype=torch.float64) * 0.2)
    return model, shape


def _exact_fold(model: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
    """The fold of the float64 pair, written out here as an independent oracle."""
    layer, bn = model
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight, kernel = layer.weight, [1] * (layer.weight.dim() - 2)
    if isinstance(layer, nn.ConvTranspose2d):  # (C_in, C_out / groups, k, k): output channels on axis 1, per group
        per_group = layer.out_channels // layer.groups
        grouped = weight.reshape(layer.groups, -1, per_group, *weight.shape[2:])
        weight = (grouped * scale.reshape(layer.groups, 1, per_group, *kernel)).reshape(weight.shape)
    else:
        weight = weight * scale.reshape(-1, 1, *kernel)
    return weight.detach(), ((layer.bias - bn.running_mean) * scale + bn.bias).detach()


def _ulps(actual: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest distance in ulps of `dtype` between a folded tensor and the exact fold."""
    exact64 = exact.double().numpy()
    spacing = np.spacing(np.abs(exact64).astype(torch.empty((), dtype=dtype).numpy().dtype)).astype(np.float64)
    return float(np.max(np.abs(actual.double().numpy() - exact64) / spacing))


def _torch_fused(model: nn.Sequential) -> nn.Module:
    layer, bn = copy.deepcopy(model)
    if isinstance(layer, nn.Linear):
        return fuse_linear_bn_eval(layer, bn)
    return fuse_conv_bn_eval(layer, bn, transpose=isinstance(layer, nn.ConvTranspose2d))


@torch.no_grad()
def measure(kind: str, dtype: torch.dtype, mean_scale: float, seed: int = 0) -> dict:
    model, shape = build(kind, mean_scale, seed)
    model = model.to(dtype)
    reference = copy.deepcopy(model).double()  # the model's own (rounded) parameters, computed in float64
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    expected = reference(x.double())
    exact_weight, exact_bias = _exact_fold(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = bnfold.fold(model, input_shape=",".join(map(str, (2, *shape[1:]))), verify=False)
    ours = report.folded_model.module
    state = dict(ours.named_parameters()) | dict(ours.named_buffers())
    result = {"unfolded_error": rel_error(expected, model(x)),
              "bnfold": _outcome(ours(x), state["0.weight"], state["0.bias"], expected, exact_weight, exact_bias,
                                 dtype)}
    try:
        theirs = _torch_fused(model)
        result["torch"] = _outcome(theirs(x), theirs.weight, theirs.bias, expected, exact_weight, exact_bias, dtype)
    except RuntimeError as error:  # e.g. grouped ConvTranspose: torch scales axis 1 as if it held every channel
        result["torch"] = {"failed": str(error).splitlines()[0][:160]}
    return result


def _outcome(output, weight, bias, expected, exact_weight, exact_bias, dtype) -> dict:
    return {"error": rel_error(expected, output), "weight_ulps": _ulps(weight, exact_weight, dtype),
            "bias_ulps": _ulps(bias, exact_bias, dtype)}


def run(quick: bool = False) -> dict:
    seeds = range(2 if quick else 5)
    results = {}
    for name, kind, dtype, mean_scale in CASES:
        runs = [measure(kind, dtype, mean_scale, seed) for seed in seeds]
        results[name] = {"dtype": str(dtype).removeprefix("torch."), "seeds": len(runs),
                         "unfolded_error": max(r["unfolded_error"] for r in runs),
                         **{tool: _worst([r[tool] for r in runs]) for tool in ("bnfold", "torch")}}
    return results


def _worst(outcomes: list[dict]) -> dict:
    failed = next((o["failed"] for o in outcomes if "failed" in o), None)
    if failed:
        return {"failed": failed}
    return {key: max(o[key] for o in outcomes) for key in outcomes[0]}


def target_holds(result: dict) -> bool:
    """bnfold's folded output is no further from float64 than the unfolded model in its own dtype."""
    return result["bnfold"]["error"] <= result["unfolded_error"]


def markdown(results: dict) -> str:
    rows = []
    for name, r in results.items():
        ours, theirs = r["bnfold"], r["torch"]
        rows.append([name, f"{r['unfolded_error']:.1e}", f"{ours['error']:.1e}",
                     "fails" if "failed" in theirs else f"{theirs['error']:.1e}",
                     f"{ours['weight_ulps']:.2f} / {ours['bias_ulps']:.2f}",
                     "–" if "failed" in theirs else f"{theirs['weight_ulps']:.2f} / {theirs['bias_ulps']:.2f}",
                     "yes" if target_holds(r) else "**no**"])
    seeds = next(iter(results.values()))["seeds"]
    return (f"Worst of {seeds} random draws per case; output errors relative to the float64 unfolded model:\n\n"
            + table(["case", "unfolded", "bnfold", "torch fusion", "bnfold weight / bias ulp",
                     "torch weight / bias ulp", "bnfold ≤ unfolded"], rows))
