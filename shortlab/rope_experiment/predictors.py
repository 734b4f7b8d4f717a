"""Which feature of B(m) predicts the distance at which retrieval fails?

The paper's bound is the first zero of B(m) = Σ_i cos(m θ_i): the largest context L_θ over which
B stays non-negative. Retrieval need not fail there: B can dip a little below zero and come back,
and a model may only lose its way once the dip is deep. The candidates compared here, each a
distance per RoPE base (and per weighting of the frequencies):

* ``first_zero``: the first m with B(m) < 0 (the paper's L_θ + 1);
* ``first_below(c)``: the first m with B(m) < −c · B(0), for a grid of depths c;
* either of them computed from B_w, the frequencies weighted by a model's own query–key
  variances (``rope.bias.pair_weights``).

``leave_one_base_out`` judges a predictor against measured half-accuracy distances: the one
free scale (measured ≈ s · predicted, fitted in log space on the other bases) is fitted without
the base it then predicts, and the error is |log(measured / (s · predicted))|, averaged over the
held-out bases; its interval resamples the independently pretrained models (seeds) of every base,
so it needs at least two per base. It holds the seed-to-seed noise only, not which bases happened
to be measured; and a depth c picked from a grid on the same bases is optimistic: compare the
grid's predictors as hypotheses, each with its own interval, not only the best of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from shortlab.rope.bias import bias_from_frequencies, rope_frequencies
from shortlab.stats import Interval


def bias_curve(base: float, head_dim: int, limit: int, weights: Sequence[float] | None = None) -> np.ndarray:
    """B(m) (or B_w(m) with per-frequency ``weights`` [d/2]) for m = 0 … ``limit``, float64."""
    return bias_from_frequencies(np.arange(limit + 1), rope_frequencies(base, head_dim), weights)


def first_below(curve: np.ndarray, depth: float = 0.0) -> int | None:
    """The first m with ``curve[m]`` < −depth · curve[0] (``depth`` 0: the first negative value,
    the paper's bound + 1); None when the curve never goes that low."""
    if curve.ndim != 1 or curve.size == 0 or not curve[0] > 0:
        raise ValueError("curve must be a 1-D B(m) starting at a positive B(0)")
    if depth < 0:
        raise ValueError(f"depth must be non-negative, got {depth}")
    below = np.flatnonzero(curve < -depth * curve[0])
    return int(below[0]) if below.size else None


def predicted_distances(bases: Sequence[float], head_dim: int, depths: Sequence[float], limit: int,
                        weights: Mapping[float, Sequence[float]] | None = None) -> dict[str, dict[float, int | None]]:
    """{predictor name: {base: distance}} for every depth c (``"B < -c·B(0)"``; c = 0 is the
    paper's first zero), from B or, with ``weights`` ({base: per-frequency weights}), from B_w
    (names prefixed ``"B_w"``)."""
    prefix = "B" if weights is None else "B_w"
    table: dict[str, dict[float, int | None]] = {}
    for base in bases:
        curve = bias_curve(base, head_dim, limit, None if weights is None else weights[base])
        for depth in depths:
            name = f"{prefix} first zero" if depth == 0 else f"{prefix} < -{depth:g}·B(0)"
            table.setdefault(name, {})[base] = first_below(curve, depth)
    return table


def _fit_scale(measured: Mapping[float, float], predicted: Mapping[float, float], bases) -> float:
    """exp(mean log(measured / predicted)) over ``bases``: the least-squares scale in log space."""
    return math.exp(np.mean([math.log(measured[b] / predicted[b]) for b in bases]))


def _lobo_error(predicted: Mapping[float, float], means: Mapping[float, float]) -> float:
    """Mean over held-out bases of |log(measured / (scale fitted on the others · predicted))|."""
    bases = sorted(means)
    return float(np.mean([abs(math.log(means[held] / (_fit_scale(means, predicted, [b for b in bases if b != held])
                                                       * predicted[held]))) for held in bases]))


def _measured(measured: Mapping[float, Sequence[float]]) -> dict:
    bases = sorted(measured)
    if len(bases) < 3:
        raise ValueError(f"leave-one-base-out needs at least 3 bases, got {len(bases)}")
    values = {base: np.asarray(measured[base], dtype=np.float64) for base in bases}
    if any(v.size < 2 or not np.all(v > 0) for v in values.values()):
        raise ValueError("every base needs positive measured distances from at least two independently pretrained "
                         "models: the interval resamples them")
    return values


def _resampled(values: Mapping[float, np.ndarray], statistic, n_resamples: int, seed: int, level: float):
    """``statistic`` of the geometric-mean distance per base, and its percentile interval over
    resamples of each base's pretrained models."""
    estimate = statistic({base: float(np.exp(np.log(v).mean())) for base, v in values.items()})
    rng = np.random.default_rng(seed)
    draws = [statistic({base: float(np.exp(np.log(v[rng.integers(0, v.size, v.size)]).mean()))
                        for base, v in values.items()}) for _ in range(n_resamples)]
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return estimate, float(low), float(high)


def _usable(predicted: Mapping[float, int | None], bases) -> bool:
    return all(predicted.get(base) not in (None, 0) for base in bases)


def leave_one_base_out(measured: Mapping[float, Sequence[float]], predicted: Mapping[float, int | None], *,
                       n_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> Interval | None:
    """Mean leave-one-base-out error |log(measured / (s · predicted))| of one predictor, with a
    bootstrap interval over the independently pretrained models of each base.

    ``measured``: {base: half-accuracy distance of each seed}; ``predicted``: {base: distance}
    (None where the predictor never fires within its scan: the predictor is then unusable and
    None is returned). Needs at least three bases (two to fit the scale on, one to predict)."""
    values = _measured(measured)
    if not _usable(predicted, values):
        return None
    estimate, low, high = _resampled(values, lambda means: _lobo_error(predicted, means), n_resamples, seed, level)
    seeds = sorted({v.size for v in values.values()})
    return Interval(estimate, low, high, level,
                    f"bootstrap over {'/'.join(map(str, seeds))} pretrained models per base, {len(values)} bases")


def paired_error_difference(measured: Mapping[float, Sequence[float]], first: Mapping[float, int],
                            second: Mapping[float, int], *, n_resamples: int = 2000, seed: int = 0,
                            level: float = 0.95) -> Interval:
    """Leave-one-base-out error of ``first`` minus that of ``second`` on the same resamples of the
    pretrained models (negative: ``first`` predicts better)."""
    values = _measured(measured)
    if not (_usable(first, values) and _usable(second, values)):
        raise ValueError("both predictors need a distance at every base")
    estimate, low, high = _resampled(values, lambda means: _lobo_error(first, means) - _lobo_error(second, means),
                                     n_resamples, seed, level)
    return Interval(estimate, low, high, level, "paired bootstrap over the pretrained models")
