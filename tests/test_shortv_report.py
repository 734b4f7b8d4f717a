"""Notebook 02's sections, run on a synthetic sweep whose answers are known: each section's record
follows the answers it reads, its figure has nothing that fails a reader, and the closing
findings name every claim."""

import numpy as np
import pytest
import torch
import transformers

from shortlab.llava_mini import evidence, report
from shortlab.llava_mini.sweep import PredictionStore
from shortlab.llava_mini.tasks import task as find_task
from shortlab.plotting import figure_problems
from shortlab.references import paper_numbers
from shortlab.stats import CONTRADICTED, EQUIVALENT, SUPPORTED

NUM_LAYERS = 6
CONFIG = evidence.EvidenceConfig(n_eval=60, frozen_counts=(1, 3), lc_counts=(2,), random_seeds=(0, 1, 2),
                                 shortv_n=2, fastv_k=1, fastv_ratios=(0.5,), combined_ratios=(0.5,), n_calib=2,
                                 pool_size=4, stability_sizes=(1, 2), stability_seeds=(0, 1))


def synthetic_sweep(lc_keeps: float = 0.97, margin: float = 0.01) -> report.Sweep:
    """Easy-VQA test questions answered by a plan whose dense model is right on 90 % of them, whose
    blank image guesses "yes", whose LC choice keeps ``lc_keeps`` of the dense model's right
    answers, and whose random draws and other settings keep 60 %."""
    rng = np.random.default_rng(0)
    vqa = find_task("easy-vqa")
    items = vqa.questions("test")[:300]
    calib = evidence.Calibration({pool: rng.random((CONFIG.pool_size, NUM_LAYERS)) for pool in evidence.POOLS},
                                 rng.random((CONFIG.n_calib, NUM_LAYERS)) + 1.0, rng.random(NUM_LAYERS))
    plan = evidence.evidence_plan(CONFIG, calib, NUM_LAYERS, matched_fastv_ratio=0.3)
    dense_right = rng.random(len(items)) < 0.9
    store = PredictionStore(None, {})

    def answers(keep):
        right = dense_right & (rng.random(len(items)) < keep)
        return [item.answer if ok else ("no" if item.answer != "no" else "yes") for item, ok in zip(items, right)]

    for row in plan:
        key = row["setting"].key
        if key in store.results:
            continue
        if row["family"] == "dense":
            store.results[key] = answers(1.0)
        elif row["family"] == "blank":
            store.results[key] = ["yes"] * len(items)
        elif row["choice"] == "layer_contribution" or row["family"] == "stability":
            store.results[key] = answers(lc_keeps)
        else:
            store.results[key] = answers(0.6)
    ev = evidence.Evidence(items, calib, plan, store, None)
    return report.Sweep(ev, vqa, margin=margin, tolerance=0.05, seed=0, n_text=20, n_visual=64)


@pytest.fixture(scope="module")
def sections():
    sweep = synthetic_sweep()
    lc = report.layer_contributions(sweep, CONFIG, CONFIG.shortv_n, 0.1)
    base = report.baselines(sweep)
    choices = report.layer_choices(sweep, CONFIG.random_seeds)
    text_config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                           num_key_value_heads=2, num_hidden_layers=NUM_LAYERS)
    front = report.frontier(sweep, text_config, CONFIG.fastv_k, CONFIG.shortv_n, base.dense)
    tokens = report.token_choice(sweep, choices, CONFIG.shortv_n)
    return dict(sweep=sweep, lc=lc, base=base, choices=choices, front=front, tokens=tokens,
                loss=report.losses(sweep, choices, base, CONFIG.shortv_n),
                types=report.type_losses(sweep, choices, base, CONFIG.shortv_n),
                stable=report.stability(sweep, sweep.setting("shortv", choice="layer_contribution", N=CONFIG.shortv_n)))


def test_sections_follow_the_answers_they_read(sections):
    sweep, base, choices = sections["sweep"], sections["base"], sections["choices"]
    assert base.accuracy["dense"].estimate == pytest.approx(np.mean(base.dense)) and base.dense.mean() > 0.8
    assert base.claims["the dense model beats the blank image"].outcome == SUPPORTED
    assert set(choices.counts) == {1, 3} and choices.correct["random"][1].shape == (3, len(sweep.items))
    judged = choices.judgements()
    assert judged[3]["LC − random"].outcome == SUPPORTED  # LC keeps 97 % of the right answers, random 60 %
    assert {"N", "choice"} <= set(choices.curve.columns) and "not in the plan" in choices.curve_table().to_string()
    assert sections["lc"].layers == sorted(sections["lc"].order[:CONFIG.shortv_n])
    assert sections["lc"].judgement.outcome == SUPPORTED  # text LC was drawn one nat above visual LC


def test_a_large_loss_is_contradicted_and_a_small_one_is_not():
    for keeps, expected in ((0.97, {SUPPORTED, EQUIVALENT}), (0.5, {CONTRADICTED})):
        sweep = synthetic_sweep(lc_keeps=keeps)
        base, choices = report.baselines(sweep), report.layer_choices(sweep, CONFIG.random_seeds)
        assert report.losses(sweep, choices, base, CONFIG.shortv_n).judgement.outcome in expected


def test_tables_and_frontier_hold_every_setting(sections):
    front, sweep = sections["front"], sections["sweep"]
    methods = set(front.points.method)
    assert {"dense", "ShortV (LC)", "FastV at ShortV's FLOPs", "ShortV + FastV"} <= methods
    assert front.points.loc[front.points.method == "dense", "flops_fraction"].iloc[0] == pytest.approx(1.0)
    assert (front.points.loc[front.points.method != "dense", "flops_fraction"] < 1).all()
    assert front.shortv_vs_fastv is not None and len(front.combination_table()) == 2
    rule = report.against_rule(sweep, sections["base"], sections["choices"], sections["tokens"], front)
    assert "random N=1" in rule.table(0.01).index and rule.rule in sections["base"].rules
    stable = sections["stable"]
    chosen = stable.chosen(sections["lc"].layers, NUM_LAYERS)
    assert chosen.index[0] == "main" and chosen.shape == (len(stable.table) + 1, NUM_LAYERS)
    assert "Every calibration subset freezes layers" in report.chosen_words(chosen)


def test_figures_have_nothing_that_fails_a_reader(sections):
    sweep, base, choices = sections["sweep"], sections["base"], sections["choices"]
    chosen = sections["stable"].chosen(sections["lc"].layers, NUM_LAYERS)
    built = [report.figure_layer_contribution(sections["lc"], "LC"), report.figure_baselines(base, "baselines"),
             report.figure_frozen_layers(sweep, choices, base, "curves"),
             report.figure_type_losses(sections["types"], 0.05, "types"),
             report.figure_choices_by_task({"easy-VQA": choices.comparisons}, 0.01),
             report.figure_token_choice(sweep, sections["tokens"], base, "tokens"),
             report.figure_frontier(sections["front"], base, paper_numbers("shortv"), "frontier"),
             report.figure_stability(sections["stable"], base, CONFIG.shortv_n, "tiny"),
             report.figure_lc_heatmaps(sweep, chosen, CONFIG.shortv_n, "heatmaps")]
    import matplotlib.pyplot as plt

    for fig in built:
        assert figure_problems(fig) == [], fig.axes[0].get_title()
        plt.close(fig)


def test_findings_name_every_claim(sections):
    text = report.findings(**{k: sections[k] for k in ("sweep", "lc", "base", "choices", "loss", "types", "tokens",
                                                        "front", "stable")},
                           model_name="tiny", num_layers=NUM_LAYERS, n=CONFIG.shortv_n,
                           comparisons={"easy-VQA": sections["choices"].comparisons, "other": sections["choices"].comparisons},
                           second_model="other-model", references=paper_numbers("shortv"), lc_margin=0.1)
    for claim in ("Text tokens contribute more", "keeps the accuracy", "LC chooses better layers than visual cosine at N = 3",
                  "ShortV beats FastV at the same FLOPs", "calibration subsets", "On other (other-model)"):
        assert claim in text
    # the paper's layer-choice ablation (19 of 32 layers) is quoted once, at the N whose share of the layers is nearest
    references = paper_numbers("shortv")
    paper_share = len(references["frozen_layers"]["LLaVA-1.5-7B"]) / references["frozen_layers"]["decoder_layers"]["LLaVA-1.5-7B"]
    nearest = min(sections["choices"].judgements(), key=lambda k: abs(k / NUM_LAYERS - paper_share))
    assert text.count("The paper's LC beats cosine") == 1 and f"in accuracy at N = {nearest}" in text


def test_the_paper_is_met_at_the_share_of_layers_nearest_its_own():
    assert report.nearest_share([6, 12, 18, 24], 30, 19 / 32) == 18  # not the largest count
    assert report.nearest_share([2, 4], 24, 19 / 32) == 4
    assert report.nearest_share([16], 16, 19 / 32) == 16


def test_explorer_opens_on_a_question_the_frozen_model_gets_wrong():
    sweep = synthetic_sweep()
    dense = [item.answer for item in sweep.items]
    frozen = list(dense)
    frozen[7] = "wrong"
    items = report.explorer_items(sweep, dense, frozen, images=2)
    assert items[0] is sweep.items[7]
    assert len({item.image_id for item in items}) == 2
    assert report.explorer_items(sweep, dense, dense, images=1)[0] is sweep.items[0]


def test_exact_copy_is_float32_and_leaves_the_model_alone():
    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    before = model.weight.detach().clone()
    with report.exact_copy(model) as exact:
        assert exact is not model and exact.weight.dtype == torch.float32
        exact.weight.data.zero_()
    assert model.weight.dtype == torch.bfloat16 and torch.equal(model.weight, before)
    full = torch.nn.Linear(4, 3)
    with report.exact_copy(full) as exact:
        assert exact is full


def test_plain_vs_package_lines_up_questions_and_layers():
    table = report.plain_vs_package([[0.1, 0.2], [0.3, 0.4]], [[0.1, 0.25], [0.3, 0.4]], [0, 5])
    assert list(table.index) == [(0, 0), (0, 5), (1, 0), (1, 5)]
    assert table["|difference|"].max() == pytest.approx(0.05)


def test_notebook_config_uses_the_options_or_the_fast_sizes():
    options = {"n_eval": None, "n_calib": 40, "frozen_counts": [6, 12], "lc_counts": [3], "random_draws": 4,
               "fastv_k": 2, "fastv_ratios": [0.5], "combined_ratios": [0.5], "stability_sizes": [10], "stability_seeds": 2,
               "photos": ["astronaut", "coffee"], "speed_model": "x", "speed_repeats": 5, "second_model": "y",
               "second_dtype": "float32"}
    config, used, n = report.notebook_config("easy-vqa", 18, options, seed=3)
    assert n == 18 and config.random_seeds == (0, 1, 2, 3) and config.frozen_counts == (6, 12) and used == options
    fast, used, n = report.notebook_config("easy-vqa", 18, options, fast=True, model="tiny", dtype="bfloat16")
    assert n == fast.shortv_n and used["speed_model"] is None and used["photos"] == ["astronaut"]
    assert used["second_model"] == "tiny" and options["speed_model"] == "x"  # the caller's dict is not changed


def test_paper_words_come_from_the_references():
    references = paper_numbers("shortv")
    words = report.paper_share_words(references, 9, 30)
    assert "9 of 30 layers (30%)" in words and str(len(references["frozen_layers"]["LLaVA-1.5-7B"])) in words
    assert "MMBench" in report.token_ablation_words(references)
    assert "x at N =" in report.published_speed_words(references)
