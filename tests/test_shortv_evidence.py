"""Notebook 02's evidence: the sweep plan, the calibration tables, the stores and the statistics
that turn per-question answers into verdicts (``shortlab.llava_mini.evidence``)."""

import json
import time

import numpy as np
import pytest
import torch

from shortlab import llava_mini as lm
from shortlab.arch import model_parts
from shortlab.contribution import layer_contribution, token_groups
from shortlab.llava_mini import evidence
from shortlab.llava_mini.sweep import PredictionStore, Setting, evaluate_setting
from shortlab.models import load_model
from shortlab.stats import CANNOT_TELL, CONTRADICTED, EQUIVALENT, SUPPORTED, bootstrap_interval, crossed_bootstrap_interval

# a plan small enough for a test on the tiny model: 2-question pools, one random draw per N
TINY = evidence.EvidenceConfig(n_eval=6, frozen_counts=(1,), lc_counts=(2,), random_seeds=(0, 1), shortv_n=2,
                               fastv_k=1, fastv_ratios=(0.5,), combined_ratios=(0.5,), n_calib=1, pool_size=2,
                               stability_sizes=(1, 2), stability_seeds=(0, 1))


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llava")


def synthetic_calibration(num_layers=6, pool_size=4, n_calib=2, seed=0):
    rng = np.random.default_rng(seed)
    return evidence.Calibration({pool: rng.random((pool_size, num_layers)) for pool in evidence.POOLS},
                                rng.random((n_calib, num_layers)), rng.random(num_layers))


# ---------------------------------------------------------------- statistics

def test_crossed_bootstrap_widens_with_the_spread_between_draws():
    rng = np.random.default_rng(0)
    clusters = np.repeat(np.arange(40), 5)
    base = (rng.random(200) < 0.6).astype(float)
    same = np.stack([base] * 10)  # ten identical draws: only the questions vary
    spread = np.stack([(rng.random(200) < p).astype(float) for p in np.linspace(0.2, 0.9, 10)])
    alone = crossed_bootstrap_interval(same, clusters)
    assert alone.estimate == pytest.approx(base.mean())
    clustered = bootstrap_interval(base, clusters)
    assert alone.half_width == pytest.approx(clustered.half_width, rel=0.25)
    assert crossed_bootstrap_interval(spread, clusters).half_width > 1.5 * alone.half_width
    assert crossed_bootstrap_interval(same, clusters) == alone  # seeded


@pytest.mark.parametrize("values, clusters, match", [
    (np.ones(5), None, "draws, items"),
    (np.ones((2, 3)), [0, 1], "one label per item"),
    (np.full((2, 2), np.nan), None, "NaN"),
])
def test_crossed_bootstrap_names_bad_input(values, clusters, match):
    with pytest.raises(ValueError, match=match):
        crossed_bootstrap_interval(values, clusters)


def test_loss_verdicts_and_the_largest_n_within_tolerance():
    clusters = np.arange(400) // 4
    dense = np.ones(400)
    frozen = {2: np.ones(400),  # no loss: the same within the tolerance, which keeps the accuracy
              4: np.r_[np.zeros(8), np.ones(392)],  # 2 % loss, but the interval reaches below 1 %
              6: np.r_[np.zeros(200), np.ones(200)]}  # 50 % loss: contradicted
    rows, largest, smallest_contradicted = evidence.max_frozen_within(dense, frozen, clusters, tolerance=0.01)
    assert [row["verdict"] for row in rows] == [EQUIVALENT, CANNOT_TELL, CONTRADICTED]
    assert (largest, smallest_contradicted) == (2, 6)
    assert rows[2]["loss"] == pytest.approx(0.5)
    _, none_supported, _ = evidence.max_frozen_within(dense, {6: frozen[6]}, clusters)
    assert none_supported is None


def test_chain_verdict_and_overlap():
    assert evidence.ordered_verdict([SUPPORTED, SUPPORTED]) == SUPPORTED
    assert evidence.ordered_verdict([SUPPORTED, CANNOT_TELL]) == CANNOT_TELL
    assert evidence.ordered_verdict([CANNOT_TELL, CONTRADICTED]) == CONTRADICTED
    assert evidence.ordered_verdict([]) == CANNOT_TELL
    assert evidence.jaccard((1, 2, 3), (2, 3, 4)) == pytest.approx(0.5)
    assert evidence.jaccard((), ()) == 1.0


def test_correct_needs_one_prediction_per_item():
    items = lm.fixed_test_questions(3, seed=1)
    assert evidence.correct(items, [it.answer for it in items]).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="one prediction per item"):
        evidence.correct(items, ["yes"])


# ---------------------------------------------------------------- the plan

@pytest.mark.parametrize("kwargs, match", [
    ({"n_calib": 100}, "n_calib"), ({"stability_sizes": (10, 90)}, "stability_sizes"),
    ({"random_seeds": (1, 1)}, "distinct"), ({"n_eval": 0}, "positive"),
])
def test_bad_configs_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        evidence.EvidenceConfig(**kwargs)


def test_plan_holds_every_family_with_layers_from_the_calibration():
    config = evidence.EvidenceConfig(frozen_counts=(2, 4, 9), lc_counts=(1, 3), random_seeds=(0, 1, 2), shortv_n=3,
                                     n_calib=2, pool_size=4, stability_sizes=(2, 4), stability_seeds=(0, 1))
    calib = synthetic_calibration()
    plan = evidence.evidence_plan(config, calib, num_layers=6, matched_fastv_ratio=0.4)
    by_family = {}
    for row in plan:
        by_family.setdefault(row["family"], []).append(row)
    main = calib.visual_lc["mixed"][:2].mean(0)
    lc_rows = {row["N"]: row["setting"] for row in by_family["shortv"] if row["choice"] == "layer_contribution"}
    assert sorted(lc_rows) == [1, 2, 3, 4, 6]  # 9 is clipped to the depth
    assert lc_rows[3].frozen_layers == tuple(sorted(np.argsort(main)[:3].tolist()))
    cosine = {row["N"]: row["setting"] for row in by_family["shortv"] if row["choice"] == "visual_cosine"}
    assert cosine[2].frozen_layers == tuple(sorted(np.argsort(calib.visual_cosine)[:2].tolist()))
    draws = [row for row in by_family["shortv"] if row["choice"] == "random" and row["N"] == 4]
    assert len(draws) == 3 and len({row["setting"] for row in draws}) > 1
    assert all(len(row["setting"].frozen_layers) == 4 for row in draws)
    assert [row["setting"].blank_image for row in by_family["blank"]] == [True]
    assert {row["choice"] for row in by_family["tokens"]} == {"text", "all", "random"}
    assert all(row["setting"].frozen_layers == lc_rows[3].frozen_layers for row in by_family["tokens"])
    assert [row["setting"].fastv_ratio for row in by_family["fastv"]] == [0.25, 0.5, 0.75, 0.9, 0.4]
    assert by_family["shortv+fastv"][0]["setting"].frozen_layers == lc_rows[3].frozen_layers
    # 4 pools x (2 seeds of size 2 + one subset of the whole pool)
    assert len(by_family["stability"]) == 12
    whole = [row for row in by_family["stability"] if row["pool"] == "mixed" and row["size"] == 4]
    assert whole[0]["setting"].frozen_layers == tuple(sorted(np.argsort(calib.visual_lc["mixed"].mean(0))[:3].tolist()))
    assert evidence.evidence_plan(config, calib, num_layers=6, matched_fastv_ratio=0.4) == plan  # deterministic


def test_stability_subsets_are_seeded_and_inside_the_pool():
    config = evidence.EvidenceConfig(pool_size=10, n_calib=5, stability_sizes=(3, 10), stability_seeds=(0, 1, 2))
    subsets = evidence.stability_subsets(config)
    assert len(subsets) == len(evidence.POOLS) * 4
    assert all(len(s["rows"]) == s["size"] and set(s["rows"]) <= set(range(10)) for s in subsets)
    assert subsets == evidence.stability_subsets(config)
    small = [s["rows"] for s in subsets if s["pool"] == "shape" and s["size"] == 3]
    assert len({tuple(rows) for rows in small}) > 1


def test_calibration_pools_are_typed_and_seeded():
    pools = evidence.calibration_pools(pool_size=12, seed=3)
    assert list(pools) == list(evidence.POOLS) and all(len(p) == 12 for p in pools.values())
    for kind in lm.QUESTION_TYPES:
        assert {lm.question_type(item) for item in pools[kind]} == {kind}
    assert pools == evidence.calibration_pools(pool_size=12, seed=3)


# ---------------------------------------------------------------- stores and fingerprints

def test_store_recomputes_a_stale_file_only_when_asked(tmp_path):
    path = tmp_path / "predictions.json"
    store = PredictionStore(path, {"weights": "a"})
    store.predictions(Setting(blank_image=True), lambda: ["yes", "no"])
    assert Setting(blank_image=True) in store and Setting() not in store
    with pytest.raises(ValueError, match="holds predictions for"):
        PredictionStore(path, {"weights": "b"})
    stale = PredictionStore(path, {"weights": "b"}, stale="recompute")
    assert stale.stale and not stale.results
    assert json.loads(path.read_text())["fingerprint"] == {"weights": "a"}, "untouched until the first write"
    stale.predictions(Setting(), lambda: ["no", "no"])
    assert json.loads(path.read_text())["fingerprint"] == {"weights": "b"}
    with pytest.raises(ValueError, match="stale must be"):
        PredictionStore(path, {}, stale="ignore")


def test_model_fingerprint_follows_the_weights_and_leaves_them_alone(tiny):
    model, _ = tiny
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    first = evidence.model_fingerprint(model)
    assert evidence.model_fingerprint(model) == first
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    parameter = next(p for name, p in model.named_parameters() if "language_model" in name and p.dim() == 2)
    with torch.no_grad():
        parameter.mul_(1.01)
    try:
        assert evidence.model_fingerprint(model) != first
    finally:
        with torch.no_grad():
            parameter.copy_(before[next(n for n, p in model.named_parameters() if p is parameter)])


def test_model_fingerprint_reads_large_tensors_to_their_last_entry():
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.zeros(2**24 + 3))  # float32 positions would round past the end
    first = evidence.model_fingerprint(model)
    with torch.no_grad():
        model.weight[-1] = 1.0
    assert evidence.model_fingerprint(model) != first


# ---------------------------------------------------------------- on the tiny model

def test_per_question_lc_is_layer_contribution_of_each_question_alone(tiny):
    model, processor = tiny
    items = evidence.calibration_pools(pool_size=2, seed=0)["mixed"]
    table = evidence.question_layer_contributions(model, processor, items)
    assert table.shape == (2, model_parts(model).num_layers)
    batch = processor(images=lm.easy_vqa_image("train", items[1].image_id),
                      text=lm.chat_text(processor, items[1].question), return_tensors="pt")
    expected = layer_contribution(model, batch, token_groups(model, batch["input_ids"])["visual"])
    assert table[1] == pytest.approx([expected[i] for i in range(table.shape[1])], rel=1e-5, abs=1e-9)


def test_blank_image_setting_shows_the_blank_image(tiny):
    model, processor = tiny
    items = lm.fixed_test_questions(4, seed=5)
    blank = evaluate_setting(model, processor, items, Setting(blank_image=True))
    by_hand = lm.evaluate_items(model, processor, items, batch_size=1, image=lm.blank_image())
    expected = {id(item): p for item, p, _ in by_hand["predictions"]}
    assert blank == [expected[id(item)] for item in items]


def test_prepare_and_run_resume_from_the_stores(tiny, tmp_path):
    model, processor = tiny
    messages = []
    first = evidence.prepare_evidence(model, processor, "tiny-llava", "float32", TINY, tmp_path, log=messages.append)
    calibration_file = evidence.store_path("tiny-llava", "calibration", tmp_path)
    assert calibration_file.is_file() and len(first.items) == TINY.n_eval
    distinct = len({row["setting"] for row in first.plan})
    assert first.missing() == distinct
    assert evidence.run_plan(model, processor, first.items, first.plan, first.store, features=first.features,
                             deadline=time.monotonic() - 1, log=messages.append) == distinct
    assert first.store.computed == 0 and any("time is up" in m for m in messages)
    assert evidence.run_plan(model, processor, first.items, first.plan[:3], first.store, features=first.features,
                             log=messages.append) == 0
    assert first.store.computed == 3

    calibration_written = calibration_file.stat().st_mtime_ns
    again = evidence.prepare_evidence(model, processor, "tiny-llava", "float32", TINY, tmp_path, log=messages.append)
    assert calibration_file.stat().st_mtime_ns == calibration_written, "the calibration is read back"
    assert again.missing() == distinct - 3 and again.plan == first.plan
    assert all(again.store.results[row["setting"].key] == first.store.results[row["setting"].key]
               for row in first.plan[:3])
    other_dtype = evidence.prepare_evidence(model, processor, "tiny-llava", "bfloat16-label", TINY, tmp_path,
                                            log=messages.append)
    assert other_dtype.store.stale and other_dtype.missing() == distinct


def test_run_plan_shares_the_first_layers_and_predicts_the_same(tiny):
    model, processor = tiny
    ev = evidence.prepare_evidence(model, processor, "tiny-llava", "float32", TINY, None, log=lambda m: None)
    messages = []
    shared, alone = (PredictionStore(None, ev.store.fingerprint) for _ in range(2))
    assert evidence.run_plan(model, processor, ev.items, ev.plan, shared, features=ev.features,
                             log=messages.append) == 0
    assert evidence.run_plan(model, processor, ev.items, ev.plan, alone, features=ev.features,
                             log=lambda m: None, share_prefix=False) == 0
    assert shared.results == alone.results
    assert any("share the dense model's first" in m for m in messages)
    sharing = int(messages[0].split(" of the ")[0])
    assert 2 <= sharing < len({row["setting"] for row in ev.plan})  # the blank image never shares
    assert any("reused" in m and "freed" in m for m in messages)
    # whole curves first: every random draw after the other points, the stability choices last
    family = {}
    for row in ev.plan:
        random_draw = row["family"] == "shortv" and row["choice"] == "random"
        family.setdefault(row["setting"].key, "random" if random_draw else row["family"])
    order = [family[m.split(" ", 5)[-1]] for m in messages if m.startswith("[")]
    tiers = [2 if f == "stability" else 1 if f == "random" else 0 for f in order]
    assert tiers == sorted(tiers)


def test_calibration_resumes_main_part_first_and_plans_only_complete_pools(tiny, tmp_path):
    model, processor = tiny
    config = evidence.EvidenceConfig(**{**TINY.__dict__, "pool_size": 3, "n_calib": 2, "stability_sizes": (3,)})
    path = tmp_path / "calibration.json"
    fingerprint = {"model": "tiny-llava"}
    with pytest.raises(TimeoutError, match="main calibration"):
        evidence.calibration(model, processor, config, path, fingerprint, deadline=time.monotonic() - 1)

    with pytest.raises(RuntimeError, match=r"mixed pool: 0 of 2 visual LC rows .*scripts/shortv_evidence.py"):
        evidence.calibration(model, processor, config, path, fingerprint, measure=False)
    main, computed = evidence.calibration(model, processor, config, path, fingerprint, main_only=True)
    assert computed and {name: len(rows) for name, rows in main.visual_lc.items()} == {"mixed": 2}
    with pytest.raises(RuntimeError, match="mixed pool: 2 of 3"):
        evidence.calibration(model, processor, config, path, fingerprint, measure=False)
    assert main.text_lc.shape[0] == 2 and main.complete_pools(config.pool_size) == []
    plan = evidence.evidence_plan(config, main, model_parts(model).num_layers)
    assert not [row for row in plan if row["family"] == "stability"]

    full, computed = evidence.calibration(model, processor, config, path, fingerprint)
    assert computed and sorted(full.complete_pools(config.pool_size)) == sorted(evidence.POOLS)
    np.testing.assert_array_equal(full.visual_lc["mixed"][:2], main.visual_lc["mixed"])  # resumed, not redone
    assert {row["pool"] for row in evidence.evidence_plan(config, full, model_parts(model).num_layers)
            if row["family"] == "stability"} == set(evidence.POOLS)
    again, computed = evidence.calibration(model, processor, config, path, fingerprint, measure=False)
    assert not computed
    np.testing.assert_array_equal(again.visual_lc["shape"], full.visual_lc["shape"])
    assert json.loads(path.read_text())["fingerprint"]["pool_size"] == 3


def test_layer_choice_correct_scores_each_choice_of_the_sweep():
    from shortlab.llava_mini.easy_vqa import VQAItem
    from shortlab.llava_mini.sweep import PredictionStore

    items = [VQAItem(f"q{i}", "yes", i // 2) for i in range(6)]
    calib = synthetic_calibration(pool_size=TINY.pool_size, n_calib=TINY.n_calib)
    plan = evidence.evidence_plan(TINY, calib, 6)
    store = PredictionStore(None, {})
    for k, row in enumerate(plan):  # the k-th setting answers "yes" to its first k questions
        store.results[row["setting"].key] = ["yes" if i < k else "no" for i in range(6)]
    ev = evidence.Evidence(items, calib, plan, store, None)
    curves = evidence.layer_choice_correct(ev)
    assert set(curves) == set(evidence.LAYER_CHOICES)
    def expected(row):  # rows may share a setting: the store holds one answer list per setting
        return [float(answer == "yes") for answer in store.results[row["setting"].key]]

    for row in plan:
        if row["family"] == "shortv" and row["choice"] != "random":
            assert list(curves[row["choice"]][row["N"]]) == expected(row)
    random_rows = [row for row in plan if row["family"] == "shortv" and row["choice"] == "random"]
    assert curves["random"][1].shape == (len(TINY.random_seeds), 6)
    assert [list(draw) for draw in curves["random"][1]] == [expected(row) for row in random_rows]
    del store.results[random_rows[0]["setting"].key]
    with pytest.raises(KeyError, match="no stored answers for .* at N = 1"):
        evidence.layer_choice_correct(ev)


def test_choice_comparisons_can_come_out_every_way():
    """LC far above cosine (supported), LC equal to random (a tie), and LC below (contradicted):
    each verdict follows its interval; a tie where both sit at 1.0 is named as at the ceiling."""
    from shortlab.stats import CONTRADICTED, EQUIVALENT, SUPPORTED

    rng = np.random.default_rng(0)
    clusters = np.repeat(np.arange(200), 5)
    lc = (rng.random(1000) < 0.8).astype(float)
    worse = np.where(rng.random(1000) < 0.3, 0.0, lc)  # loses about a quarter of LC's correct answers
    better = np.maximum(lc, (rng.random(1000) < 0.5).astype(float))
    curves = {"layer_contribution": {6: lc, 12: lc, 18: np.ones(1000)},
              "visual_cosine": {6: worse, 12: better, 18: np.ones(1000)},
              "random": {6: np.stack([lc, lc]), 12: np.stack([better, better]), 18: np.ones((3, 1000))}}
    rows = evidence.choice_comparisons(curves, clusters, margin=0.01)
    outcome = {(row["N"], row["comparison"]): row["judgement"] for row in rows}
    assert outcome[6, "LC − visual cosine"].outcome == SUPPORTED
    assert outcome[6, "LC − random"].outcome == EQUIVALENT and not outcome[6, "LC − random"].ceiling
    assert outcome[12, "LC − visual cosine"].outcome == CONTRADICTED
    assert outcome[12, "LC − random"].outcome == CONTRADICTED
    assert outcome[18, "LC − random"].outcome == EQUIVALENT and outcome[18, "LC − random"].ceiling
    import matplotlib.pyplot as plt

    from shortlab.llava_mini.figures import draw_choice_comparisons

    fig, ax = plt.subplots()
    draw_choice_comparisons(ax, rows, 0.01, title="t")
    plt.close(fig)
    assert len(ax.get_xticks()) == 3
    # the ordering "LC > cosine > random" needs both links: at N = 6 cosine loses to random
    assert outcome[6, "visual cosine − random"].outcome == CONTRADICTED
    assert outcome[12, "visual cosine − random"].outcome == EQUIVALENT
    chains = evidence.chain_verdicts(rows)
    assert chains == {6: CONTRADICTED, 12: CONTRADICTED, 18: EQUIVALENT}
    supported_chain = evidence.chain_verdicts(evidence.choice_comparisons(
        {"layer_contribution": {6: better}, "visual_cosine": {6: lc}, "random": {6: np.stack([worse, worse])}},
        clusters, margin=0.01))
    assert supported_chain == {6: SUPPORTED}


def test_layer_choice_curve_rows_and_draw_spread():
    """One row per choice and N; the random rows' interval covers draws and images, and their
    spread is the draws' own accuracies."""
    clusters = np.repeat(np.arange(50), 4)
    lc = np.tile([1.0, 1.0, 1.0, 0.0], 50)  # 0.75
    draws = np.stack([np.tile([1.0, 0.0, 0.0, 0.0], 50), np.tile([1.0, 1.0, 0.0, 0.0], 50)])  # 0.25, 0.5
    rows = evidence.layer_choice_curve({"layer_contribution": {6: lc, 3: lc}, "visual_cosine": {6: lc},
                                        "random": {6: draws}}, clusters)
    assert [(row["choice"], row["N"]) for row in rows] == [
        ("layer_contribution", 3), ("layer_contribution", 6), ("visual_cosine", 6), ("random", 6)]
    assert rows[0]["estimate"] == pytest.approx(0.75) and rows[0]["low"] <= 0.75 <= rows[0]["high"]
    random_row = rows[-1]
    assert random_row["estimate"] == pytest.approx(0.375)
    assert (random_row["draw_min"], random_row["draw_max"]) == (pytest.approx(0.25), pytest.approx(0.5))
    assert random_row["low"] < 0.375 < random_row["high"]
