"""The stored per-item evidence of notebook 01: plans, the store's fingerprints, the 2 x 2 statistics."""

import copy
import json
import math

import numpy as np
import pytest
import torch

from shortlab import stats
from shortlab.evaluate import MCExample, item_correct
from shortlab.models import load_model
from shortlab.pruning import random_layers, rank_layers_for_counts, rank_random
from shortlab.shortgpt_evidence import (
    EvidencePlan, EvidenceStore, Measurement, Setting, accuracy_beside_rules, accuracy_interaction, collect, conclusion,
    data_fingerprint, measure,
    model_fingerprint, model_free_baselines, perplexity_with_ratio, plan_settings, quantisation_interaction,
    random_versus, ranked_choices, removal_counts,
)

CHOICES = {"block_influence": {2: [5, 6], 4: [3, 4, 5, 6]},
           "reverse_order": {2: [6, 7], 4: [4, 5, 6, 7]},
           "relative_magnitude": {2: [5, 6], 4: [2, 4, 5, 6]}}


def test_removal_counts_adds_the_table_k_and_clips():
    assert removal_counts(30, 12, 4, 0.25) == ([4, 8, 12], 8)
    assert removal_counts(24, 12, 4, 0.25) == ([4, 6, 8, 12], 6)
    assert removal_counts(4, 12, 1, 0.25) == ([1, 2, 3], 1)
    with pytest.raises(ValueError, match="table_fraction"):
        removal_counts(30, 12, 4, 1.5)


def test_plan_shares_measurements_and_draws_random_sets():
    plan = EvidencePlan(ks=(2, 4), table_k=2, eval_blocks=10, random_draws=3, random_blocks=4,
                        baseline_ks=(2,), task_rankings=("block_influence",), bits=4, group_size=32)
    settings = plan_settings(CHOICES, plan, num_layers=8)
    rows = {(s.ranking, s.k, s.draw, s.quantised): s.measurement for s in settings}
    # baselines only at the table's k; BI at every k
    assert ("reverse_order", 4, None, False) not in rows and ("block_influence", 4, None, False) in rows
    # relative magnitude picks BI's set at k = 2: one measurement, with the questions BI's row needs
    assert rows[("relative_magnitude", 2, None, False)] == rows[("block_influence", 2, None, False)]
    assert rows[("block_influence", 2, None, False)].tasks and not rows[("reverse_order", 2, None, False)].tasks
    draws = [s for s in settings if s.ranking == "random"]
    assert len(draws) == 6 and all(s.measurement.n_blocks == 4 for s in draws)
    assert [list(s.measurement.removed) for s in draws if s.k == 2] == [sorted(random_layers(8, 2, seed)) for seed in range(3)]
    quantised = rows[("block_influence", 2, None, True)]
    assert (quantised.removed, quantised.bits, quantised.group_size, quantised.tasks) == ((5, 6), 4, 32, True)
    assert rows[("dense", 0, None, True)].removed == ()
    with pytest.raises(ValueError, match="block_influence"):
        plan_settings({"reverse_order": CHOICES["reverse_order"]}, plan, 8)


def test_random_layers_is_what_rank_random_removes():
    model, _ = load_model("tiny-llama")
    assert rank_random(model, [], 2, seed=5) == random_layers(4, 2, seed=5)
    with pytest.raises(ValueError, match="n_remove"):
        random_layers(4, 4)
    assert sorted(random_layers(4, 4, allow_all=True)) == [0, 1, 2, 3]  # a choice of layers to freeze
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        random_layers(4, 5, allow_all=True)


def _record(nll, tokens=None):
    return {"nll": list(nll), "tokens": list(tokens if tokens is not None else [100.0] * len(nll)), "correct": {}}


def test_store_round_trip_and_stale_fingerprints(tmp_path):
    measurement = Measurement((1, 3), None, None, 2, False)
    store = EvidenceStore(tmp_path, "model-a", "data-a")
    assert store.get(measurement) is None
    store.put(measurement, _record([1.0, 2.0]))
    path = tmp_path / f"{measurement.name}.json"
    assert json.loads(path.read_text())["measurement"]["removed"] == [1, 3]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary file is left"
    again = EvidenceStore(tmp_path, "model-a", "data-a")
    assert again.get(measurement)["nll"] == [1.0, 2.0] and again.read == 1
    assert EvidenceStore(tmp_path, "model-b", "data-a").get(measurement) is None, "other weights: stale"
    assert EvidenceStore(tmp_path, "model-a", "data-b").get(measurement) is None, "other data: stale"


def test_fingerprints_follow_weights_and_data():
    model, _ = load_model("tiny-llama")
    before = model_fingerprint(model, "tiny-llama")
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1.0
    assert model_fingerprint(model, "tiny-llama") != before
    after = model_fingerprint(model, "tiny-llama")
    assert model_fingerprint(copy.deepcopy(model), "tiny-llama") == after, "the same weights, the same fingerprint"
    with torch.no_grad():
        weight = next(model.parameters())
        weight[0, 1] = torch.nextafter(weight[0, 1], torch.tensor(float("inf")))  # one weight's last bit
    assert model_fingerprint(model, "tiny-llama") != after
    assert model_fingerprint(model.to(torch.bfloat16), "tiny-llama") != after
    ids = torch.ones(2, 4, dtype=torch.long)
    example = MCExample.shared("q", ["a", "b"], 0)
    base = data_fingerprint(ids, torch.ones_like(ids), {"piqa": [example]})
    assert data_fingerprint(ids + 1, torch.ones_like(ids), {"piqa": [example]}) != base
    assert data_fingerprint(ids, torch.ones_like(ids), {"piqa": [MCExample.shared("q", ["a", "b"], 1)]}) != base


def test_measure_and_collect_resume_without_touching_the_model(tmp_path):
    model, tokenizer = load_model("tiny-llama")
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    held_out = {"input_ids": torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(0))}
    held_out["attention_mask"] = torch.ones_like(held_out["input_ids"])
    examples = {"toy": [MCExample.shared("Question: one plus one\nAnswer:", ["two", "seven"], 0)] * 2}
    dense = Measurement((), None, None, 3, True)
    pruned_q = Measurement((1,), 4, 32, 2, False)
    record = measure(model, tokenizer, pruned_q, held_out, examples, batch_size=2)
    assert len(record["nll"]) == 2 and record["tokens"] == [15.0, 15.0] and record["correct"] == {}
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    store = EvidenceStore(tmp_path, model_fingerprint(model, "tiny"), "data")
    settings = [Setting("dense", 0, dense), Setting("block_influence", 1, pruned_q)]
    records = collect(model, tokenizer, settings, store, held_out, examples, batch_size=2, log=None)
    assert set(records[dense]["correct"]["toy"]) == {"acc", "acc_norm"} and store.written == 2
    resumed = EvidenceStore(tmp_path, model_fingerprint(model, "tiny"), "data")
    assert collect(model, tokenizer, settings, resumed, held_out, examples, log=None)[dense] == records[dense]
    assert resumed.written == 0 and resumed.read == 2
    with pytest.raises(ValueError, match="held-out blocks"):
        measure(model, tokenizer, Measurement((), None, None, 5, False), held_out, examples)


def test_perplexity_with_ratio_pairs_blocks():
    rng = np.random.default_rng(0)
    dense = rng.uniform(200, 300, 50)
    pruned = dense + 20  # 0.2 nats per token worse on every block
    ppl, ratio = perplexity_with_ratio(_record(pruned), _record(dense))
    assert ppl.estimate == pytest.approx(math.exp(pruned.sum() / 5000))
    assert ratio.estimate == pytest.approx(math.exp(0.2)) and ratio.high - ratio.low < 1e-9
    with pytest.raises(ValueError, match="same blocks"):
        perplexity_with_ratio(_record(pruned), _record(dense, [50.0] * 50))


def test_random_versus_counts_worse_draws():
    tokens = np.full(4, 100.0)
    reference = np.full(4, 200.0)  # perplexity e^2
    draws = [_record(np.full(4, 200.0 + offset)) for offset in (-10, 10, 20, 30)]
    summary = random_versus(reference, draws, tokens)
    assert summary["reference"] == pytest.approx(math.exp(2))
    assert summary["share_worse"].estimate == 0.75 and summary["draws"] == 4
    assert summary["low"] < summary["median"] < summary["high"]


def test_quantisation_interaction_is_zero_when_costs_add():
    rng = np.random.default_rng(1)
    dense = rng.uniform(200, 300, 40)
    removal, quantisation = rng.uniform(10, 30, 40), rng.uniform(1, 3, 40)
    additive = quantisation_interaction(_record(dense), _record(dense + quantisation), _record(dense + removal),
                                        _record(dense + removal + quantisation))
    assert additive["interaction"].estimate == pytest.approx(0.0, abs=1e-12)
    assert additive["quantise dense"].estimate == pytest.approx(quantisation.sum() / 4000)
    assert stats.verdict(additive["remove layers"], 0.0) == stats.SUPPORTED
    fragile = quantisation_interaction(_record(dense), _record(dense + quantisation), _record(dense + removal),
                                       _record(dense + removal + 3 * quantisation))
    assert stats.verdict(fragile["interaction"], 0.0) == stats.SUPPORTED, "pruned weights suffer more"


def test_accuracy_interaction():
    rng = np.random.default_rng(2)
    dense = rng.integers(0, 2, 400).astype(float)
    pruned = dense * (rng.random(400) > 0.2)
    result = accuracy_interaction(dense, dense, pruned, pruned)
    assert result["interaction"].estimate == 0 and result["remove layers"].high < 0


def test_item_correct_matches_score_examples():
    from shortlab.evaluate import score_examples
    examples = [MCExample.shared("q", ["a", "bbbb"], 1), MCExample.shared("q", ["a", "b", "c"], 0)]
    logliks = [-1.0, -2.0, -0.5, -3.0, -1.0]
    per_item = item_correct(examples, logliks)
    assert per_item["acc"].tolist() == [False, True] and per_item["acc_norm"].tolist() == [True, True]
    assert score_examples(examples, logliks)["acc"] == 0.5
    with pytest.raises(ValueError, match="log-likelihoods"):
        item_correct(examples, logliks[:-1])


def test_retained_fraction_interval_and_equivalence_verdict():
    rng = np.random.default_rng(3)
    dense = (rng.random(2000) < 0.7).astype(float)
    pruned = dense * (rng.random(2000) < 0.9)
    plain = stats.retained_fraction_interval(pruned, dense)
    assert plain.estimate == pytest.approx(pruned.mean() / dense.mean()) and plain.low < plain.estimate < plain.high
    above_chance = stats.retained_fraction_interval(pruned, dense, chance=0.5)
    assert above_chance.estimate < plain.estimate
    with pytest.raises(ValueError, match="chance"):
        stats.retained_fraction_interval(pruned, dense, chance=0.9)
    interval = stats.Interval(0.01, -0.02, 0.03, 0.95, "x")
    assert stats.equivalence_verdict(interval, 0.05) == stats.SUPPORTED
    assert stats.equivalence_verdict(interval, 0.025) == stats.CANNOT_TELL
    assert stats.equivalence_verdict(stats.Interval(0.2, 0.1, 0.3, 0.95, "x"), 0.05) == stats.CONTRADICTED
    with pytest.raises(ValueError, match="margin"):
        stats.equivalence_verdict(interval, 0.0)


def test_model_free_baselines_score_length_rules_and_share_ties():
    examples = [MCExample.shared("q", ["a", "bbb", "cc"], 0),   # shortest is gold
                MCExample.shared("q", ["aa", "bb"], 1),         # a tie: half of the tied choices is gold
                MCExample.shared("q", ["a", "bbbb", "cc", "d"], 1)]  # longest is gold
    baselines = model_free_baselines(examples)
    assert baselines["chance"].tolist() == pytest.approx([1 / 3, 1 / 2, 1 / 4])
    assert baselines["shortest answer"].tolist() == [1.0, 0.5, 0.0]
    assert baselines["longest answer"].tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="no questions"):
        model_free_baselines([])


def test_conclusion_is_written_from_the_verdict():
    interval = stats.Interval(0.8, 0.7, 0.9, 0.95, "x")
    assert (conclusion("BI beats random", stats.verdict(interval, 0.5), interval)
            == "Supported: BI beats random (95 % interval 0.800 [0.700, 0.900]).")
    assert conclusion("BI beats random", stats.verdict(interval, 0.95), interval).startswith("Contradicted: ")
    assert conclusion("x", stats.verdict(interval, 0.8), "n/a").startswith("Cannot tell at this sample size: ")
    with pytest.raises(ValueError, match="unknown verdict"):
        conclusion("x", "maybe", interval)


def test_ranked_choices_are_kept_per_ranking_and_remade_for_other_weights(tmp_path):
    model, tokenizer = load_model("tiny-llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    calibration = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    path = tmp_path / "rankings.json"
    made = []
    first = ranked_choices(model, calibration, ["block_influence", "reverse_order"], [1, 2], path=path, log=made.append)
    assert first == {ranking: rank_layers_for_counts(ranking, model, calibration, [1, 2])
                     for ranking in ("block_influence", "reverse_order")}
    assert len(made) == 2 and not list(tmp_path.glob(".*"))

    made.clear()  # read back, and only the new ranking is made
    again = ranked_choices(model, calibration, ["block_influence", "iterative_block_influence"], [1, 2], path=path,
                           log=made.append)
    assert again["block_influence"] == first["block_influence"] and len(made) == 1
    assert set(json.loads(path.read_text())["choices"]) == {"block_influence", "reverse_order",
                                                            "iterative_block_influence"}

    made.clear()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2)
    ranked_choices(model, calibration, ["block_influence"], [1, 2], path=path, log=made.append)
    assert len(made) == 1, "other weights: ranked again"
    ranked_choices(model, calibration, ["block_influence"], [1], path=path, log=made.append)
    assert len(made) == 2, "other removal counts: ranked again"


def test_dense_precision_extends_the_paired_blocks_and_is_stored_once(tmp_path):
    from shortlab.data import calibration_batch
    from shortlab.shortgpt_evidence import EvidenceConfig, Setting, dense_precision

    model, tokenizer = load_model("tiny-llama")
    config = EvidenceConfig(eval_blocks=2, dense_blocks=5, eval_seq_len=16, batch_size=2, tasks=())
    held_out = calibration_batch(tokenizer, config.eval_source, 2, 16, split="eval", seed=config.seed)
    store = EvidenceStore(tmp_path, model_fingerprint(model, "tiny"), data_fingerprint(
        held_out["input_ids"], held_out["attention_mask"], {}))
    paired = collect(model, tokenizer, [Setting("dense", 0, Measurement((), None, None, 2, False))], store,
                     held_out, {}, batch_size=2, log=None)
    made = []
    wide = dense_precision(model, tokenizer, config, store, log=made.append)
    assert len(wide["nll"]) == 5 and len(made) == 1 and (tmp_path / "dense__w-model__blocks5.json").is_file()
    np.testing.assert_allclose(wide["nll"][:2], next(iter(paired.values()))["nll"], rtol=1e-5)
    assert dense_precision(model, tokenizer, config, store, log=made.append) == wide and len(made) == 1
    with pytest.raises(ValueError, match="dense_blocks = 1 must be at least eval_blocks = 2"):
        dense_precision(model, tokenizer, EvidenceConfig(eval_blocks=2, dense_blocks=1), store)


def test_questions_added_to_a_stored_layer_set_reuse_its_block_nlls(tmp_path):
    model, tokenizer = load_model("tiny-llama")
    held_out = {"input_ids": torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))}
    held_out["attention_mask"] = torch.ones_like(held_out["input_ids"])
    examples = {"toy": [MCExample.shared("Question: one plus one\nAnswer:", ["two", "seven"], 0)]}
    store = EvidenceStore(tmp_path, model_fingerprint(model, "tiny"), "data")
    plain = Measurement((1,), None, None, 2, False)
    first = collect(model, tokenizer, [Setting("reverse_order", 1, plain)], store, held_out, examples, log=None)[plain]
    # a stored record whose NLLs differ from a fresh forward pass shows which one the questions' record took
    marked = {**first, "nll": [value + 1.0 for value in first["nll"]]}
    (tmp_path / f"{plain.name}.json").write_text(json.dumps(marked))
    with_tasks = Measurement((1,), None, None, 2, True)
    fresh_store = EvidenceStore(tmp_path, model_fingerprint(model, "tiny"), "data")
    record = collect(model, tokenizer, [Setting("reverse_order", 1, with_tasks)], fresh_store, held_out, examples,
                     log=None)[with_tasks]
    assert record["nll"] == marked["nll"] and set(record["correct"]["toy"]) == {"acc", "acc_norm"}
    with pytest.raises(ValueError, match="known_nll has 1 blocks"):
        measure(model, tokenizer, with_tasks, held_out, examples, known_nll={"nll": [1.0], "tokens": [15.0]})


def test_plan_scores_every_ranking_on_the_tasks_by_default():
    from shortlab.shortgpt_evidence import EvidenceConfig
    assert EvidenceConfig().task_rankings is None  # None: every ranking of the config
    plan = EvidencePlan(ks=(2, 4), table_k=4, eval_blocks=8, random_draws=0,
                        task_rankings=("block_influence", "reverse_order", "relative_magnitude"))
    with_tasks = {s.ranking for s in plan_settings(CHOICES, plan, 8) if s.measurement.tasks and s.k == 4}
    assert with_tasks == {"block_influence", "reverse_order", "relative_magnitude"}


def test_accuracy_beside_rules_judges_against_the_strongest_rule():
    examples = [MCExample.shared("q", ["a", "bbbb"], 0)] * 40 + [MCExample.shared("q", ["a", "bbbb"], 1)] * 10
    # the shortest answer is right 80 % of the time: a model at 0.82 beats chance but not that rule
    judged = accuracy_beside_rules(np.r_[np.ones(41), np.zeros(9)], examples, margin=0.05)
    assert judged["rule"] == "shortest answer" and judged["rule_score"] == pytest.approx(0.8)
    assert judged["verdict"] != stats.SUPPORTED and judged["accuracy"].estimate == pytest.approx(0.82)
    assert accuracy_beside_rules(np.ones(50), examples, margin=0.05)["verdict"] in (stats.SUPPORTED, stats.CANNOT_TELL)
    with pytest.raises(ValueError, match="one correctness value per question"):
        accuracy_beside_rules(np.ones(3), examples, margin=0.05)
