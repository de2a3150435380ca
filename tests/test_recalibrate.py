"""`recalibrate` against independent oracles, on real data (sklearn digits) with a sensor shift.

The oracles (`tests/recalibration_oracle.py`) use plain torch in float64 on all samples: exact as a
fixed point of whole-data passes, fast with the BN calls alone normalizing by each batch's statistics: no
bnfold code, no streaming merge, no dependency analysis. The sample `mlp` has Dropout upstream of a BN and
BN1d after a Linear; its files exist in every format. `tests/test_zoo_recalibration.py` runs the same
oracles over every zoo architecture.
"""

from __future__ import annotations

import copy
import functools
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import bnfold
from bnfold.errors import DataError, NoBatchNormError, OutputError, UsageError
from bnfold.recalibration import dependency_levels, recalibrate, upstream_layers
from sample_models.architectures import make_mlp
from tests.conftest import SAMPLES
from tests.recalibration_oracle import assert_statistics_match, channel_statistics, exact_oracle, fast_oracle
from tests.test_startup import run_probe

CALIB = SAMPLES / "shifted_calib.npy"
BATCH = 32
FACTORY = "sample_models.architectures:make_mlp"


@pytest.fixture(scope="module")
def trained_mlp() -> nn.Module:
    module = make_mlp()
    module.load_state_dict(torch.load(SAMPLES / "mlp_state_dict.pt", weights_only=True))
    return module.eval()


@pytest.fixture(scope="module")
def calib() -> np.ndarray:
    return np.load(CALIB)


@pytest.fixture(scope="module")
def shifted_test() -> tuple[np.ndarray, np.ndarray]:
    with np.load(SAMPLES / "shifted_test.npz") as test:
        return test["x"], test["y"]


ORACLES = {"exact": exact_oracle, "fast": functools.partial(fast_oracle, batch=BATCH)}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float(np.mean(np.argmax(logits, axis=1) == labels))


def torch_accuracy(model: nn.Module, test) -> float:
    with torch.no_grad():
        return accuracy(model(torch.from_numpy(test[0]).to(next(model.parameters()).dtype)).numpy(), test[1])


def stored_torch_statistics(path, kind) -> tuple[nn.Module, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Reload a written torch file as a runnable module and read its BN buffers."""
    if kind == "pt2":
        program = torch.export.load(str(path))
        module, state = program.module(), program.state_dict
    else:
        loaded = torch.load(path, weights_only=kind != "pickle")
        module = loaded if kind == "pickle" else make_mlp()
        if kind != "pickle":
            module.load_state_dict(loaded)
        state = module.state_dict()
    stats = {name: (state[f"{name}.running_mean"].numpy(), state[f"{name}.running_var"].numpy())
             for name in ("bn1", "bn2")}
    return module.eval() if kind != "pt2" else module, {**stats, "tracked": state["bn2.num_batches_tracked"]}


TORCH_FILES = {"pt2": ("mlp.pt2", {}), "pickle": ("mlp_pickle.pt", {"allow_pickle": True}),
               "state_dict": ("mlp_state_dict.pt", {"model_factory": FACTORY})}


@pytest.mark.parametrize("method", ["exact", "fast"])
@pytest.mark.parametrize("kind", list(TORCH_FILES))
def test_torch_formats_match_the_oracle(kind, method, tmp_path, trained_mlp, calib, shifted_test):
    name, options = TORCH_FILES[kind]
    out = tmp_path / f"out{(SAMPLES / name).suffix}"
    report = recalibrate(SAMPLES / name, CALIB, method=method, output=out, batch_size=BATCH, **options)
    assert report.passes == (2 if method == "exact" else 1)
    assert [(layer.name, layer.pass_number) for layer in report.layers] == \
        ([("bn1", 1), ("bn2", 2)] if method == "exact" else [("bn1", 1), ("bn2", 1)])

    expected, oracle_model = ORACLES[method](trained_mlp, calib, ddof=1)  # torch stores unbiased variance
    module, stored = stored_torch_statistics(out, kind)
    for layer in ("bn1", "bn2"):
        assert_statistics_match(*stored[layer], *expected[layer])
    assert int(stored["tracked"]) == len(calib) // BATCH

    before = torch_accuracy(trained_mlp, shifted_test)
    after, oracle = torch_accuracy(module, shifted_test), torch_accuracy(oracle_model, shifted_test)
    assert abs(after - oracle) <= 0.5
    assert after > before + 1.0  # recalibration recovers accuracy lost to the sensor shift


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_onnx_matches_the_oracle(method, tmp_path, trained_mlp, calib, shifted_test):
    out = tmp_path / "out.onnx"
    report = recalibrate(SAMPLES / "mlp.onnx", CALIB, method=method, output=out, batch_size=BATCH)
    assert report.passes == (2 if method == "exact" else 1)
    expected, oracle_model = ORACLES[method](trained_mlp, calib, ddof=0)  # ONNX stores population variance
    model = onnx.load(out)
    initializers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    bns = [node for node in model.graph.node if node.op_type == "BatchNormalization"]
    for node, layer in zip(bns, ("bn1", "bn2")):
        assert_statistics_match(initializers[node.input[3]], initializers[node.input[4]], *expected[layer])
    session = ort.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": shifted_test[0]})[0]
    assert abs(accuracy(logits, shifted_test[1]) - torch_accuracy(oracle_model, shifted_test)) <= 0.5
    assert len(model.graph.node) == len(onnx.load(SAMPLES / "mlp.onnx").graph.node)  # no probe left behind


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_torchscript_matches_the_oracle(method, tmp_path, trained_mlp, calib):
    out = tmp_path / "out.ts"
    recalibrate(SAMPLES / "mlp.ts", CALIB, method=method, output=out, batch_size=BATCH)
    expected, _ = ORACLES[method](trained_mlp, calib, ddof=1)
    module = torch.jit.load(str(out))
    for layer in ("bn1", "bn2"):
        bn = getattr(module, layer)
        assert_statistics_match(bn.running_mean.numpy(), bn.running_var.numpy(), *expected[layer])


def test_exact_is_not_one_plain_pass_with_old_statistics(trained_mlp, calib):
    """The shortcut the issue forbids gives bn2 measurably different statistics; exact must not."""
    model = copy.deepcopy(trained_mlp).double()
    seen = []
    model.bn2.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(torch.from_numpy(calib).double())
    shortcut_mean, _ = channel_statistics(seen, ddof=1)
    expected, _ = exact_oracle(trained_mlp, calib, ddof=1)
    report = recalibrate(trained_mlp, calib)
    new_mean = report.result.module.bn2.running_mean.numpy()
    scale = np.sqrt(expected["bn2"][1])
    assert np.max(np.abs(shortcut_mean - expected["bn2"][0]) / scale) > 1e-2
    assert np.max(np.abs(new_mean - expected["bn2"][0]) / scale) < 1e-4


def test_result_does_not_depend_on_batch_size(trained_mlp, calib):
    small = recalibrate(trained_mlp, calib, batch_size=7).result.module
    whole = recalibrate(trained_mlp, calib, batch_size=len(calib)).result.module
    for name in ("bn1", "bn2"):
        a, b = getattr(small, name), getattr(whole, name)
        np.testing.assert_allclose(a.running_mean.numpy(), b.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.running_var.numpy(), b.running_var.numpy(), rtol=1e-5)


def test_caller_model_is_untouched_and_only_statistics_change(trained_mlp, calib):
    before = {k: v.clone() for k, v in trained_mlp.state_dict().items()}
    report = recalibrate(trained_mlp, calib, batch_size=BATCH)
    for key, value in trained_mlp.state_dict().items():
        assert torch.equal(value, before[key]), key
    result = report.result.module
    assert result is not trained_mlp and not result.training
    for key, value in result.state_dict().items():
        changed = not torch.equal(value, before[key])
        assert changed == key.endswith(("running_mean", "running_var", "num_batches_tracked")), key
    assert result.bn1.momentum == trained_mlp.bn1.momentum and result.bn2.eps == trained_mlp.bn2.eps
    assert int(result.bn1.num_batches_tracked) == len(calib) // BATCH


def test_passes_follow_dependency_depth():
    report = recalibrate(SAMPLES / "resnet.pt2", CALIB)
    assert report.passes == 3
    assert {layer.name: layer.pass_number for layer in report.layers} == {
        "stem_bn": 1, "block.bn1": 2, "block.downsample.1": 2, "block.bn2": 3}
    onnx_report = recalibrate(SAMPLES / "resnet.onnx", CALIB)
    assert sorted(layer.pass_number for layer in onnx_report.layers) == [1, 2, 2, 3]
    assert recalibrate(SAMPLES / "mixed.ts", CALIB).passes == 4
    assert recalibrate(SAMPLES / "mixed.ts", CALIB, method="fast").passes == 1


def test_levels_from_data_flow_in_any_order():
    # c reads a and b; b reads a; d is independent. Steps listed out of order on purpose.
    steps = [(["b_out", "a_out"], ["c_out"], "c"), (["x"], ["a_out"], "a"), (["a_out"], ["b_out"], "b"),
             (["x"], ["d_out"], "d")]
    upstream = upstream_layers(steps)
    assert upstream == {"a": set(), "b": {"a"}, "c": {"a", "b"}, "d": set()}
    assert dependency_levels(["a", "b", "c", "d"], upstream) == [["a", "d"], ["b"], ["c"]]
    with pytest.raises(UsageError, match="feeds its own input"):
        dependency_levels(["a"], {"a": {"a"}})


class Branching(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(64, 16), nn.BatchNorm1d(16)
        self.fc2, self.bn2 = nn.Linear(16, 8), nn.BatchNorm1d(8)

    def forward(self, x):
        x = self.bn1(self.fc1(x.flatten(1)))
        if x.sum() > -1e9:
            x = torch.relu(x)
        return self.bn2(self.fc2(x))


def test_untraceable_module_falls_back_to_call_order(calib):
    torch.manual_seed(0)
    module = Branching().eval()
    report = recalibrate(module, calib)
    assert report.passes == 2 and any("torch.fx cannot trace" in note for note in report.notes)
    expected, _ = exact_oracle(module, calib, ddof=1)
    for name in ("bn1", "bn2"):
        bn = getattr(report.result.module, name)
        assert_statistics_match(bn.running_mean.numpy(), bn.running_var.numpy(), *expected[name])


class CountedHead(nn.Module):
    """A head after the last BN that counts its forwards (in a class attribute: the runner copies the model)."""

    forwards = 0

    def forward(self, x):
        CountedHead.forwards += not isinstance(x, torch.fx.Proxy)  # not torch.fx's trace
        return x


@torch.fx.wrap
def hidden_from_the_trace(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return bn(x)


class TwoLevels(nn.Module):
    def __init__(self, hide_second_call: bool) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(64, 16), nn.BatchNorm1d(16)
        self.fc2, self.fc3, self.bn2 = nn.Linear(16, 16), nn.Linear(16, 16), nn.BatchNorm1d(16)
        self.head, self.hide_second_call = CountedHead(), hide_second_call

    def forward(self, x):
        x = torch.relu(self.bn1(self.fc1(x.flatten(1))))
        y = self.bn2(self.fc2(x))
        if self.hide_second_call:  # a second call of bn2 that torch.fx does not see
            y = y + hidden_from_the_trace(self.bn2, self.fc3(x))
        return self.head(y)


@pytest.mark.parametrize("hide_second_call", [False, True])
def test_eager_passes_stop_after_their_last_layer_when_the_trace_counts_every_call(hide_second_call, calib):
    torch.manual_seed(0)
    module = TwoLevels(hide_second_call).eval()
    CountedHead.forwards = 0
    report = recalibrate(module, calib, batch_size=BATCH)
    batches = -(-len(calib) // BATCH)
    assert report.passes == 2
    # the first forward of a pass runs whole, checking the trace's count; the others stop after the
    # pass's last layer, unless that count missed a call (bn2's, in the second pass)
    assert CountedHead.forwards == (1 + batches if hide_second_call else 2)
    expected, _ = exact_oracle(module, calib, ddof=1)
    for name in ("bn1", "bn2"):
        bn = getattr(report.result.module, name)
        assert_statistics_match(bn.running_mean.numpy(), bn.running_var.numpy(), *expected[name])


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_onnx_passes_run_no_node_after_their_last_layer(method, monkeypatch):
    """onnxruntime runs every node of a graph whatever a run fetches: each pass's graph ends at its layers."""
    import bnfold.onnx.recalibrate as onnx_recalibrate

    graphs, real_session = [], onnx_recalibrate.session
    monkeypatch.setattr(onnx_recalibrate, "session",
                        lambda proto: graphs.append([node.op_type for node in proto.graph.node]) or real_session(proto))
    report = recalibrate(SAMPLES / "resnet.onnx", CALIB, method=method)
    assert report.passes == (3 if method == "exact" else 1)
    assert len(graphs) >= report.passes  # a layer whose probe cancels gets a session with a careful one
    assert not any({"GlobalAveragePool", "Flatten", "Gemm"} & set(ops) for ops in graphs)
    if method == "exact":
        assert [ops.count("Conv") for ops in graphs][:2] == [1, 3]  # the stem; then both branches of the block


def test_torch_pass_graphs_end_at_their_last_layer():
    from bnfold.formats import as_model
    from bnfold.pytorch.recalibrate import InputStatistics
    from bnfold.recalibration import statistics_runner

    program = statistics_runner(as_model(SAMPLES / "resnet.pt2"))
    with program._instrumented(False, InputStatistics({"stem_bn"})) as module:
        targets = [str(node.target) for node in module.graph.nodes if node.op == "call_function"]
    assert sum("conv" in target for target in targets) == 1
    assert not any(op in target for target in targets for op in ("linear", "mean", "add.Tensor"))
    script = statistics_runner(as_model(SAMPLES / "resnet.ts"))
    graph, observed = script.pass_graph({"block.bn1", "block.downsample.1"}, True)
    kinds = [node.kind() for node in graph.nodes()]
    assert observed == ["block.bn1", "block.downsample.1"]
    # the model's own checks (a pooling layer's check of its input's size) keep what they read
    assert "aten::adaptive_avg_pool2d" not in kinds and "aten::linear" not in kinds


def test_no_batchnorm_is_a_clear_error(calib, cli, tmp_path):
    with pytest.raises(NoBatchNormError):
        recalibrate(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), calib)
    plain = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).eval(),
                                          (torch.zeros(2, 1, 8, 8),)), str(plain))
    result = cli("recalibrate", plain, "--data", CALIB, "-o", tmp_path / "out.pt2")
    assert result.code == 2 and "no BN layer" in result.stderr and "Traceback" not in result.stderr


def test_output_is_never_the_input_by_accident(tmp_path, calib):
    model = tmp_path / "mlp.onnx"
    model.write_bytes((SAMPLES / "mlp.onnx").read_bytes())
    existing = tmp_path / "exists.onnx"
    existing.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists"):
        recalibrate(model, calib, output=existing)
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(OutputError, match="input"):
        recalibrate(model, calib, output=model)
    recalibrate(model, calib, output=existing, force=True)
    assert onnx.load(existing).graph.node
    original = model.read_bytes()
    recalibrate(model, calib, in_place=True)
    assert model.read_bytes() != original
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_bad_data_is_named(tmp_path, calib):
    nan = calib.copy()
    nan[5, 0, 3, 3] = np.nan
    with pytest.raises(DataError, match="NaN or Inf.*row 5"):
        recalibrate(SAMPLES / "mlp.onnx", nan)
    with pytest.raises(DataError, match="at least 16"):
        recalibrate(SAMPLES / "mlp.onnx", calib[:8])
    with pytest.raises(DataError, match=r"shape \(32, 64\).*\(\?, 1, 8, 8\)"):
        recalibrate(SAMPLES / "mlp.pt2", calib.reshape(len(calib), 64))
    with pytest.raises(DataError, match="uint8"):
        recalibrate(SAMPLES / "mlp.onnx", (calib * 255).astype(np.uint8))


def test_device_cuda_needs_a_gpu(calib, trained_mlp):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UsageError, match="cuda"):
        recalibrate(trained_mlp, calib, device="cuda")
    with pytest.raises(UsageError, match="cuda"):
        recalibrate(SAMPLES / "mlp.onnx", calib, device="cuda")


def test_few_samples_are_flagged(calib, trained_mlp):
    report = recalibrate(trained_mlp, calib[:20])
    assert any(f.code == "few-samples" for f in report.findings)
    assert not recalibrate(trained_mlp, calib).findings


def shifted_batches():
    """A --data-fn pipeline: (images, labels) tensor pairs, labels ignored."""
    x = torch.from_numpy(np.load(CALIB))
    return [(x[i:i + 50], torch.zeros(len(x[i:i + 50]))) for i in range(0, len(x), 50)]


def test_cli_json_and_data_fn(cli, tmp_path, trained_mlp, calib):
    out = tmp_path / "out.pt2"
    result = cli("recalibrate", SAMPLES / "mlp.pt2", "--data-fn", "tests.test_recalibrate:shifted_batches",
                 "-o", out, "--json")
    assert result.code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["kind"] == "recalibrate" and document["method"] == "exact"
    assert document["forward_passes"] == 2 and document["samples"] == 256 and document["output"] == str(out)
    assert [layer["name"] for layer in document["layers"]] == ["bn1", "bn2"]
    assert document["layers"][1]["batches"] == 6 and document["layers"][1]["relative_standard_error"]["max"] < 0.1
    expected, _ = exact_oracle(trained_mlp, calib, ddof=1)
    _, stored = stored_torch_statistics(out, "pt2")
    assert_statistics_match(*stored["bn2"], *expected["bn2"])


def test_cli_table_and_usage_errors(cli, tmp_path):
    result = cli("recalibrate", SAMPLES / "resnet.onnx", "--data", CALIB, "-o", tmp_path / "r.onnx",
                 "--method", "fast")
    assert result.code == 0, result.stderr
    assert "block/bn2" in result.stdout and "1 forward pass over the data" in result.stdout
    assert "spread of the batch means" in result.stdout  # where the standard errors come from
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    missing_output = cli("recalibrate", SAMPLES / "mlp.onnx", "--data", CALIB)
    assert missing_output.code == 2 and "-o PATH" in missing_output.stderr
    both = cli("recalibrate", SAMPLES / "mlp.onnx", "--data", CALIB, "--data-fn", "x:y", "-o", tmp_path / "x")
    assert both.code == 2 and "exactly one" in both.stderr


def test_onnx_recalibration_never_imports_torch(tmp_path):
    completed = run_probe("recalibrate", str(SAMPLES / "resnet.onnx"), "--data", str(CALIB),
                          "-o", str(tmp_path / "out.onnx"), "--method", "fast")
    assert completed.returncode == 0, completed.stderr
    assert "TORCH-MODULES: 0" in completed.stderr


def shared_statistics_model(opset: int) -> onnx.ModelProto:
    """x (N, 4, 3) -> BN -> Relu -> BN, both BN nodes reading the same mean/var initializers."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "scale"),
             numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "bias"),
             numpy_helper.from_array(np.zeros(4, np.float32), "mean"),
             numpy_helper.from_array(np.ones(4, np.float32), "var")]
    nodes = [helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["a"], name="first"),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("BatchNormalization", ["r", "scale", "bias", "mean", "var"], ["y"], name="second")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # what onnxruntime 1.31 reads for these opsets
    return model


def numpy_bn(x, mean, var, eps=1e-5):
    rng = np.random.default_rng(0)
    scale, bias = rng.uniform(0.5, 2, 4), rng.normal(size=4)
    return scale[None, :, None] * (x - mean[None, :, None]) / np.sqrt(var[None, :, None] + eps) + bias[None, :, None]


def moments(x):
    return x.mean(axis=(0, 2)), x.var(axis=(0, 2))


@pytest.mark.parametrize("opset", [12, 18])  # Cast vs CastLike, ReduceMean axes attribute vs input
@pytest.mark.parametrize("method", ["exact", "fast"])
def test_onnx_shared_statistics_and_opsets(opset, method, tmp_path):
    source = tmp_path / "shared.onnx"
    onnx.save(shared_statistics_model(opset), source)
    x = np.random.default_rng(1).normal(2.0, 3.0, size=(40, 4, 3)).astype(np.float32)
    report = recalibrate(source, x, method=method, batch_size=8, output=tmp_path / "out.onnx")
    x64 = x.astype(np.float64)
    first = moments(x64)
    if method == "exact":
        second = moments(np.maximum(numpy_bn(x64, *first), 0))
    else:
        batches = [np.maximum(numpy_bn(part, *moments(part)), 0) for part in np.split(x64, 5)]
        second = moments(np.concatenate(batches))
    model = onnx.load(tmp_path / "out.onnx")
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    first_node, second_node = (n for n in model.graph.node if n.op_type == "BatchNormalization")
    assert_statistics_match(values[first_node.input[3]], values[first_node.input[4]], *first)
    assert_statistics_match(values[second_node.input[3]], values[second_node.input[4]], *second)
    assert report.passes == (2 if method == "exact" else 1)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    expected = numpy_bn(np.maximum(numpy_bn(x64, *first), 0), *second)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter is the one that shares
def test_onnx_statistics_behind_identity_nodes(tmp_path, calib):
    """Fresh BN layers have equal statistics, which the TorchScript exporter shares through Identity nodes."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                           nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()
    path = tmp_path / "fresh.onnx"
    torch.onnx.export(module, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, do_constant_folding=False,
                      input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    assert any(node.op_type == "Identity" for node in onnx.load(path).graph.node)
    report = recalibrate(path, calib, output=tmp_path / "out.onnx")
    assert report.passes == 2 and not report.skipped
    expected, _ = exact_oracle(module, calib, ddof=0)
    model = onnx.load(tmp_path / "out.onnx")
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node, layer in zip((n for n in model.graph.node if n.op_type == "BatchNormalization"), ("1", "4")):
        assert_statistics_match(values[node.input[3]], values[node.input[4]], *expected[layer])


BN_INPUTS = {  # what a BN layer may see: centred, offset far beyond the spread, constant channels, pixels
    "centred": lambda g: torch.randn(8, 16, 12, 12, generator=g) * 2,
    "offset 1000 std": lambda g: torch.randn(8, 16, 12, 12, generator=g) + 1000,
    "after relu": lambda g: torch.relu(torch.randn(8, 16, 12, 12, generator=g)),
    "constant channels": lambda g: torch.cat([torch.full((8, 3, 12, 12), 7.0),
                                              torch.randn(8, 13, 12, 12, generator=g) - 3], dim=1),
    "bn1d": lambda g: torch.randn(64, 40, generator=g) + 5,
    # torch's BN kernels accumulate channels-last inputs in float32 (errors near 1e-5 at this size)
    "channels last": lambda g: (torch.randn(32, 16, 40, 40, generator=g) * 0.5 + 3).contiguous(
        memory_format=torch.channels_last),
    "pixels": lambda g: torch.rand(4, 3, 64, 64, generator=g) * 255,
    "float16": lambda g: (torch.randn(8, 16, 12, 12, generator=g) + 2).half(),
}


def onnx_batch_moments(inputs: np.ndarray):
    """The moments the ONNX probe reduces for a lone BN layer reading `inputs`."""
    from bnfold.onnx.model import OnnxModel
    from bnfold.onnx.recalibrate import OnnxStatisticsRunner

    channels, dtype = inputs.shape[1], helper.np_dtype_to_tensor_dtype(inputs.dtype)
    inits = [numpy_helper.from_array(np.full(channels, value, inputs.dtype), name)
             for name, value in (("scale", 1), ("bias", 0), ("mean", 0), ("var", 1))]
    graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], name="bn")], "one",
        [helper.make_tensor_value_info("x", dtype, list(inputs.shape))], [helper.make_tensor_value_info("y", dtype, None)],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    statistics = OnnxStatisticsRunner(OnnxModel(None, model)).run_pass([{"x": inputs}], ["bn"], batch_statistics=False)
    return statistics["bn"].values, statistics["bn"].sample_means


def observed_batch(statistics, layer: str, call) -> None:
    """Run `call` (one batch through `statistics`) again until the batch is kept, as the runners do."""
    call()
    while not statistics.end_batch():
        call()


@pytest.fixture(params=["native", "kernels", "vectorized"])
def torch_reduction(request, monkeypatch):
    """Every way torch calls are reduced: bnfold's moments kernel where it was built, else torch's BN kernels
    (small calls) and per-sample sums and norms (large ones)."""
    from bnfold.pytorch import recalibrate as torch_recalibrate

    if request.param == "native":
        if torch_recalibrate._moments is None:
            pytest.skip("bnfold's moments kernel was not built (no C compiler at install)")
    else:
        monkeypatch.setattr(torch_recalibrate, "_moments", None)
    if request.param == "vectorized":
        monkeypatch.setattr(torch_recalibrate, "_VECTORIZED_VALUES", 0)
    return request.param


def torch_batch_moments(inputs: np.ndarray):
    from bnfold.pytorch.recalibrate import InputStatistics

    statistics = InputStatistics(["bn"])
    observed_batch(statistics, "bn", lambda: statistics.observe("bn", torch.from_numpy(inputs)))
    result = statistics.result()["bn"]
    return result.values, result.sample_means


def torch_normalized_batch_moments(inputs: np.ndarray):
    """The moments recorded while normalizing by the batch, as the fast method does (eps 1e-5)."""
    from bnfold.pytorch.recalibrate import InputStatistics

    statistics = InputStatistics(["bn"])
    observed_batch(statistics, "bn", lambda: statistics.normalize("bn", torch.from_numpy(inputs), None, None, 1e-5))
    result = statistics.result()["bn"]
    return result.values, result.sample_means


@pytest.mark.parametrize("reduce", [torch_batch_moments, torch_normalized_batch_moments, onnx_batch_moments],
                         ids=["torch", "torch normalizing", "onnx"])
@pytest.mark.parametrize("case", BN_INPUTS)
def test_batch_moments_match_float64_whatever_the_offset(case, reduce, torch_reduction):
    inputs = BN_INPUTS[case](torch.Generator().manual_seed(0)).numpy()
    values, sample_means = reduce(inputs)
    flat = inputs.astype(np.float64).reshape(inputs.shape[0], inputs.shape[1], -1)
    per_channel = flat.transpose(1, 0, 2).reshape(flat.shape[1], -1)
    variance, spread = per_channel.var(axis=1), np.sqrt(per_channel.var(axis=1) + 1e-12)
    assert values.count == per_channel.shape[1] and sample_means.count == flat.shape[0]
    # float32 inputs carry ~6e-8 relative precision: the mean is good to that fraction of its size
    assert np.all(np.abs(values.mean - per_channel.mean(axis=1)) <= 1e-7 * np.abs(per_channel.mean(axis=1)) + 1e-6 * spread)
    assert np.allclose(values.variance(), variance, rtol=2e-6, atol=1e-12)
    # the spread of sample means only feeds the standard error: float32 sample means are ample for it
    assert np.allclose(sample_means.variance(), flat.mean(axis=2).var(axis=0), rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("case", BN_INPUTS)
def test_fast_method_normalizes_as_a_training_mode_batch_norm(case, torch_reduction):
    from bnfold.pytorch.recalibrate import InputStatistics

    inputs = BN_INPUTS[case](torch.Generator().manual_seed(0))
    channels = inputs.shape[1]
    weight = torch.linspace(0.5, 2, channels, dtype=inputs.dtype)
    bias = torch.linspace(-1, 1, channels, dtype=inputs.dtype)
    statistics = InputStatistics([])
    outputs = []
    observed_batch(statistics, "bn", lambda: outputs.append(statistics.normalize("bn", inputs, weight, bias, 1e-5)))
    per_channel = inputs.double().transpose(0, 1).reshape(channels, -1)
    shape = (1, channels) + (1,) * (inputs.dim() - 2)
    expected = ((inputs.double() - per_channel.mean(dim=1).reshape(shape))
                / torch.sqrt(per_channel.var(dim=1, unbiased=False).reshape(shape) + 1e-5)
                * weight.double().reshape(shape) + bias.double().reshape(shape))
    # the inputs carry their dtype's precision: a few units in the last place of a channel's largest value
    scale = torch.sqrt(per_channel.var(dim=1, unbiased=False) + 1e-5)
    ulps = torch.finfo(inputs.dtype).eps * per_channel.abs().amax(dim=1) / scale * weight.double().abs()
    error = (outputs[-1].double() - expected).abs()
    assert torch.all(error <= (1e-5 + 8 * ulps).reshape(shape) + 1e-5 * expected.abs())


def test_a_layer_needing_more_care_reruns_its_batch_once_and_stays_careful(torch_reduction):
    from bnfold.pytorch.recalibrate import InputStatistics

    generator = torch.Generator().manual_seed(2)
    dead = torch.cat([torch.zeros(8, 2, 5, 5), torch.randn(8, 3, 5, 5, generator=generator)], dim=1)  # variance 0
    offset = torch.randn(8, 3, 5, 5, generator=generator) + 5000  # mean 5000 standard deviations away
    statistics = InputStatistics(["dead", "offset", "plain"])
    runs = 0
    for _ in range(3):
        while True:
            runs += 1
            statistics.normalize("dead", dead, None, None, 1e-3)
            statistics.normalize("offset", offset, None, None, 1e-5)
            statistics.normalize("plain", dead, None, None, 1e-8)  # a variance of 0 is exact when eps is tiny
            if statistics.end_batch():
                break
    # torch's BN kernels: the first batch once more, for both layers at once; the moments kernel needs no care
    assert runs == (3 if torch_reduction == "native" else 4)
    result = statistics.result()
    assert result["dead"].batches == result["offset"].batches == 3
    np.testing.assert_array_equal(result["dead"].variance()[:2], 0.0)
    per_channel = offset.double().transpose(0, 1).reshape(3, -1)
    np.testing.assert_allclose(result["offset"].variance(), per_channel.var(dim=1, unbiased=False).numpy(), rtol=1e-6)


def test_pending_moments_stay_within_their_memory_bound_and_merge_exactly(monkeypatch, torch_reduction):
    from bnfold.pytorch import recalibrate as torch_recalibrate

    monkeypatch.setattr(torch_recalibrate, "_PENDING_BYTES", 1000)
    statistics = torch_recalibrate.InputStatistics(["bn"])
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 8, side, side, generator=generator) + offset  # resolutions and offsets vary
               for side, offset in [(6, 0), (6, 500), (3, 2), (6, 0), (3, 0), (6, 1), (3, 900), (6, 0)]]
    for batch in batches:
        observed_batch(statistics, "bn", lambda: (statistics.observe("bn", batch), statistics.observe("unobserved", batch)))
        assert statistics._pending_bytes <= 1000
    result = statistics.result()
    assert set(result) == {"bn"}
    everything = torch.cat([batch.double().transpose(0, 1).reshape(8, -1) for batch in batches], dim=1).numpy()
    merged = result["bn"]
    assert (merged.count, merged.samples, merged.batches) == (everything.shape[1], 32, len(batches))
    np.testing.assert_allclose(merged.mean, everything.mean(axis=1), rtol=1e-7)
    np.testing.assert_allclose(merged.variance(), everything.var(axis=1), rtol=2e-6)
    sample_means = np.concatenate([batch.double().mean(dim=(2, 3)).numpy() for batch in batches])
    np.testing.assert_allclose(merged.sample_means.variance(1), sample_means.var(axis=0, ddof=1), rtol=1e-5)


class _RootFunctionalBN(nn.Module):
    """F.batch_norm on statistics the root module owns (`mu`, `sigma2`): no module path to name it by."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mu", torch.zeros(4))
        self.register_buffer("sigma2", torch.ones(4))
        self.gamma, self.beta = nn.Parameter(torch.ones(4)), nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.conv(x), self.mu, self.sigma2, self.gamma, self.beta, False, 0.1, 1e-5)


def test_functional_bn_on_the_root_statistics_is_named_as_inspect_names_it():
    """Recalibration named it '' (the path of the module owning `mu`); inspect and fold name it `mu`."""
    model = _RootFunctionalBN().eval()
    data = np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32) * 2 + 1
    inspected = [layer.name for layer in bnfold.inspect(model, input_shape="2,3,8,8").layers]
    report = bnfold.recalibrate(model, data, method="exact")
    assert inspected == [layer.name for layer in report.layers] == ["mu"]
    conv = model.conv(torch.from_numpy(data)).detach().double()
    recalibrated = report.result.module
    np.testing.assert_allclose(recalibrated.mu.numpy(), conv.mean((0, 2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(recalibrated.sigma2.numpy(), conv.var((0, 2, 3)).numpy(), rtol=1e-5)


def test_the_moments_kernel_is_built_wherever_there_is_a_c_compiler():
    """The kernel is an optional extension, so a C file that stops compiling falls back to torch's passes
    without a word at install: this is where that shows (a fresh clone once ran all its tests so)."""
    import shutil
    import sysconfig

    from bnfold.pytorch import recalibrate as torch_recalibrate

    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}): the kernel is optional")
    assert torch_recalibrate._moments is not None, "bnfold/_moments.c did not build: pip install -v -e . says why"
