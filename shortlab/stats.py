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
* ``crossed_bootstrap_interval(values, clusters)`` — the mean of a [draws, items] table whose
  rows are random draws of a method (e.g. seeded random layer choices) scored on the same items:
  draws and item clusters are resampled independently, so the interval covers both the spread
  between draws and the sampling of the items.
* ``perplexity_interval(nll_sums, counts)`` and ``paired_perplexity_ratio(a, b, counts)`` —
  perplexity over held-out blocks, and one model's over another's on the same blocks, resampling
  blocks (tokens of one block are not independent).
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


def _check_resampling(level: float, n_resamples: int) -> None:
    _check_level(level)
    if n_resamples < 100:
        raise ValueError(f"n_resamples must be at least 100, got {n_resamples}")


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
    # the clamps to p keep rounding (a last-bit error at p = 0 or 1) from putting p outside its interval
    return Interval(p, min(p, max(0.0, centre - spread)), max(p, min(1.0, centre + spread)), level, "Wilson")


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


def ratio_interval(sums: Sequence[float] | np.ndarray, counts: Sequence[float] | np.ndarray, *,
                   level: float = 0.95, n_resamples: int = 4000, seed: int = 0,
                   method: str = "bootstrap") -> Interval:
    """Percentile-bootstrap interval of Σ sums / Σ counts over clusters (one entry per cluster:
    e.g. a block's total NLL and its token count), resampling whole clusters. Seeded."""
    _check_resampling(level, n_resamples)
    sums, counts = _as_values(sums, "sums"), _as_values(counts, "counts")
    if sums.shape != counts.shape:
        raise ValueError(f"sums and counts must be aligned: {sums.shape} vs {counts.shape}")
    if (counts <= 0).any():
        raise ValueError("every cluster needs a positive count")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, sums.size, size=(n_resamples, sums.size))
    ratios = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail])
    return Interval(float(sums.sum() / counts.sum()), float(low), float(high), level, method)


def bootstrap_interval(values: Sequence[float] | np.ndarray, clusters: Sequence | None = None, *,
                       level: float = 0.95, n_resamples: int = 4000, seed: int = 0) -> Interval:
    """Percentile-bootstrap interval of the mean of ``values`` [n], resampling whole ``clusters``
    (one label per value) when given. Seeded: the same inputs give the same interval."""
    array = _as_values(values)
    sums, counts = _cluster_sums(array, clusters)
    method = f"bootstrap over {sums.size} clusters" if clusters is not None else "bootstrap"
    return ratio_interval(sums, counts, level=level, n_resamples=n_resamples, seed=seed, method=method)


def crossed_bootstrap_interval(values: Sequence[Sequence[float]] | np.ndarray, clusters: Sequence | None = None, *,
                               level: float = 0.95, n_resamples: int = 4000, seed: int = 0) -> Interval:
    """Percentile-bootstrap interval of the mean of ``values`` [draws, items], resampling the rows
    (independent random draws) and, independently, the item ``clusters`` (one label per column;
    each item its own cluster when None). The estimate is the mean over all draws and items."""
    _check_resampling(level, n_resamples)
    table = np.asarray(values, dtype=np.float64)
    if table.ndim != 2 or 0 in table.shape:
        raise ValueError(f"values must be a non-empty [draws, items] table, got shape {table.shape}")
    if not np.isfinite(table).all():
        raise ValueError("values contains NaN or infinite entries")
    if clusters is None:
        labels = np.arange(table.shape[1])
    else:
        labels = np.asarray(clusters)
        if labels.shape != (table.shape[1],):
            raise ValueError(f"clusters must give one label per item (column): {labels.shape} vs {table.shape[1]}")
    _, index = np.unique(labels, return_inverse=True)
    n_clusters = int(index.max()) + 1
    # sums[d, c]: draw d's total over cluster c; counts[c]: the cluster's size
    sums = np.stack([np.bincount(index, weights=row, minlength=n_clusters) for row in table])
    counts = np.bincount(index, minlength=n_clusters).astype(np.float64)
    rng = np.random.default_rng(seed)
    estimates = np.empty(n_resamples)
    for r in range(n_resamples):
        draws = rng.integers(0, table.shape[0], size=table.shape[0])
        chosen = rng.integers(0, n_clusters, size=n_clusters)
        estimates[r] = sums[np.ix_(draws, chosen)].sum() / (counts[chosen].sum() * table.shape[0])
    tail = (1 - level) / 2
    low, high = np.quantile(estimates, [tail, 1 - tail])
    return Interval(float(table.mean()), float(low), float(high), level,
                    f"crossed bootstrap over {table.shape[0]} draws x {n_clusters} clusters")


def perplexity_interval(nll_sums: Sequence[float] | np.ndarray, counts: Sequence[float] | np.ndarray, *,
                        level: float = 0.95, n_resamples: int = 4000, seed: int = 0) -> Interval:
    """Perplexity exp(Σ NLL / Σ tokens) with its interval, resampling held-out blocks (one entry
    per block: its summed NLL in nats and its number of predicted tokens)."""
    log_ppl = ratio_interval(nll_sums, counts, level=level, n_resamples=n_resamples, seed=seed,
                             method=f"bootstrap over {len(counts)} blocks")
    return Interval(math.exp(log_ppl.estimate), math.exp(log_ppl.low), math.exp(log_ppl.high), level,
                    log_ppl.method)


def paired_perplexity_ratio(nll_sums_a: Sequence[float] | np.ndarray, nll_sums_b: Sequence[float] | np.ndarray,
                            counts: Sequence[float] | np.ndarray, *, level: float = 0.95,
                            n_resamples: int = 4000, seed: int = 0) -> Interval:
    """Perplexity of model a over model b on the same blocks, exp(Σ(NLL_a − NLL_b) / Σ tokens),
    with a paired interval (blocks resampled jointly): above 1 means a is worse."""
    a, b = _as_values(nll_sums_a, "nll_sums_a"), _as_values(nll_sums_b, "nll_sums_b")
    if a.shape != b.shape:
        raise ValueError(f"the two models must be scored on the same blocks: {a.shape} vs {b.shape}")
    log_ratio = ratio_interval(a - b, counts, level=level, n_resamples=n_resamples, seed=seed,
                               method=f"paired bootstrap over {len(counts)} blocks")
    return Interval(math.exp(log_ratio.estimate), math.exp(log_ratio.low), math.exp(log_ratio.high), level,
                    log_ratio.method)


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


def retained_fraction_interval(pruned: Sequence[float] | np.ndarray, dense: Sequence[float] | np.ndarray,
                               chance: Sequence[float] | np.ndarray | float = 0.0, *, level: float = 0.95,
                               n_resamples: int = 4000, seed: int = 0) -> Interval:
    """Share of the dense model's score a pruned model keeps, (mean(pruned) − c) / (mean(dense) − c)
    with c = mean(chance), by a paired bootstrap over items (``pruned[i]``, ``dense[i]`` and
    ``chance[i]`` are the same question). ``chance=0`` gives the plain ratio the ShortGPT paper
    reports ("% retained"); a per-item chance level (1 / number of choices) counts only what the
    models score above guessing. A resample where the dense model is not above c gives no ratio
    and is dropped (the interval then says so in ``method``)."""
    _check_resampling(level, n_resamples)
    a, b = _as_values(pruned, "pruned"), _as_values(dense, "dense")
    if a.shape != b.shape:
        raise ValueError(f"pruned and dense must be aligned item by item: {a.shape} vs {b.shape}")
    c = np.broadcast_to(np.asarray(chance, dtype=np.float64), a.shape)
    if b.mean() <= c.mean():
        raise ValueError(f"the dense mean {b.mean():.4f} is not above the chance level {c.mean():.4f}: "
                         "no share of it can be retained")
    draws = np.random.default_rng(seed).integers(0, a.size, size=(n_resamples, a.size))
    above = b[draws].mean(axis=1) - c[draws].mean(axis=1)
    valid = above > 0
    ratios = (a[draws].mean(axis=1)[valid] - c[draws].mean(axis=1)[valid]) / above[valid]
    tail = (1 - level) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail])
    method = "paired bootstrap over items"
    if not valid.all():
        method += f" ({int((~valid).sum())} of {n_resamples} resamples had the dense model at chance)"
    estimate = (a.mean() - c.mean()) / (b.mean() - c.mean())
    return Interval(float(estimate), float(low), float(high), level, method)


def equivalence_verdict(interval: Interval, margin: float, centre: float = 0.0) -> str:
    """Judge "the quantity is within ``centre`` ± ``margin``" (e.g. an interaction that is
    negligible): supported when the whole interval lies inside, contradicted when it lies wholly
    outside on one side, otherwise it cannot be told at this sample size."""
    if not margin > 0:
        raise ValueError(f"margin must be positive, got {margin}")
    if interval.low > centre - margin and interval.high < centre + margin:
        return SUPPORTED
    if interval.low > centre + margin or interval.high < centre - margin:
        return CONTRADICTED
    return CANNOT_TELL
