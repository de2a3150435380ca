"""Eager PyTorch models built the way real projects build them, beyond the zoo's architectures: weight
normalization (legacy hooks and parametrizations), torch.ao's fused ConvBn modules (float and QAT), models
saved inside nn.DataParallel, channels_last and half-precision models, user hooks, a BN called twice.

Each is folded (verified), inspected and recalibrated; recalibrated statistics are held against the float64
oracle of `tests.recalibration_oracle`, or, for half-precision models, against statistics of the BN inputs
the model computes in its own dtype, gathered with forward pre-hooks.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.qat as nniqat
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrizations

import bnfold
from bnfold.errors import BnfoldError
from bnfold.layers import FoldStatus
from tests.recalibration_oracle import BatchNormOracle, assert_statistics_match

SHAPE = (2, 3, 8, 8)
RUNTIME_WEIGHT = "computes its weight at run time"


def randomized(module: nn.Module) -> nn.Module:
    """`module` in eval mode with random BN statistics and affine parameters (identity BN proves nothing)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for child in module.modules():
            if isinstance(child, _BatchNorm):
                channels = child.num_features
                child.running_mean.copy_(torch.rand(channels, generator=generator) * 2 - 1)
                child.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
                child.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
                child.bias.copy_(torch.rand(channels, generator=generator) * 2 - 1)
                child.num_batches_tracked.fill_(100)
    return module.eval()


def same_every_call(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """`factory` with its conv weights drawn from a fixed seed, so that two calls build the same model."""
    @functools.wraps(factory)
    def build() -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return factory()

    return build


def calibration_data(shape: tuple[int, ...] = SHAPE, samples: int = 24) -> np.ndarray:
    return (np.random.default_rng(1).standard_normal((samples, *shape[1:])) * 2 + 0.5).astype(np.float32)


def input_shape(shape: tuple[int, ...] = SHAPE) -> str:
    return ",".join(map(str, shape))


def decisions(report) -> dict[str, tuple[FoldStatus, str | None]]:
    return {decision.layer: (decision.status, decision.reason) for decision in report.plan.decisions}


def assert_matches_oracle(module: nn.Module, result: nn.Module, method: str, data: np.ndarray, batch: int) -> None:
    """`result`'s BN statistics are those the float64 oracle computes for `module` on `data`."""
    oracle = BatchNormOracle(module, data, batch=batch, ddof=1)
    oracle = oracle.exact() if method == "exact" else oracle.fast()
    assert oracle.statistics
    for layer, (mean, var) in oracle.statistics.items():
        assert_statistics_match(result.get_buffer(oracle.reads[layer][0]).numpy(),
                                result.get_buffer(oracle.reads[layer][1]).numpy(), mean, var, layer=layer)


# --------------------------------------------------------------------------------------------------------
# Weight normalization: the conv's weight is computed on every call
# --------------------------------------------------------------------------------------------------------


@same_every_call
def legacy_weight_norm() -> nn.Module:
    """torch.nn.utils.weight_norm: `weight` is a plain attribute that a forward pre-hook computes from
    weight_g and weight_v; freshly built, it carries autograd history, which deepcopy refuses."""
    with pytest.warns(FutureWarning):
        conv = nn.utils.weight_norm(nn.Conv2d(3, 4, 3))
    return randomized(nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU()))


def test_legacy_weight_norm_keeps_its_bn() -> None:
    module = legacy_weight_norm()
    assert not module[0].weight.is_leaf
    report = bnfold.fold(module, input_shape=input_shape())
    assert report.passed and report.difference.max_rel == 0
    status, reason = decisions(report)["1"]
    assert status is FoldStatus.KEPT and RUNTIME_WEIGHT in reason
    assert bnfold.inspect(module, input_shape=input_shape()).folds["1"].status is FoldStatus.KEPT


@pytest.mark.parametrize("method", ["fast", "exact"])
def test_legacy_weight_norm_recalibrates(method: str) -> None:
    module = legacy_weight_norm()
    data = calibration_data()
    report = bnfold.recalibrate(module, data, method=method, batch_size=8)
    twin = legacy_weight_norm()
    with torch.no_grad():
        twin(torch.from_numpy(data[:1]))  # its weight recomputed without autograd: a tensor the oracle can copy
    assert_matches_oracle(twin, report.result.module, method, data, batch=8)


@pytest.mark.parametrize("parametrize", [parametrizations.weight_norm, parametrizations.spectral_norm])
def test_parametrized_conv_keeps_its_bn(parametrize) -> None:
    """A parametrization recomputes the weight from its originals: a weight written into the conv would be
    ignored, so the BN stays, and so does the parametrization."""
    module = randomized(nn.Sequential(parametrize(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4), nn.ReLU()))
    report = bnfold.fold(module, input_shape=input_shape())
    assert report.passed
    status, reason = decisions(report)["1"]
    assert status is FoldStatus.KEPT and RUNTIME_WEIGHT in reason
    assert nn.utils.parametrize.is_parametrized(report.folded_model.module[0])


@pytest.mark.parametrize("method", ["fast", "exact"])
def test_parametrized_conv_recalibrates(method: str) -> None:
    module = randomized(nn.Sequential(parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4),
                                      nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    data = calibration_data()
    report = bnfold.recalibrate(module, data, method=method, batch_size=8)
    assert [layer.name for layer in report.layers] == ["1", "4"]
    assert_matches_oracle(module, report.result.module, method, data, batch=8)


# --------------------------------------------------------------------------------------------------------
# User hooks and a BN called twice
# --------------------------------------------------------------------------------------------------------


class FeatureTap(nn.Module):
    """Keeps the conv output a forward hook hands it, as feature-extraction code does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.features: list[torch.Tensor] = []
        self.conv.register_forward_hook(lambda _module, _inputs, output: self.features.append(output))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).relu()


def test_feature_hook_holding_autograd_outputs() -> None:
    """A hook kept an output computed with autograd on (a training step, a Grad-CAM run): copying the model
    must not trip over it."""
    module = randomized(FeatureTap())
    module(torch.randn(SHAPE))  # with grad: the kept feature is not a leaf
    report = bnfold.fold(module, input_shape=input_shape())
    assert report.passed and decisions(report)["bn"][0] is FoldStatus.FOLDED
    assert bnfold.inspect(module, input_shape=input_shape()).folds["bn"].status is FoldStatus.FOLDABLE


class SharedBN(nn.Module):
    """One BN module normalizes two branches (a weight-sharing shortcut some papers use)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv_a(x)) + self.bn(self.conv_b(x))


@pytest.mark.parametrize("method", ["fast", "exact"])
def test_bn_called_on_two_branches(method: str) -> None:
    module = randomized(SharedBN())
    report = bnfold.fold(module, input_shape=input_shape())
    assert report.passed and report.difference.max_rel < 1e-5
    assert decisions(report)["bn"][0] is FoldStatus.FOLDED
    data = calibration_data()
    result = bnfold.recalibrate(module, data, method=method, batch_size=8)
    assert_matches_oracle(module, result.result.module, method, data, batch=8)
    assert int(result.result.module.bn.num_batches_tracked) == 2 * 3  # two calls in each of 3 batches


def test_bn_feeding_its_own_input_refuses_exact_in_one_line() -> None:
    module = randomized(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    chained = nn.Sequential(module, nn.ReLU(), module)
    with pytest.raises(BnfoldError, match="feeds its own input") as raised:
        bnfold.recalibrate(chained, calibration_data(), method="exact", batch_size=8)
    assert "\n" not in str(raised.value)


class BNUnderTwoNames(nn.Module):
    """One BN module held under two names (DGCNN's `self.bn1`, also `conv1[1]`)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(8)
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), self.bn1, nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv1(x))


def test_a_program_names_a_bn_held_under_two_names_by_its_first_name(tmp_path) -> None:
    """The program holds its tensors under both names and its op reads them by the call's (conv1.1):
    inspect, fold and recalibrate named it so, where the eager model's layer is bn1."""
    module = randomized(BNUnderTwoNames()).eval()
    source, data = tmp_path / "shared.pt2", calibration_data()
    torch.export.save(torch.export.export(module, (torch.randn(SHAPE),)), source)
    assert [layer.name for layer in bnfold.inspect(source).layers] == ["bn1"] \
        == [layer.name for layer in bnfold.inspect(module, input_shape=input_shape()).layers]
    report = bnfold.fold(source, tmp_path / "folded.pt2")
    assert report.passed and [(d.layer, d.status) for d in report.plan.decisions] == [("bn1", FoldStatus.FOLDED)]
    recalibrated = bnfold.recalibrate(source, data, output=tmp_path / "recalibrated.pt2", batch_size=8)
    assert [layer.name for layer in recalibrated.layers] == ["bn1"]
    program = torch.export.load(tmp_path / "recalibrated.pt2")
    assert_matches_oracle(module, program.module(), "exact", data, batch=8)


# --------------------------------------------------------------------------------------------------------
# Models saved inside nn.DataParallel (or compiled): pickled whole, or as a state_dict whose keys start with
# `module.` (or `_orig_mod.`)
# --------------------------------------------------------------------------------------------------------


@same_every_call
def conv_stack() -> nn.Module:
    """The bare model (importable: `--model-factory tests.test_eager_patterns:conv_stack`)."""
    return randomized(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4)))


def test_pickled_data_parallel_model_through_the_cli(tmp_path, cli) -> None:
    wrapped = nn.DataParallel(conv_stack()).eval()
    source, data = tmp_path / "wrapped.pt", tmp_path / "data.npy"
    torch.save(wrapped, source)
    np.save(data, calibration_data())
    assert cli("inspect", source, "--input-shape", input_shape()).code == 2  # a pickle needs consent
    assert "module.1" in cli("inspect", source, "--allow-pickle", "--input-shape", input_shape()).stdout
    folded = tmp_path / "folded.pt"
    assert cli("fold", source, "--allow-pickle", "--input-shape", input_shape(), "-o", folded).code == 0
    x = torch.randn(SHAPE)
    with torch.no_grad():
        expected, actual = wrapped(x), torch.load(folded, weights_only=False)(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    recalibrated = tmp_path / "recalibrated.pt"
    assert cli("recalibrate", source, "--allow-pickle", "--data", data, "--batch-size", "8", "-o",
               recalibrated).code == 0
    assert_matches_oracle(wrapped, torch.load(recalibrated, weights_only=False), "exact", np.load(data), batch=8)


# what the weights were saved from: keys start with `module.`, `_orig_mod.` or `_orig_mod.module.`
WRAPPERS = {"DataParallel": nn.DataParallel, "compiled": torch.compile,
            "compiled DataParallel": lambda model: torch.compile(nn.DataParallel(model))}


@pytest.mark.parametrize("wrap", WRAPPERS.values(), ids=WRAPPERS)
def test_wrapped_state_dict_loads_into_the_bare_factory_model(tmp_path, cli, wrap) -> None:
    weights = tmp_path / "weights.pt"
    torch.save(wrap(conv_stack()).state_dict(), weights)
    factory = ["--model-factory", "tests.test_eager_patterns:conv_stack"]
    inspected = cli("inspect", weights, *factory)
    assert inspected.code == 0 and "2 BN layers, 2 foldable" in inspected.stdout
    report = bnfold.fold(weights, model_factory=factory[1], input_shape=input_shape())
    assert report.passed and {d.status for d in report.plan.decisions} == {FoldStatus.FOLDED}
    data = calibration_data()
    result = bnfold.recalibrate(weights, data, model_factory=factory[1], batch_size=8)
    assert_matches_oracle(conv_stack(), result.result.module, "exact", data, batch=8)


@pytest.mark.parametrize("wrap", WRAPPERS.values(), ids=WRAPPERS)
def test_recalibrated_wrapped_state_dict_keeps_its_keys(tmp_path, cli, wrap) -> None:
    """The written weights load where the input did: into the wrapped model."""
    weights, data, recalibrated = tmp_path / "weights.pt", tmp_path / "data.npy", tmp_path / "recalibrated.pt"
    torch.save(wrap(conv_stack()).state_dict(), weights)
    np.save(data, calibration_data())
    assert cli("recalibrate", weights, "--model-factory", "tests.test_eager_patterns:conv_stack", "--data", data,
               "-o", recalibrated).code == 0
    bare = conv_stack()
    wrap(bare).load_state_dict(torch.load(recalibrated))
    assert_matches_oracle(conv_stack(), bare, "exact", np.load(data), batch=32)


def lightning_checkpoint(**extra_weights: torch.Tensor) -> dict:
    """What PyTorch Lightning saves for a LightningModule that holds the model as `self.model`."""
    weights = {f"model.{key}": tensor for key, tensor in conv_stack().state_dict().items()}
    return {"epoch": 3, "global_step": 120, "state_dict": {**weights, **extra_weights},
            "optimizer_states": [{"param_groups": [{"lr": 0.1, "params": [0, 1]}]}]}


def test_a_training_checkpoint_is_written_back_with_its_other_entries(tmp_path, cli) -> None:
    """The weights under `state_dict`, keyed `model.*`, load into the factory's model; the recalibrated file
    was a bare state_dict without the `model.` prefix, which the training code could not resume from."""
    weights, data, recalibrated = tmp_path / "last.ckpt", tmp_path / "data.npy", tmp_path / "recalibrated.ckpt"
    checkpoint = lightning_checkpoint()
    torch.save(checkpoint, weights)
    np.save(data, calibration_data())
    assert cli("recalibrate", weights, "--model-factory", "tests.test_eager_patterns:conv_stack", "--data", data,
               "-o", recalibrated).code == 0
    written = torch.load(recalibrated)
    assert {key: value for key, value in written.items() if key != "state_dict"} \
        == {key: value for key, value in checkpoint.items() if key != "state_dict"}
    assert list(written["state_dict"]) == list(checkpoint["state_dict"])
    model = conv_stack()
    model.load_state_dict({key.removeprefix("model."): tensor for key, tensor in written["state_dict"].items()})
    assert_matches_oracle(conv_stack(), model, "exact", np.load(data), batch=32)


def test_weights_beyond_the_factory_model_are_not_dropped_to_make_them_fit(tmp_path) -> None:
    weights = tmp_path / "last.ckpt"
    torch.save(lightning_checkpoint(**{"criterion.pos_weight": torch.ones(1)}), weights)
    with pytest.raises(BnfoldError, match="do not fit the factory's model"):
        bnfold.inspect(weights, model_factory="tests.test_eager_patterns:conv_stack")


def test_state_dict_that_does_not_fit_names_the_keys(tmp_path) -> None:
    weights = tmp_path / "weights.pt"
    torch.save({"encoder.weight": torch.zeros(1)}, weights)
    with pytest.raises(BnfoldError, match='Unexpected key.*"encoder.weight"') as raised:
        bnfold.inspect(weights, model_factory="tests.test_eager_patterns:conv_stack")
    assert "\n" not in str(raised.value)


# --------------------------------------------------------------------------------------------------------
# torch.ao's fused modules: float ConvBn (Sequential subclasses) and QAT ConvBn (the BN inside the conv)
# --------------------------------------------------------------------------------------------------------


FUSED = {
    "ConvBn2d": (lambda: nni.ConvBn2d(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), SHAPE),
    "ConvBnReLU2d": (lambda: nni.ConvBnReLU2d(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), SHAPE),
    "ConvBn1d": (lambda: nni.ConvBn1d(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)), (2, 3, 8)),
}


@pytest.mark.parametrize("name", FUSED)
def test_fused_float_conv_bn_folds_and_recalibrates(name: str) -> None:
    build, shape = FUSED[name]
    module = randomized(nn.Sequential(build(), nn.Tanh()))
    report = bnfold.fold(module, input_shape=input_shape(shape))
    assert report.passed and report.difference.max_rel < 1e-5
    assert decisions(report) == {"0.1": (FoldStatus.FOLDED, None)}
    data = calibration_data(shape)
    for method in ("fast", "exact"):
        result = bnfold.recalibrate(module, data, method=method, batch_size=8)
        assert_matches_oracle(module, result.result.module, method, data, batch=8)


def test_qat_conv_bn_keeps_its_bn_and_recalibrates_it() -> None:
    """QAT's ConvBn2d scales its weight by the BN's running statistics on every call: nothing stored to fold."""
    qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
    module = randomized(nn.Sequential(nniqat.ConvBn2d(3, 4, 3, qconfig=qconfig, freeze_bn=True), nn.ReLU()))
    assert [layer.name for layer in bnfold.inspect(module).layers] == ["0.bn"]
    report = bnfold.fold(module, input_shape=input_shape())
    assert report.passed
    status, reason = decisions(report)["0.bn"]
    assert status is FoldStatus.KEPT and RUNTIME_WEIGHT in reason
    result = bnfold.recalibrate(module, calibration_data(), method="fast", batch_size=8)
    assert [layer.name for layer in result.layers] == ["0.bn"]


# --------------------------------------------------------------------------------------------------------
# Memory format and precision
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fast", "exact"])
def test_channels_last_model(method: str) -> None:
    module = conv_stack().to(memory_format=torch.channels_last)
    report = bnfold.fold(module, input_shape=input_shape())
    assert report.passed and report.difference.max_rel < 1e-5
    assert {status for status, _ in decisions(report).values()} == {FoldStatus.FOLDED}
    data = calibration_data()
    result = bnfold.recalibrate(module, data, method=method, batch_size=8)
    assert_matches_oracle(module, result.result.module, method, data, batch=8)


def own_dtype_statistics(module: nn.Module, data: np.ndarray, batch: int) -> dict[str, tuple[np.ndarray, ...]]:
    """Exact statistics of a chain of BN layers computed in the module's own dtype: one eval pass per layer,
    each storing (rounded to the dtype) the float64 mean and unbiased variance of its layer's inputs."""
    module = copy.deepcopy(module)
    dtype = next(module.parameters()).dtype
    layers = {name: child for name, child in module.named_modules() if isinstance(child, _BatchNorm)}
    statistics = {}
    for name, layer in layers.items():
        seen = []
        hook = layer.register_forward_pre_hook(lambda _module, inputs: seen.append(inputs[0].double()))
        with torch.no_grad():
            for start in range(0, len(data), batch):
                module(torch.from_numpy(data[start:start + batch]).to(dtype))
        hook.remove()
        values = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in seen], 1)
        statistics[name] = (values.mean(1), values.var(1, correction=1))
        with torch.no_grad():
            layer.running_mean.copy_(statistics[name][0])
            layer.running_var.copy_(statistics[name][1])
    return statistics


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_recalibrates_in_its_dtype(dtype: torch.dtype) -> None:
    module = conv_stack().to(dtype)
    report = bnfold.fold(module, input_shape=input_shape())
    assert report.passed and report.difference.max_rel < 1e-2
    data = calibration_data()
    result = bnfold.recalibrate(module, data, method="exact", batch_size=8).result.module
    for name, (mean, var) in own_dtype_statistics(module, data, batch=8).items():
        layer = result.get_submodule(name)
        assert layer.running_mean.dtype == dtype
        torch.testing.assert_close(layer.running_mean, mean.to(dtype), rtol=0, atol=0)
        torch.testing.assert_close(layer.running_var, var.to(dtype), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------
# Ghost batch norm (TabNet's GBN): the BN runs on virtual batches, chunks of the batch
# --------------------------------------------------------------------------------------------------------


class GhostBatchNorm(nn.Module):
    """pytorch-tabnet's GBN: the batch in chunks of `virtual_batch` samples, each normalized, then joined."""

    def __init__(self, features: int, virtual_batch: int) -> None:
        super().__init__()
        self.virtual_batch = virtual_batch
        self.bn = nn.BatchNorm1d(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = x.chunk(int(np.ceil(x.shape[0] / self.virtual_batch)), 0)
        return torch.cat([self.bn(chunk) for chunk in chunks], dim=0)


@pytest.mark.parametrize("pieces", [1, 2])
def test_ghost_batch_norm_of_one_chunk_folds_into_its_linear(pieces: int) -> None:
    """At a batch that fits one virtual batch the chunk is the whole Linear output, so the BN folds into the
    Linear (and stays exact at any batch: in eval mode the chunks change nothing). Split in two pieces,
    the BN is called twice, and is kept."""
    module = randomized(nn.Sequential(nn.Linear(6, 5, bias=False), GhostBatchNorm(5, virtual_batch=4)))
    report = bnfold.fold(module, input_shape=f"{4 * pieces},6")
    assert report.passed
    status, reason = decisions(report)["1.bn"]
    assert status is (FoldStatus.FOLDED if pieces == 1 else FoldStatus.KEPT), reason
    x = torch.randn(9, 6)  # three virtual batches, the last one short
    with torch.no_grad():
        torch.testing.assert_close(report.folded_model.module(x), module(x), rtol=1e-5, atol=1e-6)
