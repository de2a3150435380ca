"""Format detection by content, safe loading, and the refusal of untrusted pickles."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from bnfold.errors import InputError, UnsafePickleError, UnsupportedFormatError, UsageError
from bnfold.formats import FileKind, load_model, sniff
from bnfold.model import LoadOptions, ModelFormat
from bnfold.pickle_scan import archive_pickle_imports, foreign_imports
from tests.conftest import SAMPLES

CNN_FACTORY = "sample_models.architectures:make_cnn"


@pytest.mark.parametrize("name, kind", [
    ("cnn.onnx", FileKind.ONNX),
    ("cnn.pt2", FileKind.EXPORTED_PROGRAM),
    ("cnn.ts", FileKind.TORCHSCRIPT),
    ("cnn_pickle.pt", FileKind.TORCH_PICKLE),
    ("cnn_state_dict.pt", FileKind.TORCH_PICKLE),
])
def test_sniff_recognises_every_sample_format(name, kind):
    assert sniff(SAMPLES / name) == kind


def test_sniff_ignores_the_extension(tmp_path):
    disguised = tmp_path / "model.onnx"
    shutil.copy(SAMPLES / "cnn_pickle.pt", disguised)
    assert sniff(disguised) == FileKind.TORCH_PICKLE
    with pytest.raises(UnsafePickleError):
        load_model(disguised)


@pytest.mark.parametrize("content, error", [
    (b"", InputError),
    (b"this is plain text, not a model", UnsupportedFormatError),
    (b"PK\x03\x04 truncated zip", InputError),
])
def test_sniff_rejects_junk(tmp_path, content, error):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(error):
        sniff(path)


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        sniff(tmp_path / "absent.onnx")


def test_pickle_imports_are_listed_without_executing(tmp_path):
    imports = foreign_imports(archive_pickle_imports(SAMPLES / "cnn_pickle.pt"))
    assert "sample_models.architectures.DigitsCNN" in imports
    assert all(not name.startswith("torch._utils") for name in imports)


def test_pickle_scan_does_not_run_the_payload(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, path)
    with pytest.raises(UnsafePickleError) as refused:
        load_model(path)
    assert not marker.exists()
    assert "builtins.open" in refused.value.imports or "io.open" in refused.value.imports
    assert "--allow-pickle" in refused.value.hint


def test_pickled_module_loads_only_with_consent():
    with pytest.raises(UnsafePickleError, match="DigitsCNN"):
        load_model(SAMPLES / "cnn_pickle.pt")
    model = load_model(SAMPLES / "cnn_pickle.pt", LoadOptions(allow_pickle=True))
    assert model.format is ModelFormat.PICKLE
    assert not model.module.training


def test_weights_only_env_blocks_even_consented_pickles(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UnsafePickleError, match="TORCH_FORCE_WEIGHTS_ONLY_LOAD"):
        load_model(SAMPLES / "cnn_pickle.pt", LoadOptions(allow_pickle=True))


def test_state_dict_needs_a_factory():
    with pytest.raises(UsageError, match="no architecture") as refused:
        load_model(SAMPLES / "cnn_state_dict.pt")
    assert "--model-factory" in refused.value.hint


def test_state_dict_with_factory_matches_the_pickle():
    from_state = load_model(SAMPLES / "cnn_state_dict.pt", LoadOptions(model_factory=CNN_FACTORY))
    pickled = load_model(SAMPLES / "cnn_pickle.pt", LoadOptions(allow_pickle=True))
    assert from_state.format is ModelFormat.STATE_DICT
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(from_state.module(x), pickled.module(x), rtol=0, atol=0)


def test_checkpoint_dict_nesting_is_unwrapped(tmp_path):
    weights = torch.load(SAMPLES / "cnn_state_dict.pt", weights_only=True)
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "state_dict": weights}, path)
    model = load_model(path, LoadOptions(model_factory=CNN_FACTORY))
    assert [layer.name for layer in model.bn_layers()] == ["bn1", "bn2", "bn3"]


def test_safetensors_with_factory(tmp_path):
    from safetensors.torch import save_file

    weights = torch.load(SAMPLES / "cnn_state_dict.pt", weights_only=True)
    path = tmp_path / "cnn.safetensors"
    save_file(dict(weights), path)
    model = load_model(path, LoadOptions(model_factory=CNN_FACTORY))
    assert len(model.bn_layers()) == 3


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "package.module:callable"),
    ("not_a_module_xyz:make", "cannot import"),
    ("sample_models.architectures:absent", "no attribute"),
])
def test_bad_factory_specs_are_usage_errors(spec, message):
    with pytest.raises(UsageError, match=message):
        load_model(SAMPLES / "cnn_state_dict.pt", LoadOptions(model_factory=spec))


def test_factory_with_the_wrong_architecture(tmp_path):
    with pytest.raises(InputError, match="do not fit"):
        load_model(SAMPLES / "cnn_state_dict.pt",
                   LoadOptions(model_factory="sample_models.architectures:make_mlp"))


def test_all_formats_report_the_same_statistics():
    """pt2, TorchScript, pickle and state_dict describe the same trained CNN identically."""
    models = [
        load_model(SAMPLES / "cnn.pt2"),
        load_model(SAMPLES / "cnn.ts"),
        load_model(SAMPLES / "cnn_pickle.pt", LoadOptions(allow_pickle=True)),
        load_model(SAMPLES / "cnn_state_dict.pt", LoadOptions(model_factory=CNN_FACTORY)),
    ]
    reference = models[0].bn_layers()
    assert [layer.name for layer in reference] == ["bn1", "bn2", "bn3"]
    for model in models[1:]:
        layers = model.bn_layers()
        assert [layer.name for layer in layers] == ["bn1", "bn2", "bn3"], model.format
        for a, b in zip(reference, layers):
            np.testing.assert_array_equal(a.running_mean, b.running_mean)
            np.testing.assert_array_equal(a.running_var, b.running_var)
            assert (a.eps, a.momentum, a.channels) == (b.eps, b.momentum, b.channels)


def test_onnx_layers_match_the_torch_statistics():
    onnx_layers = load_model(SAMPLES / "cnn.onnx").bn_layers()
    torch_layers = load_model(SAMPLES / "cnn.pt2").bn_layers()
    assert len(onnx_layers) == len(torch_layers) == 3
    for onnx_layer, torch_layer in zip(onnx_layers, torch_layers):
        assert onnx_layer.kind == "BatchNormalization-15"  # the operator version in effect at opset 17
        np.testing.assert_allclose(onnx_layer.running_var, torch_layer.running_var, rtol=1e-7)
        assert onnx_layer.momentum == pytest.approx(1 - torch_layer.momentum)


def test_pt2_input_spec_has_a_dynamic_batch():
    (spec,) = load_model(SAMPLES / "cnn.pt2").input_specs()
    assert spec.shape == (None, 1, 8, 8) and spec.dtype == "float32"


def test_onnx_input_spec():
    (spec,) = load_model(SAMPLES / "cnn.onnx").input_specs()
    assert spec.name == "input" and spec.shape == (None, 1, 8, 8)


SAMPLE_SUFFIXES = {".pt2": LoadOptions(), ".onnx": LoadOptions(), ".ts": LoadOptions(),
                   "_pickle.pt": LoadOptions(allow_pickle=True),
                   "_state_dict.pt": LoadOptions(model_factory="sample_models.architectures:make_{name}")}


@pytest.mark.parametrize("name", ["cnn", "mlp", "resnet", "mixed"])
def test_every_sample_model_is_committed_in_every_format(name):
    counts = {}
    for suffix, options in SAMPLE_SUFFIXES.items():
        if options.model_factory:
            options = LoadOptions(model_factory=options.model_factory.format(name=name))
        layers = load_model(SAMPLES / f"{name}{suffix}", options).bn_layers()
        counts[suffix] = len(layers)
        assert all(layer.has_running_stats and np.isfinite(layer.eps) for layer in layers), suffix
    assert len(set(counts.values())) == 1 and counts[".pt2"] >= 2, counts


def test_sample_models_folder_stays_small():
    tracked = [path for path in SAMPLES.rglob("*") if path.is_file() and "__pycache__" not in path.parts]
    assert sum(path.stat().st_size for path in tracked) < 5 * 2**20
    assert (SAMPLES / "make_samples.py").is_file() and np.load(SAMPLES / "calib.npy").ndim == 4


def test_onnx_with_every_tensor_in_external_data_reads_the_same_statistics(tmp_path):
    import onnx

    onnx.save(onnx.load(SAMPLES / "cnn.onnx"), tmp_path / "cnn.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="cnn.data", size_threshold=0)
    assert (tmp_path / "cnn.data").stat().st_size > (tmp_path / "cnn.onnx").stat().st_size
    external, embedded = load_model(tmp_path / "cnn.onnx").bn_layers(), load_model(SAMPLES / "cnn.onnx").bn_layers()
    assert [layer.to_dict() for layer in external] == [layer.to_dict() for layer in embedded]
    assert all(layer.has_running_stats for layer in external)
