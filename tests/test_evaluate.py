import copy
import math

import numpy as np
import pytest
import torch

from shortlab.evaluate import (
    TASKS,
    MCExample,
    arc_example,
    block_nll,
    boolq_example,
    encode_examples,
    encode_pair,
    evaluate_mc,
    hellaswag_example,
    load_task,
    loglikelihoods,
    mmlu_example,
    openbookqa_example,
    perplexity,
    piqa_example,
    sciq_example,
    score_examples,
    score_items,
    social_iqa_example,
    winogrande_example,
)
from shortlab.models import load_model


@pytest.fixture(scope="session")
def tiny():
    return load_model("tiny-llama")


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _manual_loglik(model, context, continuation):
    """log p(continuation | context) from one unpadded forward pass."""
    tokens = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(tokens).logits.double(), -1)[0]
    positions = range(len(context) - 1, len(context) + len(continuation) - 1)
    return sum(logprobs[p, t].item() for p, t in zip(positions, continuation, strict=True))


# ---------------------------------------------------------------- prompt formats


def test_hellaswag_cleans_wikihow_artefacts_and_capitalises_ctx_b():
    doc = {
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to plant a tree [title] Dig a hole.",
        "ctx_b": "then",
        "endings": ["place the tree [step] in it.", "eat  the shovel."],
        "label": "0",
    }
    example = hellaswag_example(doc)
    assert example.contexts[0] == "Home and Garden: How to plant a tree. Dig a hole. Then"
    assert example.continuations == (" place the tree in it.", " eat the shovel.")
    assert example.gold == 0


def test_winogrande_fills_the_blank_in_the_context_and_scores_the_rest():
    doc = {
        "sentence": "The trophy did not fit in the case because _ was too big.",
        "option1": "the trophy",
        "option2": "the case",
        "answer": "1",
    }
    example = winogrande_example(doc)
    assert example.contexts == (
        "The trophy did not fit in the case because the trophy",
        "The trophy did not fit in the case because the case",
    )
    assert example.continuations == (" was too big.", " was too big.")
    assert example.gold == 0


def test_simple_task_templates():
    arc = arc_example(
        {
            "question": "Which is hot?",
            "choices": {"text": ["ice", "fire"], "label": ["1", "2"]},
            "answerKey": "2",
        }
    )
    assert (arc.contexts[0], arc.continuations, arc.gold) == (
        "Question: Which is hot?\nAnswer:",
        (" ice", " fire"),
        1,
    )
    boolq = boolq_example({"passage": "Snow is cold.", "question": "is snow cold", "answer": True})
    assert (boolq.contexts[0], boolq.choices, boolq.gold) == (
        "Snow is cold.\nQuestion: is snow cold?\nAnswer:",
        ("no", "yes"),
        1,
    )
    piqa = piqa_example({"goal": "Open a jar", "sol1": "twist", "sol2": "lick", "label": 0})
    assert piqa.contexts[0] == "Question: Open a jar\nAnswer:"
    obqa = openbookqa_example(
        {
            "question_stem": "The sun is a",
            "choices": {"text": ["star", "moon"], "label": ["A", "B"]},
            "answerKey": " A",
        }
    )
    assert (obqa.contexts[0], obqa.gold) == ("The sun is a", 0)
    sciq = sciq_example(
        {
            "support": "  Water boils.",
            "question": "What boils?",
            "distractor1": "a",
            "distractor2": "b",
            "distractor3": "c",
            "correct_answer": "water",
        }
    )
    assert (sciq.contexts[0], sciq.choices[3], sciq.gold) == (
        "Water boils.\nQuestion: What boils?\nAnswer:",
        "water",
        3,
    )
    siqa = social_iqa_example(
        {
            "context": "Ann ate.",
            "question": "Why?",
            "answerA": "x",
            "answerB": "y",
            "answerC": "z",
            "label": "3",
        }
    )
    assert (siqa.contexts[0], siqa.gold) == ("Q: Ann ate. Why?\nA:", 2)


def test_mmlu_prompt_matches_the_harness_template():
    shot = {
        "question": " What is 1+1? ",
        "subject": "elementary_mathematics",
        "choices": ["1", "2", "3", "4"],
        "answer": 1,
    }
    doc = {
        "question": "What is 2+2?",
        "subject": "elementary_mathematics",
        "choices": ["2", "3", "4", "5"],
        "answer": 2,
    }
    example = mmlu_example(doc, [shot])
    assert example.contexts[0] == (
        "The following are multiple choice questions (with answers) about "
        "elementary mathematics.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "What is 2+2?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer:"
    )
    assert example.continuations == (" A", " B", " C", " D")
    assert example.gold == 2


def test_mmlu_five_shot_uses_five_dev_questions_of_the_same_subject():
    zero = load_task("mmlu", limit=6, seed=1)
    five = load_task("mmlu", limit=6, seed=1, num_fewshot=5)
    for plain, shots in zip(zero, five, strict=True):
        context = shots.contexts[0]
        assert context.startswith(
            "The following are multiple choice questions (with answers) about "
        )
        assert context.endswith("Answer:")
        assert context.count("\nAnswer:") == 6
        assert context.count("\nAnswer: ") == 5  # the five answered shots
        assert plain.contexts[0].count("\nAnswer:") == 1
        question = plain.contexts[0].split("\n\n", 1)[1]
        assert context.endswith("\n\n" + question)
        assert shots.gold == plain.gold
    with pytest.raises(ValueError, match="5 dev questions; num_fewshot=6"):
        load_task("mmlu", limit=1, num_fewshot=6)


def test_every_task_loads_real_examples():
    for name in TASKS:
        examples = load_task(name, limit=30)
        assert len(examples) == 30, name
        assert all(0 <= example.gold < len(example.choices) for example in examples)
    assert len(load_task("mmlu")) == 14042
    assert len({example.gold for example in load_task("hellaswag", limit=200)}) == 4


def test_limit_subsets_are_seeded_and_nested():
    assert load_task("piqa", limit=40, seed=0) == load_task("piqa", limit=40, seed=0)
    assert load_task("piqa", limit=40, seed=0) != load_task("piqa", limit=40, seed=1)
    small, large = load_task("piqa", limit=20, seed=5), load_task("piqa", limit=40, seed=5)
    assert set(small) <= set(large)
    subjects = {
        example.contexts[0].split("about ", 1)[1].split(".\n", 1)[0]
        for example in load_task("mmlu", limit=200)
    }
    assert len(subjects) > 30  # drawn across subjects, not the first ones


def test_unknown_task_and_unsupported_fewshot_are_named(tiny):
    with pytest.raises(ValueError, match="known tasks: mmlu, hellaswag, piqa"):
        load_task("gsm8k")
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['nope'\]"):
        evaluate_mc(*tiny, ["piqa", "nope"], limit=2, progress=False)
    with pytest.raises(ValueError, match="only mmlu ships few-shot examples; 'piqa'"):
        load_task("piqa", num_fewshot=5)
    with pytest.raises(ValueError, match="gold index 2 outside the 2 choices"):
        MCExample.shared("context", ["a", "b"], 2)


# ---------------------------------------------------------------- scoring


def test_encode_pair_moves_trailing_space_and_splits_the_joint_encoding(tiny):
    _, tokenizer = tiny
    context, continuation = encode_pair(
        tokenizer, "Question: what colour is the sky?\nAnswer: ", "blue"
    )
    assert context + continuation == _ids(
        tokenizer, "Question: what colour is the sky?\nAnswer: blue"
    )
    assert tokenizer.decode(continuation) == " blue"
    assert context == _ids(tokenizer, "Question: what colour is the sky?\nAnswer:")


def test_acc_and_acc_norm_differ_when_length_matters():
    example = MCExample.shared("context", ["a", "bb"], gold=1)
    # Raw: -2 beats -3.5. Per character of the choice (without the leading space, as in the
    # harness): -2/1 loses to -3.5/2; counting the space would flip it back (-2/2 > -3.5/3).
    scores = score_examples([example], [-2.0, -3.5])
    assert (scores["acc"], scores["acc_norm"], scores["n"]) == (0.0, 1.0, 1)
    half = score_examples([example, example], [-2.0, -3.5, -3.5, -2.0])
    assert half["acc"] == 0.5 and math.isclose(half["acc_stderr"], 0.5)


def test_loglikelihoods_match_a_manual_forward_and_do_not_depend_on_batching(tiny):
    model, tokenizer = tiny
    examples = (
        load_task("arc_easy", limit=4)
        + load_task("mmlu", limit=2)
        + load_task("winogrande", limit=2)
    )
    requests = encode_examples(tokenizer, examples)
    one = loglikelihoods(model, requests, batch_size=1)
    many = loglikelihoods(model, requests, batch_size=8)
    assert one.shape == (len(requests),)
    torch.testing.assert_close(many, one, atol=1e-5, rtol=0)
    for index in (0, len(requests) - 1):
        assert math.isclose(
            one[index].item(), _manual_loglik(model, *requests[index]), abs_tol=1e-4
        )


def test_requests_longer_than_the_model_are_left_truncated(tiny):
    model, tokenizer = tiny
    limit = model.config.max_position_embeddings
    context = _ids(tokenizer, " ".join(["word"] * (limit + 50)))
    continuation = _ids(tokenizer, " end of text")
    (truncated,) = loglikelihoods(model, [(context, continuation)]).tolist()
    kept = context[-(limit - len(continuation) + 1) :]
    assert math.isclose(truncated, _manual_loglik(model, kept, continuation), abs_tol=1e-4)


def test_loglikelihood_requests_need_tokens(tiny):
    with pytest.raises(ValueError, match="at least one context token and one continuation token"):
        loglikelihoods(tiny[0], [([1, 2], [])])


# ---------------------------------------------------------------- perplexity


def test_perplexity_equals_the_manual_computation(tiny):
    model, _ = tiny
    ids = torch.randint(0, 1000, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits.double(), -1)
    nll = -logprobs[:, :-1].gather(2, ids[:, 1:, None]).mean()
    assert math.isclose(
        perplexity(model, ids, torch.ones_like(ids), batch_size=2), math.exp(nll), rel_tol=1e-5
    )


def test_block_nll_gives_each_row_its_own_sum_and_count(tiny):
    model, _ = tiny
    ids = torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0  # row 2 predicts 7 tokens, the others 11
    nll, counts = block_nll(model, ids, mask, batch_size=2)
    assert counts.tolist() == [11, 11, 7] and nll.dtype == np.float64
    for row in range(3):
        n = int(counts[row]) + 1
        alone = perplexity(model, ids[row:row + 1, :n])
        assert math.isclose(math.exp(nll[row] / counts[row]), alone, rel_tol=1e-5)
    assert math.isclose(perplexity(model, ids, mask), math.exp(nll.sum() / counts.sum()), rel_tol=1e-12)


def test_perplexity_ignores_padding(tiny):
    model, tokenizer = tiny
    texts = ["The cat sat on the mat and looked outside.", "Rain fell all day over the hills."]
    rows = [_ids(tokenizer, text) for text in texts]
    width = max(map(len, rows)) + 7
    ids = torch.full((2, width), tokenizer.pad_token_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    for r, tokens in enumerate(rows):
        ids[r, : len(tokens)], mask[r, : len(tokens)] = torch.tensor(tokens), 1
    padded = perplexity(model, ids, mask, batch_size=2)
    # Unpadded: the same tokens as one row each, combined by token-weighted NLL.
    total = sum(-math.log(perplexity(model, torch.tensor([t]))) * (len(t) - 1) for t in rows)
    unpadded = math.exp(-total / sum(len(t) - 1 for t in rows))
    assert math.isclose(padded, unpadded, rel_tol=1e-5)
    scrambled = ids.masked_fill(mask == 0, 7)  # what sits under the padding must not matter
    assert math.isclose(perplexity(model, scrambled, mask, batch_size=1), padded, rel_tol=1e-5)
    with pytest.raises(ValueError, match="no token to predict"):
        perplexity(model, ids, torch.zeros_like(mask))


# ---------------------------------------------------------------- end to end


def test_evaluate_mc_end_to_end_leaves_model_and_tokenizer_as_they_were(tiny):
    model, tokenizer = tiny
    model.train()
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    try:
        results = evaluate_mc(
            model, tokenizer, ["arc_easy", "winogrande"], limit=6, batch_size=4, progress=False
        )
        assert model.training
    finally:
        model.eval()
    assert all(torch.equal(weights[name], tensor) for name, tensor in model.state_dict().items())
    assert set(results) == {"arc_easy", "winogrande"}
    for scores in results.values():
        assert scores["n"] == 6 and 0.0 <= scores["acc"] <= 1.0 and 0.0 <= scores["acc_norm"] <= 1.0
    assert results["winogrande"]["acc_norm"] == results["winogrande"]["acc"]

    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert (
        evaluate_mc(model, no_pad, "arc_easy", limit=6, batch_size=4, progress=False)["arc_easy"]
        == results["arc_easy"]
    )


def test_evaluation_keeps_no_reference_to_the_model(tiny):
    """Notebooks evaluate one pruned copy after another; a cache holding each copy (this once
    leaked ~2.3 GB per Qwen2.5-0.5B copy) would run the machine out of memory."""
    import gc
    import weakref

    model, tokenizer = tiny
    copy_of_model = copy.deepcopy(model)
    evaluate_mc(copy_of_model, tokenizer, ["piqa"], limit=2, batch_size=2)
    perplexity(copy_of_model, torch.randint(0, 1000, (2, 16)))
    alive = weakref.ref(copy_of_model)
    del copy_of_model
    gc.collect()
    assert alive() is None


def test_score_items_is_evaluate_mc_item_by_item(tiny):
    examples, correct = score_items(*tiny, "piqa", limit=4, batch_size=2, seed=3)
    summary = evaluate_mc(*tiny, "piqa", limit=4, batch_size=2, seed=3, progress=False)["piqa"]
    assert [e.gold for e in examples] == [e.gold for e in load_task("piqa", limit=4, seed=3)]
    assert correct["acc"].mean() == pytest.approx(summary["acc"])
    assert correct["acc_norm"].mean() == pytest.approx(summary["acc_norm"])
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        score_items(*tiny, "nope")
