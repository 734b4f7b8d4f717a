import pytest
import torch

from shortlab.hooks import replace_layer_outputs
from shortlab.metrics import block_influence, layer_similarity
from shortlab.models import load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def padded_batch(tokenizer):
    return tokenizer(["A short one.", "A somewhat longer sentence with more tokens in it."],
                     return_tensors="pt", padding=True)


def test_matches_a_direct_computation_over_non_padding_tokens(tiny):
    model, tokenizer = tiny
    batch = padded_batch(tokenizer)
    assert not batch["attention_mask"].all()  # the test needs padding to mean anything
    with torch.inference_mode():
        states = model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool()
    similarity = layer_similarity(model, [batch])
    assert similarity.shape == (5, 5) and similarity.dtype == torch.float64
    # hidden_states[i] is layer i's input for i < L (the last entry is after the final norm)
    for i in range(4):
        for j in range(4):
            cos = torch.nn.functional.cosine_similarity(states[i], states[j], dim=-1)
            assert similarity[i, j].item() == pytest.approx(cos[mask].mean().item(), abs=1e-5)


def test_symmetric_unit_diagonal_and_consistent_with_block_influence(tiny):
    model, tokenizer = tiny
    batch = padded_batch(tokenizer)
    similarity = layer_similarity(model, [batch])
    assert torch.allclose(similarity, similarity.T, atol=1e-6)
    assert torch.allclose(similarity.diagonal(), torch.ones(5, dtype=torch.float64), atol=1e-5)
    influence = block_influence(model, [batch])
    for i in range(4):  # the last layer too: point L is its output before the final norm
        assert 1 - similarity[i, i + 1].item() == pytest.approx(influence[i], abs=1e-5)


def test_identity_layer_gives_identical_neighbouring_points(tiny):
    model, tokenizer = tiny
    with replace_layer_outputs(model, {2: lambda h_in, h_out: h_in}):
        similarity = layer_similarity(model, [padded_batch(tokenizer)])
    assert similarity[2, 3].item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(similarity[2], similarity[3], atol=1e-6)
    assert similarity[1, 2].item() < 1 - 1e-4


def test_padding_is_ignored_and_batches_pool_their_tokens(tiny):
    model, tokenizer = tiny
    texts = ["A short one.", "A somewhat longer sentence with more tokens in it."]
    padded = padded_batch(tokenizer)
    garbage = dict(padded)
    # different ids under the padding must not change anything (causal model, right padding)
    garbage["input_ids"] = padded["input_ids"].masked_fill(~padded["attention_mask"].bool(), 7)
    separate = [tokenizer([text], return_tensors="pt") for text in texts]
    reference = layer_similarity(model, [padded])
    assert torch.allclose(layer_similarity(model, [garbage]), reference, atol=1e-6)
    assert torch.allclose(layer_similarity(model, separate), reference, atol=1e-6)
    without_mask = layer_similarity(model, [{"input_ids": padded["input_ids"]}])
    assert not torch.allclose(without_mask, reference, atol=1e-4)


def test_errors(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="empty calibration set"):
        layer_similarity(model, [])
    batch = tokenizer(["one two three"], return_tensors="pt")
    batch["attention_mask"] = torch.zeros_like(batch["attention_mask"])
    with pytest.raises(ValueError, match="every token was masked out"):
        layer_similarity(model, [batch])
