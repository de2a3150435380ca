"""How the torch runners reduce BN inputs (`InputStatistics`), against float64 references computed here.

The cases are those the reduction treats apart: reduced-precision activations, BN layers kept in float32
inside a float16 model, a layer flagged for more care in a later batch, shared layers and token BNs
whose calls differ in size, BN subclasses observed through hooks, and ExportedPrograms whose BN ops read
the batch's statistics.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.pytorch.recalibrate import InputStatistics
from tests.recalibration_oracle import BatchNormOracle, assert_statistics_match
from tests.test_recalibrate import observed_batch, torch_reduction  # noqa: F401 (a fixture)


def batch_norm_inputs(module: nn.Module, data: np.ndarray, batch: int, dtype: torch.dtype) -> dict[str, np.ndarray]:
    """Every BN module's inputs over the data, in float64, its BN modules in training mode (normalizing by
    each batch, as torch does), each module's calls concatenated along the channels' other axes."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [bn.register_forward_pre_hook(lambda _, args, name=name: seen.setdefault(name, []).append(args[0]))
             for name, bn in module.named_modules() if isinstance(bn, nn.modules.batchnorm._BatchNorm)]
    for bn in module.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.train()
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch):
                module(torch.from_numpy(data[start:start + batch]).to(dtype))
    finally:
        for handle in hooks:
            handle.remove()
        module.eval()
    return {name: torch.cat([x.double().transpose(0, 1).reshape(x.shape[1], -1) for x in inputs], 1).numpy()
            for name, inputs in seen.items()}


class OwnForward(nn.BatchNorm2d):
    """A BN subclass with a forward of its own: observed through a hook, its buffers hold the batch's statistics."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return super().forward(inputs) + 0.0


def keep_batch_norm_fp32() -> nn.Module:
    """A float16 model whose BN layers stay float32 (apex O2's keep_batchnorm_fp32): torch's BN takes float16
    inputs with float32 parameters and statistics."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 6, 3), OwnForward(6), nn.ReLU(), nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4),
                           nn.BatchNorm2d(4, affine=False)).half().eval()
    for bn in (module[1], module[4], module[5]):
        bn.float()
    return module


@pytest.mark.parametrize("kind", ["eager", "pt2"])
def test_fast_method_on_a_float16_model_with_float32_batch_norms(kind):
    module = keep_batch_norm_fp32()
    # the first BN's input varies by more than float16 holds (65,504): float32 statistics only
    data = (np.random.default_rng(0).standard_normal((12, 3, 8, 8)) * 600 + 1).astype(np.float32)
    expected = batch_norm_inputs(module, data, 4, torch.float16)
    assert expected["1"].var(axis=1).max() > 1e5
    source = module if kind == "eager" else torch.export.export(module, (torch.zeros(4, 3, 8, 8).half(),))
    result = bnfold.recalibrate(source, data, method="fast", batch_size=4, min_samples=1).result
    state = result.module.state_dict() if kind == "eager" else result.program.state_dict
    for name in ("1", "4", "5"):
        values = expected[name]
        assert state[f"{name}.running_mean"].dtype == torch.float32
        np.testing.assert_allclose(state[f"{name}.running_mean"].double().numpy(), values.mean(axis=1),
                                   rtol=1e-3, atol=1e-3 * values.std(axis=1).max())
        np.testing.assert_allclose(state[f"{name}.running_var"].double().numpy(), values.var(axis=1, ddof=1), rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("offset, scale", [(0.0, 400.0), (300.0, 1.0)])
def test_reduced_precision_inputs_normalize_as_a_training_mode_batch_norm(dtype, offset, scale):
    """As a training-mode BN in float64, up to the output's rounding (a float16 variance above 65,504 is
    infinite; torch's own float16 kernel loses more, 0.06 at an offset of 300 standard deviations)."""
    generator = torch.Generator().manual_seed(3)
    inputs = (torch.randn(6, 4, 5, 5, generator=generator) * scale + offset).to(dtype)
    weight, bias = torch.linspace(0.5, 2, 4).to(dtype), torch.linspace(-1, 1, 4).to(dtype)
    statistics = InputStatistics(["bn"])
    outputs = []
    observed_batch(statistics, "bn", lambda: outputs.append(statistics.normalize("bn", inputs, weight, bias, 1e-5)))
    expected = F.batch_norm(inputs.double(), None, None, weight.double(), bias.double(), True, 0.0, 1e-5)
    assert outputs[-1].dtype == dtype
    assert (outputs[-1].double() - expected).abs().max() <= torch.finfo(dtype).eps * 2 * expected.abs().amax()
    values = inputs.double().transpose(0, 1).reshape(4, -1).numpy()
    np.testing.assert_allclose(statistics.result()["bn"].variance(), values.var(axis=1), rtol=1e-6)


def float64_moments(batches: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    values = torch.cat([x.double().transpose(0, 1).reshape(x.shape[1], -1) for x in batches], 1).numpy()
    return values.mean(axis=1), values.var(axis=1)


def test_layers_flagged_in_later_batches_keep_every_batch_exact(torch_reduction, monkeypatch):
    """`late` needs float64 from its third batch on, `both` a direct variance and float64 at once in its
    second; batches of other sizes, resolutions and layers are merged with theirs, a few at a time."""
    from bnfold.pytorch import recalibrate as torch_recalibrate

    monkeypatch.setattr(torch_recalibrate, "_PENDING_BYTES", 3000)
    generator = torch.Generator().manual_seed(4)
    seen: dict[str, list[torch.Tensor]] = {"late": [], "both": [], "plain": []}
    statistics = InputStatistics(["late", "both", "plain"])
    runs = 0
    for index, (samples, side) in enumerate([(6, 5), (6, 5), (6, 4), (3, 5), (6, 5)]):
        late = torch.randn(samples, 3, side, side, generator=generator) * 2 + (4000.0 if index >= 2 else 1.0)
        both = torch.randn(samples, 4, side, side, generator=generator) + 1
        if index == 1:
            both[:, 0] = 0.25  # a variance of 0 is below eps / 8 ...
            both[:, 1] = both[:, 1] * 1e-3 + 900  # ... and a mean of 900 about 1000 standard deviations out
        plain = torch.randn(samples, 2, side, side, generator=generator) - 2

        def run():
            nonlocal runs
            runs += 1
            statistics.normalize("late", late, None, None, 1e-5)
            statistics.normalize("both", both, None, None, 1e-3)
            statistics.normalize("plain", plain, None, None, 1e-5)

        observed_batch(statistics, "", run)
        for name, batch in (("late", late), ("both", both), ("plain", plain)):
            seen[name].append(batch)
    if torch_reduction == "native":  # the moments kernel is exact at any offset: nothing needs care
        assert not statistics._careful | statistics._direct and runs == 5
    else:
        assert statistics._careful >= {"late", "both"} and "plain" not in statistics._careful | statistics._direct
        assert runs == 7  # batches 2 and 3 once more
    result = statistics.result()
    for name, batches in seen.items():
        mean, variance = float64_moments(batches)
        assert result[name].batches == 5 and result[name].count == sum(x[:, 0].numel() for x in batches)
        assert np.all(np.abs(result[name].mean - mean) <= 1e-7 * np.abs(mean) + 1e-6 * np.sqrt(variance)), name
        np.testing.assert_allclose(result[name].variance(), variance, rtol=2e-6, err_msg=name)


class Reshaped(nn.Module):
    """A BN module called at two resolutions, a token BN1d called on (N*T, C) and on (N, C), a BN1d on
    (N, C, L), and a BN far from zero that no other layer reads."""

    def __init__(self, three_d: bool) -> None:
        super().__init__()
        conv, bn = (nn.Conv3d, nn.BatchNorm3d) if three_d else (nn.Conv2d, nn.BatchNorm2d)
        self.pool = F.avg_pool3d if three_d else F.avg_pool2d
        self.conv, self.shared, self.offset = conv(3, 8, 3, padding=1), bn(8), bn(8)
        self.tokens, self.sequence = nn.BatchNorm1d(8), nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = self.shared(self.conv(x))
        half = self.shared(self.conv(self.pool(x, 2)))
        far = self.offset(full + 3000.0)
        samples, channels = full.shape[:2]
        tokens = self.tokens(full.flatten(2).transpose(1, 2).reshape(-1, channels))
        sequence = self.sequence(tokens.reshape(samples, -1, channels).transpose(1, 2))
        return sequence.mean() + self.tokens(half.flatten(2).mean(2)).sum() + far.mean()


@pytest.mark.parametrize("method", ["exact", "fast"])
@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
def test_calls_of_several_sizes_in_channels_last_models_match_the_oracle(method, three_d, torch_reduction):
    torch.manual_seed(0)
    module = Reshaped(three_d).eval()
    shape = (11, 3, 4, 8, 8) if three_d else (11, 3, 16, 16)  # a last batch of 3
    data = (np.random.default_rng(1).standard_normal(shape) * 2 + 1).astype(np.float32)
    layout = torch.channels_last_3d if three_d else torch.channels_last
    report = bnfold.recalibrate(copy.deepcopy(module).to(memory_format=layout), data, method=method, batch_size=4,
                                min_samples=1)
    oracle = BatchNormOracle(module, data, batch=4, ddof=1)
    oracle = oracle.exact() if method == "exact" else oracle.fast()
    assert set(oracle.statistics) == {"shared", "offset", "tokens", "sequence"}
    for name, (mean, var) in oracle.statistics.items():
        bn = report.result.module.get_submodule(name)
        assert_statistics_match(bn.running_mean.numpy(), bn.running_var.numpy(), mean, var, layer=name)
        assert int(bn.num_batches_tracked) == oracle.calls[name]


def test_a_float16_program_normalizes_by_float32_batch_statistics_as_eager_runs_do():
    """A pure float16 .pt2 gets its batch statistics in float32 (with float32 weight and bias for torch's BN),
    as the eager fast method normalizes, so both store the same statistics downstream; in float16 the
    first layer's rounded statistics moved the second layer's."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1),
                           nn.BatchNorm2d(8)).half().eval()
    data = (np.random.default_rng(3).standard_normal((32, 3, 8, 8)) * 3 + 1).astype(np.float32)
    options = {"method": "fast", "batch_size": 8, "min_samples": 1}
    eager = bnfold.recalibrate(module, data, **options).result.module.state_dict()
    program = torch.export.export(module, (torch.zeros(8, 3, 8, 8).half(),))
    exported = bnfold.recalibrate(program, data, **options).result.program.state_dict
    for name in ("1", "4"):
        for statistic in ("running_mean", "running_var"):
            assert exported[f"{name}.{statistic}"].dtype == torch.float16
            assert torch.equal(exported[f"{name}.{statistic}"], eager[f"{name}.{statistic}"]), (name, statistic)
