"""ShortV (freeze_visual_tokens) and FastV (fastv) against references that compute everything
and mask or overwrite afterwards: the zeroed-update ``keep_tokens_unchanged`` for ShortV, and a
4D attention mask hiding the dropped tokens from layer k on for FastV."""

import copy
import functools
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image

from shortlab import llava_mini as lm
from shortlab.arch import UnsupportedArchitectureError, model_parts
from shortlab.flops import fastv_num_dropped
from shortlab.hooks import keep_tokens_unchanged
from shortlab.models import load_model
from shortlab.shortv import _ENGINES, _Engine, fastv, freeze_visual_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT_MODELS = ("tiny-llama", "tiny-qwen3")
ATOL = 1e-5
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
              "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


@functools.cache
def _prototype(name):
    return load_model(name)


def _model(name, attn="sdpa"):
    """A fresh copy of a tiny model (copying is much faster than building it)."""
    prototype, tokenizer = _prototype(name)
    model = copy.deepcopy(prototype)
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    return model, tokenizer


def _text_batch(model, seed=0):
    """Two left-padded rows of random ids (row 1 has 3 padding tokens) and a visual mask with a
    different count per row, never on padding or on the first real token."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size - 1, (2, 14), generator=gen)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0
    visual = torch.zeros_like(ids, dtype=torch.bool)
    visual[0, 2:9] = True
    visual[1, 5:8] = True
    visual[1, 10] = True
    return {"input_ids": ids, "attention_mask": attention_mask}, visual


def _llava_batch(processor, n=1, seed=0):
    """Pixel inputs for tiny-llava: ``n`` prompts of different lengths (right-padded)."""
    rng = np.random.RandomState(seed)
    images = [Image.fromarray(rng.randint(0, 256, (40, 60, 3), dtype=np.uint8)) for _ in range(n)]
    texts = ["<image> Describe the picture in one word.", "<image> What?"][:n]
    return dict(processor(text=texts, images=images, return_tensors="pt", padding=True))


def _logits(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def _assert_close_where(actual, expected, where):
    """Compare ``[batch, seq, ...]`` tensors where ``where`` (``[batch, seq]``) is True."""
    torch.testing.assert_close(actual[where.bool()], expected[where.bool()], rtol=0, atol=ATOL)


def _is_clean(model):
    """No patch or hook of ours left anywhere on the model (transformers adds hooks of its own
    lazily, on a first forward pass)."""
    for module in model.modules():
        assert "forward" not in module.__dict__
        for attr in HOOK_DICTS:
            for hook in getattr(module, attr).values():
                assert not isinstance(getattr(hook, "__self__", None), _Engine), (module, attr)
    return model not in _ENGINES


# ---------------------------------------------------------------- ShortV: freeze_visual_tokens


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_tiny_text_models_use_grouped_query_attention(name):
    config = _prototype(name)[0].config
    assert config.num_key_value_heads < config.num_attention_heads


@pytest.mark.parametrize("name", TEXT_MODELS)
@pytest.mark.parametrize("padded", [False, True])
def test_freeze_matches_the_zeroed_update_reference(name, padded):
    model, _ = _model(name)
    inputs, visual = _text_batch(model)
    if not padded:
        inputs = {"input_ids": inputs["input_ids"]}  # no mask: causal attention, sdpa's is_causal
    layers = [1, -1]
    with keep_tokens_unchanged(model, layers, visual):
        expected = _logits(model, inputs)
    with freeze_visual_tokens(model, layers, visual):
        actual = _logits(model, inputs)
    real = inputs.get("attention_mask", torch.ones_like(visual))
    _assert_close_where(actual, expected, real)
    assert not torch.allclose(actual, _logits(model, inputs), atol=1e-3)  # freezing did something
    assert _is_clean(model)


def test_freeze_matches_the_reference_with_eager_attention():
    model, _ = _model("tiny-llama", attn="eager")  # float additive masks instead of bool ones
    inputs, visual = _text_batch(model)
    with keep_tokens_unchanged(model, [0, 2], visual):
        expected = _logits(model, inputs)
    with freeze_visual_tokens(model, [0, 2], visual):
        actual = _logits(model, inputs)
    _assert_close_where(actual, expected, inputs["attention_mask"])


def test_freeze_with_rows_entirely_frozen():
    """A row with nothing but frozen tokens (no query at all) beside a partly frozen one, and a
    batch frozen entirely (the layer only fills the cache)."""
    model, _ = _model("tiny-llama")
    inputs, visual = _text_batch(model)
    inputs = {"input_ids": inputs["input_ids"]}
    partly = visual.clone()
    partly[0] = True
    for mask in (partly, torch.ones_like(visual)):
        with keep_tokens_unchanged(model, [1, 2], mask):
            expected = _logits(model, inputs)
        with freeze_visual_tokens(model, [1, 2], mask):
            actual = _logits(model, inputs)
        torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL)


def test_freeze_skips_the_frozen_tokens_compute():
    """Frozen layers project q, run o and the MLP on the other tokens only (padded to the widest
    row), and k/v on every token."""
    model, _ = _model("tiny-llama")
    inputs, visual = _text_batch(model)
    parts = model_parts(model)
    widths: dict[tuple[str, int], list[int]] = {}
    handles = [
        getattr(parts.layers[i].self_attn if name.endswith("proj") else parts.layers[i], name)
        .register_forward_hook(
            lambda m, args, out, key=(name, i): widths.setdefault(key, []).append(args[0].shape[1])
        )
        for i in range(parts.num_layers) for name in ("q_proj", "k_proj", "o_proj", "mlp")
    ]
    try:
        with freeze_visual_tokens(model, [1, 2], visual):
            _logits(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    seq = visual.shape[1]
    active = int((~visual).sum(dim=1).max())  # row 1: 14 - 4 = 10 queries; row 0: 7
    for i in range(parts.num_layers):
        expected = active if i in (1, 2) else seq
        assert widths[("q_proj", i)] == widths[("o_proj", i)] == widths[("mlp", i)] == [expected]
        assert widths[("k_proj", i)] == [seq]


def test_freeze_on_tiny_llava_with_pixels_reads_the_image_tokens_itself():
    model, processor = _model("tiny-llava")
    inputs = _llava_batch(processor, n=2)
    image = inputs["input_ids"] == model.config.image_token_id
    assert image.sum() == 2 * 16
    with keep_tokens_unchanged(model, [0, 3], image):
        expected = _logits(model, inputs)
    with freeze_visual_tokens(model, [0, 3]):  # no token_mask: input_ids == image_token_id
        actual = _logits(model, inputs)
    _assert_close_where(actual, expected, inputs["attention_mask"])
    assert not torch.allclose(actual, _logits(model, inputs), atol=1e-3)
    assert _is_clean(model)


def _packed_inputs(model, seed=0):
    """Two packed LLaVA sequences of different lengths (a shared prefix with 16 image tokens,
    question blocks and answer branches), their 4D additive mask and random image features."""
    gen = torch.Generator().manual_seed(seed)
    image_id = model.config.image_token_id

    def ids(n):
        return torch.randint(0, 1000, (n,), generator=gen).tolist()

    prefix = ids(3) + [image_id] * 16 + ids(1)
    first = lm.pack(prefix, [(ids(4), 0), (ids(2), 1), (ids(2), 1), (ids(3), 0)])
    second = lm.pack(prefix, [(ids(2), 0), (ids(1), 1)])
    input_ids, position_ids, mask = lm.packed_batch([first, second], 0, model.dtype)
    real = torch.zeros_like(input_ids, dtype=torch.bool)
    real[0, : len(first.input_ids)] = True
    real[1, : len(second.input_ids)] = True
    features = torch.randn(2, 16, model.config.text_config.hidden_size, generator=gen)
    return input_ids, position_ids, mask, features, real


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_freeze_with_a_custom_4d_packed_mask(attn):
    model, _ = _model("tiny-llava", attn=attn)
    input_ids, position_ids, mask, features, real = _packed_inputs(model)
    image = input_ids == model.config.image_token_id

    def hidden():
        with torch.no_grad():
            return lm.packed_hidden_states(model, input_ids, position_ids, mask, features)

    with keep_tokens_unchanged(model, [1, 2], image):
        expected = hidden()
    with freeze_visual_tokens(model, [1, 2], token_mask=image):
        actual = hidden()
    _assert_close_where(actual, expected, real)
    # Packed evaluation calls the decoder stack with inputs_embeds: there is no input_ids to read.
    with freeze_visual_tokens(model, [1, 2]):
        with pytest.raises(ValueError, match="no input_ids .* pass token_mask"):
            hidden()
    assert _is_clean(model)


def test_freeze_generate_with_kv_cache_equals_the_reference():
    model, processor = _model("tiny-llava")
    inputs = _llava_batch(processor, n=1)
    image = inputs["input_ids"] == model.config.image_token_id

    def generate():
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=6, do_sample=False)

    with keep_tokens_unchanged(model, [0, 1, 2], image):
        expected = generate()
    with freeze_visual_tokens(model, [0, 1, 2]):
        actual = generate()
    assert torch.equal(actual, expected)


def test_freeze_batched_generate_with_an_absolute_token_mask():
    """A token_mask covering the left-padded prompts; generated tokens beyond it are not frozen."""
    model, _ = _model("tiny-llama")
    inputs, visual = _text_batch(model)

    def generate():
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=5, do_sample=False)

    with keep_tokens_unchanged(model, [1, 3], visual):
        expected = generate()
    with freeze_visual_tokens(model, [1, 3], visual):
        actual = generate()
    assert torch.equal(actual, expected)


def test_freeze_decode_steps_with_a_cache_match_a_full_forward():
    model, _ = _model("tiny-qwen3")
    inputs, visual = _text_batch(model)
    new = torch.tensor([[11, 42], [7, 99]])
    extended = {
        "input_ids": torch.cat([inputs["input_ids"], new], dim=1),
        "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(new)], dim=1),
    }
    with freeze_visual_tokens(model, [0, 2], visual), torch.no_grad():
        full = model(**extended, use_cache=False).logits
        out = model(**inputs, use_cache=True)
        cache, steps = out.past_key_values, [out.logits[:, -1]]
        for t in range(new.shape[1]):
            mask = extended["attention_mask"][:, : inputs["input_ids"].shape[1] + t + 1]
            out = model(input_ids=new[:, t : t + 1], attention_mask=mask, past_key_values=cache)
            steps.append(out.logits[:, -1])
    prompt = inputs["input_ids"].shape[1]
    expected = torch.stack([full[:, prompt - 1 + t] for t in range(new.shape[1] + 1)])
    torch.testing.assert_close(torch.stack(steps), expected, rtol=0, atol=ATOL)


def test_freeze_restores_the_model_on_every_exit_path():
    model, _ = _model("tiny-llama")
    inputs, visual = _text_batch(model)
    plain = _logits(model, inputs)
    with pytest.raises(RuntimeError, match="in the block"):
        with freeze_visual_tokens(model, [1], visual):
            raise RuntimeError("in the block")
    assert _is_clean(model)
    with pytest.raises(ValueError, match="does not match the hidden states"):
        with freeze_visual_tokens(model, [1], torch.cat([visual, visual])):  # wrong batch size
            _logits(model, inputs)
    assert _is_clean(model)
    with pytest.raises(RuntimeError, match="inside a layer"):
        with freeze_visual_tokens(model, [1], visual):
            def fail(module, args, kwargs):
                raise RuntimeError("inside a layer")
            handle = model.model.layers[2].register_forward_pre_hook(fail, with_kwargs=True)
            try:
                _logits(model, inputs)
            finally:
                handle.remove()
    assert _is_clean(model)
    with freeze_visual_tokens(model, [1], visual):
        with fastv(model, 2, 0.5, visual):
            pass
        assert model in _ENGINES  # still frozen after the inner context left
    assert _is_clean(model)
    assert torch.equal(_logits(model, inputs), plain)


def test_freeze_with_no_layers_is_a_no_op():
    model, _ = _model("tiny-llama")
    inputs, visual = _text_batch(model)
    plain = _logits(model, inputs)
    with freeze_visual_tokens(model, [], visual):
        assert _is_clean(model)
        assert torch.equal(_logits(model, inputs), plain)


def test_freeze_validates_its_arguments():
    model, _ = _model("tiny-llama")
    _, visual = _text_batch(model)
    with pytest.raises(IndexError, match="out of range"):
        with freeze_visual_tokens(model, [4], visual):
            pass
    with pytest.raises(TypeError, match="not an int"):
        with freeze_visual_tokens(model, [1.0], visual):
            pass
    with pytest.raises(ValueError, match="duplicate layer index 3"):
        with freeze_visual_tokens(model, [3, -1], visual):
            pass
    with pytest.raises(TypeError, match="bool tensor"):
        with freeze_visual_tokens(model, [1], visual.long()):
            pass
    with pytest.raises(ValueError, match="no image_token_id .* pass token_mask"):
        with freeze_visual_tokens(model, [1]):
            pass
    with freeze_visual_tokens(model, [1], visual):
        with pytest.raises(ValueError, match="already active"):
            with freeze_visual_tokens(model, [2], visual):
                pass
    assert _is_clean(model)


@pytest.mark.parametrize("name, layer_class", [("tiny-phi3", "Phi3DecoderLayer"),
                                               ("tiny-gpt2", "GPT2Block")])
def test_unsupported_architectures_are_named(name, layer_class):
    model, _ = _prototype(name)
    with pytest.raises(UnsupportedArchitectureError, match=layer_class):
        with freeze_visual_tokens(model, [1], torch.ones(1, 4, dtype=torch.bool)):
            pass
    with pytest.raises(UnsupportedArchitectureError, match=layer_class):
        with fastv(model, 1, 0.5, torch.ones(1, 4, dtype=torch.bool)):
            pass
    assert _is_clean(model)


# ---------------------------------------------------------------- FastV


def _drop_columns_reference(model, k, dropped):
    """Pre-hooks on layers >= k hiding the ``dropped`` tokens (bool [batch, seq]) as keys through
    the 4D mask: every token still computes everything, so kept tokens see what FastV gives them."""
    parts = model_parts(model)

    def hook(module, args, kwargs):
        mask = kwargs["attention_mask"]
        batch, seq = dropped.shape
        if mask is None:
            mask = torch.ones(seq, seq, dtype=torch.bool).tril().expand(batch, 1, seq, seq)
        hidden = dropped[:, None, None, :]
        if mask.dtype == torch.bool:
            mask = mask & ~hidden
        else:
            mask = mask.masked_fill(hidden, torch.finfo(mask.dtype).min)
        return args, {**kwargs, "attention_mask": mask}

    return [parts.layers[i].register_forward_pre_hook(hook, with_kwargs=True)
            for i in range(k, parts.num_layers)]


def _with_handles(handles, fn):
    try:
        return fn()
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_fastv_with_ratio_zero_is_the_plain_model(name):
    model, _ = _model(name)
    inputs, visual = _text_batch(model)
    plain = _logits(model, inputs, use_cache=False)
    with fastv(model, 2, 0.0, visual) as record:
        assert torch.equal(_logits(model, inputs, use_cache=False), plain)
    assert not record.dropped.any()
    assert _is_clean(model)


@pytest.mark.parametrize("name, attn", [("tiny-llama", "sdpa"), ("tiny-llama", "eager"),
                                        ("tiny-qwen3", "sdpa")])
@pytest.mark.parametrize("padded", [False, True])
def test_fastv_matches_the_masking_reference(name, attn, padded):
    model, _ = _model(name, attn)
    inputs, visual = _text_batch(model)
    if not padded:
        inputs = {"input_ids": inputs["input_ids"]}
    k, ratio = 2, 0.5
    with fastv(model, k, ratio, visual) as record:
        actual = _logits(model, inputs, use_cache=False)
    dropped = record.dropped
    counts = visual.sum(dim=1).tolist()
    assert dropped.sum(dim=1).tolist() == [fastv_num_dropped(v, ratio) for v in counts] == [4, 2]
    assert not (dropped & ~visual).any()
    expected = _with_handles(_drop_columns_reference(model, k, dropped),
                             lambda: _logits(model, inputs, use_cache=False))
    real = inputs.get("attention_mask", torch.ones_like(visual)).bool()
    _assert_close_where(actual, expected, real & ~dropped)


def test_fastv_drops_the_least_attended_visual_tokens():
    """The dropped set is the lowest-scored visual tokens under the last real token's attention
    in layer k - 1 (head mean), computed directly from the eager model's attention weights."""
    model, _ = _model("tiny-llama", attn="eager")
    inputs, visual = _text_batch(model, seed=3)
    k, ratio = 2, 0.6
    with torch.no_grad():
        attentions = model(**inputs, use_cache=False, output_attentions=True).attentions[k - 1]
    with fastv(model, k, ratio, visual) as record:
        _logits(model, inputs, use_cache=False)
    last = inputs["attention_mask"].shape[1] - 1  # left padding: the last real token is last
    assert record.queries.nonzero()[:, 1].tolist() == [last, last]
    for row in range(2):
        scores = attentions[row, :, last].mean(dim=0)
        torch.testing.assert_close(record.scores[row], scores, rtol=0, atol=1e-6)
        candidates = visual[row].nonzero().flatten()
        n_drop = fastv_num_dropped(len(candidates), ratio)
        lowest = candidates[scores[candidates].argsort()[:n_drop]]
        assert set(record.dropped[row].nonzero().flatten().tolist()) == set(lowest.tolist())


def test_fastv_ranks_by_the_mean_attention_of_given_query_rows():
    model, _ = _model("tiny-llama", attn="eager")
    inputs, visual = _text_batch(model, seed=3)
    k, ratio = 2, 0.5
    queries = torch.zeros_like(visual)
    queries[0, [-1, -3]] = True
    queries[1, -2] = True
    with torch.no_grad():
        attentions = model(**inputs, use_cache=False, output_attentions=True).attentions[k - 1]
    with fastv(model, k, ratio, visual, query_mask=queries) as record:
        _logits(model, inputs, use_cache=False)
    assert torch.equal(record.queries, queries)
    for row in range(2):
        rows = queries[row].nonzero().flatten()
        expected = attentions[row][:, rows].mean(dim=0).mean(dim=0)
        torch.testing.assert_close(record.scores[row], expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="selects no query token"):
        with fastv(model, k, ratio, visual, query_mask=torch.zeros_like(visual)):
            _logits(model, inputs, use_cache=False)


def test_fastv_leaves_dropped_tokens_out_of_the_later_layers():
    model, _ = _model("tiny-llama")
    inputs, visual = _text_batch(model)
    parts = model_parts(model)
    widths = {}

    def record_width(index):
        def hook(module, args, output):
            widths[index] = args[0].shape[1]
        return hook

    handles = [parts.layers[i].self_attn.k_proj.register_forward_hook(record_width(i))
               for i in range(parts.num_layers)]
    with fastv(model, 2, 0.5, visual) as record:
        _with_handles(handles, lambda: _logits(model, inputs, use_cache=False))
    seq = visual.shape[1]
    kept = int((~record.dropped).sum(dim=1).max())
    assert kept == seq - 2  # row 1 drops 2, row 0 drops 4: padded to the wider row
    assert widths == {0: seq, 1: seq, 2: kept, 3: kept}


def test_fastv_on_tiny_llava_with_pixels_and_with_a_packed_mask():
    model, processor = _model("tiny-llava")
    inputs = _llava_batch(processor, n=2)
    image = inputs["input_ids"] == model.config.image_token_id
    with fastv(model, 1, 0.75) as record:  # image tokens read from input_ids
        actual = _logits(model, inputs, use_cache=False)
    assert record.dropped.sum(dim=1).tolist() == [12, 12] and not (record.dropped & ~image).any()
    lengths = inputs["attention_mask"].sum(dim=1)
    assert record.queries.nonzero()[:, 1].tolist() == (lengths - 1).tolist()  # right padding
    expected = _with_handles(_drop_columns_reference(model, 1, record.dropped),
                             lambda: _logits(model, inputs, use_cache=False))
    _assert_close_where(actual, expected, inputs["attention_mask"].bool() & ~record.dropped)

    input_ids, position_ids, mask, features, real = _packed_inputs(model)
    image = input_ids == model.config.image_token_id

    def hidden():
        with torch.no_grad():
            return lm.packed_hidden_states(model, input_ids, position_ids, mask, features)

    with fastv(model, 2, 0.5, token_mask=image) as record:
        actual = hidden()
    assert record.queries.nonzero()[:, 1].tolist() == (real.sum(dim=1) - 1).tolist()  # each row's sequence end
    expected = _with_handles(_drop_columns_reference(model, 2, record.dropped), hidden)
    _assert_close_where(actual, expected, real & ~record.dropped)


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_fastv_composes_with_freezing(name):
    """ShortV + FastV: frozen layers freeze the kept visual tokens; the reference zeroes the frozen
    updates and hides the dropped tokens through the mask."""
    model, _ = _model(name)
    inputs, visual = _text_batch(model)
    frozen, k = [1, 3], 2
    with freeze_visual_tokens(model, frozen, visual), fastv(model, k, 0.5, visual) as record:
        actual = _logits(model, inputs, use_cache=False)
    with keep_tokens_unchanged(model, frozen, visual):
        expected = _with_handles(_drop_columns_reference(model, k, record.dropped),
                                 lambda: _logits(model, inputs, use_cache=False))
    _assert_close_where(actual, expected, inputs["attention_mask"].bool() & ~record.dropped)
    assert _is_clean(model)


def test_fastv_is_prefill_only():
    model, processor = _model("tiny-llava")
    inputs = _llava_batch(processor, n=1)
    with fastv(model, 2, 0.5) as record:
        with pytest.raises(ValueError, match="prefill-only .* use_cache=False"):
            _logits(model, inputs)  # the config's use_cache=True creates a cache
        with pytest.raises(ValueError, match="prefill-only"):
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        _logits(model, inputs, use_cache=False)  # and the engine still works afterwards
    assert record.dropped.sum() == 8
    assert _is_clean(model)


def test_fastv_validates_its_arguments():
    model, _ = _model("tiny-llama")
    _, visual = _text_batch(model)
    for k in (0, 4):
        with pytest.raises(ValueError, match="k must be in 1..3"):
            with fastv(model, k, 0.5, visual):
                pass
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\]"):
        with fastv(model, 1, 1.5, visual):
            pass
    with pytest.raises(ValueError, match="no image_token_id"):
        with fastv(model, 1, 0.5):
            pass
    assert _is_clean(model)
