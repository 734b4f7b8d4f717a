import pytest
import torch

from shortlab.arch import model_parts
from shortlab.models import load_model
from shortlab.pruning import remove_layers
from shortlab.quantize import decoder_weight_modules
from shortlab.speed import (
    SpeedMeasurement, decode, kv_cache_bytes, matmul_weight_count, measure_speed, parameter_bytes,
    prefill, random_prompt,
)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def test_parameter_bytes_counts_removed_layers_and_tied_weights_once(tiny):
    model, _ = tiny
    assert parameter_bytes(model) == sum(p.numel() * 4 for p in model.parameters())
    pruned = remove_layers(model, [0, 2])
    layer_bytes = sum(p.numel() * 4 for i in (0, 2) for p in model_parts(model).layers[i].parameters())
    assert parameter_bytes(model) - parameter_bytes(pruned) == layer_bytes
    assert parameter_bytes(pruned.to(torch.bfloat16)) * 2 == parameter_bytes(pruned.float())
    tied = remove_layers(model, [])
    parts = model_parts(tied)
    untied_bytes = parameter_bytes(tied)
    parts.lm_head.weight = parts.embed_tokens.weight
    assert parameter_bytes(tied) == untied_bytes - parts.embed_tokens.weight.numel() * 4


def test_matmul_weight_count(tiny):
    model, _ = tiny
    parts = model_parts(model)
    head = parts.lm_head.weight.numel()
    per_layer = sum(m.weight.numel() for m in decoder_weight_modules(model).values()) // 4
    assert matmul_weight_count(model) == 4 * per_layer + head
    assert matmul_weight_count(remove_layers(model, [3])) == 3 * per_layer + head


def test_kv_cache_bytes_matches_the_config_and_follows_removal(tiny):
    model, _ = tiny
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_layer = 2 * 3 * 40 * config.num_key_value_heads * head_dim * 4  # K and V, batch 3, 40 tokens
    assert kv_cache_bytes(model, 40, batch_size=3) == 4 * per_layer
    assert kv_cache_bytes(remove_layers(model, [1, 2, 3]), 40, batch_size=3) == per_layer


def test_kv_cache_bytes_of_sliding_window_layers_stay_bounded():
    model, _ = load_model("tiny-gemma2")  # sliding window 64 on alternate layers
    short, long = kv_cache_bytes(model, 32), kv_cache_bytes(model, 256)
    assert long < 256 / 32 * short


def test_prefill_and_decode_reproduce_greedy_generate(tiny):
    model, _ = tiny
    for candidate in (model, remove_layers(model, [1])):
        prompt = random_prompt(candidate, 2, 12, seed=3)
        cache, first = prefill(candidate, prompt)
        generated = decode(candidate, cache, first, steps=5)
        assert generated.shape == (2, 5) and cache.get_seq_length() == 12 + 5
        with torch.inference_mode():
            expected = candidate.generate(prompt, attention_mask=torch.ones_like(prompt),
                                          max_new_tokens=6, do_sample=False, min_new_tokens=6)
        assert torch.equal(torch.cat([first, generated], dim=1), expected[:, 12:])


def test_random_prompt_is_seeded_and_in_vocabulary(tiny):
    model, _ = tiny
    a, b = random_prompt(model, 2, 30, seed=1), random_prompt(model, 2, 30, seed=1)
    assert torch.equal(a, b) and a.shape == (2, 30) and a.dtype == torch.long
    assert not torch.equal(a, random_prompt(model, 2, 30, seed=2))
    assert 0 <= a.min() and a.max() < model.get_input_embeddings().weight.shape[0]
    with pytest.raises(ValueError, match="at least 1"):
        random_prompt(model, 0, 30)


def test_measure_speed_runs_every_model_and_leaves_them_alone(tiny):
    model, _ = tiny
    pruned = remove_layers(model, [0, 1])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    results = measure_speed({"dense": model, "pruned": pruned}, prompt_len=16, new_tokens=3,
                            batch_size=2, repeats=3, warmup=1)
    assert set(results) == {"dense", "pruned"}
    for measurement in results.values():
        assert measurement.prefill_tokens == 32 and measurement.decode_tokens == 6
        assert len(measurement.prefill_seconds) == 3 and len(measurement.decode_seconds) == 3
        assert measurement.prefill_tokens_per_s > 0 and measurement.decode_tokens_per_s > 0
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert model_parts(model).num_layers == 4 and model_parts(pruned).num_layers == 2


def test_measure_speed_errors(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="no models"):
        measure_speed({})
    with pytest.raises(ValueError, match="new_tokens"):
        measure_speed({"a": model}, new_tokens=0)
    other, _ = load_model("tiny-gpt2")
    other.resize_token_embeddings(100)
    with pytest.raises(ValueError, match="share one vocabulary"):
        measure_speed({"a": model, "b": other})


def test_speed_measurement_uses_medians():
    measurement = SpeedMeasurement(prefill_tokens=100, decode_tokens=10,
                                   prefill_seconds=(1.0, 0.5, 100.0), decode_seconds=(2.0, 4.0))
    assert measurement.prefill_tokens_per_s == pytest.approx(100.0)
    assert measurement.decode_tokens_per_s == pytest.approx(10 / 3.0)
