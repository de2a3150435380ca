"""Train the sample models on sklearn's digits and write them in several formats.

Run from the repository root:

    python sample_models/make_samples.py

Everything is seeded and runs on CPU with 2 threads (well under a minute). The
script fails loudly (raises) if any export or round-trip check does not hold; it
skips nothing. It also (re)writes sample_models/README.md with the measured numbers.
"""

from __future__ import annotations

import copy
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Import the package as ``sample_models.*`` (not as top-level ``architectures``), so
# that pickled modules reference ``sample_models.architectures.DigitsCNN`` and load
# from anywhere the repository root is on sys.path.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if sys.path[0] == str(HERE):  # drop the script dir python put first
    sys.path.pop(0)

from sample_models.architectures import FACTORIES  # noqa: E402
from sample_models.shift import (  # noqa: E402
    GAIN,
    GAMMA,
    NOISE_STD,
    OFFSET,
    load_digits_split,
    sensor_shift,
)

SEED = 0
EPOCHS = 15
BATCH_SIZE = 64
LR = 3e-3
N_CALIB = 256
OPSET = 17
ATOL = 1e-5
MODEL_NAMES = ["cnn", "mlp", "resnet", "mixed"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    model.train()
    for _ in range(EPOCHS):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), BATCH_SIZE):
            idx = perm[i : i + BATCH_SIZE]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def logits(model, x: np.ndarray) -> np.ndarray:
    return model(torch.from_numpy(x)).numpy()


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    return float((logits(model, x).argmax(1) == y).mean() * 100.0)


@torch.no_grad()
def naive_recalibrate(model: nn.Module, x: np.ndarray) -> nn.Module:
    """Reset BN running stats, momentum=None (cumulative average), forward ``x`` in one
    batch with only the BN layers in train mode (Dropout stays in eval), then eval."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
            m.train()
    model(torch.from_numpy(x))
    return model.eval()


def bn_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def check_close(name: str, what: str, got: np.ndarray, ref: np.ndarray) -> None:
    err = float(np.abs(np.asarray(got) - ref).max())
    if not err <= ATOL:
        raise AssertionError(f"{name}: {what} differs from torch by {err:.3g} > {ATOL}")


def export_pt2(name: str, model: nn.Module, example: torch.Tensor, path: Path, x_check) -> str:
    batch = torch.export.Dim("batch", min=1)
    ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(path))
    loaded = torch.export.load(str(path)).module()
    for xc in (x_check[:1], x_check):  # batch 1 and the full split: dynamic batch works
        check_close(name, f".pt2 batch {len(xc)}", logits(loaded, xc), logits(model, xc))
    return "dynamic batch (Dim('batch', min=1))"


def export_onnx(name: str, model: nn.Module, example: torch.Tensor, path: Path, x_check) -> int:
    import onnx
    import onnxruntime as ort

    # The TorchScript-based ("legacy") exporter with do_constant_folding=False keeps
    # BatchNormalization nodes in eval mode. (Its default do_constant_folding=True fuses
    # Conv+BN; the dynamo exporter's default optimizer also fuses them, and with
    # optimize=False it leaves Shape/Expand subgraphs feeding bias-less Conv nodes.)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*will be removed.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*feature will be removed.*")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            export_params=True,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.EVAL,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load(str(path))
    n_identity = _materialize_identity_initializers(proto)
    if n_identity:
        print(f"    {name}.onnx: replaced {n_identity} Identity node(s) that the exporter's "
              "initializer de-duplication created with their own initializer copies")
        onnx.save(proto, str(path))
    onnx.checker.check_model(proto, full_check=True)
    inits = {i.name for i in proto.graph.initializer}
    if any(i.data_location == onnx.TensorProto.EXTERNAL for i in proto.graph.initializer):
        raise AssertionError(f"{name}: ONNX has external data")
    bns = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    n_expected = len(bn_names(model))
    if len(bns) != n_expected:
        raise AssertionError(f"{name}: ONNX has {len(bns)} BatchNormalization nodes, expected {n_expected}")
    for n in bns:  # scale, bias, mean, var must be plain initializers
        if not all(i in inits for i in n.input[1:5]):
            raise AssertionError(f"{name}: BN node {n.name} parameters are not initializers: {n.input}")
    odd = sorted({n.op_type for n in proto.graph.node} - {
        "Conv", "BatchNormalization", "Relu", "Add", "Gemm", "Flatten", "GlobalAveragePool"})
    if odd:
        raise AssertionError(f"{name}: unexpected ONNX ops {odd}")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for xc in (x_check[:1], x_check):
        (out,) = sess.run(["logits"], {"input": xc})
        check_close(name, f"onnxruntime batch {len(xc)}", out, logits(model, xc))
    return len(bns)


def _materialize_identity_initializers(proto) -> int:
    """The TorchScript-based exporter de-duplicates bit-identical parameters: the second
    one becomes ``Identity(first)``. In DigitsResNet, ``block.bn2.bias`` and
    ``block.downsample.1.bias`` come out of training bit-identical (both start at 0 and
    get the same gradient through the residual Add), so one BN would read its bias
    through an Identity node. Give each such output its own initializer instead."""
    import onnx

    inits = {i.name: i for i in proto.graph.initializer}
    keep, n = [], 0
    for node in proto.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in inits:
            copy_ = onnx.TensorProto()
            copy_.CopyFrom(inits[node.input[0]])
            copy_.name = node.output[0]
            proto.graph.initializer.append(copy_)
            inits[copy_.name] = copy_
            n += 1
        else:
            keep.append(node)
    if n:
        del proto.graph.node[:]
        proto.graph.node.extend(keep)
    return n


def export_torchscript(name: str, model: nn.Module, path: Path, x_check) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scripted = torch.jit.script(model)
    for msg in sorted({f"{w.category.__name__}: {w.message}" for w in caught}):
        print(f"    [torch.jit.script warning] {msg[:160]}")
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    check_close(name, ".ts", logits(loaded, x_check), logits(model, x_check))
    return "torch.jit.script"


def save_state_dict(name: str, model: nn.Module, path: Path, x_check) -> None:
    torch.save(model.state_dict(), str(path))
    rebuilt = FACTORIES[name]()
    rebuilt.load_state_dict(torch.load(str(path), weights_only=True))
    check_close(name, "state_dict", logits(rebuilt.eval(), x_check), logits(model, x_check))


def save_pickle(name: str, model: nn.Module, path: Path, x_check) -> None:
    torch.save(model, str(path))
    loaded = torch.load(str(path), weights_only=False)
    if type(loaded).__module__ != "sample_models.architectures":
        raise AssertionError(f"{name}: pickled class lives in {type(loaded).__module__}")
    check_close(name, "pickle", logits(loaded.eval(), x_check), logits(model, x_check))


def main() -> None:
    t0 = time.time()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    seed_everything(SEED)

    x_train, y_train, x_test, y_test = load_digits_split(seed=SEED)
    rng = np.random.default_rng(SEED)
    perm = rng.permutation(len(x_train))
    calib = np.ascontiguousarray(x_train[perm[:N_CALIB]])
    shifted_calib = sensor_shift(x_train[perm[N_CALIB : 2 * N_CALIB]], seed=1)
    shifted_test = sensor_shift(x_test, seed=2)
    np.save(HERE / "calib.npy", calib)
    np.save(HERE / "shifted_calib.npy", shifted_calib)
    np.savez(HERE / "test.npz", x=x_test, y=y_test)
    np.savez(HERE / "shifted_test.npz", x=shifted_test, y=y_test)
    print(f"data: train {x_train.shape}, test {x_test.shape}, calib {calib.shape}, "
          f"shifted_calib {shifted_calib.shape}")

    results = {}
    example = torch.from_numpy(x_test[:4])
    x_check = np.concatenate([x_test, shifted_test])
    for i, name in enumerate(MODEL_NAMES):
        seed_everything(SEED + i)
        model = train(FACTORIES[name](), x_train, y_train, seed=SEED + i)
        model.eval()
        r = {
            "clean": accuracy(model, x_test, y_test),
            "shifted": accuracy(model, shifted_test, y_test),
            "recal": accuracy(naive_recalibrate(model, shifted_calib), shifted_test, y_test),
            "bn": bn_names(model),
        }
        print(f"{name}: clean {r['clean']:.2f}%  shifted {r['shifted']:.2f}%  "
              f"shifted after naive BN recalibration {r['recal']:.2f}%")
        r["pt2"] = export_pt2(name, model, example, HERE / f"{name}.pt2", x_check)
        r["onnx_bn"] = export_onnx(name, model, example, HERE / f"{name}.onnx", x_check)
        r["ts"] = export_torchscript(name, model, HERE / f"{name}.ts", x_check)
        save_state_dict(name, model, HERE / f"{name}_state_dict.pt", x_check)
        save_pickle(name, model, HERE / f"{name}_pickle.pt", x_check)
        print(f"    wrote {name}.pt2 ({r['pt2']}), {name}.onnx ({r['onnx_bn']} BatchNormalization "
              f"nodes), {name}.ts, {name}_state_dict.pt, {name}_pickle.pt; all reload and match")
        results[name] = r

    write_readme(results)
    print(f"done in {time.time() - t0:.1f}s")


def write_readme(results: dict) -> None:
    rows = "\n".join(
        f"| {n} | {r['clean']:.2f} | {r['shifted']:.2f} | {r['recal']:.2f} |"
        for n, r in results.items()
    )
    bns = "\n".join(f"- `{n}`: " + ", ".join(f"`{b}`" for b in r["bn"]) for n, r in results.items())
    text = f"""# sample_models

Small BatchNorm models trained on **real data**: scikit-learn's bundled digits set
(`sklearn.datasets.load_digits`, 1797 8x8 grayscale images, 10 classes; shipped with
scikit-learn, nothing is downloaded). Used as fixtures and examples for bnfold.

Everything here is produced by `python sample_models/make_samples.py` (run from the
repository root; seeded, deterministic, CPU, 2 threads, under a minute). Made with
torch {torch.__version__}, onnx {_version('onnx')}, onnxruntime {_version('onnxruntime')}.

## Inputs and outputs

All models take a float32 tensor `(N, 1, 8, 8)` with pixels in [0, 1] (raw digit
values 0..16 divided by 16) and return logits `(N, 10)`.

## Files

| file | what |
|---|---|
| `architectures.py` | `DigitsCNN`, `DigitsMLP`, `DigitsResNet`, `DigitsMixed` and zero-argument factories `make_cnn`, `make_mlp`, `make_resnet`, `make_mixed` (e.g. `--model-factory sample_models.architectures:make_cnn` plus `cnn_state_dict.pt`) |
| `shift.py` | `load_digits_split(seed=0)` (fixed stratified split, 1347 train / 450 test) and `sensor_shift(x, seed=0)` (simulated new camera) |
| `make_samples.py` | the script that trains and writes everything below |
| `<name>.pt2` | `torch.export.export(model, (example,), dynamic_shapes=({{0: Dim("batch", min=1)}},))` saved with `torch.export.save`; dynamic batch dimension |
| `<name>.onnx` | ONNX (opset {OPSET}), BatchNorm kept as `BatchNormalization` nodes (not fused), BN parameters as plain initializers, input `input`, output `logits`, dynamic batch axis `batch`, weights inline (no external data) |
| `<name>.ts` | TorchScript (`torch.jit.script`, `torch.jit.save`) |
| `<name>_state_dict.pt` | `torch.save(model.state_dict())`; load with `torch.load(..., weights_only=True)` |
| `<name>_pickle.pt` | `torch.save(model)`, a full pickled module (class `sample_models.architectures.*`; needs the repo root on `sys.path`; `torch.load(..., weights_only=False)`) |
| `calib.npy` | float32 `(256, 1, 8, 8)`: clean training images, for calibration |
| `shifted_calib.npy` | float32 `(256, 1, 8, 8)`: `sensor_shift(seed=1)` of 256 *other* training images |
| `test.npz` | `x` float32 `(450, 1, 8, 8)`, `y` int64 `(450,)`: clean held-out test split |
| `shifted_test.npz` | same test images after `sensor_shift(seed=2)`, same `y` |

`<name>` is one of `cnn`, `mlp`, `resnet`, `mixed`. All models are saved in eval mode.

The ONNX files come from the TorchScript-based exporter (`dynamo=False`) with
`do_constant_folding=False`, `training=TrainingMode.EVAL`: with constant folding on
it fuses Conv+BN, and the dynamo exporter's default optimizer fuses them too (with
`optimize=False` it keeps BN but feeds bias-less Conv nodes a Shape/Expand subgraph).
That exporter also de-duplicates bit-identical parameters into `Identity` nodes; in
`resnet`, `block.bn2.bias` and `block.downsample.1.bias` are bit-identical after training
(both start at 0 and get the same gradient through the residual Add), so the script
replaces such Identity nodes by their own initializer copy: every BatchNormalization
node reads scale/bias/mean/var directly from initializers, and the graphs contain only
Conv, BatchNormalization, Relu, Add, GlobalAveragePool, Flatten and Gemm.
`torch.jit.script` emits a DeprecationWarning in this torch version but works.
The script checks every file: `torch.export.load`, `torch.jit.load`,
`torch.load(weights_only=True)` into a fresh factory model, `torch.load(weights_only=False)`,
`onnx.checker.check_model(full_check=True)` and onnxruntime, all matching the trained
torch model within {ATOL} on batch 1 and on the 900 clean+shifted test images.

## Training

Adam (lr {LR}), batch {BATCH_SIZE}, {EPOCHS} epochs on the 1347 training images,
cross-entropy, no augmentation; seeds fixed, `torch.use_deterministic_algorithms(True)`.

## The shift

`sensor_shift` simulates a different camera: `clip({GAIN} * x**{GAMMA} + {OFFSET} + N(0, {NOISE_STD}**2), 0, 1)`
(lower gain, gamma curve, raised black level, read noise), deterministic per seed.

## Measured accuracies (%, 450 test images)

"naive recal" = reset BN running stats, `momentum=None` (cumulative average), forward
all 256 `shifted_calib.npy` images in one batch with only the BN layers in train mode
(Dropout stays in eval), then eval; evaluated on `shifted_test.npz`.

| model | clean test | shifted test | shifted test after naive BN recal |
|---|---|---|---|
{rows}

## BatchNorm layers (module names)

{bns}

In `cnn`, `mlp` and `resnet` every BN directly follows a Conv2d/Linear whose output
nothing else reads, so all of them fold exactly (`block.downsample.1` folds into
`block.downsample.0`). In `mlp`, `bn2` has a Dropout upstream (`drop`), which matters
when recalibrating in train mode.

### `mixed`: which BN layers are not foldable

- `input_bn` (BatchNorm2d(1) applied to the raw image) has **no producer layer** to fold
  back into. Folding it *forward* into `conv1` is not exact either: `conv1` zero-pads
  (padding=1), and the padded border stays 0 instead of becoming the BN output of 0
  (i.e. its shift), so the BN shift cannot become a constant added to conv1's bias (its
  per-channel scale alone could be folded into conv1's weights).
- `bn2` reads `conv2`'s output, but that output is also read un-normalized by a second
  branch (`relu(bn2(y)) + y`): folding `bn2` into `conv2` would change that branch.
  It is followed by a ReLU, so it cannot fold forward either.
- `bn1` (after `conv1`) and `bn3` (after `conv3`) are ordinary foldable Conv-BN pairs.
"""
    (HERE / "README.md").write_text(text)


def _version(mod: str) -> str:
    return __import__(mod).__version__


if __name__ == "__main__":
    main()
