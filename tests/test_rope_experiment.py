import math

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from shortlab.rope import check_base, max_context, rope_bias, rope_frequencies
from shortlab.rope_experiment import (
    CharTokenizer, PasskeyPrompt, RetrievalTask, binned_perplexity, build_model, char_stream,
    distance_batch, lm_losses, nearest_valid_base, passkey_prompt, passkey_trial, per_position_nll,
    published_checks, qk_pair_weights, retrieval_accuracy, retrieval_example, rope_matrix,
    rope_model_config, rotate, score_gap_monte_carlo, text_batch, train_lm, training_batches,
    valid_bases,
)

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "How vexingly quick daft zebras jump! ") * 40


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer()


@pytest.fixture(scope="module")
def text_ids(tokenizer):
    return char_stream(tokenizer, [TEXT, "Sphinx of black quartz, judge my vow. " * 30])


def tiny_model(base=100.0, context=128, seed=0):
    config = rope_model_config(base, CharTokenizer().vocab_size, context=context, hidden_size=32,
                               num_layers=1, head_dim=16, intermediate_size=64)
    return build_model(config, seed)


# ----------------------------------------------------------------------------- derivation

@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_rotate_is_the_block_rotation_and_depends_only_on_relative_position(layout):
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 16, generator=generator, dtype=torch.float64)
    for position in (0, 3, 1000):
        expected = rope_matrix(position, 500.0, 16, layout=layout) @ q
        torch.testing.assert_close(rotate(q, position, 500.0, layout=layout), expected)
    score = (rotate(q, 107, 500.0, layout=layout) * rotate(k, 100, 500.0, layout=layout)).sum()
    shifted = (rotate(q, 7, 500.0, layout=layout) * rotate(k, 0, 500.0, layout=layout)).sum()
    torch.testing.assert_close(score, shifted)
    # R_aᵀ R_b = R_{b−a}, and tr(R_m) = 2 B(m)
    r_a, r_b = (rope_matrix(m, 500.0, 16, layout=layout) for m in (100, 107))
    torch.testing.assert_close(r_a.T @ r_b, rope_matrix(7, 500.0, 16, layout=layout))
    assert math.isclose(float(torch.trace(rope_matrix(7, 500.0, 16, layout=layout))),
                        2 * float(rope_bias(7, 500.0, 16)), rel_tol=1e-12)


def test_half_layout_matches_transformers_rotary_embedding():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 5, 8, generator=generator, dtype=torch.float64)  # [B, heads, T, d]
    positions = torch.arange(5, dtype=torch.float64)
    angles = positions[:, None] * torch.from_numpy(rope_frequencies(1e4, 8))
    cos = torch.cat((angles.cos(), angles.cos()), -1)[None]
    sin = torch.cat((angles.sin(), angles.sin()), -1)[None]
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(rotate(x, positions, 1e4, layout="half"), expected)
    with pytest.raises(ValueError, match="layout"):
        rotate(x, positions, 1e4, layout="pairs")


def test_monte_carlo_gap_is_two_sigma_squared_b():
    distances = [0, 5, 40, 300]
    result = score_gap_monte_carlo(1e3, 32, distances, n_samples=3000, sigma=0.7, seed=3)
    expected = 2 * 0.7**2 * rope_bias(np.array(distances), 1e3, 32)
    assert np.all(np.abs(result["gap"] - expected) < 5 * result["gap_stderr"])
    np.testing.assert_allclose(result["gap"], result["similar"] - result["random"], atol=1e-9)
    # and the check can fail: a wrong σ is far outside the error bars
    assert np.any(np.abs(result["gap"] - expected / 0.7**2) > 5 * result["gap_stderr"])


# ----------------------------------------------------------------------------- published bounds

def test_valid_bases_agree_with_check_base():
    bases = np.geomspace(2e3, 2e4, 40)
    valid = valid_bases(bases, 1024, 64)
    assert valid.shape == (40,) and valid.any() and not valid.all()
    assert valid.tolist() == [check_base(b, 1024, 64)[0] for b in bases]
    assert valid_bases(bases.reshape(4, 10), 1024, 64).shape == (4, 10)


def test_nearest_valid_base_is_valid_and_nothing_closer_is():
    base, context = 10447.0, 1024  # d = 64: this base does not support 1024 tokens
    assert not check_base(base, context, 64)[0]
    above = nearest_valid_base(base, context, 64, direction=+1, rtol=1e-3)
    below = nearest_valid_base(base, context, 64, direction=-1, rtol=1e-3)
    for found, direction in ((above, 1), (below, -1)):
        if found is None:
            continue
        assert check_base(found, context, 64)[0] and (found - base) * direction > 0
        steps = round(math.log(found / base) / math.log1p(1e-3)) * direction
        closer = [base * (1 + 1e-3) ** (direction * j) for j in range(1, steps)]
        assert not valid_bases(closer, context, 64).any()
    assert above is not None
    assert nearest_valid_base(base, context, 64, direction=+1, span=1.0001) is None
    with pytest.raises(ValueError, match="direction"):
        nearest_valid_base(base, context, 64, direction=0)


def test_published_checks_cover_every_convention():
    bound = max_context(1e4, 64)  # 724: base 1e4 supports exactly this many tokens
    rows = published_checks({str(bound): 1e4, str(bound + 1): 1e4, "1K": 1e4}, 64)
    assert [row["context"] for row in rows] == [str(bound), str(bound + 1), "1K"]
    first, second, third = rows
    assert first["holds_under"] == ["k=1000 closed", "k=1000 half_open", "k=1024 closed",
                                    "k=1024 half_open"]
    # one more token: fails with m up to L, holds with m up to L - 1
    assert second["k=1024 closed"] == (False, bound + 1)
    assert second["holds_under"] == ["k=1000 half_open", "k=1024 half_open"]
    assert third["holds_under"] == [] and third["k=1000 closed"] == (False, bound + 1)


# ----------------------------------------------------------------------------- characters

def test_char_tokenizer_round_trip_and_normalisation(tokenizer):
    text = tokenizer.normalize("Café\tnaïve — “quotes”\nline")
    assert text == "Cafe naive  quotes\nline"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.vocab_size == 96 and tokenizer.encode("\n")[0] == 0
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.encode("a\x01b")


# ----------------------------------------------------------------------------- retrieval data

LOOK_ALIKE = dict(key_alphabet="abcd", key_length=4, separator="=", value_length=2)


def records_in(tokenizer, ids, task):
    """key -> (index of the record's anchor, value) for every record of a decoded sequence."""
    text = tokenizer.decode(ids)
    found = {}
    start = text.find("[")
    while start >= 0:
        end = text.index("]", start)
        inner = text[start + 1:end]
        key, value = inner[:task.key_length], inner[task.key_length + len(task.separator):]
        assert inner == key + task.separator + value
        found[key] = (start + task.key_length + len(task.separator), value)
        start = text.find("[", end)
    return found


@pytest.mark.parametrize("style", [{}, dict(LOOK_ALIKE, near_keys=2)], ids=["symbols", "look-alike"])
def test_retrieval_example_answers_are_the_records_values(tokenizer, text_ids, style):
    task = RetrievalTask(n_records=10, n_queries=3, **style)
    example = retrieval_example(text_ids, tokenizer, task, 400, np.random.default_rng(0))
    assert example.input_ids.shape == (400,)
    records = records_in(tokenizer, example.input_ids, task)
    assert len(records) == task.n_records  # keys distinct
    assert all(set(key) <= set(task.key_alphabet) and len(key) == task.key_length for key in records)
    anchor = task.key_length + len(task.separator)  # query "\n?" key separator: anchor offset + 1
    for j, key in enumerate(example.keys):
        answer = tokenizer.decode(example.input_ids[example.answer_positions[j]])
        assert answer == records[key][1] == example.values[j]
        assert len(answer) == task.value_length and set(answer) <= set(task.value_alphabet)
        query_anchor = example.answer_positions[j][0] - 1
        query = tokenizer.decode(example.input_ids[query_anchor - anchor - 1: query_anchor + 1])
        assert query == f"\n?{key}{task.separator}"
        assert example.distances[j] == query_anchor - records[key][0]
        near = [other for other in records if sum(a != b for a, b in zip(other, key)) == 1]
        assert len(near) >= task.near_keys
    tail = tokenizer.decode(example.input_ids[-task.n_queries * task.query_length:])
    assert tail.count("?") == 3 and tail.startswith("\n?")


def test_records_spread_over_the_whole_sequence(tokenizer, text_ids):
    task = RetrievalTask(n_records=6, n_queries=2)
    rng = np.random.default_rng(0)
    distances = np.concatenate([retrieval_example(text_ids, tokenizer, task, 300, rng).distances
                                for _ in range(200)])
    assert distances.min() < 30 and distances.max() > 260  # near and far records both occur


def test_retrieval_examples_are_deterministic_by_seed(tokenizer, text_ids):
    task = RetrievalTask()
    first, again, other = (retrieval_example(text_ids, tokenizer, task, 300,
                                             np.random.default_rng(seed)) for seed in (5, 5, 6))
    np.testing.assert_array_equal(first.input_ids, again.input_ids)
    assert not np.array_equal(first.input_ids, other.input_ids)
    batches_a, batches_b = (training_batches(text_ids, tokenizer, task, 300, 2, seed=1)
                            for _ in range(2))
    for _ in range(2):
        a, b = next(batches_a), next(batches_b)
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["answer_mask"], b["answer_mask"])


@pytest.mark.parametrize("style", [{}, LOOK_ALIKE], ids=["symbols", "look-alike"])
def test_distances_are_as_requested(tokenizer, text_ids, style):
    task = RetrievalTask(n_queries=1, n_records=6, **style)
    shortest = task.record_length + 2  # record, one free cell, then the query's "\n?" and key
    longest = 300 - task.query_length + 1 + task.key_length + len(task.separator) \
        - (task.key_length + len(task.separator))  # record at index 0
    requested = [shortest, 50, 200, longest]
    batch = distance_batch(text_ids, tokenizer, task, 300, requested, per_distance=3, seed=0)
    assert batch["input_ids"].shape == (12, 300)
    assert batch["distances"][:, 0].tolist() == [d for d in requested for _ in range(3)]
    for ids, distance, positions in zip(batch["input_ids"], batch["distances"][:, 0],
                                        batch["answer_positions"][:, 0]):
        records = records_in(tokenizer, ids.numpy(), task)
        anchor = int(positions[0]) - 1
        key = tokenizer.decode(ids[anchor - len(task.separator) - task.key_length + 1:
                                   anchor - len(task.separator) + 1].numpy())
        assert records[key][0] == anchor - distance
        assert records[key][1] == tokenizer.decode(ids[positions].numpy())
    for impossible in (shortest - 1, longest + 1):
        with pytest.raises(ValueError, match=rf"does not fit .* \[{shortest}, {longest}\]"):
            distance_batch(text_ids, tokenizer, task, 300, [impossible], 1, 0)
    with pytest.raises(ValueError, match="n_queries = 1"):
        distance_batch(text_ids, tokenizer, RetrievalTask(), 300, [50], 1, 0)


def test_task_validation():
    with pytest.raises(ValueError, match="near keys"):
        RetrievalTask(n_records=4, n_queries=3, near_keys=1)
    with pytest.raises(ValueError, match="distinct keys"):
        RetrievalTask(n_records=20)
    with pytest.raises(ValueError, match="value symbols"):
        RetrievalTask(key_alphabet="ab1")
    with pytest.raises(ValueError, match="too short"):
        retrieval_example(np.zeros(1000, dtype=np.int64), CharTokenizer(), RetrievalTask(), 50,
                          np.random.default_rng(0))


# ----------------------------------------------------------------------------- models

def test_configs_differ_only_in_rope_base_and_initial_weights_match():
    small, large = (rope_model_config(base, 96, context=256) for base in (100.0, 1e6))
    a, b = small.to_dict(), large.to_dict()
    differing = {key for key in a.keys() | b.keys() if a.get(key) != b.get(key)}
    assert differing == {"rope_parameters"}
    assert a["rope_parameters"] == {"rope_type": "default", "rope_theta": 100.0}
    assert b["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}
    assert (small.head_dim, small.num_attention_heads) == (32, 4)
    model_small, model_large = build_model(small, seed=0), build_model(large, seed=0)
    for (name, p), (_, q) in zip(model_small.state_dict().items(),
                                 model_large.state_dict().items()):
        if "rotary" in name:  # inv_freq buffers are where the bases differ
            assert not torch.equal(p, q)
        else:
            assert torch.equal(p, q), name
    inv_freq = model_large.model.rotary_emb.inv_freq.double().numpy()
    np.testing.assert_allclose(inv_freq, rope_frequencies(1e6, 32), rtol=1e-6)


def test_training_reduces_the_loss(one_thread, tokenizer, text_ids):
    model = tiny_model()
    batches = training_batches(text_ids, tokenizer, RetrievalTask(n_records=3, n_queries=1),
                               128, 4, seed=0)
    history = train_lm(model, batches, 40, task_weight=1.0, lr=1e-2, warmup=5)
    assert len(history["loss"]) == len(history["answer_loss"]) == 40 and not model.training
    assert np.mean(history["loss"][-5:]) < np.mean(history["loss"][:5]) - 1.0
    with pytest.raises(ValueError, match="task_weight"):
        train_lm(model, batches, 1, task_weight=-1.0)


def test_answer_loss_is_the_loss_on_the_answer_tokens(one_thread, tokenizer, text_ids):
    model = tiny_model().eval()
    batch = next(training_batches(text_ids, tokenizer, RetrievalTask(n_records=4, n_queries=2, value_length=2),
                                  96, 2, seed=3))
    assert batch["answer_mask"].sum() == 2 * 2 * 2  # rows x queries x value digits
    decoded = CharTokenizer().decode(batch["input_ids"][batch["answer_mask"]].numpy())
    assert decoded.isdigit()
    with torch.no_grad():
        loss, answer_loss = lm_losses(model, batch["input_ids"], batch["answer_mask"])
        logprobs = model(input_ids=batch["input_ids"]).logits.log_softmax(-1)
    ids = batch["input_ids"]
    picked = -logprobs[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
    assert math.isclose(loss.item(), picked.mean().item(), rel_tol=1e-5)
    assert math.isclose(answer_loss.item(), picked[batch["answer_mask"][:, 1:]].mean().item(),
                        rel_tol=1e-5)


# ----------------------------------------------------------------------------- measurements

def test_per_position_nll_matches_the_logits_and_respects_the_mask(one_thread, text_ids):
    model = tiny_model().eval()
    ids = text_batch(text_ids, 40, 3, seed=0)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, 10:] = False
    mask[:, 20] = False
    nll_sum, count = per_position_nll(model, ids, mask, batch_size=2)
    assert nll_sum.shape == count.shape == (40,)
    assert count[0] == 0 and count[5] == 3 and count[15] == 2 and count[20] == 0
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits.log_softmax(-1)
    picked = -logprobs[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)  # [3, 39], target t = i + 1
    expected = (picked * mask[:, 1:]).sum(0).double().numpy()
    np.testing.assert_allclose(nll_sum[1:], expected, rtol=1e-5)
    assert nll_sum[20] == 0
    perplexities = binned_perplexity(nll_sum, count, [1, 20, 40])
    np.testing.assert_allclose(perplexities[0], math.exp(nll_sum[1:20].sum() / count[1:20].sum()))
    assert np.isnan(binned_perplexity(nll_sum, count, [0, 1, 2])[0])
    with pytest.raises(ValueError, match="increasing"):
        binned_perplexity(nll_sum, count, [5, 5])


def test_retrieval_accuracy_is_the_greedy_answer(one_thread, tokenizer, text_ids):
    model = tiny_model().eval()
    batch = distance_batch(text_ids, tokenizer, RetrievalTask(n_queries=1, n_records=4), 128,
                           [20, 60], per_distance=2, seed=0)
    correct = retrieval_accuracy(model, batch, batch_size=3)
    with torch.no_grad():
        argmax = model(input_ids=batch["input_ids"]).logits.argmax(-1)
    positions = batch["answer_positions"][:, 0]  # [N, digits]
    expected = (argmax.gather(1, positions - 1) == batch["input_ids"].gather(1, positions)).all(1)
    assert correct.shape == (4, 1) and correct[:, 0].tolist() == expected.tolist()
    # an oracle batch whose answers are what the model predicts is always "found"
    rigged = dict(batch, input_ids=batch["input_ids"].clone())
    for row in range(4):
        for position in positions[row]:  # answer digits in order, each given the previous ones
            with torch.no_grad():
                guess = model(input_ids=rigged["input_ids"][row:row + 1]).logits[0, position - 1]
            rigged["input_ids"][row, position] = guess.argmax()
    assert retrieval_accuracy(model, rigged).all()


def test_qk_pair_weights_are_the_variances_of_the_projections(one_thread, text_ids):
    model = tiny_model().eval()
    ids = text_batch(text_ids, 32, 2, seed=1)
    weights = qk_pair_weights(model, ids)
    assert weights.shape == (1, 2, 8)
    layer = model.model.layers[0]
    with torch.no_grad():
        normed = layer.input_layernorm(model.model.embed_tokens(ids))
        q = layer.self_attn.q_proj(normed).unflatten(-1, (2, 16))
        k = layer.self_attn.k_proj(normed).unflatten(-1, (2, 16))
    for head in range(2):
        pooled = torch.cat((q[..., head, :], k[..., head, :])).reshape(-1, 16).double()
        variances = pooled.var(0, correction=0).numpy()
        np.testing.assert_allclose(weights[0, head], variances[:8] + variances[8:], rtol=1e-6)


# ----------------------------------------------------------------------------- passkey

@pytest.fixture(scope="module")
def tiny_llama():
    from shortlab.models import load_model
    return load_model("tiny-llama")


def test_passkey_prompt_layout(tiny_llama):
    _, tok = tiny_llama
    filler = tok("In the beginning God created the heaven and the earth. " * 30,
                 add_special_tokens=False)["input_ids"]
    prompt = passkey_prompt(tok, filler, 120, "40817")
    assert isinstance(prompt, PasskeyPrompt) and prompt.distance == 120
    ids = prompt.input_ids.tolist()
    answer = tok.decode(ids[prompt.answer_positions[0]:])
    assert answer.strip() == "40817" and prompt.answer_positions[-1] == len(ids) - 1
    needle_start = int(prompt.answer_positions[0]) - 120
    assert tok.decode(ids[needle_start:needle_start + len(prompt.answer_positions)]).strip() == "40817"
    assert tok.decode(ids[:needle_start]).endswith("The pass key is")
    n_filler = int(prompt.filler_mask.sum())
    first = int(prompt.filler_mask.nonzero()[0])
    assert ids[first:first + n_filler] == filler[:n_filler]
    assert tok.decode(ids[first + n_filler:prompt.answer_positions[0]]).strip() == \
        "What is the pass key? The pass key is"
    longer = passkey_prompt(tok, filler, 150, "40817")
    assert int(longer.filler_mask.sum()) == n_filler + 30
    with pytest.raises(ValueError, match="shorter than"):
        passkey_prompt(tok, filler, 5, "40817")
    with pytest.raises(ValueError, match="filler tokens"):
        passkey_prompt(tok, filler[:10], 120, "40817")


def test_passkey_trial_matches_a_plain_forward(one_thread, tiny_llama):
    model, tok = tiny_llama
    filler = tok("And the earth was without form, and void. " * 20,
                 add_special_tokens=False)["input_ids"]
    prompt = passkey_prompt(tok, filler, 80, "12345")
    found, nll_sum, count = passkey_trial(model, prompt)
    with torch.no_grad():
        logprobs = model(input_ids=prompt.input_ids[None]).logits[0].log_softmax(-1)
    positions = prompt.answer_positions
    expected = bool((logprobs[positions - 1].argmax(-1) == prompt.input_ids[positions]).all())
    assert found == expected
    assert count.sum() == prompt.filler_mask.sum() and np.all(count[~prompt.filler_mask.numpy()] == 0)
    t = int(prompt.filler_mask.nonzero()[3])
    assert math.isclose(nll_sum[t], -float(logprobs[t - 1, prompt.input_ids[t]]), rel_tol=1e-4)


def test_the_needle_moves_deeper_without_changing_its_distance(tiny_llama):
    from shortlab.rope_experiment.passkey import passkey_prompt

    tokenizer = tiny_llama[1]
    filler = list(range(1000, 1200))
    shallow = passkey_prompt(tokenizer, filler, 60, "12345")
    deep = passkey_prompt(tokenizer, filler, 60, "12345", before_ids=list(range(2000, 2040)))
    assert shallow.distance == deep.distance == 60
    assert deep.input_ids.numel() == shallow.input_ids.numel() + 40
    assert int(deep.filler_mask.sum()) == int(shallow.filler_mask.sum()) + 40
    assert torch.equal(deep.input_ids[-len(shallow.answer_positions):], shallow.input_ids[-len(shallow.answer_positions):])


@pytest.fixture
def recorded_prompts(monkeypatch):
    """The prompts ``passkey_found`` is given, in order, with every passkey counted as found."""
    from shortlab.rope_experiment import passkey

    seen = []

    def record(model, input_ids, answer_positions, batch_size=8):
        seen.extend(input_ids.tolist())
        return np.ones(input_ids.shape[0], dtype=bool)

    monkeypatch.setattr(passkey, "passkey_found", record)
    return seen


def test_passkey_grid_draws_its_own_haystack_per_trial_and_keeps_depth_zero_prompts(tiny_llama, recorded_prompts):
    from shortlab.rope_experiment import passkey

    model, tokenizer = tiny_llama
    seen = recorded_prompts
    filler = list(np.random.default_rng(0).integers(1000, 5000, size=600))
    rows = passkey.passkey_accuracy(model, tokenizer, filler, [40, 80], trials=3, depths=(0, 100), max_length=400)
    assert [(row["depth"], row["distance"]) for row in rows] == [(0, 40), (0, 80), (100, 40), (100, 80)]
    grid_prompts, seen[:] = list(seen), []
    passkey.passkey_accuracy(model, tokenizer, filler, [40, 80], trials=3)
    assert seen == grid_prompts[:6], "depth 0 keeps the prompts of the grid without depths"
    deep = grid_prompts[6:9]
    assert all(len(p) == len(q) + 100 for p, q in zip(deep, grid_prompts[:3]))
    assert len({tuple(p) for p in deep}) == 3, "every trial draws its own haystack"
    with pytest.raises(ValueError, match="depths"):
        passkey.passkey_accuracy(model, tokenizer, filler, [40], depths=(0, 0))
    with pytest.raises(ValueError, match="filler tokens"):
        passkey.passkey_accuracy(model, tokenizer, filler, [400], depths=(300,))


def test_rulers_essays_are_the_haystack():
    from shortlab.rope_experiment.passkey import RULER_ESSAYS, essay_text

    try:
        text = essay_text()
    except FileNotFoundError:
        pytest.skip(f"{RULER_ESSAYS.distribution} is not installed")
    assert len(text) > 2_000_000 and text.startswith("April 2012")  # the essays, about 3 M characters
    assert text.count("\n") > 10_000


def test_shared_filler_protocol_reuses_each_trials_text_at_every_distance(tiny_llama, recorded_prompts):
    """Notebook 03's first protocol: trial k's haystack comes from block k at every distance
    (its prompts at two distances share their text), not from a window of its own."""
    from shortlab.rope_experiment import passkey

    model, tokenizer = tiny_llama
    seen = recorded_prompts
    blocks = [list(np.random.default_rng(k).integers(1000, 5000, size=200)) for k in range(2)]
    rows = passkey.shared_filler_passkey(model, tokenizer, blocks, [60, 120], seed=0)
    assert [(row["distance"], row["n"], row["correct"]) for row in rows] == [(60, 2, 2), (120, 2, 2)]
    short, long = seen[:2], seen[2:]
    for trial, block in enumerate(blocks):
        text = block[:20]  # the first filler tokens after the needle are the block's first ones at both distances
        assert any(short[trial][i: i + 20] == text for i in range(len(short[trial])))
        assert any(long[trial][i: i + 20] == text for i in range(len(long[trial])))


def test_passkey_protocols_script_stores_every_setup_and_resumes(tmp_path, monkeypatch):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import passkey_protocols

    output = tmp_path / "protocols.json"
    monkeypatch.setattr(passkey_protocols, "essay_token_ids",
                        lambda tokenizer: list(np.random.default_rng(0).integers(1000, 5000, size=3000)))
    args = ["--model", "tiny-llama", "--distances", "40", "80", "--trials", "2", "--dtypes", "float32",
            "--output", str(output)]
    assert passkey_protocols.main(args) == 0
    stored = json.loads(output.read_text())
    assert set(stored["runs"]) == {f"{setup}|float32" for setup in passkey_protocols.SETUPS}
    for run in stored["runs"].values():
        assert [row["distance"] for row in run["rows"]] == [40, 80] and all(row["n"] == 2 for row in run["rows"])
        assert run["weights_fingerprint"] and run["provenance"]["command"]
    monkeypatch.setattr(passkey_protocols, "measure", lambda *a, **k: pytest.fail("a stored setup was measured again"))
    assert passkey_protocols.main(args) == 0
    with pytest.raises(SystemExit, match="another measurement"):
        passkey_protocols.main(args[:-4] + ["--trials", "3", "--output", str(output)])


def test_protocol_comparison_pairs_precisions_and_compares_fillers():
    """Identical prompts in two precisions pair trial by trial; two fillers compare as
    independent samples; rates split at the bound."""
    from shortlab.rope_experiment.protocols import filler_effect, precision_effects, protocol_rates
    from shortlab.stats import CONTRADICTED, EQUIVALENT, SUPPORTED

    def run(setup, dtype, within, beyond):
        return {"setup": setup, "dtype": dtype,
                "rows": [{"distance": 100, "found": within}, {"distance": 900, "found": beyond}]}

    ones, zeros = [1] * 200, [0] * 200
    stored = {"runs": {"a|float32": run("a", "float32", ones, zeros), "a|bfloat16": run("a", "bfloat16", ones, zeros),
                       "b|float32": run("b", "float32", [1, 0] * 100, zeros),
                       "b|bfloat16": run("b", "bfloat16", zeros, zeros)}}
    rates = {(row["setup"], row["dtype"]): row for row in protocol_rates(stored, bound=500)}
    assert rates["a", "float32"]["within"].estimate == 1.0 and rates["a", "float32"]["beyond"].estimate == 0.0
    assert protocol_rates(stored, bound=1000)[0]["beyond"] is None
    effects = precision_effects(stored, 500, margin=0.05)
    assert effects["a"]["verdict"] == EQUIVALENT  # the same prompts, the same answers
    assert effects["b"]["verdict"] == SUPPORTED and effects["b"]["difference"].estimate == pytest.approx(0.5)
    filler = filler_effect(stored, 500, "b", "a", margin=0.05)
    assert filler["verdict"] == CONTRADICTED and filler["difference"].estimate == pytest.approx(-0.5)
    assert filler_effect(stored, 500, "c", "a", margin=0.05) is None
