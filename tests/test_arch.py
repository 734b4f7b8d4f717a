import operator
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
import transformers as tf

from shortlab.arch import (
    ModelParts,
    UnsupportedArchitectureError,
    model_parts,
    supported_architectures,
    validate_layer_indices,
)
from shortlab.models import TINY_MODELS, TINY_MULTIMODAL, TINY_SLIDING_WINDOW, load_model


pytestmark = pytest.mark.usefixtures("one_thread")


EXPECTED = {  # name: (family, text_family, layers_path)
    "tiny-llama": ("llama", "llama", "model.layers"),
    "tiny-mistral": ("mistral", "mistral", "model.layers"),
    "tiny-qwen2": ("qwen2", "qwen2", "model.layers"),
    "tiny-qwen3": ("qwen3", "qwen3", "model.layers"),
    "tiny-gemma": ("gemma", "gemma", "model.layers"),
    "tiny-gemma2": ("gemma2", "gemma2", "model.layers"),
    "tiny-gemma3": ("gemma3", "gemma3", "model.layers"),
    "tiny-phi3": ("phi3", "phi3", "model.layers"),
    "tiny-gpt2": ("gpt2", "gpt2", "transformer.h"),
    "tiny-llava": ("llava", "llama", "model.language_model.layers"),
    "tiny-llava-1.5": ("llava", "llama", "model.language_model.layers"),
    "tiny-llava-next": ("llava_next", "llama", "model.language_model.layers"),
    "tiny-qwen2-vl": ("qwen2_vl", "qwen2_vl", "model.language_model.layers"),
    "tiny-qwen2.5-vl": ("qwen2_5_vl", "qwen2_5_vl", "model.language_model.layers"),
}


@pytest.fixture(scope="module", params=TINY_MODELS)
def loaded(request):
    model, _ = load_model(request.param)
    return request.param, model


def _ids(model, length=8, batch=1):
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(0, vocab - 1, (batch, length), generator=torch.Generator().manual_seed(0))


def test_every_tiny_model_has_an_expectation():
    assert set(EXPECTED) == set(TINY_MODELS)


def test_parts_locate_the_real_modules(loaded):
    name, model = loaded
    parts = model_parts(model)
    family, text_family, layers_path = EXPECTED[name]
    assert (parts.family, parts.text_family) == (family, text_family)
    assert parts.layers_path == layers_path
    assert parts.model is model
    assert operator.attrgetter(parts.layers_path)(model) is parts.layers
    assert operator.attrgetter(parts.decoder_path)(model) is parts.decoder
    assert isinstance(parts.layers, torch.nn.ModuleList)
    assert parts.num_layers == model.config.get_text_config().num_hidden_layers == 4
    assert parts.embed_tokens is model.get_input_embeddings()
    assert parts.lm_head is model.get_output_embeddings()
    assert parts.text_config is model.config.get_text_config()
    assert parts.text_config is parts.decoder.config  # the object the stack actually reads
    if name in TINY_MULTIMODAL:
        assert parts.text_config is model.config.text_config


def test_llava_wrappers_expose_their_vision_tower_and_projector(loaded):
    name, model = loaded
    parts = model_parts(model)
    if name in ("tiny-llava", "tiny-llava-1.5", "tiny-llava-next"):
        assert parts.vision_tower is model.model.vision_tower
        assert parts.projector is model.model.multi_modal_projector
        # the projector maps the tower's width to the decoder's
        width = parts.vision_tower.config.hidden_size
        projected = parts.projector(torch.zeros(1, 2, width))
        assert projected.shape == (1, 2, parts.text_config.hidden_size)
    else:
        assert parts.vision_tower is None and parts.projector is None


def test_final_norm_and_lm_head_produce_the_logits(loaded):
    _, model = loaded
    parts = model_parts(model)
    ids = _ids(model)
    seen = []
    handle = parts.final_norm.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            hidden = parts.decoder(input_ids=ids).last_hidden_state
    finally:
        handle.remove()
    assert len(seen) == 2 and torch.equal(seen[1], hidden)
    with torch.no_grad():
        expected = parts.lm_head(hidden)
    softcap = getattr(parts.text_config, "final_logit_softcapping", None)
    if softcap is not None:
        expected = torch.tanh(expected / softcap) * softcap
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def test_attention_and_kv_cache_index(loaded):
    _, model = loaded
    parts = model_parts(model)
    for i in range(parts.num_layers):
        assert parts.attention(i) is getattr(parts.layers[i], parts.attention_attr)
        assert parts.kv_cache_index(i) == i
        assert parts.kv_cache_index(parts.layers[i]) == i
        assert parts.attention(i).layer_idx == i
    assert parts.attention(-1) is parts.attention(parts.num_layers - 1)


def test_kv_cache_index_is_what_the_cache_is_indexed_by(loaded):
    """Swapping the indices of layers 0 and 1 swaps where their keys land in the cache."""
    _, model = loaded
    parts = model_parts(model)
    # Shorter than the tiny Gemmas' sliding window: a sliding layer's cache keeps only the last
    # window - 1 tokens, a full layer's all of them.
    ids = _ids(model, length=TINY_SLIDING_WINDOW - 2)
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=True).past_key_values
        parts.set_kv_cache_index(0, 1)
        parts.set_kv_cache_index(1, 0)
        try:
            swapped = model(input_ids=ids, use_cache=True).past_key_values
        finally:
            parts.set_kv_cache_index(0, 0)
            parts.set_kv_cache_index(1, 1)
    assert torch.equal(swapped.layers[0].keys, plain.layers[1].keys)
    assert torch.equal(swapped.layers[1].keys, plain.layers[0].keys)
    assert not torch.equal(plain.layers[0].keys, plain.layers[1].keys)


def test_set_kv_cache_index_updates_every_copy(loaded):
    _, model = loaded
    parts = model_parts(model)
    layer = parts.layers[2]
    owners = []
    for dotted in parts.kv_index_attrs:
        path, _, attr = dotted.rpartition(".")
        owner = getattr(layer, path, None) if path else layer
        if owner is not None and hasattr(owner, attr):
            owners.append((owner, attr))
    try:
        parts.set_kv_cache_index(2, 7)
        assert owners and all(getattr(owner, attr) == 7 for owner, attr in owners)
        assert parts.kv_cache_index(2) == 7
    finally:
        parts.set_kv_cache_index(2, 2)
    assert all(getattr(owner, attr) == 2 for owner, attr in owners)
    # Gemma 3 decoder layers hold a second copy of the index, which must follow the attention's.
    assert (len(owners) == 2) == (parts.text_family == "gemma3")


def test_per_layer_config_fields_cover_every_per_layer_list(loaded):
    _, model = loaded
    parts = model_parts(model)
    config = parts.text_config.to_dict()
    per_layer = {
        key for key, value in config.items()
        if isinstance(value, (list, tuple)) and len(value) == parts.num_layers
    }
    assert per_layer == set(parts.per_layer_config_fields)
    expected = {"qwen2", "qwen3", "gemma2", "gemma3", "qwen2_vl", "qwen2_5_vl"}
    assert ("layer_types" in parts.per_layer_config_fields) == (parts.text_family in expected)


def test_unsupported_model_names_its_class_and_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError) as error:
        model_parts(torch.nn.Linear(2, 2))
    assert isinstance(error.value, ValueError)
    message = str(error.value)
    assert "Linear" in message and "LlamaForCausalLM" in message and "GPT2LMHeadModel" in message

    config = tf.OPTConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
        word_embed_proj_dim=16,
    )
    with pytest.raises(UnsupportedArchitectureError, match="OPTForCausalLM.*Phi3ForCausalLM"):
        model_parts(tf.OPTForCausalLM(config))


def test_supported_architectures_lists_the_registry():
    names = supported_architectures()
    assert names == sorted(names)
    assert {"LlamaForCausalLM", "GPT2LMHeadModel", "LlavaForConditionalGeneration",
            "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"} <= set(names)


def test_subclass_of_a_supported_class_is_supported():
    model, _ = load_model("tiny-llama")
    model.__class__ = type("MyLlama", (type(model),), {})
    assert model_parts(model).family == "llama"


def _tiny_vision_kwargs():
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                image_size=28, patch_size=14)


def test_gemma3_conditional_generation():
    text = tf.Gemma3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=64,
    )
    config = tf.Gemma3Config(
        text_config=text, vision_config=tf.SiglipVisionConfig(**_tiny_vision_kwargs()),
        mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298,
    )
    model = tf.Gemma3ForConditionalGeneration(config).eval()
    parts = model_parts(model)
    assert (parts.family, parts.text_family) == ("gemma3", "gemma3")
    assert parts.layers_path == "model.language_model.layers" and parts.num_layers == 3
    assert parts.text_config is model.config.text_config
    assert parts.lm_head is model.lm_head
    assert parts.embed_tokens is model.get_input_embeddings()
    assert parts.per_layer_config_fields == ("layer_types",)


def test_llava_around_another_stack_uses_the_stack_registry():
    text = tf.MistralConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    config = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(**_tiny_vision_kwargs()), text_config=text,
        image_token_index=299,
    )
    parts = model_parts(tf.LlavaForConditionalGeneration(config))
    assert (parts.family, parts.text_family, parts.num_layers) == ("llava", "mistral", 2)


# ---------------------------------------------------------------- validate_layer_indices


def test_validate_normalises_and_sorts():
    assert validate_layer_indices(30, [5, -1, 0]) == [0, 5, 29]
    assert validate_layer_indices(4, torch.tensor([3, 1])) == [1, 3]
    assert validate_layer_indices(4, np.array([2, -4])) == [0, 2]
    assert validate_layer_indices(4, (i for i in [1])) == [1]


def test_validate_accepts_model_parts():
    model, _ = load_model("tiny-gpt2")
    parts = model_parts(model)
    assert isinstance(parts, ModelParts)
    assert validate_layer_indices(parts, [-1]) == [3]
    with pytest.raises(IndexError, match="4 layers"):
        validate_layer_indices(parts, [4])


@pytest.mark.parametrize("index", [30, -31, 100])
def test_validate_out_of_range_names_index_and_layer_count(index):
    with pytest.raises(IndexError, match=rf"layer index {index} .*30 layers"):
        validate_layer_indices(30, [1, index])


@pytest.mark.parametrize("indices, shown", [([3, 3], "3"), ([29, -1], "29"), ([0, 1, -30], "0")])
def test_validate_duplicates(indices, shown):
    with pytest.raises(ValueError, match=rf"duplicate layer index {shown}\b"):
        validate_layer_indices(30, indices)


@pytest.mark.parametrize("indices", [[1.0], ["1"], [True], [None], [torch.tensor(1.5)]])
def test_validate_non_int(indices):
    with pytest.raises(TypeError, match="not an int"):
        validate_layer_indices(30, indices)


@pytest.mark.parametrize("indices", [3, "12", None])
def test_validate_non_iterable(indices):
    with pytest.raises(TypeError, match="iterable of ints"):
        validate_layer_indices(30, indices)


def test_validate_empty():
    with pytest.raises(ValueError, match="no layer indices"):
        validate_layer_indices(30, [])
    assert validate_layer_indices(30, [], allow_empty=True) == []


def test_layer_accessor_validates():
    model, _ = load_model("tiny-llama")
    parts = model_parts(model)
    assert parts.layer(-1) is parts.layers[3]
    assert parts.layer(parts.layers[1]) is parts.layers[1]
    with pytest.raises(IndexError, match="layer index 4 is out of range.*4 layers"):
        parts.attention(4)


def test_gpt2_cross_attention_index_follows():
    config = tf.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, add_cross_attention=True)
    parts = model_parts(tf.GPT2LMHeadModel(config))
    parts.set_kv_cache_index(1, 5)
    assert parts.layers[1].attn.layer_idx == parts.layers[1].crossattention.layer_idx == 5
    assert parts.kv_cache_index(1) == 5


def test_repr_is_short():
    model, _ = load_model("tiny-gemma3")
    text = repr(model_parts(model))
    assert text.startswith("ModelParts(Gemma3ForCausalLM") and "x4" in text and len(text) < 300
