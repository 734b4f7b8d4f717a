"""Notebook 03's report functions on small inputs whose answers are known (the notebook's FAST
run exercises all of them end to end)."""


import numpy as np
import pytest

from shortlab import rope
from shortlab.plotting import figure_problems
from shortlab.rope_experiment import report


def plain_bias(m, base, head_dim):
    theta = base ** (-np.arange(0, head_dim, 2) / head_dim)
    return np.cos(np.outer(m, theta)).sum(axis=1)


def plain_bound(base, head_dim, limit):
    negative = np.flatnonzero(plain_bias(np.arange(limit + 1), base, head_dim) < 0)
    return int(negative[0]) - 1 if negative.size else limit


def no_problems(fig):
    import matplotlib.pyplot as plt

    problems = figure_problems(fig)
    plt.close(fig)
    return problems == []


def test_options_shrink_in_fast_mode_and_leave_the_callers_dict_alone():
    options = {"mc_samples": 20000, "passkey_trials": 3, "torch_threads": 1}
    used, contexts = report.notebook_options(options, contexts=["1K", "2K", "4K", "8K", "16K"], fast=True)
    assert used["mc_samples"] == report.FAST_SIZES["mc_samples"] and contexts == ["1K", "2K", "4K", "8K"]
    assert options["mc_samples"] == 20000 and report.notebook_options(options, contexts=["1K"])[0] == options


def test_plain_functions_agree_with_the_package_and_a_wrong_one_is_caught():
    gap, rows = report.plain_versus_package(plain_bias, plain_bound, [1e4, 5e5], 64, limit=20_000)
    assert gap < 1e-9 and all(plain == package for _, plain, package in rows)
    wrong, _ = report.plain_versus_package(lambda m, b, d: plain_bias(m, b, d) + 1e-3, plain_bound, [1e4], 64, limit=1000)
    assert wrong > 1e-4
    relative, trace = report.relative_position_check(32, 1e4)
    assert relative < 1e-9 and trace < 1e-9


def test_monte_carlo_matches_the_theorem_and_its_figure_reads():
    mc = report.monte_carlo(1e4, 32, samples=400, sigma=0.5, max_distance=200, seed=0)
    assert mc.distances[0] == 0 and np.abs(mc.z).max() < 5 and "within 2 s.e." in mc.words()
    assert no_problems(report.figure_monte_carlo(mc))


def test_bound_table_islands_and_trend_on_short_contexts():
    tables = report.bound_tables(["1K", "2K", "4K"], 128, 1e-2)
    assert [row["context"] for row in tables[1024]] == ["1K", "2K", "4K"]
    assert "context L (k=1024)" in report.bound_table_text(tables)
    published = {"1K": 4.3e3, "2K": 1.6e4}
    verdicts = report.published_verdicts(published, tables, 128)
    assert [v["context"] for v in verdicts] == ["1K", "2K"] and all("finding" in v for v in verdicts)
    assert "contexts with 1K = 1024" in report.published_words(verdicts, published, tables)
    found = report.islands(tables, "2K", 128, 60)
    assert found.valid.shape == (60,) and found.valid[found.bases >= found.row["stable"]].mean() > 0.5
    assert no_problems(report.figure_islands(found, 128))
    figure, fits = report.figure_bound_trend(tables, published, 128)
    assert set(fits) == {"smallest (ours)", "stable (ours)", "published"} and no_problems(figure)


def test_model_bounds_name_the_configs_whose_bound_is_below_their_span():
    models = rope.rope_report()
    text = report.model_bounds_text(models)
    assert f"of {len(models)} model/layer types attend over more tokens" in text
    assert ("<- bound below span" in text) == any(not row["bound_covers_span"] for row in models)
    assert no_problems(report.figure_model_bounds(models))


def test_stored_passkey_is_read_when_the_store_measured_this_model():
    rows = [{"distance": d, "n": 4, "correct": c, "rate": c / 4, "low": 0.0, "high": 1.0, "found": [1] * c + [0] * (4 - c)}
            for d, c in ((256, 4), (512, 4), (4096, 1), (8000, 0))]
    protocols = {"model": "m", "trials": 4, "seed": 0, "distances": [256, 512, 4096, 8000],
                 "runs": {"essays-windows|float32": {"rows": rows, "seconds": 12.0}}}
    passkey = report.stored_passkey(protocols, None, None, "m", "float32", distances=[1], trials=1, seed=0,
                                    accuracy_margin=0.05, bound=3615)
    assert passkey.rows is rows and passkey.origin.startswith("read from the protocols store")
    words = passkey.words(3615)
    assert "found within the bound: 8/8" in words and "found beyond the bound: 1/8" in words
    assert passkey.claims is not None and "fails beyond the bound" in words


def test_a_missing_finetune_store_is_named_and_a_present_one_summarised():
    from shortlab.rope_experiment.report import RealModel

    class Setup:
        head_dim, max_position_embeddings = 64, 8192

    class Variant:
        base = 100000.0

    real = RealModel("smollm2-135m", Setup(), Variant(), 3615)
    found, words = report.finetunes(["results/rope_finetune/nothing.json"], {"accuracy_margin": 0.05}, real)
    assert found == [] and "does not exist" in words
    path = report.repository_path("results/rope_finetune/smollm2-135m-retrieval-trained.json")
    if not path.is_file():
        pytest.skip("the committed fine-tuning store is absent")
    found, words = report.finetunes([str(path)], {"accuracy_margin": 0.05}, real)
    assert len(found) == 1 and "MISMATCH" not in words and no_problems(report.figure_finetune(found[0]))


def test_the_from_scratch_families_are_sentences_and_the_central_one_leads():
    from shortlab.findings import findings_markdown
    from shortlab.references import paper_numbers
    from shortlab.rope_experiment.findings import CENTRAL_CLAIM, central_finding, rope_findings

    practical = {"accuracy_margin": 0.05, "ppl_tolerance": 1.1, "ratio_margin": 0.1}
    scratch = report.from_scratch("results/rope_from_scratch/results.json", recompute=False, fast=False, device="cpu",
                                  practical=practical)
    if scratch is None:
        pytest.skip("the committed from-scratch store is absent")
    findings, _ = rope_findings(scratch.summary, [], None, paper_numbers("rope_base"), practical)
    family = [f for f in findings if f.claim.startswith("For small Llamas")]
    assert family and all(f.detail.split(" for ", 1)[0] in ("supported", "contradicted", "the same within the margin",
                                                            "cannot tell") and "bases after Holm" in f.detail
                          for f in family)
    central = central_finding(findings)
    assert central is not None and central.claim.endswith(CENTRAL_CLAIM)
    text = findings_markdown("", findings, headline=central)
    assert text.startswith("**In short.** The central claim, that for small Llamas")
    assert central_finding([f for f in findings if f is not central]) is None


def test_the_published_table_is_summarised_against_its_own_criterion():
    from shortlab.rope_experiment.findings import published_departure

    rows = [{"context": "1K", "finding": "holds under every convention"},
            {"context": "4K", "finding": "holds only with k=1000 closed"},
            {"context": "16K", "finding": "fails under every convention: B(12,223) < 0"},
            {"context": "32K", "finding": "fails under every convention: B(27,685) < 0"}]
    text = published_departure(rows)
    assert "holds under every convention for 1 of 4 contexts" in text
    assert "for 1 (4K)" in text and "under none for 2 (16K, 32K)" in text
    assert published_departure([]) == ""
