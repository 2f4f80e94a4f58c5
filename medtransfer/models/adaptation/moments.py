"""Per-channel moments merged exactly across batches, so AdaBN does not depend on batch size."""

from __future__ import annotations

import numpy as np


class Moments:
    """Per-channel count, mean and sum of squared deviations, merged exactly (Chan et al.)."""

    def __init__(self):
        self.count = 0
        self.mean = np.zeros(0)
        self.m2 = np.zeros(0)

    def add(self, count: int, mean: np.ndarray, variance: np.ndarray) -> None:
        if count == 0:
            return
        mean = mean.astype(np.float64)
        m2 = variance.astype(np.float64) * count
        if self.count == 0:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * count / total)
        self.count = total

    @property
    def variance(self) -> np.ndarray:
        return self.m2 / self.count
