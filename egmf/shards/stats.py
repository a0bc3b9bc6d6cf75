"""Per-dimension feature statistics of a split, for standardising the model's inputs.

    stats = FeatureStats()
    stats.add(frames, finite)         # one sample's [L, D] float32 frames and where they are finite
    stats.as_dict()                   # {"mean": [D], "std": [D], "frames": n, "zero_variance_dims": n}

Public acoustic features put values of very different scales side by side
(COVAREP: pitch in Hz next to coefficients near 0-1), and a per-frame
LayerNorm does not fix that: the large dimensions dominate every frame. The
builder therefore records each dimension's mean and standard deviation over a
split's finite values (non-finite ones are zeroed in the shards and left out
here), and the model standardises with its train split's numbers.

Samples are merged with Chan et al.'s parallel update of (count, mean, M2), in
float64, so the variance of a dimension with a large mean and a small spread
does not cancel away. A dimension whose deviation is (near) zero, or that has
no finite value at all, gets std 1: standardising it only removes its mean.
"""

from __future__ import annotations

import numpy as np

MIN_STD = 1e-6


class FeatureStats:
    def __init__(self):
        self.count = self.mean = self.m2 = None

    def add(self, frames: np.ndarray, finite: np.ndarray) -> None:
        values = np.where(finite, frames, 0.0).astype(np.float64)
        count = finite.sum(0).astype(np.float64)  # [D]
        mean = values.sum(0) / np.maximum(count, 1)
        m2 = (np.where(finite, values - mean, 0.0) ** 2).sum(0)
        if self.count is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        share = np.divide(count, total, out=np.zeros_like(total), where=total > 0)
        self.m2 = self.m2 + m2 + delta**2 * self.count * share
        self.mean = self.mean + delta * share
        self.count = total

    def as_dict(self) -> dict:
        if self.count is None:
            return {}
        std = np.sqrt(np.divide(self.m2, self.count, out=np.zeros_like(self.m2), where=self.count > 0))
        flat = std < MIN_STD
        return {
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in np.where(flat, 1.0, std)],
            "frames": int(self.count.max()),
            "zero_variance_dims": int(flat.sum()),
        }
