"""The dense model's first layers computed once for every setting that leaves them unchanged:
the same numbers as computing them each time, on every family, and never for other weights."""

import pytest
import torch

from shortlab.arch import model_parts
from shortlab.data import calibration_batch
from shortlab.evaluate import block_nll, encode_examples, load_task, loglikelihoods
from shortlab.models import load_model
from shortlab.prefix import PrefixCache
from shortlab.pruning import remove_layers
from shortlab.quantize import quantize_weights
from shortlab.shortgpt_evidence import (
    EvidenceStore, Measurement, Setting, collect, measure, reuses_prefix, shared_prefix_depth,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(tokenizer):
    blocks = calibration_batch(tokenizer, "wiki", 4, 24)
    examples = load_task("arc_easy", limit=4) + load_task("piqa", limit=4)
    return blocks, encode_examples(tokenizer, examples)


def _scores(model, blocks, requests):
    nll, _ = block_nll(model, blocks["input_ids"], blocks["attention_mask"], batch_size=2)
    return torch.tensor(nll), loglikelihoods(model, requests, batch_size=3)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2", "gemma3", "gpt2"])
def test_shared_first_layers_give_the_same_numbers(family):
    model, tokenizer = load_model(f"tiny-{family}")
    blocks, requests = _inputs(tokenizer)
    pruned = remove_layers(model, [3])
    expected = _scores(pruned, blocks, requests)
    cache = PrefixCache(2)
    with cache.attached(model):  # the dense model fills it
        dense = _scores(model, blocks, requests)
    filled = cache.misses
    assert filled > 0 and cache.hits == 0 and cache.stored_bytes > 0
    with cache.attached(pruned):  # the pruned one only reads it
        got = _scores(pruned, blocks, requests)
    assert cache.hits == filled and cache.misses == filled
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(dense[0], torch.tensor(block_nll(model, blocks["input_ids"], blocks["attention_mask"],
                                                               batch_size=2)[0]), atol=1e-6, rtol=0)


def test_other_first_layers_are_refused_and_the_layers_always_come_back():
    model, tokenizer = load_model("tiny-llama")
    blocks, requests = _inputs(tokenizer)
    originals = list(model_parts(model).layers)
    cache = PrefixCache(2)
    with cache.attached(model):
        _scores(model, blocks, requests)
    assert list(model_parts(model).layers) == originals
    for other in (remove_layers(model, [1]), quantize_weights(model, 4, 32)):
        with pytest.raises(ValueError, match="first 2 layers differ"):
            with cache.attached(other):
                pass
    with pytest.raises(RuntimeError, match="boom"):
        with cache.attached(model):
            raise RuntimeError("boom")
    assert list(model_parts(model).layers) == originals
    with pytest.raises(ValueError, match="leaves none"):
        with PrefixCache(4).attached(model):
            pass
    with pytest.raises(ValueError, match="at least 1"):
        PrefixCache(0)


def test_other_inputs_are_computed_not_served():
    model, tokenizer = load_model("tiny-qwen2")
    blocks, _ = _inputs(tokenizer)
    cache = PrefixCache(1)
    with cache.attached(model):
        first = block_nll(model, blocks["input_ids"][:2], blocks["attention_mask"][:2])[0]
        shifted = block_nll(model, blocks["input_ids"][2:], blocks["attention_mask"][2:])[0]
    assert cache.hits == 0 and cache.misses == 2 and (first != shifted).all()


def test_depth_is_where_most_layer_passes_are_spared():
    def m(removed, bits=None):
        return Measurement(tuple(removed), bits, None if bits is None else 32, 4, True)

    deep = [m(()), m((6, 7)), m((5, 6)), m((5, 7))]
    assert shared_prefix_depth(deep, 8) == 5  # 5 layers x 3 later measurements
    assert shared_prefix_depth(deep + [m((0, 1)), m((), bits=4)], 8) == 5  # they cannot share
    assert shared_prefix_depth([m((0,)), m((1,))], 8) == 0
    assert reuses_prefix(m((5, 6)), 5) and not reuses_prefix(m((4, 6)), 5) and not reuses_prefix(m((), 4), 1)


def test_collect_with_a_shared_prefix_stores_the_same_records(tmp_path):
    model, tokenizer = load_model("tiny-llama")
    blocks = calibration_batch(tokenizer, "wiki", 4, 24)
    examples = {"arc_easy": load_task("arc_easy", limit=4)}
    settings = [Setting("dense", 0, Measurement((), None, None, 4, True)),
                Setting("reverse_order", 1, Measurement((3,), None, None, 4, True)),
                Setting("block_influence", 1, Measurement((2,), None, None, 2, False)),
                Setting("random", 1, Measurement((0,), None, None, 2, False), draw=0)]
    records = {}
    for share in (False, True):
        store = EvidenceStore(tmp_path / str(share), "model", "data")
        logged = []
        records[share] = collect(model, tokenizer, settings, store, blocks, examples, batch_size=2,
                                 log=logged.append, share_prefix=share)
        assert any("share the dense model's first 2 layers" in line for line in logged) == share
    for measurement, record in records[False].items():
        shared = records[True][measurement]
        assert shared["correct"] == record["correct"]
        torch.testing.assert_close(torch.tensor(shared["nll"]), torch.tensor(record["nll"]), atol=1e-6, rtol=0)
    assert measure(model, tokenizer, settings[1].measurement, blocks, examples, 2)["correct"] == \
        records[True][settings[1].measurement]["correct"]
