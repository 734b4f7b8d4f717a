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
* ``verdict(interval, threshold, margin=...)`` — judges a claim against a *practical size*: the
  quantity is claimed to lie beyond ``threshold`` by more than ``margin``. "supported" when the
  whole interval does, "the same within the margin" (an equivalence: a tie) when the whole
  interval lies within ``threshold ± margin``, "contradicted" when the whole interval falls short
  of the practical size, otherwise "cannot tell at this sample size". ``describe`` words an
  outcome with its margin ("the same within ±0.02"); ``at_ceiling`` names a tie at the ceiling.
* ``family_verdicts(intervals, ...)`` — the same verdicts for a family of settings, beside the
  ones that survive Holm's step-down adjustment (family-wise error 5 %), and how many would come
  out either way by chance alone.
* ``sample_size_to_tell(interval, n, ...)`` — roughly how many items would make an undecided
  interval decide (the width shrinks as 1/√n).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

SUPPORTED = "supported"
CONTRADICTED = "contradicted"
CANNOT_TELL = "cannot tell at this sample size"
EQUIVALENT = "the same within the margin"
OUTCOMES = (SUPPORTED, EQUIVALENT, CONTRADICTED, CANNOT_TELL)


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
        values = (self.estimate, self.low, self.high)
        magnitude = max(abs(v) for v in values)
        # scientific notation only where three decimals cannot show the interval: all of it below
        # 0.001 (a perplexity ratio of 2e-06) or above 1e5 (a perplexity of 1.5e+09)
        if math.isfinite(magnitude) and (0 < magnitude < 1e-3 or magnitude >= 1e5):
            return "{:.3g} [{:.3g}, {:.3g}]".format(*values)
        # rounded first, so that -0.0004 reads 0.000 rather than a negative zero
        return "{:.3f} [{:.3f}, {:.3f}]".format(*(round(v, 3) + 0.0 for v in values))


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


def group_difference_interval(values: Sequence[float] | np.ndarray, groups: Sequence, first, second,
                              clusters: Sequence | None = None, *, level: float = 0.95,
                              n_resamples: int = 4000, seed: int = 0) -> Interval:
    """Interval of mean(values over the items of group ``first``) − mean(over group ``second``),
    ``values`` [n] and ``groups`` [n] aligned, resampling whole ``clusters`` (one label per item:
    a resampled cluster brings its items of both groups, so groups measured on the same images,
    e.g. two question families asked about each image, stay paired). Clusters holding no item of
    either group are ignored; each item is its own cluster when ``clusters`` is None."""
    _check_resampling(level, n_resamples)
    array = _as_values(values)
    labels = np.asarray(groups)
    if labels.shape != array.shape:
        raise ValueError(f"groups must give one label per value: {labels.shape} vs {array.shape}")
    in_first, in_second = labels == first, labels == second
    for name, mask in ((first, in_first), (second, in_second)):
        if not mask.any():
            raise ValueError(f"no item belongs to group {name!r}")
    keep = in_first | in_second
    cluster_labels = np.arange(array.size) if clusters is None else np.asarray(clusters)
    if cluster_labels.shape != array.shape:
        raise ValueError(f"clusters must give one label per value: {cluster_labels.shape} vs {array.shape}")
    _, index = np.unique(cluster_labels[keep], return_inverse=True)
    size = int(index.max()) + 1
    kept_values, kept_first = array[keep], in_first[keep]
    sums = np.stack([np.bincount(index, weights=kept_values * mask, minlength=size)
                     for mask in (kept_first, ~kept_first)])  # [2, clusters]
    counts = np.stack([np.bincount(index, weights=mask.astype(np.float64), minlength=size)
                       for mask in (kept_first, ~kept_first)])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, size, size=(n_resamples, size))
    drawn_sums, drawn_counts = sums[:, draws].sum(-1), counts[:, draws].sum(-1)  # [2, resamples]
    valid = (drawn_counts > 0).all(0)
    differences = drawn_sums[0, valid] / drawn_counts[0, valid] - drawn_sums[1, valid] / drawn_counts[1, valid]
    tail = (1 - level) / 2
    low, high = np.quantile(differences, [tail, 1 - tail])
    estimate = array[in_first].mean() - array[in_second].mean()
    return Interval(float(estimate), float(low), float(high), level, f"bootstrap over {size} clusters")


def _check_claim(claim: str) -> None:
    if claim not in ("above", "below"):
        raise ValueError(f"claim must be 'above' or 'below', got {claim!r}")


def _check_margin(margin: float) -> float:
    if not (margin >= 0 and math.isfinite(margin)):
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    return float(margin)


def verdict(interval: Interval, threshold: float = 0.0, *, claim: str = "above", margin: float = 0.0) -> str:
    """Judge the claim "the quantity is ``claim`` ``threshold`` by more than ``margin``" (the
    practical size: the smallest difference that matters) from ``interval``.

    For ``claim="above"`` (``"below"`` mirrors it), with edge ``e = threshold + margin``:

    * ``SUPPORTED`` when ``low > e``: the whole interval clears the practical size;
    * ``EQUIVALENT`` when ``threshold − margin ≤ low`` and ``high ≤ e`` (needs ``margin > 0``):
      the quantity equals ``threshold`` within ± ``margin`` — a tie, which denies the claim;
    * ``CONTRADICTED`` when ``high < e``: the claimed practical difference is ruled out;
    * ``CANNOT_TELL`` otherwise: the interval reaches both sides of ``e``.

    With ``margin=0`` this is the plain test of "above ``threshold``".
    """
    _check_claim(claim)
    margin = _check_margin(margin)
    sign = 1.0 if claim == "above" else -1.0
    # in "above" coordinates: the distance of each end beyond the threshold
    low, high = sorted((sign * (interval.low - threshold), sign * (interval.high - threshold)))
    if low > margin:
        return SUPPORTED
    if margin > 0 and low >= -margin and high <= margin:
        return EQUIVALENT
    if high < margin:
        return CONTRADICTED
    return CANNOT_TELL


def family_outcome(verdicts, *, tie_holds: bool) -> str:
    """One verdict for a claim that needs every one of ``verdicts`` (links of a chain, settings of
    a family): contradicted when any is; when ``tie_holds`` (a claim of keeping, such as "loses at
    most the tolerance") supported when all are supported or ties, the same within the margin
    when all are ties; otherwise (a claim of beating) a tie at any link denies it as a tie;
    supported only when every one is; otherwise cannot tell."""
    verdicts = list(verdicts)
    if not verdicts:
        return CANNOT_TELL
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    if tie_holds:
        if all(v == EQUIVALENT for v in verdicts):
            return EQUIVALENT
        return SUPPORTED if all(v in (SUPPORTED, EQUIVALENT) for v in verdicts) else CANNOT_TELL
    if EQUIVALENT in verdicts:
        return EQUIVALENT
    return SUPPORTED if all(v == SUPPORTED for v in verdicts) else CANNOT_TELL


def describe(outcome: str, margin: float | None = None, unit: str = "") -> str:
    """An outcome in words; an equivalence names its margin ("the same within ±0.02")."""
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}; expected one of {OUTCOMES}")
    if outcome == EQUIVALENT and margin is not None:
        return f"the same within ±{margin:g}{unit}"
    return outcome


def at_ceiling(*intervals: Interval, ceiling: float = 1.0, margin: float = 0.01) -> bool:
    """Whether every one of ``intervals`` (accuracies, say) reaches within ``margin`` of
    ``ceiling``: two settings both there cannot differ by more than the room left, so a tie
    between them says nothing about how they would differ on a harder task."""
    if not intervals:
        raise ValueError("at_ceiling needs at least one interval")
    return all(interval.high >= ceiling - margin and interval.estimate >= ceiling - 2 * margin
               for interval in intervals)


def _one_sided_p(interval: Interval, edge: float, side: str) -> float:
    """Normal-approximation p-value of "the quantity is beyond ``edge`` on ``side``" (``"above"``
    or ``"below"``), with the standard error read from the interval's half on that side, so that
    p < (1 − level) / 2 exactly when that end of the interval clears ``edge``."""
    z = NormalDist().inv_cdf(0.5 + interval.level / 2)
    if side == "above":
        spread = (interval.estimate - interval.low) / z
        distance = interval.estimate - edge
    else:
        spread = (interval.high - interval.estimate) / z
        distance = edge - interval.estimate
    if spread <= 0:
        return 0.0 if distance > 0 else 1.0
    return 1.0 - NormalDist().cdf(distance / spread)


def holm_reject(p_values: Sequence[float], alpha: float) -> list[bool]:
    """Holm's step-down procedure: which of ``p_values`` are rejected with family-wise error at
    most ``alpha``. Sorted ascending, the i-th smallest (from 0) is compared with alpha / (m − i);
    the first one that fails stops the rejections."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or not np.all((p >= 0) & (p <= 1)):
        raise ValueError("p_values must be a 1-D sequence of probabilities")
    rejected = [False] * p.size
    for rank, index in enumerate(np.argsort(p, kind="stable")):
        if p[index] > alpha / (p.size - rank):
            break
        rejected[int(index)] = True
    return rejected


@dataclass(frozen=True)
class FamilyVerdicts:
    """Verdicts for a family of settings judged on one claim: ``per_setting`` as each interval
    alone gives them, ``holm`` after Holm's adjustment for the family, and ``expected_by_chance``:
    how many settings would come out "supported" (or, separately, "contradicted") by chance alone
    if every true value sat exactly on the practical edge (each side errs with (1 − level) / 2)."""

    per_setting: dict[str, str]
    holm: dict[str, str]
    expected_by_chance: float
    level: float

    def counts(self, adjusted: bool = False) -> dict[str, int]:
        verdicts = (self.holm if adjusted else self.per_setting).values()
        return {outcome: sum(v == outcome for v in verdicts) for outcome in OUTCOMES}

    def summary(self, margin: float | None = None) -> str:
        """One sentence: the counts before and after Holm's adjustment."""
        def words(counts):
            return ", ".join(f"{n} {describe(outcome, margin)}" for outcome, n in counts.items() if n) or "none"
        m = len(self.per_setting)
        alone = f"{m} settings, each judged alone" if m != 1 else "1 setting, judged alone"
        return (f"{alone}: {words(self.counts())} (were every true value on the "
                f"practical edge, about {self.expected_by_chance:.1f} of {m} would come out supported by chance, and as "
                "many contradicted); after Holm's "
                f"adjustment for the family (family-wise error {1 - self.level:.0%}): {words(self.counts(adjusted=True))}.")


def family_verdicts(intervals: Mapping[str, Interval], threshold: float = 0.0, *, claim: str = "above",
                    margin: float = 0.0) -> FamilyVerdicts:
    """``verdict`` for every interval of a family, and the verdicts that survive Holm's
    step-down adjustment across it. Each interval's one-sided tests (its end beyond the practical
    edge; both ends inside ± margin for an equivalence) get normal-approximation p-values from the
    interval's own halves; each kind of outcome is adjusted over the family at (1 − level) / 2,
    the one-sided error of a single interval, so a family of one gives ``verdict`` itself."""
    _check_claim(claim)
    margin = _check_margin(margin)
    if not intervals:
        raise ValueError("family_verdicts needs at least one interval")
    names = list(intervals)
    levels = {interval.level for interval in intervals.values()}
    if len(levels) != 1:
        raise ValueError(f"the intervals of one family must share a level, got {sorted(levels)}")
    level = levels.pop()
    alpha = (1 - level) / 2
    forward, backward = ("above", "below") if claim == "above" else ("below", "above")
    edge = threshold + margin if claim == "above" else threshold - margin
    far_edge = threshold - margin if claim == "above" else threshold + margin
    p_supported = [_one_sided_p(intervals[n], edge, forward) for n in names]
    p_short = [_one_sided_p(intervals[n], edge, backward) for n in names]
    p_equivalent = [max(_one_sided_p(intervals[n], far_edge, forward), _one_sided_p(intervals[n], edge, backward))
                    if margin > 0 else 1.0 for n in names]
    supported, equivalent, short = (holm_reject(p, alpha) for p in (p_supported, p_equivalent, p_short))
    holm = {}
    for i, name in enumerate(names):
        holm[name] = (SUPPORTED if supported[i] else EQUIVALENT if equivalent[i] and margin > 0
                      else CONTRADICTED if short[i] else CANNOT_TELL)
    per_setting = {name: verdict(intervals[name], threshold, claim=claim, margin=margin) for name in names}
    return FamilyVerdicts(per_setting, holm, alpha * len(names), level)


def sample_size_to_tell(interval: Interval, n: int, threshold: float = 0.0, *, margin: float = 0.0,
                        claim: str = "above") -> int | None:
    """Roughly how many items (of the kind that gave ``n``) would let an interval centred where
    this one is decide against the practical edge ``threshold ± margin``: the interval's half
    width shrinks as 1/√n, so it must fall below the estimate's distance from the edge. None when
    the estimate sits on the edge (no sample size decides it)."""
    _check_claim(claim)
    margin = _check_margin(margin)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    edge = threshold + margin if claim == "above" else threshold - margin
    distance = abs(interval.estimate - edge)
    if distance == 0 or interval.half_width == 0:
        return None
    return max(n, math.ceil(n * (interval.half_width / distance) ** 2))


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


class NothingToRecover(ValueError):
    """The pruned model is not below the dense one: no share of a loss can be recovered."""


def recovered_share_interval(dense: Sequence[float] | np.ndarray, pruned: Sequence[float] | np.ndarray,
                             healed: Sequence[Sequence[float]] | np.ndarray,
                             floor: Sequence[float] | np.ndarray | None = None,
                             counts: Sequence[float] | np.ndarray | None = None, *, level: float = 0.95,
                             n_resamples: int = 4000, seed: int = 0) -> Interval:
    """Share of what pruning lost that healing gives back, (H − P) / (D − P), from per-item scores
    where higher is better: ``dense`` [n] (D), ``pruned`` [n] (P) and ``healed`` [seeds, n] (H,
    one row per independent healing). Each mean is per item, or per unit of ``counts`` [n] (e.g.
    negative summed NLLs per block with their token counts: per-token log-likelihoods). With a
    per-item ``floor`` [n] (the best rule that needs no model), scores count only above it:
    P and H are raised to at least the floor's mean, so only the loss above the rule is to recover.
    A crossed bootstrap resamples the items and, independently, the healing seeds. A resample
    where the pruned model lost nothing (D ≤ P) has no share: when more than the interval's tail
    (2.5 %) of them do, the loss itself is uncertain and the interval is unbounded (any verdict
    on it is "cannot tell"). Raises ``NothingToRecover`` when the full data show no loss."""
    _check_resampling(level, n_resamples)
    d, p = _as_values(dense, "dense"), _as_values(pruned, "pruned")
    h = np.asarray(healed, dtype=np.float64)
    if h.ndim == 1:
        h = h[None, :]
    if d.shape != p.shape or h.shape[1:] != d.shape or not np.isfinite(h).all():
        raise ValueError(f"dense {d.shape}, pruned {p.shape} and healed [seeds, items] {h.shape} must be aligned "
                         "item by item (finite values)")
    w = np.ones_like(d) if counts is None else _as_values(counts, "counts")
    if w.shape != d.shape or not np.all(w > 0):
        raise ValueError(f"counts must be positive, one per item: got shape {w.shape} for {d.size} items")
    f = None if floor is None else np.broadcast_to(np.asarray(floor, dtype=np.float64), d.shape)

    def share(items: np.ndarray, seeds: np.ndarray) -> float:
        weight = w[items].sum()
        dense_mean, pruned_mean = d[items].sum() / weight, p[items].sum() / weight
        healed_mean = h[np.ix_(seeds, items)].sum() / (weight * len(seeds))
        if f is not None:
            rule = f[items].sum() / weight
            pruned_mean, healed_mean = max(pruned_mean, rule), max(healed_mean, rule)
        lost = dense_mean - pruned_mean
        return (healed_mean - pruned_mean) / lost if lost > 0 else math.nan

    estimate = share(np.arange(d.size), np.arange(h.shape[0]))
    if math.isnan(estimate):
        raise NothingToRecover("the pruned model is not below the dense one (above the floor): nothing to recover")
    rng = np.random.default_rng(seed)
    shares = np.array([share(rng.integers(0, d.size, size=d.size), rng.integers(0, h.shape[0], size=h.shape[0]))
                       for _ in range(n_resamples)])
    valid = ~np.isnan(shares)
    tail = (1 - level) / 2
    method = f"crossed bootstrap over {h.shape[0]} healing seeds x {d.size} items"
    if (~valid).mean() > tail:
        return Interval(float(estimate), -math.inf, math.inf, level, method + (
            f"; unbounded: {int((~valid).sum())} of {n_resamples} resamples had nothing lost"))
    low, high = np.quantile(shares[valid], [tail, 1 - tail])
    if not valid.all():
        method += f" ({int((~valid).sum())} of {n_resamples} resamples had nothing lost)"
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


def strongest_rule(rules: Mapping[str, Sequence[float] | np.ndarray]) -> tuple[str, np.ndarray]:
    """The rule with the highest mean score among ``rules`` = {name: per-item score [n]} (rules
    that need no model: chance, the question-only prior, answer length, a blank input), with its
    scores. An accuracy is judged against this one, not against chance alone. Picking the best
    rule on the same items flatters the rule, never the model."""
    if not rules:
        raise ValueError("no rules given")
    scores = {name: _as_values(values, name) for name, values in rules.items()}
    sizes = {values.size for values in scores.values()}
    if len(sizes) != 1:
        raise ValueError(f"every rule must score the same items, got sizes {sorted(sizes)}")
    best = max(scores, key=lambda name: scores[name].mean())
    return best, scores[best]


def above_strongest_rule(correct: Sequence[float] | np.ndarray, rules: Mapping[str, Sequence[float] | np.ndarray],
                         *, margin: float, clusters: Sequence | None = None, seed: int = 0) -> dict:
    """Judge "the model scores more than ``margin`` above the strongest rule that needs no model"
    on the same items (paired bootstrap over items, or over ``clusters``). Returns {rule, rule_score,
    difference: Interval, verdict}."""
    name, values = strongest_rule(rules)
    difference = paired_interval(correct, values, clusters, seed=seed)
    return {"rule": name, "rule_score": float(values.mean()), "difference": difference,
            "verdict": verdict(difference, 0.0, margin=margin)}
