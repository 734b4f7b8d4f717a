"""95 % intervals and the verdicts drawn from them, for every comparative claim in the notebooks.

* ``wilson_interval(successes, n)`` — a proportion (accuracy, retrieval rate): Wilson's score
  interval, which stays inside [0, 1] and behaves at 0 or n successes, unlike mean ± 2 SE.
* ``bootstrap_interval(values, clusters=None)`` — the mean of per-item values (correct 0/1,
  NLL per block, a paired difference) by the percentile bootstrap. With ``clusters`` the
  resampling draws whole clusters (all questions about one image, all tokens of one block), since
  items that share a cluster are not independent; the statistic is then the item mean of the
  drawn clusters (a ratio estimator), so clusters of different sizes weigh by their size.
* ``paired_interval(a, b, clusters=None)`` — the mean of ``a − b`` over aligned items (two models
  on the same questions), which is far tighter than comparing two separate intervals.
* ``verdict(interval, threshold)`` — "supported" when the whole interval lies on the claimed
  side of ``threshold``, "contradicted" when it lies wholly on the other side, and otherwise
  "cannot tell at this sample size".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

SUPPORTED = "supported"
CONTRADICTED = "contradicted"
CANNOT_TELL = "cannot tell at this sample size"


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided interval at ``level``; ``method`` says how it was made."""

    estimate: float
    low: float
    high: float
    level: float
    method: str

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _check_level(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return level


def wilson_interval(successes: int, n: int, level: float = 0.95) -> Interval:
    """Wilson score interval for ``successes`` out of ``n`` trials."""
    _check_level(level)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in 0..{n}, got {successes}")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    spread = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Interval(p, max(0.0, centre - spread), min(1.0, centre + spread), level, "Wilson")


def _as_values(values: Sequence[float] | np.ndarray, name: str = "values") -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite entries")
    return array


def _cluster_sums(values: np.ndarray, clusters: Sequence | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster (sum, count); each item is its own cluster when ``clusters`` is None."""
    if clusters is None:
        return values, np.ones_like(values)
    labels = np.asarray(clusters)
    if labels.shape != values.shape:
        raise ValueError(f"clusters must give one label per value: {labels.shape} vs {values.shape}")
    _, index = np.unique(labels, return_inverse=True)
    return np.bincount(index, weights=values), np.bincount(index).astype(np.float64)


def bootstrap_interval(values: Sequence[float] | np.ndarray, clusters: Sequence | None = None, *,
                       level: float = 0.95, n_resamples: int = 4000, seed: int = 0) -> Interval:
    """Percentile-bootstrap interval of the mean of ``values`` [n], resampling whole ``clusters``
    (one label per value) when given. Seeded: the same inputs give the same interval."""
    _check_level(level)
    if n_resamples < 100:
        raise ValueError(f"n_resamples must be at least 100, got {n_resamples}")
    array = _as_values(values)
    sums, counts = _cluster_sums(array, clusters)
    rng = np.random.default_rng(seed)
    n_clusters = sums.size
    draws = rng.integers(0, n_clusters, size=(n_resamples, n_clusters))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    method = f"bootstrap over {n_clusters} clusters" if clusters is not None else "bootstrap"
    return Interval(float(array.mean()), float(low), float(high), level, method)


def paired_interval(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                    clusters: Sequence | None = None, *, level: float = 0.95,
                    n_resamples: int = 4000, seed: int = 0) -> Interval:
    """Interval of mean(a − b) over aligned items (``a[i]`` and ``b[i]`` measure the same item)."""
    first, second = _as_values(a, "a"), _as_values(b, "b")
    if first.shape != second.shape:
        raise ValueError(f"a and b must be aligned item by item: {first.shape} vs {second.shape}")
    return bootstrap_interval(first - second, clusters, level=level, n_resamples=n_resamples, seed=seed)


def verdict(interval: Interval, threshold: float = 0.0, *, claim: str = "above") -> str:
    """Judge the claim "the quantity is ``claim`` ``threshold``" from ``interval``.

    ``claim="above"``: supported when ``low > threshold``, contradicted when ``high < threshold``;
    ``claim="below"`` mirrors it. Anything else (the interval straddles the threshold) cannot be
    told apart at this sample size.
    """
    if claim not in ("above", "below"):
        raise ValueError(f"claim must be 'above' or 'below', got {claim!r}")
    above, below = interval.low > threshold, interval.high < threshold
    if claim == "below":
        above, below = below, above
    if above:
        return SUPPORTED
    if below:
        return CONTRADICTED
    return CANNOT_TELL
