import copy
import functools
import os
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from shortlab.arch import model_parts
from shortlab.hooks import (
    capture_layer_io,
    eval_mode,
    keep_tokens_unchanged,
    replace_layer_outputs,
    skip_layers,
)
from shortlab.models import load_model


pytestmark = pytest.mark.usefixtures("one_thread")


HOOK_MODELS = ("tiny-llama", "tiny-gpt2", "tiny-gemma3", "tiny-llava")
HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
    "_backward_hooks", "_backward_pre_hooks",
)


def _inputs(name, model, tokenizer, length=10):
    if name == "tiny-llava":
        pixels = np.random.RandomState(0).randint(0, 256, (40, 60, 3), dtype=np.uint8)
        batch = tokenizer(
            text="<image> Describe the picture in one word.", images=Image.fromarray(pixels),
            return_tensors="pt",
        )
        return dict(batch)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab - 1, (2, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@functools.cache
def _prototype(name):
    model, tokenizer = load_model(name)
    return model, tokenizer


def _setup(name, length=10):
    """A fresh copy of a tiny model (copying is much faster than building it again)."""
    prototype, tokenizer = _prototype(name)
    model = copy.deepcopy(prototype)
    inputs = _inputs(name, model, tokenizer, length)
    ids = inputs["input_ids"]
    if name == "tiny-llava":  # ShortV: freeze the image tokens
        mask = ids == model.config.image_token_index
    else:
        mask = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    # True at position 0, so that a decode step wrongly reading the mask's start shows up.
    mask[:, 0] = True
    assert not mask.all()
    # transformers installs its output-capturing hooks lazily on a first forward (LLaVA's vision
    # tower asks for hidden states); run it now so that hook counts only see our changes.
    with torch.no_grad():
        model(**inputs)
    return SimpleNamespace(
        name=name, model=model, tokenizer=tokenizer, inputs=inputs, mask=mask,
        parts=model_parts(model),
    )


@pytest.fixture(params=HOOK_MODELS)
def s(request):
    return _setup(request.param)


def _logits(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def _hook_snapshot(model):
    return {
        name: (
            {attr: tuple(getattr(module, attr)) for attr in HOOK_DICTS},
            module.__dict__.get("forward"),
        )
        for name, module in model.named_modules()
    }


def _extend(inputs, new_ids):
    """Inputs for the prompt followed by ``new_ids`` [batch, n]."""
    extended = dict(inputs)
    extended["input_ids"] = torch.cat([inputs["input_ids"], new_ids], dim=1)
    extended["attention_mask"] = torch.cat(
        [inputs["attention_mask"], torch.ones_like(new_ids)], dim=1
    )
    return extended


def _decode_matches_full_forward(s, context_factory, steps=2):
    """Prefill + cached single-token steps give the logits of an uncached forward on it all."""
    batch = s.inputs["input_ids"].shape[0]
    new_ids = torch.tensor([[11, 42], [7, 99]])[:batch, :steps]
    with context_factory():
        full = _logits(s.model, _extend(s.inputs, new_ids), use_cache=False)
        with torch.no_grad():
            out = s.model(**s.inputs, use_cache=True)
            cache, stepwise = out.past_key_values, [out.logits[:, -1]]
            for t in range(steps):
                step = {
                    "input_ids": new_ids[:, t : t + 1],
                    "attention_mask": _extend(s.inputs, new_ids[:, : t + 1])["attention_mask"],
                }
                out = s.model(**step, past_key_values=cache, use_cache=True)
                stepwise.append(out.logits[:, -1])
    prompt_len = s.inputs["input_ids"].shape[1]
    expected = [full[:, prompt_len - 1 + t] for t in range(steps + 1)]
    torch.testing.assert_close(torch.stack(stepwise), torch.stack(expected), rtol=0, atol=2e-5)


def _generate(s, **kwargs):
    return s.model.generate(**s.inputs, max_new_tokens=4, do_sample=False, **kwargs)


# ---------------------------------------------------------------- capture_layer_io


def test_capture_records_every_layer_over_several_passes(s):
    n = s.parts.num_layers
    with capture_layer_io(s.model) as record:
        out = s.model(**s.inputs, output_hidden_states=True)  # with grad: captures must detach
        s.model(**s.inputs)
    assert record.layers == tuple(range(n))
    hidden = out.hidden_states  # [0] = layer 0 input ... [n] = after the final norm
    for i in range(n):
        assert len(record.inputs[i]) == len(record.outputs[i]) == 2
        assert torch.equal(record.inputs[i][0], hidden[i])
        assert not record.inputs[i][0].requires_grad and not record.outputs[i][0].requires_grad
        if i + 1 < n:
            assert torch.equal(record.outputs[i][0], hidden[i + 1])
            assert torch.equal(record.outputs[i][1], record.inputs[i + 1][1])
    assert torch.equal(s.parts.final_norm(record.outputs[n - 1][0]), hidden[n])


def test_capture_subset_and_errors(s):
    with capture_layer_io(s.model, layers=[-1, 1]) as record:
        _logits(s.model, s.inputs)
    assert record.layers == (1, 3) and set(record.inputs) == {1, 3}
    with pytest.raises(ValueError, match="no layer indices"):
        with capture_layer_io(s.model, layers=[]):
            pass
    with pytest.raises(IndexError, match="layer index 4 .*4 layers"):
        with capture_layer_io(s.model, layers=[4]):
            pass


def test_capture_with_reduce_streams_and_stores_nothing(s):
    """A streaming Block Influence accumulator sees the same states and stores nothing."""
    sums, counts, order = {}, {}, []

    def block_influence(index, hidden_in, hidden_out):
        order.append(index)
        influence = 1 - torch.nn.functional.cosine_similarity(hidden_in, hidden_out, dim=-1)
        sums[index] = sums.get(index, 0.0) + influence.sum().item()
        counts[index] = counts.get(index, 0) + influence.numel()

    with capture_layer_io(s.model, reduce=block_influence) as streamed:
        for _ in range(2):
            _logits(s.model, s.inputs)
    with capture_layer_io(s.model) as stored:
        _logits(s.model, s.inputs)

    n = s.parts.num_layers
    assert order == list(range(n)) * 2
    assert all(streamed.inputs[i] == [] and streamed.outputs[i] == [] for i in range(n))
    for i in range(n):
        x_in, x_out = stored.inputs[i][0], stored.outputs[i][0]
        expected = (1 - torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)).mean()
        assert sums[i] / counts[i] == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------- skip_layers


@pytest.mark.parametrize("indices", [[0], [1, 2], [-1]])
def test_skip_equals_identity_replacement(s, indices):
    with skip_layers(s.model, indices):
        skipped = _logits(s.model, s.inputs)
    with replace_layer_outputs(s.model, {i: (lambda x_in, x_out: x_in) for i in indices}):
        replaced = _logits(s.model, s.inputs)
    assert torch.equal(skipped, replaced)
    assert not torch.equal(skipped, _logits(s.model, s.inputs))


def test_skip_really_skips_compute_but_keeps_hooks(s):
    layer = s.parts.layers[1]
    inner_calls, layer_calls = [], []
    handles = [
        module.register_forward_pre_hook(lambda *a: inner_calls.append(1))
        for module in layer.modules() if module is not layer
    ]
    handles.append(layer.register_forward_hook(
        lambda module, args, kwargs, output: layer_calls.append(output is args[0]),
        with_kwargs=True,
    ))
    try:
        with skip_layers(s.model, [1]):
            _logits(s.model, s.inputs)
        assert inner_calls == [] and layer_calls == [True]
        _logits(s.model, s.inputs)
        assert inner_calls and layer_calls == [True, False]
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("indices", [[0], [1, 3]])
def test_skip_with_kv_cache(s, indices):
    """Skipping layer 0 must not empty the cache length the model derives positions from."""
    _decode_matches_full_forward(s, lambda: skip_layers(s.model, indices))
    with skip_layers(s.model, indices):
        assert torch.equal(_generate(s), _generate(s, use_cache=False))


def _physically_removed(model, indices):
    """A copy of ``model`` without the given layers, renumbered as layer removal must do it."""
    clone = copy.deepcopy(model)
    parts = model_parts(clone)
    keep = [i for i in range(parts.num_layers) if i not in indices]
    parent_path, _, attr = parts.layers_path.rpartition(".")
    kept = nn.ModuleList(parts.layers[i] for i in keep)
    setattr(parts.model.get_submodule(parent_path), attr, kept)
    parts = model_parts(clone)
    for new_index, layer in enumerate(parts.layers):
        parts.set_kv_cache_index(layer, new_index)
    config = parts.text_config
    for name in parts.per_layer_config_fields:
        setattr(config, name, [getattr(config, name)[i] for i in keep])
    config.num_hidden_layers = len(keep)
    return clone


@pytest.mark.parametrize("name", HOOK_MODELS + ("tiny-gemma2",))
@pytest.mark.parametrize("indices", [[0], [1, 2]])
def test_skip_matches_physical_layer_removal(name, indices):
    """80 tokens exceed the sliding window (64), so Gemma 2's alternating layer_types matter."""
    s = _setup(name, length=80)
    removed = _physically_removed(s.model, indices)
    with skip_layers(s.model, indices):
        skipped_logits = _logits(s.model, s.inputs)
        skipped_tokens = _generate(s)
    torch.testing.assert_close(skipped_logits, _logits(removed, s.inputs), rtol=0, atol=1e-5)
    generated = removed.generate(**s.inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(skipped_tokens, generated)


def test_skip_restores_an_existing_instance_forward_and_nests(s):
    layer = s.parts.layers[2]
    own_calls = []

    def own_forward(*args, **kwargs):
        own_calls.append(1)
        return type(layer).forward(layer, *args, **kwargs)

    layer.forward = own_forward
    try:
        with skip_layers(s.model, [2]):
            with skip_layers(s.model, [2, 0]):
                _logits(s.model, s.inputs)
            assert s.model.get_submodule(s.parts.layers_path)[0].__dict__.get("forward") is None
            _logits(s.model, s.inputs)
        assert own_calls == [] and layer.__dict__["forward"] is own_forward
        _logits(s.model, s.inputs)
        assert own_calls == [1]
    finally:
        del layer.forward


def test_skip_validates(s):
    with pytest.raises(IndexError, match="layer index -5 .*4 layers"):
        with skip_layers(s.model, [-5]):
            pass
    with pytest.raises(ValueError, match="duplicate layer index 3"):
        with skip_layers(s.model, [3, -1]):
            pass
    with skip_layers(s.model, []):
        assert torch.equal(_logits(s.model, s.inputs), _logits(s.model, s.inputs))


# ---------------------------------------------------------------- replace_layer_outputs


def test_replace_changes_only_what_flows_on(s):
    with capture_layer_io(s.model, layers=[2]) as plain:
        baseline = _logits(s.model, s.inputs)
    with replace_layer_outputs(s.model, {2: lambda x_in, x_out: x_out * 0.5}):
        with capture_layer_io(s.model, layers=[2, 3]) as patched:
            changed = _logits(s.model, s.inputs)
    assert not torch.equal(changed, baseline)
    # A capture entered inside sees the replaced output; the next layer receives it.
    assert torch.equal(patched.outputs[2][0], plain.outputs[2][0] * 0.5)
    assert torch.equal(patched.inputs[3][0], patched.outputs[2][0])


def test_replace_rejects_a_wrong_shape(s):
    with replace_layer_outputs(s.model, {1: lambda x_in, x_out: x_out[:, :-1]}):
        with pytest.raises(ValueError, match="replacement for layer 1 returned"):
            _logits(s.model, s.inputs)
    with pytest.raises(ValueError, match="duplicate layer index 3"):
        with replace_layer_outputs(s.model, {3: None, -1: None}):
            pass


def test_tuple_returning_layers_are_handled():
    """Older layers return ``(hidden, ...)``: hooks read element 0 and keep the rest."""
    s = _setup("tiny-llama")
    layer = s.parts.layers[1]
    calls = []
    handle = layer.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True
    )
    _logits(s.model, s.inputs)
    handle.remove()
    args, kwargs = calls[0]
    layer.forward = lambda *a, **k: (type(layer).forward(layer, *a, **k), "extra")
    try:
        with torch.no_grad():
            plain_hidden, extra = layer(*args, **kwargs)
            with capture_layer_io(s.model, layers=[1]) as record:
                with replace_layer_outputs(s.model, {1: lambda x_in, x_out: x_in}):
                    replaced = layer(*args, **kwargs)
    finally:
        del layer.forward
    assert extra == "extra" and replaced[1] == "extra" and torch.equal(replaced[0], args[0])
    # Hooks run in registration order: the capture entered first sees the layer's own output.
    assert torch.equal(record.outputs[1][0], plain_hidden)
    assert not torch.equal(plain_hidden, args[0])
    assert torch.equal(record.inputs[1][0], args[0])


# ---------------------------------------------------------------- keep_tokens_unchanged


def test_keep_with_all_false_mask_is_the_unpatched_model(s):
    mask = torch.zeros_like(s.mask)
    with keep_tokens_unchanged(s.model, [0, 2], mask):
        patched = _logits(s.model, s.inputs)
    assert torch.equal(patched, _logits(s.model, s.inputs))


@pytest.mark.parametrize("index", [0, 2])
def test_keep_with_all_true_mask_is_skipping(s, index):
    with keep_tokens_unchanged(s.model, [index], torch.ones_like(s.mask)):
        kept = _logits(s.model, s.inputs)
    with skip_layers(s.model, [index]):
        assert torch.equal(kept, _logits(s.model, s.inputs))


@pytest.mark.parametrize("index", [0, 1])
def test_keep_matches_a_manual_reference(s, index):
    """Layer i computed by hand on its captured input, then where(mask, x_in, x_out), then the
    remaining layers, gives the patched model's last hidden state."""
    calls = {}
    handles = [
        layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: calls.setdefault(i, (args, kwargs)), with_kwargs=True
        )
        for i, layer in enumerate(s.parts.layers)
    ]
    try:
        _logits(s.model, s.inputs, use_cache=False)  # a filled cache would be reused below
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        args, kwargs = calls[index]
        x_in = args[0]
        x_out = s.parts.layers[index](*args, **kwargs)
        hidden = torch.where(s.mask[..., None], x_in, x_out)
        for j in range(index + 1, s.parts.num_layers):
            args, kwargs = calls[j]
            hidden = s.parts.layers[j](hidden, *args[1:], **kwargs)

    with keep_tokens_unchanged(s.model, [index], s.mask):
        with capture_layer_io(s.model, layers=[-1]) as record:
            patched = _logits(s.model, s.inputs, use_cache=False)
    torch.testing.assert_close(record.outputs[3][0], hidden, rtol=0, atol=1e-6)
    assert not torch.equal(patched, _logits(s.model, s.inputs))


def test_keep_with_kv_cache_and_generate(s):
    """The mask covers the prompt; cached decode steps update new tokens normally."""
    _decode_matches_full_forward(s, lambda: keep_tokens_unchanged(s.model, [1, 2], s.mask))
    with keep_tokens_unchanged(s.model, [1, 2], s.mask):
        patched = _generate(s)
        assert torch.equal(patched, _generate(s, use_cache=False))


def test_keep_validates_the_mask(s):
    with pytest.raises(TypeError, match="bool tensor"):
        with keep_tokens_unchanged(s.model, [1], s.mask.long()):
            pass
    with pytest.raises(ValueError, match=r"shape \[batch, seq\]"):
        with keep_tokens_unchanged(s.model, [1], s.mask[0]):
            pass
    wider = torch.cat([s.mask, s.mask], dim=0)
    with keep_tokens_unchanged(s.model, [1], wider):
        with pytest.raises(ValueError, match="does not match the hidden states .* layer 1"):
            _logits(s.model, s.inputs)
    longer = torch.cat([s.mask, s.mask], dim=1)
    with keep_tokens_unchanged(s.model, [1], longer):
        with pytest.raises(ValueError, match="without a KV cache the input must cover the mask"):
            _logits(s.model, s.inputs, use_cache=False)
    with pytest.raises(IndexError, match="layer index 9 .*4 layers"):
        with keep_tokens_unchanged(s.model, [9], s.mask):
            pass


# ---------------------------------------------------------------- cleanup on every exit path

CONTEXTS = {
    "capture": lambda s: capture_layer_io(s.model, layers=[1, -1]),
    "capture_reduce": lambda s: capture_layer_io(s.model, reduce=lambda i, a, b: None),
    "skip": lambda s: skip_layers(s.model, [1, 2]),
    "replace": lambda s: replace_layer_outputs(s.model, {1: lambda x_in, x_out: x_in + x_out}),
    "keep": lambda s: keep_tokens_unchanged(s.model, [1, 3], s.mask),
}


class HookFailure(RuntimeError):
    pass


def _raise(*args):
    raise HookFailure("raised inside a hook")


RAISING_CONTEXTS = {  # the context's own hook (or callback) raises during the forward pass
    "capture_reduce": lambda s: capture_layer_io(s.model, reduce=_raise),
    "replace": lambda s: replace_layer_outputs(s.model, {1: _raise}),
    "keep": lambda s: keep_tokens_unchanged(s.model, [1], torch.cat([s.mask, s.mask])),
}


@pytest.fixture
def guarded(s):
    """``s`` with a user's hooks on layer 1; checks the model is exactly restored afterwards."""
    fired, fail = [], []

    def user_hook(module, args, output):
        fired.append("post")
        if fail:
            raise HookFailure("the user's hook raised")

    layer = s.parts.layers[1]
    handles = [
        layer.register_forward_hook(user_hook),
        layer.register_forward_pre_hook(lambda m, a, k: fired.append("pre"), with_kwargs=True),
    ]
    before = _hook_snapshot(s.model)
    state = {k: v.clone() for k, v in s.model.state_dict().items()}
    logits = _logits(s.model, s.inputs)
    fired.clear()
    s.fired, s.fail = fired, fail
    yield s

    assert _hook_snapshot(s.model) == before
    after = s.model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    fired.clear()
    fail.clear()
    assert torch.equal(_logits(s.model, s.inputs), logits)
    assert fired == ["pre", "post"]  # the user's hooks survived and still fire
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("context", CONTEXTS)
def test_cleanup_after_normal_exit(guarded, context):
    with CONTEXTS[context](guarded):
        _logits(guarded.model, guarded.inputs)
    assert guarded.fired == ["pre", "post"]


@pytest.mark.parametrize("context", CONTEXTS)
def test_cleanup_after_exception_in_the_with_block(guarded, context):
    with pytest.raises(HookFailure):
        with CONTEXTS[context](guarded):
            _logits(guarded.model, guarded.inputs)
            raise HookFailure("raised in the with-block")


@pytest.mark.parametrize("context", CONTEXTS)
def test_cleanup_after_exception_in_another_hook_during_forward(guarded, context):
    with pytest.raises(HookFailure, match="user's hook"):
        with CONTEXTS[context](guarded):
            guarded.fail.append(True)
            _logits(guarded.model, guarded.inputs)


@pytest.mark.parametrize("context", RAISING_CONTEXTS)
def test_cleanup_after_exception_in_its_own_hook(guarded, context):
    with pytest.raises((HookFailure, ValueError)):
        with RAISING_CONTEXTS[context](guarded):
            _logits(guarded.model, guarded.inputs)


@pytest.mark.parametrize("outer", CONTEXTS)
@pytest.mark.parametrize("inner", CONTEXTS)
def test_cleanup_after_nesting_on_the_same_layer(guarded, outer, inner):
    with CONTEXTS[outer](guarded):
        outer_only = _logits(guarded.model, guarded.inputs)
        with CONTEXTS[inner](guarded):
            _logits(guarded.model, guarded.inputs)
        assert torch.equal(_logits(guarded.model, guarded.inputs), outer_only)


def test_eval_mode_restores_each_module_flag_even_after_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Linear(2, 2))
    model.train()
    model[1].eval()  # a mixed state must come back exactly
    before = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(model):
            assert not any(m.training for m in model.modules())
            raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == before
