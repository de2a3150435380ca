"""Exact per-channel statistics from a stream of batches: float64 sufficient statistics, merged stably.

Each batch is reduced to (count, mean, M2) per channel, M2 being the sum of squared deviations from the
batch mean; batches are combined with the parallel update of Chan, Golub and LeVeque (1979):

    n = na + nb,  d = mean_b - mean_a,  mean = mean_a + d * nb / n,  M2 = M2a + M2b + d^2 * na * nb / n

This is exact up to float64 rounding, whatever the batch sizes, and includes the variance between
batches (an average of per-batch variances does not; an exponential moving average is not exact at all).
Many batches can also arrive at once, as arrays of per-batch moments (`Moments.of_batches`): the same
update summed in one vectorized step.
Pure numpy: frameworks reduce their tensors to `Moments` and hand them over.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Above this squared mean / variance, float32 batch means (good to about 6e-8 of their size) would blur
# the variance between batches by more than about 1e-6 of the total (float32 sample means, summed by
# cascade, up to about 1e-5): such a layer's batches are reduced more carefully (in float64, or around a
# shift) by the framework that reduces them.
BATCH_MEAN_RATIO = 1e4


def beyond_float32_means(mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """Where a mean lies too far out for float32 (`BATCH_MEAN_RATIO`), elementwise."""
    mean = np.asarray(mean, dtype=np.float64)
    return mean * mean > BATCH_MEAN_RATIO * np.asarray(variance, dtype=np.float64)


def pooled_columns(counts: np.ndarray, means: np.ndarray, variances: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per column, the count, mean and M2 of B batches given as (B, C) means and population variances and
    counts that broadcast to them (one per batch, or one per batch and column, as when the columns are the
    channels of several layers): Chan's update summed over the batches."""
    means = np.asarray(means, dtype=np.float64)
    total = np.broadcast_to(counts, means.shape).sum(axis=0)
    mean = (counts * means).sum(axis=0) / total
    within = (counts * np.asarray(variances, dtype=np.float64)).sum(axis=0)
    return total, mean, within + (counts * np.square(means - mean)).sum(axis=0)


@dataclass(frozen=True)
class Moments:
    """count, mean and M2 per channel, in float64; `count` values stand behind every channel."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, values: np.ndarray, channel_axis: int = 1) -> Moments:
        """The moments of `values` per index on `channel_axis`, over all other axes."""
        values = np.moveaxis(np.asarray(values, dtype=np.float64), channel_axis, 0)
        flat = values.reshape(values.shape[0], -1)
        mean = flat.mean(axis=1)
        deviations = flat - mean[:, None]
        return cls(int(flat.shape[1]), mean, np.einsum("ij,ij->i", deviations, deviations))

    @classmethod
    def of_batches(cls, counts: np.ndarray, means: np.ndarray, variances: np.ndarray) -> Moments:
        """The moments of B batches together, given as `counts` (B,) and each batch's mean and population
        variance (B, C), as frameworks reduce them: Chan's update summed over the batches
        (M2 = sum of count * variance + sum of count * (batch mean - mean)^2)."""
        counts = np.asarray(counts, dtype=np.float64)
        _, mean, m2 = pooled_columns(counts[:, None], means, variances)
        return cls(int(counts.sum()), mean, m2)

    def merge(self, other: Moments) -> Moments:
        """The moments of both sets of values together (Chan et al.)."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        if self.mean.shape != other.mean.shape:
            raise ValueError(f"cannot merge moments of {self.mean.size} and {other.mean.size} channels")
        total = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / total)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / total)
        return Moments(total, mean, m2)

    def variance(self, ddof: int = 0) -> np.ndarray:
        """M2 / (count - ddof): ddof=0 the population variance, ddof=1 the unbiased estimate."""
        if self.count <= ddof:
            raise ValueError(f"{self.count} values are too few for a variance with ddof={ddof}")
        return self.m2 / (self.count - ddof)


class ChannelStatistics:
    """Accumulates what one BN layer's input looked like over a whole data set.

    Two sets of moments: of all values per channel (what the BN's running statistics estimate), and of the
    means of the independent units, which give the standard error of the mean. The units are the samples
    (values inside one image are correlated, samples are not), or, with `batch_units`, whole batches: each
    batch mean weighted by its rows, where per-sample means would cost a framework another read of every
    BN input (see `standard_error`).
    """

    def __init__(self, values: Moments | None = None, sample_means: Moments | None = None, batches: int = 0,
                 batch_units: bool = False) -> None:
        empty = Moments(0, np.zeros(0), np.zeros(0))
        self.values = values if values is not None else empty
        self.sample_means = sample_means if sample_means is not None else empty  # of the units, per sample
        self.batches = batches
        self.batch_units = batch_units

    def add(self, values: Moments, sample_means: Moments, batches: int = 1) -> None:
        """Merge one batch (or `batches` pooled), given as the moments of its values and of its unit means
        (per-sample means, or with `batch_units` its batch mean weighted by its rows: `Moments.of_batches`
        with zero variances)."""
        self.values = self.values.merge(values)
        self.sample_means = self.sample_means.merge(sample_means)
        self.batches += batches

    def merge(self, other: ChannelStatistics) -> None:
        """Merge statistics accumulated elsewhere (another process's share of the data), exactly."""
        if other.batch_units != self.batch_units:
            raise ValueError("cannot merge statistics of per-sample and per-batch means")
        self.values = self.values.merge(other.values)
        self.sample_means = self.sample_means.merge(other.sample_means)
        self.batches += other.batches

    def add_array(self, batch: np.ndarray, channel_axis: int = 1) -> None:
        """Merge one batch of shape (N, C, *spatial) (channels on `channel_axis`)."""
        batch = np.moveaxis(np.asarray(batch, dtype=np.float64), channel_axis, 1)
        per_sample = batch.reshape(batch.shape[0], batch.shape[1], -1).mean(axis=2)
        self.add(Moments.of(batch), Moments.of_batches(np.array([len(batch)]), per_sample.mean(axis=0, keepdims=True),
                                                        np.zeros((1, batch.shape[1])))
                 if self.batch_units else Moments.of(per_sample))

    @property
    def samples(self) -> int:
        """How many samples (rows of the batches) were seen."""
        return self.sample_means.count

    @property
    def count(self) -> int:
        """How many values per channel were seen (samples times spatial positions)."""
        return self.values.count

    @property
    def mean(self) -> np.ndarray:
        return self.values.mean

    def variance(self, ddof: int = 0) -> np.ndarray:
        return self.values.variance(ddof)

    def standard_error(self) -> np.ndarray:
        """Standard error of `mean` per channel, treating the units (samples, or batches) as independent
        draws: sqrt(M2 / ((units - 1) * samples)), with M2 of the unit means weighted by their rows. Per
        sample that is the sample variance over the samples; per batch, with B batches, M2 / (B - 1) is an
        unbiased estimate of the sample variance from B - 1 degrees of freedom (noisier with few batches;
        larger, so more careful, where batches are not shuffled and differ more than random ones would)."""
        units = self.batches if self.batch_units else self.samples
        if units < 2:
            return np.full(self.mean.shape, np.inf)
        return np.sqrt(self.sample_means.m2 / ((units - 1) * self.samples))


__all__ = ["ChannelStatistics", "Moments"]
