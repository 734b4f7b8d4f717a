"""ShortV freezing (and FastV, Layer Contribution) on the architectures beyond Llama/Qwen:
Gemma / Gemma 2 / Gemma 3 decoders (sandwich norms, attention-logit soft-capping, sliding-window
layers, local/global RoPE tables), LLaVA-NeXT (anyres: a variable number of image tokens) and
Qwen2-VL / Qwen2.5-VL (multimodal RoPE), each as a tiny random model, against the references
that compute everything and mask afterwards."""

import copy
import functools
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

from shortlab.arch import UnsupportedArchitectureError, model_parts
from shortlab.contribution import layer_contribution, token_groups
from shortlab.hooks import keep_tokens_unchanged
from shortlab.models import (
    QWEN_VL_IMAGE, TINY_SLIDING_WINDOW, load_model, tiny_qwen_vl_inputs,
)
from shortlab.shortv import _ENGINES, fastv, freeze_visual_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
GEMMA_MODELS = ("tiny-gemma", "tiny-gemma2", "tiny-gemma3")
MULTIMODAL = ("tiny-llava-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl")


@functools.cache
def _prototype(name):
    return load_model(name)


def _model(name, attn=None):
    """A fresh copy of a tiny model, in its default attention implementation unless ``attn``."""
    prototype, tokenizer = _prototype(name)
    model = copy.deepcopy(prototype)
    if attn is not None:
        model.set_attn_implementation(attn)
    return model, tokenizer


def _text_batch(model, seed=0):
    """Two left-padded rows of 20 random ids (longer than the sliding window) and a visual mask
    with a different count per row, spread over more than one window."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size - 1, (2, 20), generator=gen)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0
    visual = torch.zeros_like(ids, dtype=torch.bool)
    visual[0, 2:12] = True
    visual[1, 5:8] = True
    visual[1, 10:16] = True
    return {"input_ids": ids, "attention_mask": attention_mask}, visual


def _images(n, seed=0):
    """Images of different sizes: LLaVA-NeXT tiles them on different grids and Qwen2-VL
    patches them into different grids, so the rows get different numbers of image tokens."""
    rng = np.random.RandomState(seed)
    shapes = [(40, 60, 3), (30, 30, 3)][:n]
    return [Image.fromarray(rng.randint(0, 256, shape, dtype=np.uint8)) for shape in shapes]


def _multimodal_batch(name, model, processor, n=2):
    if name == "tiny-llava-next":
        texts = ["<image> Describe the picture in one word.", "<image> What?"][:n]
        return dict(processor(text=texts, images=_images(n), return_tensors="pt", padding=True))
    texts = [QWEN_VL_IMAGE + " Describe the picture in one word.", "Hi " + QWEN_VL_IMAGE + " What?"]
    return tiny_qwen_vl_inputs(model, processor, texts[:n], _images(n))


def _logits(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def _assert_close_where(actual, expected, where):
    torch.testing.assert_close(actual[where.bool()], expected[where.bool()], rtol=0, atol=ATOL)


def _query_widths(model, layer):
    """Record how many tokens each call of ``layer``'s q_proj and k_proj projects."""
    attention = model_parts(model).attention(layer)
    widths = {"q": [], "k": []}
    handles = [
        getattr(attention, f"{key}_proj").register_forward_hook(
            lambda module, args, output, key=key: widths[key].append(args[0].shape[1])
        )
        for key in widths
    ]
    return widths, handles


def _freeze_and_reference(model, layers, mask, run):
    with keep_tokens_unchanged(model, layers, mask):
        expected = run()
    with freeze_visual_tokens(model, layers, mask):
        actual = run()
    assert model not in _ENGINES
    return actual, expected


# ---------------------------------------------------------------- Gemma decoders


def test_tiny_gemma_models_exercise_what_the_engine_must_mirror():
    gemma2 = _prototype("tiny-gemma2")[0]
    assert gemma2.config.attn_logit_softcapping is not None
    assert gemma2.config._attn_implementation == "eager"  # Gemma 2 has no sdpa path
    assert gemma2.config.query_pre_attn_scalar != gemma2.config.head_dim  # scaling: not head_dim ** -0.5
    gemma3 = _prototype("tiny-gemma3")[0]
    assert set(gemma3.config.layer_types) == {"sliding_attention", "full_attention"}
    window, seq = gemma3.config.sliding_window, _text_batch(gemma3)[0]["input_ids"].shape[1]
    assert window == TINY_SLIDING_WINDOW < seq
    rope = gemma3.config.rope_parameters
    assert rope["sliding_attention"]["rope_theta"] != rope["full_attention"]["rope_theta"]


@pytest.mark.parametrize("name, attn", [
    ("tiny-gemma", None), ("tiny-gemma2", None), ("tiny-gemma3", None), ("tiny-gemma3", "eager"),
])
@pytest.mark.parametrize("padded", [False, True])
def test_gemma_freeze_matches_the_zeroed_update_reference(name, attn, padded):
    model, _ = _model(name, attn)
    inputs, visual = _text_batch(model)
    if not padded:
        inputs = {"input_ids": inputs["input_ids"]}
    layers = [0, 1, -1]  # sliding and full-attention layers
    widths, handles = _query_widths(model, 1)
    try:
        actual, expected = _freeze_and_reference(
            model, layers, visual, lambda: _logits(model, inputs)
        )
    finally:
        for handle in handles:
            handle.remove()
    real = inputs.get("attention_mask", torch.ones_like(visual))
    _assert_close_where(actual, expected, real)
    assert not torch.allclose(actual, _logits(model, inputs), atol=1e-3)  # freezing did something
    # The reference ran q on every token, the engine on the widest row's unfrozen tokens.
    seq, active = visual.shape[1], int((~visual).sum(dim=1).max())
    assert widths == {"q": [seq, active], "k": [seq, seq]}


@pytest.mark.parametrize("name", GEMMA_MODELS)
def test_gemma_batched_generate_with_a_cache_equals_the_reference(name):
    """Left-padded prompts longer than the sliding window, then decode steps on the cache."""
    model, _ = _model(name)
    inputs, visual = _text_batch(model)

    def generate():
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=5, do_sample=False)

    actual, expected = _freeze_and_reference(model, [1, 2], visual, generate)
    assert torch.equal(actual, expected)


def test_fastv_scores_gemma2_tokens_with_the_soft_capped_attention():
    """FastV's ranking reads the attention the eager Gemma 2 layer computes (logits scaled by
    query_pre_attn_scalar, soft-capped, masked), and its outputs match the masking reference."""
    model, _ = _model("tiny-gemma2")
    inputs, visual = _text_batch(model, seed=3)
    k, ratio = 2, 0.5
    with torch.no_grad():
        attentions = model(**inputs, use_cache=False, output_attentions=True).attentions[k - 1]
    with fastv(model, k, ratio, visual) as record:
        actual = _logits(model, inputs, use_cache=False)
    last = inputs["input_ids"].shape[1] - 1
    for row in range(2):
        torch.testing.assert_close(record.scores[row], attentions[row, :, last].mean(dim=0),
                                   rtol=0, atol=1e-6)
    parts = model_parts(model)

    def hide_dropped(module, args, kwargs):
        mask = kwargs["attention_mask"]
        return args, {**kwargs, "attention_mask": mask.masked_fill(
            record.dropped[:, None, None, :], torch.finfo(mask.dtype).min)}

    handles = [parts.layers[i].register_forward_pre_hook(hide_dropped, with_kwargs=True)
               for i in range(k, parts.num_layers)]
    try:
        expected = _logits(model, inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    _assert_close_where(actual, expected, inputs["attention_mask"].bool() & ~record.dropped)


def test_bidirectional_gemma3_is_refused_by_name():
    config = copy.deepcopy(_prototype("tiny-gemma3")[0].config)
    config.use_bidirectional_attention = True
    model = tf.Gemma3ForCausalLM(config)
    with pytest.raises(UnsupportedArchitectureError, match="Gemma3ForCausalLM attends bidirectionally"):
        with freeze_visual_tokens(model, [1], torch.ones(1, 4, dtype=torch.bool)):
            pass


# ---------------------------------------------------------------- LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL


def test_multimodal_tiny_models_give_rows_different_image_token_counts():
    for name in MULTIMODAL:
        model, processor = _prototype(name)
        inputs = _multimodal_batch(name, model, processor)
        counts = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
        assert len(set(counts)) == 2 and min(counts) > 0, (name, counts)
    qwen = _prototype("tiny-qwen2-vl")[0]
    assert sum(qwen.config.text_config.rope_parameters["mrope_section"]) == 16 // 2  # head_dim 16


@pytest.mark.parametrize("name", MULTIMODAL)
def test_multimodal_freeze_reads_the_image_tokens_itself(name):
    model, processor = _model(name)
    inputs = _multimodal_batch(name, model, processor)
    image = inputs["input_ids"] == model.config.image_token_id
    with keep_tokens_unchanged(model, [0, 3], image):
        expected = _logits(model, inputs)
    with freeze_visual_tokens(model, [0, 3]):  # no token_mask: input_ids == image_token_id
        actual = _logits(model, inputs)
    _assert_close_where(actual, expected, inputs["attention_mask"])
    assert not torch.allclose(actual, _logits(model, inputs), atol=1e-3)
    assert model not in _ENGINES


@pytest.mark.parametrize("name", MULTIMODAL)
def test_multimodal_generate_with_a_cache_equals_the_reference(name):
    model, processor = _model(name)
    inputs = _multimodal_batch(name, model, processor, n=1)

    def generate():
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=5, do_sample=False)

    image = inputs["input_ids"] == model.config.image_token_id
    actual, expected = _freeze_and_reference(model, [0, 1, 2], image, generate)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("name", MULTIMODAL)
def test_multimodal_layer_contribution_rerun_matches_full_forward(name):
    model, processor = _model(name)
    inputs = _multimodal_batch(name, model, processor)
    visual = token_groups(model, inputs["input_ids"], inputs["attention_mask"])["visual"]
    fast = layer_contribution(model, inputs, visual)
    reference = layer_contribution(model, inputs, visual, method="full_forward")
    assert list(fast) == list(reference) == [0, 1, 2, 3]
    for layer, value in fast.items():
        assert value == pytest.approx(reference[layer], rel=0, abs=1e-5)
    assert max(fast.values()) > 1e-5


def test_qwen2_vl_positions_are_multimodal():
    """The reference and the engine agree because the layers get the merged M-RoPE table: check
    that image tokens' positions really are 3-D (height/width differ from the text positions)."""
    model, tokenizer = _prototype("tiny-qwen2-vl")
    inputs = _multimodal_batch("tiny-qwen2-vl", model, tokenizer, n=1)
    captured = {}
    handle = model_parts(model).layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True
    )
    try:
        _logits(model, inputs)
    finally:
        handle.remove()
    cos, _ = captured["position_embeddings"]
    assert cos.shape == (1, inputs["input_ids"].shape[1], 16)
    plain = model.model.language_model.rotary_emb(
        cos, torch.arange(cos.shape[1])[None]
    )[0]
    assert not torch.allclose(cos, plain)


def test_qwen_vl_inputs_check_one_image_per_placeholder():
    model, tokenizer = _prototype("tiny-qwen2-vl")
    with pytest.raises(ValueError, match="2 images for 1"):
        tiny_qwen_vl_inputs(model, tokenizer, [QWEN_VL_IMAGE + " Hi"], _images(2))


def _tiny_gemma3_vlm():
    """A Gemma 3 multimodal model (one-block SigLIP tower, 4 image tokens per image, decoder with
    alternating sliding/full layers) and a left-padded batch with one image per row."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text = tf.Gemma3TextConfig(
            vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            sliding_window=TINY_SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention"] * 2,
        )
        vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14)
        config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                 image_token_index=299, boi_token_index=297, eoi_token_index=298)
        model = tf.Gemma3ForConditionalGeneration(config).eval()
        pixel_values = torch.randn(2, 3, 28, 28)
    ids = torch.tensor([[5, 6, 297] + [299] * 4 + [298, 7, 8, 9, 10, 11, 12]] * 2)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :2] = 0
    # token_type_ids: the image tokens attend to each other bidirectionally (a custom 4D mask).
    inputs = dict(input_ids=ids, attention_mask=attention_mask, pixel_values=pixel_values,
                  token_type_ids=(ids == 299).long())
    return model, inputs


def test_gemma3_multimodal_freeze_and_generate_equal_the_reference():
    model, inputs = _tiny_gemma3_vlm()
    image = inputs["input_ids"] == model.config.image_token_id
    actual, expected = _freeze_and_reference(model, [0, 1, 3], image, lambda: _logits(model, inputs))
    _assert_close_where(actual, expected, inputs["attention_mask"])
    assert not torch.allclose(actual, _logits(model, inputs), atol=1e-3)

    def generate():
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=4, do_sample=False)

    actual, expected = _freeze_and_reference(model, [0, 1, 3], image, generate)
    assert torch.equal(actual, expected)
