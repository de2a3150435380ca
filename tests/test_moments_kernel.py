"""bnfold's moments kernel (bnfold/_moments.c) against float64 numpy, at any offset, length and thread count."""

import numpy as np
import pytest

_moments = pytest.importorskip("bnfold._moments", reason="bnfold's moments kernel was not built (no C compiler)")


def kernel_moments(values: np.ndarray, threads: int = 1):
    """Each row's sum and M2, each channel's mean and variance (float64), as the kernel's record has them;
    the float32 statistics it normalizes by are those, rounded."""
    samples, channels = values.shape[:2]
    positions = int(np.prod(values.shape[2:]))
    record, statistics = np.empty(2 * (channels + samples * channels)), np.empty(2 * channels, dtype=np.float32)
    _moments.batch_moments(values, samples, channels, positions, record, statistics, threads)
    np.testing.assert_array_equal(statistics, record[:2 * channels].astype(np.float32))
    mean, var, rows = record[:channels], record[channels:2 * channels], record[2 * channels:]
    sums, m2 = rows.reshape(2, samples, channels)
    return sums, m2, mean, var


def reference(values: np.ndarray):
    rows = values.astype(np.float64).reshape(values.shape[0], values.shape[1], -1)
    per_channel = rows.transpose(1, 0, 2).reshape(rows.shape[1], -1)
    deviations = rows - rows.mean(axis=2, keepdims=True)
    return rows.sum(axis=2), np.square(deviations).sum(axis=2), per_channel.mean(axis=1), per_channel.var(axis=1)


# lengths around the kernel's lanes (16) and blocks (256); offsets up to 1e4 standard deviations
@pytest.mark.parametrize("positions", [1, 3, 16, 17, 255, 256, 257, 1000, 4099])
@pytest.mark.parametrize("offset", [0.0, 3.0, -40.0, 1e4])
def test_row_and_channel_moments_are_those_of_float64(positions, offset):
    generator = np.random.default_rng(positions)
    scales = np.array([0.5, 2.0, 1e-3])[None, :, None]
    values = (generator.standard_normal((5, 3, positions)) * scales + offset).astype(np.float32)
    sums, m2, mean, var = kernel_moments(values)
    sums_ref, m2_ref, mean_ref, var_ref = reference(values)
    spread = np.sqrt(var_ref)
    # the sums carry float64 rounding of the values' own spread, not of their size
    np.testing.assert_allclose(sums, sums_ref, rtol=1e-12, atol=1e-6 * positions * spread.max())
    np.testing.assert_allclose(m2, m2_ref, rtol=2e-6, atol=1e-12)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-12, atol=1e-6 * spread.max())
    np.testing.assert_allclose(var, var_ref, rtol=2e-6, atol=1e-12)


def test_constant_rows_have_no_spread_at_all():
    values = np.full((4, 2, 300), 1234.5678, dtype=np.float32)
    values[:, 1] = -7.0
    sums, m2, mean, var = kernel_moments(values)
    np.testing.assert_array_equal(m2, 0.0)
    np.testing.assert_array_equal(var, 0.0)
    np.testing.assert_array_equal(mean, values[0, :, 0])


@pytest.mark.parametrize("threads", [2, 3, 64, 1000])
def test_threads_share_the_rows_and_agree_with_one(threads):
    values = (np.random.default_rng(0).standard_normal((32, 7, 4096)) + 2).astype(np.float32)  # worth threads
    alone, shared = kernel_moments(values, 1), kernel_moments(values, threads)
    for one, many in zip(alone, shared):
        np.testing.assert_array_equal(one, many)


@pytest.mark.parametrize("wrong", ["values", "record", "statistics"])
def test_buffers_of_the_wrong_size_are_refused(wrong):
    values = np.zeros((2, 3, 4), dtype=np.float32)
    buffers = {"values": values, "record": np.empty(2 * (3 + 6)), "statistics": np.empty(6, dtype=np.float32)}
    buffers[wrong] = np.empty(5, dtype=buffers[wrong].dtype)
    with pytest.raises(ValueError, match=wrong):
        _moments.batch_moments(buffers["values"], 2, 3, 4, buffers["record"], buffers["statistics"], 1)


def test_large_calls_far_from_zero_are_exact_in_one_run():
    """The kernel's calls need none of the second runs that float32 reductions need (see InputStatistics)."""
    import torch
    import torch.nn.functional as F

    from bnfold.pytorch.recalibrate import _VECTORIZED_VALUES, InputStatistics

    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(8, 3, 100, 100, generator=generator) * torch.tensor([1.0, 1e-3, 0.0]).reshape(1, 3, 1, 1)
    inputs += 5000.0  # 5000 standard deviations out, 5e6 for the second channel, and a dead third one
    assert inputs.numel() > _VECTORIZED_VALUES
    statistics = InputStatistics(["bn"])
    output = statistics.normalize("bn", inputs, None, None, 1e-5)
    assert statistics.end_batch()
    result = statistics.result()["bn"]
    values = inputs.double().transpose(0, 1).reshape(3, -1)
    np.testing.assert_allclose(result.mean, values.mean(dim=1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(result.variance(), values.var(dim=1, unbiased=False).numpy(), rtol=2e-6, atol=0)
    expected = F.batch_norm(inputs.double(), None, None, None, None, True, 0.0, 1e-5)
    # float32 inputs 5000 out carry 5000 * 6e-8 of rounding: 3e-4 of a unit standard deviation
    assert (output.double() - expected)[:, 0].abs().max() < 1e-3


def test_a_recalibration_without_the_kernel_says_so_and_agrees_with_it(monkeypatch):
    import torch
    from torch import nn

    from bnfold import recalibrate
    from bnfold.pytorch import recalibrate as torch_recalibrate
    from bnfold.pytorch.recalibrate import NO_KERNEL_NOTE

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4)).eval()
    data = np.random.default_rng(0).standard_normal((64, 3, 40, 40)).astype(np.float32) * 3 + 100  # large calls
    with_kernel = recalibrate(model, data, method="fast")
    monkeypatch.setattr(torch_recalibrate, "_moments", None)
    without = recalibrate(model, data, method="fast")
    assert NO_KERNEL_NOTE not in with_kernel.notes
    assert NO_KERNEL_NOTE in without.notes
    for name in ("1", "4"):
        kernel_bn, torch_bn = (report.result.module.get_submodule(name) for report in (with_kernel, without))
        torch.testing.assert_close(kernel_bn.running_mean, torch_bn.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(kernel_bn.running_var, torch_bn.running_var, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("shape", [(4, 3, 16), (5, 2, 3), (2, 7, 300), (3, 4, 1)])
@pytest.mark.parametrize("affine", [True, False])
def test_normalized_output_is_that_of_a_training_mode_batch_norm(shape, affine):
    """With an output, the kernel also writes the values normalized by the statistics it found, as a BN in
    training mode does (to float32 rounding of its scale and shift); the statistics do not change."""
    generator = np.random.default_rng(sum(shape))
    samples, channels, positions = shape
    values = (generator.standard_normal(shape) * 3 + 40).astype(np.float32)
    weight, bias = ((generator.random(channels) + 0.5).astype(np.float32),
                    generator.standard_normal(channels).astype(np.float32)) if affine else (None, None)
    alone = np.empty(2 * (channels + samples * channels)), np.empty(2 * channels, dtype=np.float32)
    normalizing = np.empty(2 * (channels + samples * channels)), np.empty(2 * channels, dtype=np.float32)
    output = np.full_like(values, np.nan)
    _moments.batch_moments(values, samples, channels, positions, *alone, 1)
    _moments.batch_moments(values, samples, channels, positions, *normalizing, 1, output, weight, bias, 1e-3)
    for one, other in zip(alone, normalizing):
        np.testing.assert_array_equal(one, other)
    exact = values.astype(np.float64)
    mean, var = exact.mean(axis=(0, 2), keepdims=True), exact.var(axis=(0, 2), keepdims=True)
    scale = (1.0 if weight is None else weight[None, :, None]) / np.sqrt(var + 1e-3)
    expected = (exact - mean) * scale + (0.0 if bias is None else bias[None, :, None])
    # y = x * scale + shift in float32: rounding of the order of |x * scale|, not of |y|
    rounding = 8 * np.finfo(np.float32).eps * np.abs(exact * scale).max()
    np.testing.assert_allclose(output, expected, rtol=0, atol=rounding)


@pytest.mark.parametrize("wrong", ["output", "weight", "bias"])
def test_normalizing_buffers_of_the_wrong_size_are_refused(wrong):
    values = np.zeros((2, 3, 4), dtype=np.float32)
    buffers = {"output": np.empty_like(values), "weight": np.ones(3, dtype=np.float32),
               "bias": np.zeros(3, dtype=np.float32)}
    buffers[wrong] = np.empty(5, dtype=np.float32)
    with pytest.raises(ValueError, match=wrong):
        _moments.batch_moments(values, 2, 3, 4, np.empty(18), np.empty(6, dtype=np.float32), 1, buffers["output"],
                               buffers["weight"], buffers["bias"], 1e-5)


def test_normalize_follows_a_weight_whose_memory_was_replaced():
    """The fast method converts a layer's weight and bias for the kernel once and keeps them: a new tensor,
    or new memory under the same one (a `.data` assignment), is converted again."""
    torch = pytest.importorskip("torch")
    from bnfold.pytorch.recalibrate import InputStatistics

    statistics = InputStatistics(["bn"])
    inputs = torch.randn(4, 3, 5, 5) * 2 + 1
    weight, bias = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(3))

    def normalized_as_torch_does() -> None:
        output = statistics.normalize("bn", inputs, weight, bias, 1e-5)
        with torch.no_grad():
            expected = torch.nn.functional.batch_norm(inputs, None, None, weight, bias, True, 0.0, 1e-5)
        torch.testing.assert_close(output, expected)

    normalized_as_torch_does()
    weight.data = torch.tensor([2.0, -1.0, 0.5])
    normalized_as_torch_does()
    bias = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    normalized_as_torch_does()
