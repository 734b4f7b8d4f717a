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


PAPER_PREDICTOR = "B first zero"


def failure_distances(results: dict) -> dict[float, list[float]]:
    """{base: the half-accuracy distance of each of its models} from a from-scratch results file
    (``from_scratch.run_experiment``): where each model's accuracy, pooled over its probes at a
    distance, first falls halfway from perfect to chance (``crossing_distance``). Bases with a
    model still above halfway at the largest distance, or already below it at the shortest, are
    left out: their failure distance is censored, not measured."""
    from shortlab.rope_experiment.from_scratch import ExperimentConfig, base_runs, upgrade
    from shortlab.rope_experiment.measurements import crossing_distance, halfway_level

    results = upgrade(results)
    config = ExperimentConfig.from_dict(results["config"])
    distances = np.asarray(results["distances"], dtype=np.float64)
    task = config.task(n_queries=1)
    halfway = halfway_level(1 / len(task.value_alphabet) ** task.value_length)
    found: dict[float, list[float]] = {}
    for entry in results["bases"]:
        runs = base_runs(results, entry["base"])
        if runs is None:
            continue
        curves = np.stack([np.asarray(run["correct"], dtype=np.float64).mean(1) for run in runs])  # [models, distances]
        crossings = crossing_distance(distances, curves, halfway)
        if np.isfinite(crossings).all() and (curves[:, 0] > halfway).all():
            found[entry["base"]] = [float(c) for c in crossings]
    return found


def model_weights(results: dict) -> dict[float, np.ndarray]:
    """{base: per-frequency weights [d/2]}: the pooled query–key variance weights of every head
    of every model fine-tuned with that base, averaged (the B_w of those models)."""
    from shortlab.rope_experiment.from_scratch import base_runs, upgrade

    results = upgrade(results)
    weights = {}
    for entry in results["bases"]:
        runs = base_runs(results, entry["base"])
        if runs is not None:
            stacked = np.concatenate([np.asarray(run["variance_weights"], dtype=np.float64).reshape(-1, np.shape(
                run["variance_weights"])[-1]) for run in runs])  # [models × layers × heads, d/2]
            weights[entry["base"]] = stacked.mean(0)
    return weights


def predictor_comparison(results: dict, depths: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5), *,
                         margin: float = 0.05, seed: int = 0) -> dict:
    """Every predictor's leave-one-base-out error on a from-scratch experiment's failure distances
    (``failure_distances``): B and B_w (``model_weights``) at each depth c of ``depths``. Then the
    claim "the paper's bound (B's first zero) predicts where retrieval fails better than the best
    alternative" (the predictor of least error among those whose distances differ from the
    paper's at some base), judged on the paired difference of their errors (paper − best other; negative
    favours the paper) by more than ``margin`` (a mean |log| error of 0.05 is about 5 % of the
    distance). Returns {"measured", "predicted", "rows" [{"predictor", "error" (Interval or None
    when it never fires at some base)}], "best_alternative", "difference", "verdict"}; with fewer
    than three measured bases, only "measured" and a "reason"."""
    from shortlab.rope_experiment.from_scratch import ExperimentConfig, upgrade
    from shortlab.stats import verdict

    results = upgrade(results)
    config = ExperimentConfig.from_dict(results["config"])
    measured = failure_distances(results)
    if len(measured) < 3 or any(len(values) < 2 for values in measured.values()):
        return {"measured": measured, "reason": f"{len(measured)} bases with a measured failure distance in every model "
                                                "(at least 3 bases, each with 2 models, are needed)"}
    bases = sorted(measured)
    limit = 100 * config.context
    weights = model_weights(results)
    predicted = {**predicted_distances(bases, config.head_dim, depths, limit),
                 **predicted_distances(bases, config.head_dim, depths, limit, weights={b: weights[b] for b in bases})}
    rows = [{"predictor": name, "error": leave_one_base_out(measured, table, seed=seed)} for name, table in predicted.items()]
    usable = {row["predictor"]: row["error"] for row in rows if row["error"] is not None}
    # an alternative predicts other distances than the paper's bound somewhere (B_w's first zero
    # with near-equal weights may not)
    others = {name: error for name, error in usable.items()
              if name != PAPER_PREDICTOR and any(predicted[name][b] != predicted[PAPER_PREDICTOR][b] for b in bases)}
    if PAPER_PREDICTOR not in usable or not others:
        return {"measured": measured, "predicted": predicted, "rows": rows,
                "reason": "the paper's bound or every alternative never fires at some measured base"}
    best = min(others, key=lambda name: others[name].estimate)
    difference = paired_error_difference(measured, predicted[PAPER_PREDICTOR], predicted[best], seed=seed)
    return {"measured": measured, "predicted": predicted, "rows": rows, "best_alternative": best,
            "difference": difference, "verdict": verdict(difference, 0.0, claim="below", margin=margin)}
