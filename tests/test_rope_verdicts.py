"""Each verdict function of the RoPE experiments driven to each of its outcomes on synthetic
data, and a model that never learned retrieval supported by none of them."""

import numpy as np
import pytest

from shortlab.rope_experiment import bound_verdicts, shipped_bound_verdict, summarize
from shortlab.rope_experiment.measurements import (
    fails_beyond_verdict, gated_family, gated_verdict, half_accuracy_summary, passkey_chance,
)
from shortlab.stats import CANNOT_TELL, CONTRADICTED, EQUIVALENT, SUPPORTED, Interval, wilson_interval

CHANCE = 0.1  # halfway level 0.55


def rate(correct, n=400):
    return wilson_interval(correct, n)


@pytest.mark.parametrize("within,beyond,outcome", [
    (390, 20, SUPPORTED),  # retrieves within, fails beyond
    (390, 380, CONTRADICTED),  # retrieves beyond the bound too
    (390, 220, CANNOT_TELL),  # beyond straddles halfway
    (60, 20, CANNOT_TELL),  # does not retrieve within its bound: untestable
    (220, 20, CANNOT_TELL),  # cannot tell whether it retrieves within
])
def test_fails_beyond_reaches_every_outcome(within, beyond, outcome):
    result = fails_beyond_verdict(rate(within), rate(beyond), CHANCE)
    assert result["verdict"] == outcome
    if within < 300:
        assert "retrieve" in result["reason"]


def test_gated_verdict_outcomes_and_gate():
    def interval(low, high):
        return Interval((low + high) / 2, low, high, 0.95, "test")
    assert gated_verdict(interval(0.2, 0.3), 0.0, claim="above", margin=0.05, reason=None)["verdict"] == SUPPORTED
    assert gated_verdict(interval(-0.02, 0.03), 0.0, claim="above", margin=0.05, reason=None)["verdict"] == EQUIVALENT
    assert gated_verdict(interval(-0.3, -0.1), 0.0, claim="above", margin=0.05, reason=None)["verdict"] == CONTRADICTED
    assert gated_verdict(interval(-0.1, 0.3), 0.0, claim="above", margin=0.05, reason=None)["verdict"] == CANNOT_TELL
    gated = gated_verdict(interval(0.2, 0.3), 0.0, claim="above", margin=0.05, reason="no retrieval")
    assert gated["verdict"] == CANNOT_TELL and gated["reason"] == "no retrieval"


def curve(rates, trials=200, seeds=1, seed=0):
    """0/1 outcomes [seeds, distances, trials] with exactly these rates per distance."""
    rng = np.random.default_rng(seed)
    out = np.zeros((seeds, len(rates), trials))
    for j, r in enumerate(rates):
        for s in range(seeds):
            row = np.zeros(trials)
            row[: round(r * trials)] = 1
            out[s, j] = rng.permutation(row)
    return out


DISTANCES = [10, 20, 40, 80, 120]


@pytest.mark.parametrize("rates,bound,outcome", [
    ([1, 1, 1, 0.1, 0.1], 40, SUPPORTED),  # halves past the bound
    ([1, 0.1, 0.1, 0.1, 0.1], 80, CONTRADICTED),  # halves at about 15, well before 80
    ([0.1, 0.1, 0.1, 0.1, 0.1], 5, CANNOT_TELL),  # below halfway from the first distance, beyond the bound
])
def test_half_accuracy_verdict_reaches_every_outcome(rates, bound, outcome):
    assert half_accuracy_summary(DISTANCES, curve(rates), CHANCE, bound)["verdict"] == outcome


def passkey_rows(rates, distances, trials=20, seed=0):
    found = curve(rates, trials, seed=seed)[0]
    return [{"distance": d, "n": trials, "correct": int(f.sum()), "found": f.astype(int).tolist()}
            for d, f in zip(distances, found)]


def perplexity(scale, rows=16):
    return {"rows": {"nll_sum": [[100.0 * scale + i % 3] for i in range(rows)], "count": [[50.0]] * rows}}


PASSKEY_DISTANCES = [20, 40, 60, 100, 140, 200]


def test_bound_verdicts_reach_their_outcomes():
    control = {"bound": 4000, "passkey": passkey_rows([1] * 6, PASSKEY_DISTANCES), "perplexity": perplexity(1.0)}
    failing = {"bound": 60, "passkey": passkey_rows([1, 1, 1, 0, 0, 0], PASSKEY_DISTANCES), "perplexity": perplexity(1.0)}
    result = bound_verdicts(failing, control, 256)
    assert result["fails_beyond"]["verdict"] == SUPPORTED
    assert result["control_minus_run_beyond"]["verdict"] == SUPPORTED
    assert result["perplexity_ratio"]["verdict"] == SUPPORTED and result["overall"] == SUPPORTED
    holding = dict(failing, passkey=passkey_rows([1] * 6, PASSKEY_DISTANCES), perplexity=perplexity(1.5))
    result = bound_verdicts(holding, control, 256)
    assert result["fails_beyond"]["verdict"] == CONTRADICTED
    assert result["control_minus_run_beyond"]["verdict"] == EQUIVALENT
    assert result["perplexity_ratio"]["verdict"] == CONTRADICTED and result["overall"] == CONTRADICTED
    # a control that does not retrieve beyond the bound: the run cannot fall short of it
    weak = dict(control, passkey=passkey_rows([1, 1, 1, 0, 0, 0], PASSKEY_DISTANCES))
    claim = bound_verdicts(failing, weak, 256)["control_minus_run_beyond"]
    assert claim["verdict"] != SUPPORTED


def test_shipped_bound_verdict_outcomes():
    assert shipped_bound_verdict(passkey_rows([1, 1, 1, 0, 0, 0], PASSKEY_DISTANCES), 60)["fails_beyond"]["verdict"] == SUPPORTED
    assert shipped_bound_verdict(passkey_rows([1] * 6, PASSKEY_DISTANCES), 60)["fails_beyond"]["verdict"] == CONTRADICTED
    weak = shipped_bound_verdict(passkey_rows([0.2, 0.2, 0.2, 0, 0, 0], PASSKEY_DISTANCES), 60)
    assert weak["fails_beyond"]["verdict"] == CANNOT_TELL and "does not retrieve" in weak["fails_beyond"]["reason"]
    assert weak["within_minus_beyond"]["verdict"] == CANNOT_TELL


def test_gated_family_keeps_untestable_settings_undecided():
    intervals = {"a": dict(estimate=0.1, low=0.05, high=0.15, method="t", reason=None),
                 "b": dict(estimate=0.1, low=0.05, high=0.15, method="t", reason="does not retrieve")}
    family = gated_family(intervals, 0.55, claim="below")
    assert family.per_setting == {"a": SUPPORTED, "b": CANNOT_TELL}
    assert family.holm["b"] == CANNOT_TELL


# ---------------------------------------------------------------- a model that never learned

NEVER_LEARNED = [0.47, 0.19, 0.35, 0.25, 0.42, 0.19]  # near chance at every distance


def test_a_model_that_never_learned_is_supported_by_no_passkey_verdict():
    control = {"bound": 4000, "passkey": passkey_rows(NEVER_LEARNED, PASSKEY_DISTANCES, seed=1),
               "perplexity": perplexity(1.0)}
    for bound in (30, 60, 150):
        run = {"bound": bound, "passkey": passkey_rows(NEVER_LEARNED, PASSKEY_DISTANCES), "perplexity": perplexity(1.0)}
        result = bound_verdicts(run, control, 256)
        for claim in ("fails_beyond", "within_minus_beyond", "control_minus_run_beyond"):
            assert result[claim]["verdict"] != SUPPORTED, (bound, claim)
        assert result["overall"] != SUPPORTED
        shipped = shipped_bound_verdict(run["passkey"], bound)
        assert SUPPORTED not in (shipped["fails_beyond"]["verdict"], shipped["within_minus_beyond"]["verdict"])
        half = half_accuracy_summary(PASSKEY_DISTANCES, curve(NEVER_LEARNED, 20), passkey_chance(), bound)
        assert half.get("verdict") != SUPPORTED


def scratch_results(accuracy_by_base, seeds=(0, 1), trials=30):
    """A from-scratch results dict with these per-distance accuracies for each base (the last
    base is the control)."""
    from dataclasses import asdict

    from shortlab.rope_experiment import ExperimentConfig
    config = ExperimentConfig(context=64, hidden_size=32, num_layers=1, head_dim=16, bases=(30.0, 120.0),
                              bound_fractions=(0.5,), seeds=seeds, probe_distances=(8, 16, 24, 40, 56),
                              probe_trials=trials, perplexity_rows=8, position_bins=4, n_records=4, n_queries=2)
    distances = config.distances()
    bases = config.finetune_bases()
    runs = {}
    for i, base in enumerate(bases):
        for seed in seeds:
            runs[f"{base!r}|{seed}"] = {
                "base": base, "seed": seed, "correct": curve(accuracy_by_base[i], trials, seed=seed + 10 * i)[0].tolist(),
                "bin_nll": (np.full((8, 4), 40.0) + np.arange(8)[:, None]).tolist(), "bin_counts": [16.0] * 4,
                "covariance_bounds": [[10, 20]], "variance_bounds": [[10, 20]]}
    return {"config": asdict(config), "distances": distances, "position_edges": config.position_edges(),
            "bases": [{"base": b, "bound": config.bound(b), "control": b == config.pretrain_base} for b in bases],
            "pretrained": {"correct": curve(NEVER_LEARNED[:5], trials)[0].tolist()}, "runs": runs}


def test_summarize_never_learned_supports_nothing():
    results = scratch_results([NEVER_LEARNED[:5]] * 3)
    summary = summarize(results)
    assert summary["pretrained"]["learned"] != SUPPORTED
    for row in summary["bases"]:
        for key in ("verdict", "relative_verdict"):
            assert row.get(key) != SUPPORTED, (row["base"], key)
        assert row["half_accuracy"].get("verdict") != SUPPORTED


def test_summarize_reaches_supported_and_contradicted():
    failing = [1, 1, 0.1, 0.1, 0.1]
    summary = summarize(scratch_results([failing, [1] * 5, [1] * 5]))
    rows = {row["base"]: row for row in summary["bases"]}
    bounds = {row["base"]: row["bound"] for row in summary["bases"]}
    assert bounds[30.0] < 24 < 40 < 56
    assert rows[30.0]["verdict"] == SUPPORTED and rows[30.0]["relative_verdict"] == SUPPORTED
    if "verdict" in rows[120.0]:
        assert rows[120.0]["verdict"] == CONTRADICTED
    assert summary["practical"]["accuracy_margin"] == 0.05
