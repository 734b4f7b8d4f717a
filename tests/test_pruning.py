import pytest
import torch
from transformers import AutoModelForCausalLM

from shortlab.arch import model_parts
from shortlab.hooks import replace_layer_outputs, skip_layers
from shortlab.models import load_model
from shortlab.metrics import block_influence
from shortlab.pruning import (
    RANKINGS, angular_distances, iterative_block_influence, rank_angular_distance, rank_block_influence,
    rank_iterative_block_influence, rank_layers, rank_layers_for_counts, rank_random,
    rank_relative_magnitude, rank_reverse_order, relative_magnitude, remove_layers,
)

ARCHS = ["tiny-llama", "tiny-qwen2", "tiny-gemma2", "tiny-gemma3", "tiny-gpt2", "tiny-phi3"]


pytestmark = pytest.mark.usefixtures("one_thread")


def prompt(tokenizer, n_tokens=80):
    text = " ".join(f"word{i}" for i in range(200))
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :n_tokens]
    return ids


@pytest.mark.parametrize("name", ARCHS)
def test_pruned_logits_equal_skipping_and_the_original_is_untouched(name):
    model, tokenizer = load_model(name)
    ids = prompt(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode(), skip_layers(model, [1, 2]):
        skipped = model(ids).logits
    pruned = remove_layers(model, [2, 1])
    with torch.inference_mode():
        assert torch.allclose(pruned(ids).logits, skipped, atol=1e-5)
    assert model_parts(pruned).num_layers == 2 == model_parts(pruned).text_config.num_hidden_layers
    assert [model_parts(pruned).kv_cache_index(i) for i in range(2)] == [0, 1]
    assert model_parts(model).num_layers == 4 and model.config.num_hidden_layers == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for field in model_parts(pruned).per_layer_config_fields:
        assert getattr(model_parts(pruned).text_config, field) == [
            getattr(model_parts(model).text_config, field)[i] for i in (0, 3)
        ]


@pytest.mark.parametrize("name", ARCHS)
def test_pruned_generation_with_cache_equals_without(name):
    model, tokenizer = load_model(name)
    pruned = remove_layers(model, [0, 2])
    ids = prompt(tokenizer, 70)  # beyond the tiny Gemma sliding window after generation
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    cached = pruned.generate(ids, use_cache=True, **kwargs)
    uncached = pruned.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma2", "tiny-gpt2"])
def test_pruned_model_round_trips_through_save_pretrained(name, tmp_path):
    model, tokenizer = load_model(name)
    pruned = remove_layers(model, [1])
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.num_hidden_layers == 3
    ids = prompt(tokenizer, 20)
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, pruned(ids).logits)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(reloaded.generate(ids, **kwargs), pruned.generate(ids, **kwargs))


def test_inplace_removal_edits_the_model_itself():
    model, _ = load_model("tiny-llama")
    third = model.model.layers[3]
    assert remove_layers(model, [0], inplace=True) is model
    assert model.model.layers[2] is third and model.config.num_hidden_layers == 3


def test_removal_from_a_llava_model_prunes_its_language_model():
    model, processor = load_model("tiny-llava")
    pruned = remove_layers(model, [3])
    assert pruned.config.text_config.num_hidden_layers == 3
    assert len(pruned.model.language_model.layers) == 3


@pytest.mark.parametrize("indices,error,match", [
    ([4], IndexError, "out of range"), ([-5], IndexError, "out of range"),
    ([1, 1], ValueError, "duplicate"), ([0, 1, 2, 3], ValueError, "cannot remove all 4"),
    ([1.5], TypeError, "not an int"),
])
def test_removal_errors(indices, error, match):
    model, _ = load_model("tiny-llama")
    with pytest.raises(error, match=match):
        remove_layers(model, indices)
    assert model.config.num_hidden_layers == 4


@pytest.fixture(scope="module")
def calibration():
    model, tokenizer = load_model("tiny-llama")
    texts = ["The quick brown fox jumps over the lazy dog.", "Short text.",
             "Another calibration sentence about rivers and mountains."]
    batches = [tokenizer(texts[:2], return_tensors="pt", padding=True),
               tokenizer(texts[2:], return_tensors="pt", padding=True)]
    return model, batches


def make_identity(model, batches, layer):
    """Run rankings on a model whose ``layer`` is an identity, so it must be ranked least useful."""
    return replace_layer_outputs(model, {layer: lambda h_in, h_out: h_in})


@pytest.mark.parametrize("rank", [rank_block_influence, rank_relative_magnitude])
def test_score_based_rankings_pick_an_identity_layer_first(calibration, rank):
    model, batches = calibration
    with make_identity(model, batches, 2):
        assert rank(model, batches, 1)[0] == 2
        assert sorted(rank(model, batches, 3)) == sorted(set(rank(model, batches, 3)))


def test_relative_magnitude_of_identity_is_zero(calibration):
    model, batches = calibration
    with make_identity(model, batches, 1):
        scores = relative_magnitude(model, batches)
    assert scores[1] == pytest.approx(0.0, abs=1e-6) and min(scores[i] for i in (0, 2, 3)) > 1e-3


def test_iterative_block_influence_matches_one_shot_for_one_layer(calibration):
    model, batches = calibration
    assert rank_iterative_block_influence(model, batches, 1) == rank_block_influence(model, batches, 1)
    chosen = rank_iterative_block_influence(model, batches, 3)
    assert len(set(chosen)) == 3 and all(0 <= i < 4 for i in chosen)
    assert model.config.num_hidden_layers == 4  # worked on a copy


def test_iterative_block_influence_scores_each_layer_on_the_model_it_was_removed_from(calibration):
    model, batches = calibration
    chosen, scores = iterative_block_influence(model, batches, 2)
    first, second = chosen
    one_shot = block_influence(model, batches)
    assert scores[first] == pytest.approx(one_shot[first]) == pytest.approx(min(one_shot.values()))
    # the second score is BI in the model without the first layer, indexed there by position
    without_first = remove_layers(model, [first])
    position = [i for i in range(4) if i != first].index(second)
    assert scores[second] == pytest.approx(block_influence(without_first, batches)[position])
    assert iterative_block_influence(model, batches, 0) == ([], {})


def test_angular_distance_finds_an_identity_block(calibration):
    model, batches = calibration
    with replace_layer_outputs(model, {1: lambda h_in, h_out: h_in, 2: lambda h_in, h_out: h_in}):
        distances = angular_distances(model, batches, 2)
        assert distances[1] == pytest.approx(0.0, abs=1e-3)
        assert rank_angular_distance(model, batches, 2) == [1, 2]
    assert set(distances) == {0, 1, 2}
    with pytest.raises(ValueError, match="block_size"):
        angular_distances(model, batches, 5)


def test_data_free_rankings(calibration):
    model, batches = calibration
    assert rank_reverse_order(model, batches, 3) == [3, 2, 1]
    assert rank_random(model, batches, 3, seed=1) == rank_random(model, batches, 3, seed=1)
    assert len(set(rank_random(model, batches, 3, seed=1))) == 3
    assert {tuple(rank_random(model, batches, 2, seed=s)) for s in range(10)}.__len__() > 1


@pytest.mark.parametrize("method", sorted(RANKINGS))
def test_every_ranking_by_name_returns_distinct_valid_layers(calibration, method):
    model, batches = calibration
    chosen = rank_layers(method, model, batches, 2, seed=0)
    assert len(chosen) == len(set(chosen)) == 2 and all(0 <= i < 4 for i in chosen)
    assert rank_layers(method, model, batches, 0) == []
    with pytest.raises(ValueError, match="n_remove"):
        rank_layers(method, model, batches, 4)


def test_unknown_ranking_is_named():
    with pytest.raises(ValueError, match="unknown ranking 'bogus'"):
        rank_layers("bogus", None, [], 1)


@pytest.mark.parametrize("method", sorted(RANKINGS))
def test_choices_for_several_counts_equal_one_ranking_per_count(calibration, method):
    model, batches = calibration
    counts = [3, 0, 1, 2]
    assert rank_layers_for_counts(method, model, batches, counts, seed=5) == {
        k: rank_layers(method, model, batches, k, seed=5) for k in sorted(counts)
    }
    assert rank_layers_for_counts(method, model, batches, []) == {}
    with pytest.raises(ValueError, match="n_remove"):
        rank_layers_for_counts(method, model, batches, [1, 4])


def test_choices_for_several_counts_analyse_the_model_once(calibration, monkeypatch):
    model, batches = calibration
    from shortlab import pruning

    calls = []
    monkeypatch.setitem(pruning._SCORES, "block_influence",
                        lambda m, b: calls.append(1) or pruning.block_influence(m, b))
    choices = rank_layers_for_counts("block_influence", model, batches, [1, 2, 3])
    assert len(calls) == 1 and choices[3][:2] == choices[2]
    with pytest.raises(ValueError, match="unknown ranking 'bogus'"):
        rank_layers_for_counts("bogus", model, batches, [1])
