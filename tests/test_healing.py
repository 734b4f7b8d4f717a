"""Healing a pruned model: what is trained, what is left alone, resuming in chunks, and the
healed checkpoint the CLI saves."""

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from shortlab.arch import model_parts
from shortlab.cli import STOPPED_EARLY, main
from shortlab.healing import HealingConfig, causal_lm_loss, heal, linear_targets, training_blocks
from shortlab.models import load_model
from shortlab.pruning import remove_layers

SMALL = dict(steps=4, batch_size=2, block_size=24, warmup=1, lr=5e-3)


def pruned(arch="llama"):
    model, tokenizer = load_model(f"tiny-{arch}")
    return remove_layers(model, [1], inplace=True), tokenizer


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def calibration_nll(model, tokenizer, config):
    blocks = training_blocks(tokenizer, config)
    with torch.no_grad():
        return float(causal_lm_loss(model(input_ids=blocks).logits, blocks))


@pytest.mark.parametrize("config, message", [
    (dict(method="qlora"), "unknown healing method"),
    (dict(steps=0), "steps must be at least 1"),
    (dict(warmup=100), "warmup must be in"),
    (dict(lr=0), "lr must be positive"),
    (dict(block_size=1), "block_size"),
    (dict(compute_dtype="float16"), "compute_dtype"),
])
def test_bad_configs_are_named(config, message):
    with pytest.raises(ValueError, match=message):
        HealingConfig(**config)


def test_the_budget_is_the_same_calibration_tokens_for_every_variant():
    _, tokenizer = pruned()
    config = HealingConfig(**SMALL)
    blocks = training_blocks(tokenizer, config)
    assert blocks.shape == (8, 24) and config.tokens == 8 * 24
    assert torch.equal(blocks, training_blocks(tokenizer, config))
    assert not torch.equal(blocks, training_blocks(tokenizer, HealingConfig(**{**SMALL, "seed": 1})))
    assert config.label.startswith("lora-r8-4x2x24-s0-")
    assert HealingConfig(**SMALL, compute_dtype="bfloat16").label.startswith("lora-r8-4x2x24-bf16-s0-")
    assert HealingConfig(**{**SMALL, "lr": 1e-3}).label != config.label, "any field changes the name"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_healing_trains_merges_and_leaves_a_plain_model(arch):
    model, tokenizer = pruned(arch)
    model.eval()
    config = HealingConfig(**SMALL)
    before = snapshot(model)
    loss_before = calibration_nll(model, tokenizer, config)
    record = heal(model, tokenizer, config, log=None)
    assert record["complete"] and record["steps_done"] == 4 and len(record["losses"]) == 4
    assert record["tokens"] == config.tokens and record["split"] == "calib" and not record["untied_lm_head"]
    after = snapshot(model)
    assert after.keys() == before.keys(), "merged back: no adapter parameters left"
    assert not any("lora" in name for name, _ in model.named_modules())
    targets = set(linear_targets(model))
    changed = {name.removesuffix(".weight") for name in before if not torch.equal(before[name], after[name])}
    assert changed and changed <= targets, "only the decoder layers' linear weights change"
    assert all(p.requires_grad for p in model.parameters()) and not model.training, "flags and mode restored"
    assert calibration_nll(model, tokenizer, config) < loss_before


def test_last_layers_healing_unties_a_tied_head_and_trains_only_the_end():
    model, tokenizer = pruned()
    parts = model_parts(model)
    parts.lm_head.weight = parts.embed_tokens.weight  # tie it, as SmolLM2 and Qwen ship
    model.config.tie_word_embeddings = True
    before = snapshot(model)
    config = HealingConfig(**{**SMALL, "method": "last_layers", "last_layers": 1, "lr": 1e-3})
    record = heal(model, tokenizer, config, log=None)
    assert record["untied_lm_head"] and model.config.tie_word_embeddings is False
    parts = model_parts(model)
    assert parts.lm_head.weight.data_ptr() != parts.embed_tokens.weight.data_ptr()
    assert torch.equal(parts.embed_tokens.weight, before["model.embed_tokens.weight"]), "embeddings untouched"
    last = parts.num_layers - 1
    for name, value in snapshot(model).items():
        trained = name.startswith((f"model.layers.{last}.", "model.norm.", "lm_head."))
        if name in before:
            assert torch.equal(value, before[name]) != trained or name == "model.norm.weight", name
    assert not torch.equal(parts.lm_head.weight, before["model.embed_tokens.weight"])


def test_healing_in_chunks_equals_healing_at_once(tmp_path):
    config = HealingConfig(**SMALL)
    at_once, tokenizer = pruned()
    heal(at_once, tokenizer, config, log=None)
    chunked, _ = pruned()
    untouched = snapshot(chunked)
    checkpoint = tmp_path / "healing.pt"
    first = heal(chunked, tokenizer, config, checkpoint=checkpoint, checkpoint_every=1, max_steps=3, log=None)
    assert not first["complete"] and first["steps_done"] == 3
    assert all(torch.equal(v, untouched[k]) for k, v in snapshot(chunked).items()), "unfinished: model as it was"
    second = heal(chunked, tokenizer, config, checkpoint=checkpoint, log=None)
    assert second["complete"] and second["losses"][:3] == first["losses"]
    for name, value in snapshot(chunked).items():
        torch.testing.assert_close(value, dict(at_once.named_parameters())[name], atol=1e-6, rtol=0)
    other, _ = pruned()
    remove_layers(other, [0], inplace=True)
    with pytest.raises(ValueError, match="other weights or with another configuration"):
        heal(other, tokenizer, config, checkpoint=checkpoint, log=None)
    with pytest.raises(ValueError, match="needs a checkpoint"):
        heal(other, tokenizer, config, max_steps=1, log=None)


@pytest.mark.parametrize("method", ["lora", "last_layers"])
def test_a_failed_healing_leaves_the_model_as_it_was(method):
    model, tokenizer = pruned()
    parts = model_parts(model)
    parts.lm_head.weight = parts.embed_tokens.weight
    model.config.tie_word_embeddings = True
    before = snapshot(model)
    layer_types = [type(m) for m in model.modules()]

    def fail(message):
        if "step 1/" in message:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        heal(model, tokenizer, HealingConfig(**{**SMALL, "method": method}), log=fail)
    assert [type(m) for m in model.modules()] == layer_types, "no adapter left behind"
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    parts = model_parts(model)
    assert parts.lm_head.weight is parts.embed_tokens.weight and model.config.tie_word_embeddings
    assert all(p.requires_grad for p in model.parameters())


def test_cli_heals_a_pruned_checkpoint_that_transformers_reloads(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    pruned_dir, healed_dir = tmp_path / "pruned", tmp_path / "healed"
    assert main(["prune", "tiny-llama", "--layers", "1", "--output", str(pruned_dir)]) == 0
    args = ["heal", str(pruned_dir), "--steps", "3", "--batch-size", "2", "--block-size", "24", "--warmup", "1",
            "--output", str(healed_dir)]
    assert main(args) == 0
    assert "healed by lora" in capsys.readouterr().out
    config = json.loads((healed_dir / "config.json").read_text())
    assert config["shortlab_pruning"]["removed_layers"] == [1], "the removal record stays beside the healing"
    assert config["shortlab_healing"]["method"] == "lora" and config["shortlab_healing"]["steps"] == 3
    assert "losses" not in config["shortlab_healing"]
    card = (healed_dir / "README.md").read_text()
    assert "## Healing" in card and "nothing was fine-tuned" not in card and "calibration split" in card
    reloaded = AutoModelForCausalLM.from_pretrained(healed_dir)
    original = AutoModelForCausalLM.from_pretrained(pruned_dir)
    assert reloaded.config.num_hidden_layers == original.config.num_hidden_layers
    changed = [n for n, p in reloaded.named_parameters() if not torch.equal(p, dict(original.named_parameters())[n])]
    assert changed and all("layers" in n for n in changed)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, nn.Linear)
    assert reloaded(ids).logits.shape == original(ids).logits.shape


def test_cli_heal_stops_at_its_time_limit_and_resumes(tmp_path, capsys):
    out, checkpoint = tmp_path / "healed", tmp_path / "progress.pt"
    args = ["heal", "tiny-llama", "--steps", "3", "--batch-size", "2", "--block-size", "24", "--warmup", "1",
            "--checkpoint", str(checkpoint), "--output", str(out)]
    assert main([*args, "--max-minutes", "0"]) == STOPPED_EARLY
    assert "run the same command again" in capsys.readouterr().out and checkpoint.is_file() and not out.exists()
    assert main(args) == 0 and (out / "config.json").is_file()
    assert "# `tiny-llama`, healed" in (out / "README.md").read_text()
    assert main(["heal", "tiny-llama", "--max-minutes", "1", "--output", str(tmp_path / "x")]) == 2
    assert "--max-minutes needs --checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------- healed variants in notebook 01's evidence


def test_plan_heals_the_rankings_and_the_dense_control_with_each_seed():
    from shortlab.shortgpt_evidence import EvidencePlan, healing_configs, measurement_dict, plan_settings

    choices = {"block_influence": {2: [5, 6]}, "reverse_order": {2: [6, 7]}, "angular_distance": {2: [3, 4]}}
    healing = healing_configs([0, 1], **SMALL)
    plan = EvidencePlan(ks=(2,), table_k=2, eval_blocks=4, random_draws=1, task_rankings=tuple(choices),
                        healing=healing, healing_rankings=("block_influence", "reverse_order"))
    healed = [s for s in plan_settings(choices, plan, num_layers=8) if s.measurement.healing is not None]
    assert sorted((s.ranking, s.measurement.healing.seed) for s in healed) == sorted(
        (r, seed) for r in ("dense", "block_influence", "reverse_order") for seed in (0, 1))
    assert all(s.measurement.tasks for s in healed)
    names = [s.measurement.name for s in healed]
    assert len(set(names)) == len(names) and "__healed-lora-r8-4x2x24-s1-" in names[-1]
    plain = [s.measurement for s in plan_settings(choices, plan, 8) if s.measurement.healing is None]
    # records made before healing existed keep their fingerprints: no healing field unless set
    assert all(set(measurement_dict(m)) == {"removed", "bits", "group_size", "n_blocks", "tasks"} for m in plain)
    with pytest.raises(ValueError, match="healed or quantised"):
        dataclasses.replace(plain[0], bits=4, healing=healing[0])


def test_collect_heals_a_copy_resumes_after_the_deadline_and_records_the_healing(tmp_path):
    from shortlab.evaluate import MCExample
    from shortlab.shortgpt_evidence import EvidenceStore, Measurement, Setting, collect, model_fingerprint

    model, tokenizer = load_model("tiny-llama")
    before = snapshot(model)
    held_out = {"input_ids": torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))}
    held_out["attention_mask"] = torch.ones_like(held_out["input_ids"])
    examples = {"toy": [MCExample.shared("Question: one plus one\nAnswer:", ["two", "seven"], 0)]}
    pruned_m = Measurement((1,), None, None, 2, True)
    healed_m = Measurement((1,), None, None, 2, True, HealingConfig(**SMALL))
    settings = [Setting("block_influence", 1, pruned_m), Setting("block_influence", 1, healed_m)]
    store = EvidenceStore(tmp_path, model_fingerprint(model, "tiny"), "data")
    assert collect(model, tokenizer, settings, store, held_out, examples, log=None, deadline=0.0) == {}
    said = []
    records = collect(model, tokenizer, settings, store, held_out, examples, log=said.append)
    assert any(line.startswith("healing step") for line in said), "a healing's progress reaches the caller's log"
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items()), "the caller's model is untouched"
    healed = records[healed_m]
    assert healed["healing"]["complete"] and healed["healing"]["tokens"] == HealingConfig(**SMALL).tokens
    assert healed["nll"] != records[pruned_m]["nll"] and "healing" not in records[pruned_m]
    assert not store.healing_checkpoint(healed_m).exists(), "the progress file goes once the record is written"
    assert json.loads(store.path(healed_m).read_text())["measurement"]["healing"]["seed"] == 0
    later = Measurement((2,), None, None, 2, True)  # a new measurement first: past the deadline, the stored are still read
    again = collect(model, tokenizer, [Setting("reverse_order", 1, later), *settings], store, held_out, examples,
                    log=None, deadline=0.0)
    assert set(again) == {pruned_m, healed_m}


# ---------------------------------------------------------------- the healing verdicts


def test_recovered_share_counts_only_what_was_lost_above_the_floor():
    import numpy as np

    from shortlab.stats import NothingToRecover, recovered_share_interval

    rng = np.random.default_rng(0)
    dense = (rng.random(2000) < 0.8).astype(float)
    pruned = np.where(rng.random(2000) < 0.5, 0.0, dense)  # loses half of the correct answers: 0.4
    healed = np.stack([np.where(rng.random(2000) < 0.25, 0.0, dense) for _ in range(2)])  # 0.6: half back
    share = recovered_share_interval(dense, pruned, healed)
    assert share.low < 0.5 < share.high and share.half_width < 0.1
    # with a rule at 0.5 only the loss above it counts: pruned 0.4 -> 0.5, so 0.1 of 0.3 is recovered
    floored = recovered_share_interval(dense, pruned, healed, floor=np.full(2000, 0.5))
    assert floored.estimate == pytest.approx((healed.mean() - 0.5) / (dense.mean() - 0.5))
    assert recovered_share_interval(dense, pruned, np.stack([dense, dense])).estimate == 1.0
    with pytest.raises(NothingToRecover):
        recovered_share_interval(pruned, dense, healed)
    # a loss too small to be sure of: the share's interval is unbounded ("cannot tell")
    barely = np.where(np.arange(2000) < 3, 0.0, dense)
    assert math.isinf(recovered_share_interval(dense, barely, np.stack([dense])).high)
    # per-token means from per-block sums: weighted by the counts
    counts = np.array([1.0, 3.0])
    weighted = recovered_share_interval([-1.0, -3.0], [-3.0, -9.0], [[-2.0, -6.0]], counts=counts, n_resamples=100)
    assert weighted.estimate == pytest.approx(0.5)


@pytest.mark.parametrize("gaps, outcome", [
    ({"reverse_order": 0.1, "angular_distance": 0.15}, "supported"),  # BI stays ahead by 0.1+
    ({"reverse_order": -0.1, "angular_distance": 0.15}, "contradicted"),  # reverse order overtakes it
    ({"reverse_order": 0.0, "angular_distance": 0.0}, "the same within the margin"),  # healing ties them
])
def test_the_best_criterion_before_healing_is_judged_after_it(gaps, outcome):
    import numpy as np

    from shortlab.shortgpt_evidence import ranking_after_healing

    rng = np.random.default_rng(1)
    base = (rng.random(3000) < 0.6).astype(float)

    def shifted(delta):  # per-question correctness with an accuracy about base's + delta
        flip = rng.random(3000) < abs(delta)
        return np.where(flip, 1.0 if delta > 0 else 0.0, base)

    before = {"block_influence": shifted(0.2), "reverse_order": base, "angular_distance": shifted(-0.1)}
    after = {"block_influence": np.stack([base, base]),
             **{name: np.stack([shifted(-gap), shifted(-gap)]) for name, gap in gaps.items()}}
    judged = ranking_after_healing(before, after, margin=0.02)
    assert judged["best_before"] == "block_influence" and judged["outcome"] == outcome
    assert set(judged["against"]) == set(judged["before_against"]) == {"reverse_order", "angular_distance"}
    # before healing BI led reverse order by 0.2 × 0.4 = 0.08 (a fifth of the questions flipped to right, 40 %
    # of which were wrong) and angular distance by 0.08 + 0.1 × 0.6 = 0.14
    assert judged["before_against"]["reverse_order"].low < 0.08 < judged["before_against"]["reverse_order"].high
    assert judged["before_against"]["angular_distance"].low < 0.14 < judged["before_against"]["angular_distance"].high
    assert judged["before_against"]["angular_distance"].estimate > judged["before_against"]["reverse_order"].estimate


def test_bfloat16_autocast_healing_keeps_the_weights_dtype(monkeypatch, caplog):
    from shortlab import models

    monkeypatch.setattr(models, "bfloat16_slowdown", lambda device="cpu", size=256: 50.0)  # an emulating CPU
    model, tokenizer = pruned()
    before = snapshot(model)
    with caplog.at_level("WARNING", logger="shortlab.models"):
        record = heal(model, tokenizer, HealingConfig(**SMALL, compute_dtype="bfloat16"), log=None)
    assert "healing computes in bfloat16, but this CPU emulates it" in caplog.text
    assert record["complete"] and record["compute_dtype"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(v, before[k]) for k, v in snapshot(model).items())


def test_healing_comparison_from_records():
    import numpy as np

    from shortlab.shortgpt_evidence import healing_comparison
    from shortlab.stats import SUPPORTED

    rng = np.random.default_rng(2)
    tokens = [100.0] * 40

    def record(nll_per_token, accuracy):
        nll = (nll_per_token + rng.normal(0, 0.05, 40)) * 100
        return {"nll": nll.tolist(), "tokens": tokens,
                "correct": {"t": {"acc": (rng.random(600) < accuracy).astype(int).tolist()}}}

    dense = record(2.0, 0.7)
    before = {"block_influence": record(2.3, 0.55), "reverse_order": record(2.6, 0.45)}
    after = {"block_influence": {0: record(2.1, 0.65), 1: record(2.1, 0.65)},
             "reverse_order": {0: record(2.4, 0.5), 1: record(2.4, 0.5), 2: record(2.4, 0.5)},
             "dense": {0: record(1.95, 0.7), 1: record(1.95, 0.7)}}
    result = healing_comparison(before, after, dense, ["t"], rule=np.full(600, 0.4), acc_margin=0.02,
                                nll_margin=0.02)
    rows = {row["criterion"]: row for row in result["rows"]}
    assert set(rows) == {"block_influence", "reverse_order", "dense"}
    assert rows["reverse_order"]["seeds"] == [0, 1], "only the seeds every criterion has, paired seed by seed"
    assert "perplexity ÷ dense, pruned" not in rows["dense"], "the control has no pruned record"
    assert rows["block_influence"]["log-likelihood recovered"].estimate == pytest.approx(2 / 3, abs=0.05)
    # against the healed control (1.95): (2.3 - 2.1) / (2.3 - 1.95)
    assert rows["block_influence"]["log-likelihood recovered, against the healed dense"].estimate == pytest.approx(
        4 / 7, abs=0.05)
    assert 0.2 < rows["block_influence"]["acc recovered above the rule"].estimate < 1.0
    assert rows["reverse_order"]["perplexity ÷ dense, healed"].estimate > rows["block_influence"][
        "perplexity ÷ dense, healed"].estimate
    assert result["accuracy"]["best_before"] == "block_influence" and result["accuracy"]["outcome"] == SUPPORTED
    assert result["perplexity"]["outcome"] == SUPPORTED
    with pytest.raises(ValueError, match="no healing seed is common"):
        healing_comparison(before, {"block_influence": {0: dense}, "reverse_order": {1: dense}}, dense, ["t"],
                           acc_margin=0.02, nll_margin=0.02)


def test_healing_a_healed_model_keeps_the_earlier_record(tmp_path, capsys):
    once, twice = tmp_path / "once", tmp_path / "twice"
    common = ["--steps", "2", "--batch-size", "1", "--block-size", "24", "--warmup", "0"]
    assert main(["heal", "tiny-llama", *common, "--output", str(once)]) == 0
    assert main(["heal", str(once), *common, "--seed", "1", "--compute-dtype", "bfloat16", "--output", str(twice)]) == 0
    record = json.loads((twice / "config.json").read_text())["shortlab_healing"]
    assert (record["seed"], record["compute_dtype"]) == (1, "bfloat16") and record["previous"]["seed"] == 0
    assert "bfloat16 passes" in (twice / "README.md").read_text()


def test_last_layers_refuses_weights_too_coarse_to_train():
    model, tokenizer = pruned()
    model.to(torch.bfloat16)
    before = snapshot(model)
    with pytest.raises(ValueError, match="load the model in float32"):
        heal(model, tokenizer, HealingConfig(**{**SMALL, "method": "last_layers"}), log=None)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())


def test_criteria_that_remove_the_same_layers_are_judged_once():
    from shortlab.shortgpt_evidence import one_healing_per_removal

    after = {"dense": {0: "d"}, "block_influence": {0: "b"}, "reverse_order": {0: "r"},
             "relative_magnitude": {0: "b"}, "angular_distance": {0: "a"}}
    removed = {"block_influence": [13, 9, 18], "reverse_order": [21, 22, 23],
               "relative_magnitude": [9, 13, 18], "angular_distance": [8, 9, 10]}
    kept, twins = one_healing_per_removal(after, removed)
    assert list(kept) == ["dense", "block_influence", "reverse_order", "angular_distance"]
    assert twins == {"relative_magnitude": "block_influence"}
    assert one_healing_per_removal(kept, removed) == (kept, {})  # nothing left to merge
