"""The data layer: every source streams the right samples, and bad data is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnfold.data import DataOptions, ImageOptions, open_data, parse_channel_values
from bnfold.errors import DataError, UsageError
from bnfold.model import InputSpec

IMAGE = InputSpec("input", (None, 1, 8, 8), "float32")


def collect(source) -> dict[str, np.ndarray]:
    batches = list(source.batches())
    return {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}


def sizes(source) -> list[int]:
    return [len(next(iter(batch.values()))) for batch in source.batches()]


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).random((70, 1, 8, 8), dtype=np.float32)


def test_npy_is_memory_mapped_and_batched(tmp_path, images):
    path = tmp_path / "calib.npy"
    np.save(path, images)
    source = open_data(path, [IMAGE], DataOptions(batch_size=32))
    assert isinstance(source.arrays["input"], np.memmap)
    assert sizes(source) == [32, 32, 6] and source.num_samples == 70 and source.num_batches == 3
    np.testing.assert_array_equal(collect(source)["input"], images)
    assert all(batch["input"].flags.writeable for batch in source.batches())  # copies, not views of the file


def test_npz_arrays_by_input_name_memory_mapped(tmp_path, images):
    path = tmp_path / "data.npz"
    np.savez(path, image=images, scale=np.arange(70, dtype=np.float32)[:, None], label=np.zeros(70))
    specs = [InputSpec("image", (None, 1, 8, 8), "float32"), InputSpec("scale", (None, 1), "float32")]
    source = open_data(path, specs, DataOptions(batch_size=50))
    assert all(isinstance(array, np.memmap) for array in source.arrays.values())
    data = collect(source)
    assert set(data) == {"image", "scale"}  # the labels are not an input
    np.testing.assert_array_equal(data["image"], images)
    np.testing.assert_array_equal(data["scale"][:, 0], np.arange(70))


def test_npz_compressed_and_single_array(tmp_path, images):
    path = tmp_path / "data.npz"
    np.savez_compressed(path, x=images)
    np.testing.assert_array_equal(collect(open_data(path, [IMAGE]))["input"], images)  # one array, one input


def test_npz_names_that_do_not_fit(tmp_path, images):
    path = tmp_path / "data.npz"
    np.savez(path, x=images, y=np.zeros(70))
    with pytest.raises(DataError, match="arrays x, y but the model's inputs are input"):
        open_data(path, [IMAGE])
    with pytest.raises(DataError, match="can feed one input, but the model has 2"):
        open_data(tmp_path, [IMAGE, InputSpec("other", (None, 3), "float32")])


def test_seed_shuffles_and_max_samples_takes_a_share(images):
    ordered = collect(open_data(images, [IMAGE], DataOptions(max_samples=10)))["input"]
    np.testing.assert_array_equal(ordered, images[:10])
    first = collect(open_data(images, [IMAGE], DataOptions(seed=3, max_samples=10)))["input"]
    again = collect(open_data(images, [IMAGE], DataOptions(seed=3, max_samples=10)))["input"]
    np.testing.assert_array_equal(first, again)
    picked = [int(np.flatnonzero((images == row).all(axis=(1, 2, 3)))[0]) for row in first]
    assert len(set(picked)) == 10 and picked != list(range(10))


def test_short_last_batch_joins_the_previous_one_and_fixed_batches(images):
    assert sizes(open_data(images[:33], [IMAGE], DataOptions(batch_size=32, min_batch=2))) == [33]
    assert sizes(open_data(images[:33], [IMAGE], DataOptions(batch_size=32))) == [32, 1]
    fixed = open_data(images, [InputSpec("input", (16, 1, 8, 8), "float32")], DataOptions(batch_size=32))
    assert sizes(fixed) == [16] * 4 and fixed.num_samples == 64
    assert any("exactly 16" in note for note in fixed.notes) and any("6 samples" in note for note in fixed.notes)


def test_batches_are_checked(images):
    bad = images.copy()
    bad[41, 0, 2, 2] = np.inf
    with pytest.raises(DataError, match=r"samples 32\.\.63, input 'input' holds NaN or Inf .* row 9"):
        list(open_data(bad, [IMAGE]).batches())
    with pytest.raises(DataError, match=r"shape \(32, 64\), the model expects \(\?, 1, 8, 8\)"):
        list(open_data(images.reshape(70, 64), [IMAGE]).batches())
    with pytest.raises(DataError, match="holds int64 values, the model expects float32"):
        list(open_data(np.zeros((20, 1, 8, 8), np.int64), [IMAGE]).batches())
    with pytest.raises(DataError, match="inputs must be numbers"):
        list(open_data(np.array([["a"]] * 20), ["input"]).batches())
    with pytest.raises(DataError, match="holds no samples"):
        open_data(images[:0], [IMAGE])
    widened = next(open_data(images.astype(np.float64), [IMAGE]).batches())["input"]
    assert widened.dtype == np.float32
    assert next(open_data(images.astype(np.float64), ["input"]).batches())["input"].dtype == np.float64


def test_callable_pipelines_give_tensors_tuples_or_dicts(images):
    tensors = torch.from_numpy(images)
    for make in (lambda: [tensors[:40], tensors[40:]],
                 lambda: ((tensors[i:i + 20], torch.zeros(20)) for i in range(0, 70, 20)),
                 lambda: [{"input": images[:35], "label": np.zeros(35)}, {"input": images[35:]}]):
        source = open_data(make, [IMAGE])
        np.testing.assert_array_equal(collect(source)["input"], images)
        np.testing.assert_array_equal(collect(source)["input"], images)  # called again for a second pass
    truncated = open_data(lambda: [tensors[:40], tensors[40:]], [IMAGE], DataOptions(max_samples=50))
    assert sizes(truncated) == [40, 10]
    with pytest.raises(DataError, match="produced no batches"):
        list(open_data(lambda: [], [IMAGE]).batches())
    with pytest.raises(DataError, match="has no value for the model input 'input'"):
        list(open_data(lambda: [{"x": images}], [IMAGE]).batches())
    with pytest.raises(DataError, match="not an iterable"):
        list(open_data(lambda: 3, [IMAGE]).batches())


def test_lists_are_reusable_but_iterators_feed_one_pass(images):
    listed = open_data([images[:35], images[35:]], [IMAGE])
    assert sizes(listed) == sizes(listed) == [35, 35]
    once = open_data(iter([images[:35], images[35:]]), [IMAGE])
    assert sizes(once) == [35, 35]
    with pytest.raises(DataError, match="one-shot iterator"):
        list(once.batches())


def save_image(path, pixels: np.ndarray, mode: str) -> None:
    from PIL import Image

    Image.fromarray(pixels, mode=mode).save(path)


def test_image_folder_grayscale_and_rgb(tmp_path):
    rng = np.random.default_rng(5)
    gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    color = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    (tmp_path / "sub").mkdir()
    save_image(tmp_path / "a.png", gray, "L")
    save_image(tmp_path / "sub" / "b.png", color, "RGB")
    (tmp_path / "notes.txt").write_text("not an image")
    mono = collect(open_data(tmp_path, [IMAGE]))["input"]
    assert mono.shape == (2, 1, 8, 8)
    mean, std = np.mean([0.485, 0.456, 0.406]), np.mean([0.229, 0.224, 0.225])  # averaged for one channel
    np.testing.assert_allclose(mono[0, 0], (gray / 255.0 - mean) / std, rtol=1e-5)
    rgb = collect(open_data(tmp_path, [InputSpec("input", (None, 3, 8, 8), "float32")],
                            DataOptions(images=ImageOptions(mean=(0.5,), std=(0.25,)))))["input"]
    np.testing.assert_allclose(rgb[1], (color.transpose(2, 0, 1) / 255.0 - 0.5) / 0.25, rtol=1e-5)
    np.testing.assert_allclose(rgb[0, 0], rgb[0, 2])  # a grayscale image becomes three equal channels


def test_image_resize_and_crop(tmp_path):
    save_image(tmp_path / "wide.png", np.full((20, 40, 3), 128, np.uint8), "RGB")
    save_image(tmp_path / "tall.png", np.full((30, 10, 3), 64, np.uint8), "RGB")
    spec = InputSpec("input", (None, 3, 8, 8), "float32")
    with pytest.raises(DataError, match="different sizes"):
        list(open_data(tmp_path, [spec]).batches())
    batch = collect(open_data(tmp_path, [spec], DataOptions(images=ImageOptions(resize=10, crop=8))))["input"]
    assert batch.shape == (2, 3, 8, 8)
    with pytest.raises(DataError, match="larger than image"):
        list(open_data(tmp_path, [spec], DataOptions(images=ImageOptions(resize=6, crop=8))).batches())


def test_image_folder_problems(tmp_path):
    with pytest.raises(DataError, match="holds no images"):
        open_data(tmp_path, [IMAGE])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image"):
        list(open_data(tmp_path, [IMAGE]).batches())


def test_paths_and_options(tmp_path):
    with pytest.raises(DataError, match="no such data"):
        open_data(tmp_path / "missing.npy", [IMAGE])
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(DataError, match=".npy or .npz"):
        open_data(tmp_path / "data.csv", [IMAGE])
    with pytest.raises(UsageError, match="--batch-size"):
        DataOptions(batch_size=0)
    assert parse_channel_values("0.5, 0.25,1", "--mean") == (0.5, 0.25, 1.0)
    with pytest.raises(UsageError, match="--std takes comma-separated numbers"):
        parse_channel_values("a,b", "--std")


def test_arrays_in_memory_are_read_through_read_only_views(images):
    """No copy of data already in memory (the ONNX engine reads it as it is), and nothing downstream can
    write the caller's array: the engines that may write their inputs copy them (tests/test_fold_api.py)."""
    for seed in (None, 3):  # slices, and the rows of a shuffle
        batches = list(open_data(images, [IMAGE], DataOptions(batch_size=32, seed=seed)).batches())
        assert not any(batch["input"].flags.writeable for batch in batches)
    first = next(open_data(images, [IMAGE], DataOptions(batch_size=32)).batches())["input"]
    assert np.shares_memory(first, images)
