"""Multiple-choice scoring with shared contexts, and tokenisation as lm-evaluation-harness does it.

A question's context is packed once with one branch per answer below it; every continuation must
get the log-likelihood it gets as a full sequence of its own, on every supported family (sliding
windows, soft-capped attention, BOS and no-BOS tokenizers), and every context must start as the
harness starts it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from shortlab.data import calibration_batch
from shortlab.evaluate import (
    block_nll, encode_examples, encode_pair, item_correct, load_task, loglikelihoods,
)
from shortlab.evaluate.likelihood import packing_limit, special_prefix
from shortlab.models import TINY_ARCHS, TINY_BOS_ARCHS, TINY_SLIDING_WINDOW, load_model

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="the optional lm-eval package is not installed"
)
FAMILIES = (*TINY_ARCHS, "llava")


def _examples():
    """Items with 2 (PIQA), 4 (ARC-Easy) and 4 long (HellaSwag) choices, and one-token MMLU letters."""
    return (load_task("arc_easy", limit=6) + load_task("piqa", limit=6) + load_task("hellaswag", limit=3)
            + load_task("mmlu", limit=3))


class CountForwards:
    """Counts the model's forward passes (a context manager that owns its hook handle)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __enter__(self):
        self.handle = self.model.register_forward_pre_hook(self._count)
        return self

    def _count(self, *_):
        self.calls += 1

    def __exit__(self, *exc):
        self.handle.remove()


def _tiny(family: str):
    model, tokenizer = load_model(f"tiny-{family}")
    return model, getattr(tokenizer, "tokenizer", tokenizer)


@pytest.fixture(scope="module")
def examples():
    return _examples()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_one_sequence_per_choice(family, examples):
    model, tokenizer = _tiny(family)
    requests = encode_examples(tokenizer, examples)
    alone = loglikelihoods(model, requests, batch_size=4, shared_context=False)
    with CountForwards(model) as packed_run:
        packed = loglikelihoods(model, requests, batch_size=1)
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=0)
    contexts = {tuple(context) for context, _ in requests}
    if packing_limit(model) is None:
        # one pass per context: every question's choices shared it
        assert packed_run.calls == len(contexts) < len(requests)
    else:  # a sliding window shorter than the prompts: every request is scored alone, exactly
        assert packing_limit(model) == TINY_SLIDING_WINDOW
        assert packed_run.calls == len({tuple(c) + tuple(x[:-1]) for c, x in requests})


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", ("gemma2", "gemma3"))
def test_soft_capped_and_sliding_window_families_pack_inside_their_window(family, examples):
    model, tokenizer = _tiny(family)
    model.config.sliding_window = 4096  # read at every forward: wider than any prompt here
    assert packing_limit(model) == 4096
    requests = encode_examples(tokenizer, examples)
    with CountForwards(model) as packed_run:
        packed = loglikelihoods(model, requests, batch_size=2)
    alone = loglikelihoods(model, requests, batch_size=3, shared_context=False)
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=0)
    assert packed_run.calls < len(requests) / 2


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("padding_side", ("left", "right"))
def test_the_tokenizers_padding_side_changes_nothing(padding_side, examples):
    model, tokenizer = _tiny("qwen2")
    expected = loglikelihoods(model, encode_examples(tokenizer, examples), batch_size=5)
    tokenizer.padding_side = padding_side
    got = loglikelihoods(model, encode_examples(tokenizer, examples), batch_size=5)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_kernels_that_ignore_custom_masks_are_never_packed():
    config = SimpleNamespace(_attn_implementation="flash_attention_2")
    config.get_text_config = lambda: config
    assert packing_limit(SimpleNamespace(config=config)) == 0


@pytest.mark.usefixtures("one_thread")
def test_a_left_truncated_request_is_scored_alone():
    model, tokenizer = _tiny("llama")
    limit = model.config.max_position_embeddings
    context = list(range(100, 100 + limit))  # one token too many once the continuation is added
    requests = [(context, [5, 6]), (context, [7]), ([1, 2, 3], [4, 5]), ([1, 2, 3], [6])]
    packed = loglikelihoods(model, requests, batch_size=2)
    alone = loglikelihoods(model, requests, batch_size=2, shared_context=False)
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- tokenisation


@pytest.mark.parametrize("family", ("llama", "mistral", "gemma2"))
def test_contexts_start_with_the_tokenizers_own_prefix(family):
    _, tokenizer = _tiny(family)
    prefix = special_prefix(tokenizer)
    assert prefix == ([tokenizer.bos_token_id] if family in TINY_BOS_ARCHS else [])
    context, continuation = encode_pair(tokenizer, "Question: why? Answer:", " because")
    assert context[: len(prefix)] == prefix and continuation[0] not in prefix
    # a context that already starts with the BOS text gets no second one
    if prefix:
        again, _ = encode_pair(tokenizer, tokenizer.decode(prefix) + "Question: why? Answer:", " because")
        assert again == context


@needs_lm_eval
@pytest.mark.parametrize("family", ("qwen2", "mistral", "gemma3"))
def test_encode_pair_is_the_harness_encode_pair(family, examples):
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = _tiny(family)
    harness = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=1)
    for example in examples:
        for context, continuation in zip(example.contexts, example.continuations, strict=True):
            assert encode_pair(tokenizer, context, continuation) == harness._encode_pair(context, continuation)


@pytest.mark.usefixtures("one_thread")
def test_blocks_start_with_the_bos_as_context_only():
    _, plain = _tiny("llama")
    model, with_bos = _tiny("gemma2")
    assert not (calibration_batch(plain, "wiki", 2, 16)["input_ids"][:, 0] == plain.bos_token_id).any()
    for mode in ("pack", "pad"):
        blocks = calibration_batch(with_bos, "wiki", 3, 16, mode=mode)
        assert (blocks["input_ids"][:, 0] == with_bos.bos_token_id).all()
        assert not (blocks["input_ids"][:, 1:] == with_bos.bos_token_id).any()
    _, counts = block_nll(model, blocks["input_ids"], blocks["attention_mask"])
    assert (counts == blocks["attention_mask"].sum(1).numpy() - 1).all()  # the BOS is never a target


@needs_lm_eval
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", ("mistral", "gemma2"))
def test_bos_tokenizers_agree_with_lm_eval_item_by_item(family):
    from shortlab.harness import evaluate_with_lm_eval

    model, tokenizer = _tiny(family)
    theirs = evaluate_with_lm_eval(model, tokenizer, ["arc_easy", "piqa"], limit=10, per_item=True)
    for name in ("arc_easy", "piqa"):
        examples = load_task(name, limit=10)
        ours = item_correct(examples, loglikelihoods(model, encode_examples(tokenizer, examples)).tolist())
        assert theirs[name]["correct"] == ours["acc"].tolist()
        assert theirs[name]["correct_norm"] == ours["acc_norm"].tolist()


# ---------------------------------------------------------------- real checkpoints

REAL_TASKS = {"arc_easy": 40, "piqa": 35, "sciq": 30}  # 105 items, two and four choices
RESULTS = Path(__file__).resolve().parents[1] / "results" / "shortgpt"


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # real models, unlike the tiny ones, gain from both cores
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("two_threads")
def test_smollm2_packed_equals_one_sequence_per_choice(smollm2):
    """Log-likelihoods within 1e-4 on 10 items per task, and on 105 items the answers of notebook
    01's stored dense record, which was scored one sequence per choice (500 seeded questions per task)."""
    model, tokenizer = smollm2
    record = json.loads((RESULTS / "smollm2-135m" / "dense__w-model__blocks160__tasks.json").read_text())
    for name, n in REAL_TASKS.items():
        examples = load_task(name, limit=500)[:n]
        requests = encode_examples(tokenizer, examples)
        packed = loglikelihoods(model, requests, batch_size=8)
        few = sum(len(example.choices) for example in examples[:10])
        alone = loglikelihoods(model, requests[:few], batch_size=8, shared_context=False)
        torch.testing.assert_close(packed[:few], alone, atol=1e-4, rtol=0)
        for metric, values in item_correct(examples, packed.tolist()).items():
            assert values.astype(int).tolist() == record["correct"][name][metric][:n], (name, metric)


@pytest.mark.usefixtures("two_threads")
def test_qwen_packed_answers_equal_its_stored_one_sequence_per_choice_answers():
    """Qwen2.5-0.5B's stored dense record was scored one sequence per choice (notebook 01's
    Qwen run: 300 seeded questions per task); packed scoring must give every item the same answer."""
    record = json.loads((RESULTS / "qwen2.5-0.5b" / "dense__w-model__blocks96__tasks.json").read_text())
    assert record["dtype"] == "torch.float32"
    model, tokenizer = load_model("qwen2.5-0.5b")
    for name, n in REAL_TASKS.items():
        examples = load_task(name, limit=300)[:n]
        packed = loglikelihoods(model, encode_examples(tokenizer, examples), batch_size=8)
        for metric, values in item_correct(examples, packed.tolist()).items():
            assert values.astype(int).tolist() == record["correct"][name][metric][:n], (name, metric)
