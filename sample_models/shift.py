"""Real data (sklearn digits, shipped with scikit-learn, nothing downloaded) and a
deterministic synthetic "new camera" shift."""

from __future__ import annotations

import numpy as np

# Parameters of the simulated new sensor (applied to images in [0, 1]).
GAIN = 0.75  # weaker sensor response
OFFSET = 0.12  # raised black level
GAMMA = 0.7  # different tone curve (brightens mid-tones)
NOISE_STD = 0.05  # additive Gaussian read noise
CLIP = (0.0, 1.0)


def sensor_shift(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Simulate the same scenes seen by a different camera.

    ``x`` holds images with values in [0, 1] (any shape). Returns float32
    ``clip(GAIN * x**GAMMA + OFFSET + noise, 0, 1)`` with Gaussian noise drawn from
    ``np.random.default_rng(seed)``, so the result is deterministic for a given seed.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise ValueError("sensor_shift expects values in [0, 1]")
    rng = np.random.default_rng(seed)
    y = GAIN * np.power(x, GAMMA) + OFFSET + rng.normal(0.0, NOISE_STD, size=x.shape)
    return np.clip(y, *CLIP).astype(np.float32)


def load_digits_split(seed: int = 0, test_fraction: float = 0.25):
    """Return ``(x_train, y_train, x_test, y_test)`` from ``sklearn.datasets.load_digits``.

    Images are float32 of shape (N, 1, 8, 8) scaled to [0, 1] (raw values 0..16
    divided by 16); labels are int64. The split is a fixed, stratified permutation
    (``sklearn.model_selection.train_test_split`` with ``random_state=seed``):
    1347 train / 450 test images for the defaults.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return (
        np.ascontiguousarray(x_train, dtype=np.float32),
        np.ascontiguousarray(y_train, dtype=np.int64),
        np.ascontiguousarray(x_test, dtype=np.float32),
        np.ascontiguousarray(y_test, dtype=np.int64),
    )
