"""Exact streamed statistics: merged batches equal the statistics of all values at once."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.stats import ChannelStatistics, Moments, pooled_columns


def _split(values: np.ndarray, cuts: list[int]) -> list[np.ndarray]:
    return [part for part in np.split(values, sorted(set(cuts))) if len(part)]


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(2, 40), channels=st.integers(1, 5), spatial=st.integers(1, 6),
       cuts=st.lists(st.integers(1, 39), max_size=6), seed=st.integers(0, 2**31 - 1))
def test_batches_merge_to_the_statistics_of_everything(rows, channels, spatial, cuts, seed):
    rng = np.random.default_rng(seed)
    values = rng.normal(3.0, 2.0, size=(rows, channels, spatial)).astype(np.float32)
    statistics = ChannelStatistics()
    for batch in _split(values, [c for c in cuts if c < rows]):
        statistics.add_array(batch)
    everything = values.astype(np.float64).transpose(1, 0, 2).reshape(channels, -1)
    assert statistics.count == rows * spatial
    assert statistics.samples == rows
    np.testing.assert_allclose(statistics.mean, everything.mean(axis=1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(statistics.variance(0), everything.var(axis=1), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(statistics.variance(1), everything.var(axis=1, ddof=1), rtol=1e-10, atol=1e-12)


def test_result_does_not_depend_on_batch_size_and_includes_between_batch_variance():
    rng = np.random.default_rng(0)
    # Two batches with different means: averaging per-batch variances would miss the gap between them.
    values = np.concatenate([rng.normal(0, 1, (50, 3)), rng.normal(10, 1, (50, 3))])
    by_batch = {}
    for size in (1, 7, 50, 100):
        statistics = ChannelStatistics()
        for start in range(0, 100, size):
            statistics.add_array(values[start:start + size])
        by_batch[size] = statistics.variance(1)
    for variance in by_batch.values():
        np.testing.assert_allclose(variance, values.var(axis=0, ddof=1), rtol=1e-12)
    assert np.all(by_batch[50] > 20)  # per-batch variances are ~1 each


def test_large_offset_keeps_precision():
    # Naive sum/sum-of-squares in float64 loses every digit of a variance of 1e-6 around 1e4.
    rng = np.random.default_rng(1)
    values = 1e4 + rng.normal(0, 1e-3, size=(4000, 2))
    statistics = ChannelStatistics()
    for start in range(0, 4000, 64):
        statistics.add_array(values[start:start + 64])
    np.testing.assert_allclose(statistics.variance(0), values.var(axis=0), rtol=1e-6)


def test_channel_axis_and_spatial_dimensions():
    rng = np.random.default_rng(2)
    values = rng.normal(size=(6, 4, 3, 5))
    moments = Moments.of(values, channel_axis=1)
    np.testing.assert_allclose(moments.mean, values.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(moments.variance(0), values.var(axis=(0, 2, 3)))
    last = Moments.of(np.moveaxis(values, 1, -1), channel_axis=-1)
    np.testing.assert_allclose(last.m2, moments.m2)


def test_standard_error_uses_samples_as_the_independent_unit():
    rng = np.random.default_rng(4)
    # Each sample is one value repeated over 100 positions: 100x more values, no more information.
    per_sample = rng.normal(size=(400, 1))
    values = np.repeat(per_sample[:, :, None], 100, axis=2)
    statistics = ChannelStatistics()
    statistics.add_array(values)
    expected = per_sample.std(ddof=1) / np.sqrt(400)
    np.testing.assert_allclose(statistics.standard_error(), [expected], rtol=1e-10)



def test_standard_error_from_batch_units_is_the_spread_of_the_batch_means():
    """With `batch_units` (ONNX's fast pass) the units are batches: SE = sd(batch means) / sqrt(batches) for
    equal batches, a row-weighted version otherwise; either way an unbiased estimate of the same quantity."""
    rng = np.random.default_rng(5)
    values = rng.normal(3.0, 2.0, size=(96, 2, 4))
    by_batches = ChannelStatistics(batch_units=True)
    for start in range(0, 96, 8):
        by_batches.add_array(values[start:start + 8])
    batch_means = values.reshape(12, 8, 2, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(by_batches.standard_error(), batch_means.std(axis=0, ddof=1) / np.sqrt(12), rtol=1e-12)
    assert by_batches.samples == 96 and by_batches.count == 96 * 4
    uneven = ChannelStatistics(batch_units=True)
    sizes = [10, 30, 56]
    for part in np.split(values, np.cumsum(sizes)[:-1]):
        uneven.add_array(part)
    means = np.stack([part.mean(axis=(0, 2)) for part in np.split(values, np.cumsum(sizes)[:-1])])
    weighted = np.asarray(sizes, float) @ np.square(means - values.mean(axis=(0, 2)))
    np.testing.assert_allclose(uneven.standard_error(), np.sqrt(weighted / (2 * 96)), rtol=1e-12)
    one = ChannelStatistics(batch_units=True)
    one.add_array(values)  # one batch says nothing about the spread between batches
    assert np.isinf(one.standard_error()).all()
    with pytest.raises(ValueError, match="per-sample and per-batch"):
        ChannelStatistics().merge(by_batches)


def test_pooled_columns_with_a_count_per_column_pool_each_column_on_its_own():
    """Several layers' channels side by side (ONNX merges every layer at once), each with its own counts."""
    rng = np.random.default_rng(6)
    counts = rng.integers(1, 50, size=(7, 5)).astype(np.float64)
    means, variances = rng.normal(size=(7, 5)) * 10, rng.uniform(0.1, 2, size=(7, 5))
    total, mean, m2 = pooled_columns(counts, means, variances)
    for column in range(5):
        alone = Moments.of_batches(counts[:, column], means[:, [column]], variances[:, [column]])
        assert total[column] == alone.count
        np.testing.assert_allclose([mean[column], m2[column]], [alone.mean[0], alone.m2[0]], rtol=1e-13)

def test_empty_and_mismatched_merges():
    empty = Moments(0, np.zeros(0), np.zeros(0))
    some = Moments.of(np.ones((3, 2)))
    assert empty.merge(some) is some and some.merge(empty) is some
    with pytest.raises(ValueError, match="channels"):
        some.merge(Moments.of(np.ones((3, 4))))
    with pytest.raises(ValueError, match="too few"):
        Moments.of(np.ones((1, 2))).variance(ddof=1)
    single = ChannelStatistics()
    single.add_array(np.ones((1, 2)))
    assert single.standard_error().shape == (2,) and np.isinf(single.standard_error()).all()


def test_batch_moments_pooled_at_once_equal_merging_one_part_at_a_time():
    rng = np.random.default_rng(3)
    parts = [Moments.of(rng.normal(loc, 2.0, size=(size, 5)) + 1e3, channel_axis=1)
             for loc, size in ((0.0, 7), (5.0, 1), (-3.0, 40))]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    pooled = Moments.of_batches(np.array([part.count for part in parts]), np.stack([part.mean for part in parts]),
                                np.stack([part.variance() for part in parts]))
    assert pooled.count == merged.count == 48
    np.testing.assert_allclose(pooled.mean, merged.mean, rtol=1e-13)
    np.testing.assert_allclose(pooled.m2, merged.m2, rtol=1e-11)
