"""Fine-tuning with another RoPE base (shortlab.rope_experiment.finetune), the batched passkey
test and scripts/rope_finetune.py, on the tiny random Llama."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shortlab.models import load_model
from shortlab.rope import max_context
from shortlab.rope_experiment import (
    PASSKEY_QUESTION, bound_verdicts, difference_of_rates, distance_grid, fine_tune,
    describe_finetune, finetune_batches, finetune_summary, min_passkey_distance, passkey_accuracy, passkey_found, passkey_length,
    passkey_prompt, passkey_trial, perplexity_by_position, position_edges, rope_base, split_stream,
    shipped_bound_verdict, tokenize_text, with_rope_base,
)
from shortlab.stats import CANNOT_TELL, SUPPORTED, perplexity_interval, wilson_interval

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "rope_finetune.py"
TEXT = ("The river rises in the northern hills and flows south through farmland. "
        "Its valley was settled early, and several towns grew along its banks. ") * 60


@pytest.fixture(scope="module")
def tiny_llama():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def text_ids(tiny_llama):
    return tokenize_text(tiny_llama[1], TEXT)


def test_with_rope_base_changes_config_buffers_and_logits_and_copies(one_thread, tiny_llama):
    model, _ = tiny_llama
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    old_inv_freq = model.model.rotary_emb.inv_freq.clone()
    changed = with_rope_base(model, 500.0)
    assert changed is not model
    assert rope_base(changed) == 500.0 and rope_base(model) == 10000.0
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    expected = 1.0 / (500.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    torch.testing.assert_close(changed.model.rotary_emb.inv_freq, expected)
    torch.testing.assert_close(changed.model.rotary_emb.original_inv_freq, expected)
    # the original is untouched: config, buffers, weights
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, old_inv_freq)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    ids = torch.arange(5, 45)[None]
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, changed(ids).logits, atol=1e-4)
        # the same as a model built with that base from the start, with the same weights
        from transformers import AutoModelForCausalLM
        config = type(model.config).from_dict(model.config.to_dict())
        config.rope_parameters = dict(config.rope_parameters, rope_theta=500.0)
        fresh = AutoModelForCausalLM.from_config(config).eval()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(fresh(ids).logits, changed(ids).logits)


def test_with_rope_base_rejects_bad_bases_and_scaled_rope(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="base"):
        with_rope_base(model, 0.5)
    scaled = with_rope_base(model, 1000.0)
    scaled.config.rope_parameters = dict(scaled.config.rope_parameters, rope_type="linear", factor=2.0)
    with pytest.raises(ValueError, match="rope_type"):
        with_rope_base(scaled, 500.0)


def test_text_helpers_and_their_errors(tiny_llama):
    tokenizer = tiny_llama[1]
    with pytest.raises(ValueError, match="empty text"):
        tokenize_text(tokenizer, "  \n ")
    ids = torch.arange(100)
    train, held_out = split_stream(ids, 0.2)
    assert train.tolist() == list(range(80)) and held_out.tolist() == list(range(80, 100))
    with pytest.raises(ValueError, match="eval_fraction"):
        split_stream(ids, 1.0)


def test_batches_shapes_weights_and_determinism(tiny_llama, text_ids):
    tokenizer = tiny_llama[1]
    first = next(finetune_batches(text_ids, 64, 3, seed=1))
    assert first["input_ids"].shape == (3, 64) and first["loss_weight"].shape == (3, 64)
    assert torch.equal(first["loss_weight"], torch.ones(3, 64))
    again = next(finetune_batches(text_ids, 64, 3, seed=1))
    assert torch.equal(first["input_ids"], again["input_ids"])
    # rows are blocks of the stream, and an epoch visits every block once
    n_blocks = text_ids.numel() // 64
    blocks = {tuple(text_ids[i * 64:(i + 1) * 64].tolist()) for i in range(n_blocks)}
    stream = finetune_batches(text_ids, 64, 1, seed=2)
    seen = [tuple(next(stream)["input_ids"][0].tolist()) for _ in range(n_blocks)]
    assert set(seen) == blocks
    # every row a passkey row: its answer tokens carry the weight, and the answer is the passkey
    tasks = next(finetune_batches(text_ids, 96, 4, seed=0, tokenizer=tokenizer, task_fraction=1.0,
                                  answer_weight=7.0))
    for row, weight in zip(tasks["input_ids"], tasks["loss_weight"]):
        answer = weight == 7.0
        assert answer.sum() == 6  # " 12345": a space and five digits, one token each
        assert answer[-6:].all() and (weight[~answer] == 1).all()
        assert tokenizer.decode(row[answer]).strip().isdigit()
        assert PASSKEY_QUESTION.strip() in tokenizer.decode(row)
    with pytest.raises(ValueError, match="tokenizer"):
        next(finetune_batches(text_ids, 64, 2, task_fraction=0.5))
    with pytest.raises(ValueError, match="fewer than one row"):
        next(finetune_batches(text_ids[:10], 64, 2))


def test_fine_tune_lowers_the_loss_and_restores_the_model_state(one_thread, tiny_llama, text_ids):
    model = with_rope_base(tiny_llama[0], 2000.0)
    first = next(finetune_batches(text_ids, 32, 4, seed=0))["input_ids"]
    history = fine_tune(model, finetune_batches(text_ids, 32, 4, seed=0), 30, lr=3e-3, warmup=3,
                        gradient_checkpointing=True)
    assert len(history["loss"]) == 30 and history["tokens"] == 30 * 4 * 32
    assert np.mean(history["loss"][-5:]) < np.mean(history["loss"][:5]) - 0.5
    assert not model.training and not model.is_gradient_checkpointing
    with torch.no_grad():
        assert model(first).logits.isfinite().all()
    with pytest.raises(ValueError, match="steps"):
        fine_tune(model, finetune_batches(text_ids, 32, 4), 0)


def test_passkey_found_matches_passkey_trial(one_thread, tiny_llama, text_ids):
    model, tokenizer = tiny_llama
    model = with_rope_base(model, 10000.0)
    prompts = [passkey_prompt(tokenizer, text_ids[i * 7:].tolist(), 60, key)
               for i, key in enumerate(("12345", "67890", "55555"))]
    ids = torch.stack([p.input_ids for p in prompts])
    positions = torch.stack([p.answer_positions for p in prompts])
    # greedy decoding written in as the first prompt's answer: found by construction
    with torch.no_grad():
        for position in positions[0]:
            ids[0, position] = model(ids[:1]).logits[0, position - 1].argmax()
    found = passkey_found(model, ids, positions, batch_size=2)
    assert found.dtype == bool and found.shape == (3,) and found[0]
    for row in range(3):
        prompt = prompts[row]
        prompt.input_ids = ids[row]
        assert found[row] == passkey_trial(model, prompt)[0]
    with pytest.raises(ValueError, match="answer_positions"):
        passkey_found(model, ids, torch.zeros_like(positions))


def test_passkey_accuracy_table_is_wilson_and_paired_across_models(one_thread, tiny_llama, text_ids):
    model, tokenizer = tiny_llama
    filler = text_ids.tolist()
    table = passkey_accuracy(model, tokenizer, filler, [30, 50], trials=20, seed=3, max_length=128)
    assert [row["distance"] for row in table] == [30, 50]
    for row in table:
        interval = wilson_interval(row["correct"], 20)
        assert row["n"] == 20 and len(row["found"]) == 20 and sum(row["found"]) == row["correct"]
        assert (row["rate"], row["low"], row["high"]) == (interval.estimate, interval.low, interval.high)
    # trials depend on the seed only: the same table again
    assert passkey_accuracy(model, tokenizer, filler, [30, 50], trials=20, seed=3) == table
    length = passkey_length(tokenizer, 50)
    assert length == passkey_prompt(tokenizer, filler, 50, "12345").input_ids.numel()
    assert min_passkey_distance(tokenizer) == passkey_prompt(tokenizer, filler, min_passkey_distance(tokenizer), "12345").distance
    with pytest.raises(ValueError, match="exceeds the context"):
        passkey_accuracy(model, tokenizer, filler, [200], max_length=128)
    with pytest.raises(ValueError, match="more than the context"):
        passkey_accuracy(model, tokenizer, filler, [120], max_length=128)
    with pytest.raises(ValueError, match="filler tokens"):
        passkey_accuracy(model, tokenizer, filler[:40], [50])
    with pytest.raises(ValueError, match="repeat"):
        passkey_accuracy(model, tokenizer, filler, [30, 30])


def test_perplexity_by_position_matches_a_plain_forward(one_thread, tiny_llama, text_ids):
    model = tiny_llama[0]
    rows = text_ids[: 3 * 32].view(3, 32)
    edges = position_edges(32)
    assert edges[0] == 1 and edges[-1] == 32 and edges == sorted(set(edges))
    result = perplexity_by_position(model, rows, edges)
    with torch.no_grad():
        logprobs = model(rows).logits[:, :-1].log_softmax(-1).gather(2, rows[:, 1:, None])[..., 0]
    nll = -logprobs.double()  # index t - 1 predicts token t
    for j, bin_ in enumerate(result["bins"]):
        lo, hi = bin_["start"], bin_["end"]
        expected = torch.exp(nll[:, lo - 1: hi - 1].mean()).item()
        assert bin_["perplexity"] == pytest.approx(expected, rel=1e-4)
        assert bin_["low"] <= bin_["perplexity"] <= bin_["high"]
        assert bin_["tokens"] == 3 * (hi - lo)
        assert np.allclose([r[j] for r in result["rows"]["nll_sum"]], nll[:, lo - 1: hi - 1].sum(1))
    assert result["overall"]["perplexity"] == pytest.approx(torch.exp(nll.mean()).item(), rel=1e-4)


def test_distance_grid_is_dense_around_bounds():
    grid = distance_grid([153, 297], 985, 20)
    assert grid == sorted(set(grid)) and grid[0] >= 20 and grid[-1] == 985
    for bound in (153, 297):
        assert {bound, round(0.9 * bound), round(1.1 * bound)} <= set(grid)
    assert all(d <= 985 for d in distance_grid([600], 985))
    with pytest.raises(ValueError):
        distance_grid([100], 10, 20)


def _run(bound, found_by_distance, nll):
    return {"bound": bound,
            "passkey": [{"distance": d, "n": len(f), "correct": sum(f), "found": f}
                        for d, f in found_by_distance.items()],
            "perplexity": {"rows": {"nll_sum": [[x] for x in nll], "count": [[100]] * len(nll)}}}


def test_bound_verdicts():
    rng = np.random.default_rng(0)
    nll = rng.normal(300, 10, size=20)
    run = _run(100, {50: [1] * 20, 80: [1] * 19 + [0], 150: [0] * 20, 200: [0] * 20}, nll + 1)
    control = _run(3615, {50: [1] * 20, 80: [1] * 20, 150: [1] * 20, 200: [1] * 19 + [0]}, nll)
    result = bound_verdicts(run, control, context=256)
    assert result["within_minus_beyond"]["verdict"] == SUPPORTED
    assert result["control_minus_run_beyond"]["verdict"] == SUPPORTED
    assert result["perplexity_ratio"]["verdict"] == SUPPORTED
    assert result["overall"] == SUPPORTED
    # retrieval that does not change across the bound: cannot tell, and so overall
    flat = _run(100, {50: [1, 0] * 10, 150: [0, 1] * 10}, nll)
    assert bound_verdicts(flat, control, 256)["within_minus_beyond"]["verdict"] == CANNOT_TELL
    assert bound_verdicts(flat, control, 256)["overall"] == CANNOT_TELL
    # no distance beyond the bound: no retrieval verdict
    assert bound_verdicts(control, control, 256)["overall"] is None
    gap = difference_of_rates(18, 20, 2, 20)
    assert gap.estimate == pytest.approx(0.8) and gap.low < gap.estimate < gap.high <= 1


def _script():
    spec = importlib.util.spec_from_file_location("rope_finetune_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_arguments_are_checked():
    script = _script()
    with pytest.raises(SystemExit, match="neither a number"):
        script.parse_args(["--bases", "500,big", "--model", "tiny-llama"])
    with pytest.raises(SystemExit, match="at least 20"):
        script.parse_args(["--trials", "5", "--model", "tiny-llama"])
    with pytest.raises(SystemExit, match="integers"):
        script.parse_args(["--distances", "10,x", "--model", "tiny-llama"])
    args = script.parse_args(["--model", "tiny-llama", "--bases", "500,own", "--device", "cpu"])
    assert args.bases == ["500", "own"] and args.dtype == "float32"
    assert args.output.endswith("results/rope_finetune/tiny-llama.json")


def test_script_end_to_end_resumes_and_checks_distances(one_thread, tmp_path, monkeypatch):
    script = _script()
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 4)
    output = tmp_path / "out.json"
    common = ["--model", "tiny-llama", "--text-file", str(text), "--context", "96", "--steps", "2",
              "--batch-size", "2", "--eval-rows", "2", "--distances", "30,50", "--device", "cpu",
              "--output", str(output)]
    assert script.main(common + ["--bases", "500", "--shipped-distances", ""]) == 0
    first = json.loads(output.read_text())
    assert first["complete"] and [run["label"] for run in first["runs"]] == ["500"]
    run = first["runs"][0]
    assert run["bound"] == max_context(500.0, 16) and run["tokens_seen"] == 2 * 2 * 96
    assert [row["distance"] for row in run["passkey"]] == [30, 50]
    # other parameters: refused, not overwritten
    with pytest.raises(SystemExit, match="other parameters"):
        script.main(common + ["--bases", "500,own", "--shipped-distances", ""])
    # same parameters: the finished base is skipped (its fine-tuning is not called again)
    calls = []
    original = script.ft.fine_tune
    monkeypatch.setattr(script.ft, "fine_tune", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert script.main(common + ["--bases", "500", "--shipped-distances", ""]) == 0
    assert calls == [] and json.loads(output.read_text())["runs"][0] == run
    # a distance longer than the context allows
    with pytest.raises(SystemExit, match="too long"):
        script.main(common[:-1] + [str(tmp_path / "other.json"), "--distances", "95",
                                   "--bases", "500", "--shipped-distances", ""])


def _results_file(rng):
    """A schema-1 results dict as scripts/rope_finetune.py writes it: the control ("own") and one
    base whose retrieval fails beyond its bound, with verdicts and the shipped model's grid."""
    nll = rng.normal(300, 10, size=(8, 2))

    def run(label, base, bound, found_by_distance, nll_sum):
        count = np.full(nll_sum.shape, 50.0)
        passkey = []
        for distance, found in found_by_distance.items():
            interval = wilson_interval(sum(found), len(found))
            passkey.append(dict(distance=distance, n=len(found), correct=sum(found), rate=interval.estimate,
                                low=interval.low, high=interval.high, found=found))
        bins = []
        for j, (start, end) in enumerate(((1, 64), (64, 128))):
            interval = perplexity_interval(nll_sum[:, j], count[:, j])
            bins.append(dict(start=start, end=end, tokens=int(count[:, j].sum()), perplexity=interval.estimate,
                             low=interval.low, high=interval.high))
        overall = perplexity_interval(nll_sum.sum(1), count.sum(1))
        return dict(label=label, base=base, head_dim=16, bound=bound, steps=2, tokens_seen=512, train_seconds=1.0,
                    eval_seconds=1.0, device="cpu", final_loss=3.0, loss_curve={"step": [1, 2], "loss": [3.5, 3.0]},
                    perplexity={"edges": [1, 64, 128], "bins": bins,
                                "overall": dict(perplexity=overall.estimate, low=overall.low, high=overall.high),
                                "rows": {"nll_sum": nll_sum.tolist(), "count": count.tolist()}},
                    passkey=passkey)

    control = run("own", 10000.0, 90, {30: [1] * 20, 60: [1] * 19 + [0], 100: [1] * 18 + [0, 0]}, nll)
    small = run("500", 500.0, 45, {30: [1] * 20, 60: [0] * 20, 100: [0] * 19 + [1]}, nll + 1)
    control["verdict"] = None
    small["verdict"] = bound_verdicts(small, control, 128, 1.1)
    shipped_rows = control["passkey"]
    return {"schema": 1, "complete": True, "wall_seconds_last_call": 5.0,
            "parameters": {"context": 128, "ppl_tolerance": 1.1, "batch_size": 2, "lr": 2e-4, "task_fraction": 0.5,
                           "trials": 20, "seed": 0},
            "environment": {"shortlab": "0", "git_revision": "abc", "versions": {"torch": "2"}, "device": "cuda",
                            "device_name": "Some GPU", "torch_threads": 4},
            "model": {"name": "tiny.gguf", "label": "tiny", "head_dim": 16, "own_base": 10000.0, "own_bound": 90,
                      "max_positions": 512, "layers": 2},
            "text": {"source": "file t.txt", "chars": 5000, "sha256": "0", "tokens": 1000, "train_tokens": 800,
                     "eval_tokens": 200},
            "distances": [30, 60, 100], "perplexity_edges": [1, 64, 128],
            "runs": [control, small],
            "shipped_passkey": {"base": 10000.0, "head_dim": 16, "bound": 45, "seconds": 1.0,
                                "passkey": shipped_rows}}


def test_finetune_summary_recomputes_and_checks_the_stored_values():
    import copy

    results = _results_file(np.random.default_rng(0))
    untouched = copy.deepcopy(results)
    summary = finetune_summary(results)
    assert results == untouched
    assert summary["problems"] == [] and summary["complete"] and summary["context"] == 128
    control, small = summary["runs"]
    assert control["control"] and control["verdict"] is None and not small["control"]
    assert small["verdict"]["overall"] == SUPPORTED == small["stored_verdict"]["overall"]
    assert [row["correct"] for row in small["passkey"]] == [20, 0, 1]
    assert small["perplexity"]["bins"][1]["perplexity"] > control["perplexity"]["bins"][1]["perplexity"]
    # passkey perfect at 30, gone at 60: halves at 45 = 1.0 × its bound 45, within its practical margin
    assert small["half_accuracy"]["distance"]["estimate"] == pytest.approx(45.0, abs=0.01)
    assert small["half_accuracy"]["verdict"] == SUPPORTED  # not short of the bound by more than 0.1 × L_θ
    assert control["half_accuracy"]["distance"]["estimate"] is None  # above half up to 100
    never = copy.deepcopy(results)  # a control that never retrieves: no run's failure is the bound's
    never["runs"][0]["passkey"][0].update(found=[0] * 20, correct=0, rate=0.0)
    for run in finetune_summary(never)["runs"]:
        assert "verdict" not in run["half_accuracy"]
    assert "unjudged" in finetune_summary(never)["runs"][1]["half_accuracy"]
    shipped = summary["shipped"]["verdict"]
    assert shipped["within"] == {"correct": 20, "n": 20} and shipped["beyond"] == {"correct": 37, "n": 40}
    assert shipped["within_minus_beyond"]["verdict"] == CANNOT_TELL
    # a stored count, a stored perplexity and a stored verdict that the raw data do not give
    for edit, expected in ((lambda r: r["runs"][1]["passkey"][1].update(correct=5), "stored correct 5"),
                           (lambda r: r["runs"][0]["perplexity"]["bins"][0].update(perplexity=1.0),
                            "stored perplexity 1.0"),
                           (lambda r: r["runs"][1]["verdict"].update(overall=CANNOT_TELL), "overall verdict")):
        tampered = copy.deepcopy(results)
        edit(tampered)
        assert any(expected in problem for problem in finetune_summary(tampered)["problems"])
    # verdicts stored under an earlier rule (no "rule"): their estimates are checked, not their verdicts
    older = copy.deepcopy(results)
    del older["runs"][1]["verdict"]["rule"]
    older["runs"][1]["verdict"]["overall"] = CANNOT_TELL
    summary = finetune_summary(older)
    assert summary["problems"] == [] and summary["older_rule"] == 1 and summary["verdicts_compared"] == 0
    older["runs"][1]["verdict"]["perplexity_ratio"]["estimate"] = 9.0
    assert any("stored estimate 9.0" in problem for problem in finetune_summary(older)["problems"])
    # a file written before the verdicts (a run cut short): recomputed, nothing to compare
    partial = copy.deepcopy(results)
    for run in partial["runs"]:
        del run["verdict"]
    partial["shipped_passkey"] = None
    summary = finetune_summary(partial)
    assert summary["problems"] == [] and summary["runs"][1]["verdict"]["overall"] == SUPPORTED
    assert summary["runs"][1]["stored_verdict"] is None and summary["shipped"] is None


def test_finetune_summary_refuses_other_files():
    results = _results_file(np.random.default_rng(1))
    with pytest.raises(ValueError, match="schema"):
        finetune_summary(dict(results, schema=2))
    with pytest.raises(ValueError, match="lacks"):
        finetune_summary({"schema": 1, "runs": []})
    with pytest.raises(ValueError, match="no control"):
        finetune_summary(dict(results, runs=results["runs"][1:]))
    bad = json.loads(json.dumps(results))
    bad["runs"][0]["passkey"][0]["found"] = [2, 0]
    with pytest.raises(ValueError, match="0/1"):
        finetune_summary(bad)
    bad = json.loads(json.dumps(results))
    bad["runs"][0]["perplexity"]["rows"]["count"] = [[1.0]]
    with pytest.raises(ValueError, match="bins"):
        finetune_summary(bad)
    assert shipped_bound_verdict([{"distance": 10, "n": 20, "correct": 20}], bound=45) is None


def test_describe_finetune_says_what_ran_where_and_every_verdict():
    summary = finetune_summary(_results_file(np.random.default_rng(2)))
    text = describe_finetune(summary)
    assert "Run on Some GPU (cuda, 4 torch threads)" in text and "torch 2" in text
    assert "2 steps, 512 tokens in 1 s" in text and "50% of the batches" in text
    small = summary["runs"][1]["verdict"]
    assert f"all three: {small['overall']}" in text and text.count("→ supported") >= 2
    assert "found within its bound 20/20, beyond 37/40" in text
    assert "reproduce: none (1 stored verdicts checked)" in text and "INCOMPLETE" not in text
    assert "base 500 (L_θ = 45): halves at 45" in text
    summary["complete"], summary["problems"] = False, ["run 500: stored correct 5"]
    text = describe_finetune(summary)
    assert text.startswith("INCOMPLETE") and "run 500: stored correct 5" in text
