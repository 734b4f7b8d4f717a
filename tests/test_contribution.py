"""ShortV's Layer Contribution: the fast rerun method against the literal definition, semantics
(no-op interventions give zero, an all-True mask is skipping the layer), token groups, errors."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DynamicCache

from shortlab.contribution import layer_contribution, reading_positions, token_groups
from shortlab.hooks import replace_layer_outputs, skip_layers
from shortlab.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
    "_backward_hooks", "_backward_pre_hooks",
)


def _text_batch(tokenizer):
    # Right padding on the shorter row: the default reading position must skip it.
    return dict(tokenizer(["The quick brown fox jumps over the", "A lazy dog"],
                          return_tensors="pt", padding=True))


def _random_mask(shape, seed=0):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    mask[:, 0] = True
    return mask


def _warmed(model, batch):
    """transformers installs its output-capturing hooks lazily on a first forward (LLaVA's vision
    tower asks for hidden states); run one so that later hook counts only see our changes."""
    with torch.no_grad():
        model(**batch, use_cache=False)
    return model


@pytest.fixture(scope="module")
def llama():
    model, tokenizer = load_model("tiny-llama")
    batch = _text_batch(tokenizer)
    return _warmed(model, batch), batch


@pytest.fixture(scope="module")
def llava():
    model, processor = load_model("tiny-llava")
    images = [Image.fromarray(np.random.RandomState(seed).randint(0, 256, (40, 60, 3), np.uint8))
              for seed in range(2)]
    batch = dict(processor(
        text=["<image>\nDescribe it.", "<image>\nWhat colour is the thing in this picture?"],
        images=images, return_tensors="pt", padding=True,
    ))
    return _warmed(model, batch), batch


def _assert_methods_agree(model, batch, mask, **kwargs):
    fast = layer_contribution(model, batch, mask, **kwargs)
    reference = layer_contribution(model, batch, mask, method="full_forward", **kwargs)
    assert list(fast) == list(reference)
    for layer, value in fast.items():
        assert value == pytest.approx(reference[layer], rel=0, abs=1e-5)
    return fast


# ---------------------------------------------------------------- rerun == full forward


def test_rerun_matches_full_forward_with_padding(llama):
    model, batch = llama
    assert not batch["attention_mask"].all()
    values = _assert_methods_agree(model, batch, _random_mask(batch["input_ids"].shape))
    assert list(values) == [0, 1, 2, 3]
    assert all(value > 1e-5 for value in values.values())  # not vacuous


def test_rerun_matches_full_forward_on_chosen_layers_and_positions(llama):
    model, batch = llama
    positions = batch["attention_mask"].bool().clone()  # every real token
    positions[:, 0] = False
    values = _assert_methods_agree(
        model, batch, _random_mask(batch["input_ids"].shape, seed=1), layers=[-1, 1],
        positions=positions,
    )
    assert list(values) == [1, 3]


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gpt2"])
def test_rerun_matches_full_forward_on_other_stacks(name):
    # Gemma 2 caps its logits after the head; GPT-2 blocks take their arguments positionally.
    model, tokenizer = load_model(name)
    if name == "tiny-gemma2":
        assert model.config.final_logit_softcapping is not None
    batch = _text_batch(tokenizer)
    _assert_methods_agree(model, batch, _random_mask(batch["input_ids"].shape))


@pytest.mark.parametrize("group", ["visual", "text"])
def test_rerun_matches_full_forward_on_llava(llava, group):
    model, batch = llava
    mask = token_groups(model, batch["input_ids"], batch["attention_mask"])[group]
    values = _assert_methods_agree(model, batch, mask)
    assert values[0] > 1e-5


# ---------------------------------------------------------------- semantics


def test_an_empty_group_changes_nothing(llama):
    model, batch = llama
    nothing = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for method in ("rerun", "full_forward"):
        values = layer_contribution(model, batch, nothing, method=method)
        assert all(abs(value) < 1e-12 for value in values.values())


def test_a_layer_that_changes_nothing_contributes_nothing(llama):
    model, batch = llama
    mask = _random_mask(batch["input_ids"].shape)
    with replace_layer_outputs(model, {2: lambda hidden_in, hidden_out: hidden_in}):
        values = layer_contribution(model, batch, mask)
    assert abs(values[2]) < 1e-12
    assert min(values[0], values[1], values[3]) > 1e-5


def test_keeping_every_token_is_skipping_the_layer(llama):
    model, batch = llama
    everything = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    values = layer_contribution(model, batch, everything)
    read = reading_positions(batch)
    with torch.no_grad():
        original = model(**batch).logits[read].double().log_softmax(-1)
        for layer in range(4):
            with skip_layers(model, [layer]):
                skipped = model(**batch).logits[read].double().log_softmax(-1)
            kl = (skipped.exp() * (skipped - original)).sum(-1).mean().item()
            assert values[layer] == pytest.approx(kl, rel=1e-5, abs=1e-9)


def test_last_layer_visual_contribution_is_zero(llava):
    # In the last layer other tokens only matter through their keys and values, which come from
    # the layer's input either way; so a group without the reading position contributes nothing.
    model, batch = llava
    groups = token_groups(model, batch["input_ids"], batch["attention_mask"])
    values = layer_contribution(model, batch, groups["visual"])
    assert values[3] == 0.0
    assert layer_contribution(model, batch, groups["text"], layers=[-1])[3] > 1e-5


# ---------------------------------------------------------------- the model is left alone


def _hook_snapshot(model):
    return {name: ({attr: tuple(getattr(module, attr)) for attr in HOOK_DICTS},
                   module.__dict__.get("forward"))
            for name, module in model.named_modules()}


def test_model_left_untouched(llava):
    model, batch = llava
    model = copy.deepcopy(model)
    model.train()
    model.model.vision_tower.eval()  # a mixed state must come back as it was
    flags = {name: module.training for name, module in model.named_modules()}
    hooks = _hook_snapshot(model)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    mask = token_groups(model, batch["input_ids"], batch["attention_mask"])["visual"]
    for method in ("rerun", "full_forward"):
        layer_contribution(model, batch, mask, method=method)
    assert _hook_snapshot(model) == hooks
    assert {name: module.training for name, module in model.named_modules()} == flags
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name


@pytest.mark.parametrize("failing_call", [1, 2], ids=["in_the_clean_run", "in_a_rerun"])
def test_hooks_removed_after_an_error(llama, failing_call):
    model, batch = llama
    calls = []

    def fail_on_call(hidden_in, hidden_out):
        calls.append(None)
        if len(calls) == failing_call:
            raise RuntimeError("boom")
        return hidden_out

    with replace_layer_outputs(model, {3: fail_on_call}):
        hooks = _hook_snapshot(model)
        with pytest.raises(RuntimeError, match="boom"):
            layer_contribution(model, batch, _random_mask(batch["input_ids"].shape))
        assert _hook_snapshot(model) == hooks


# ---------------------------------------------------------------- inputs and errors


def test_layer_and_mask_validation(llama):
    model, batch = llama
    mask = _random_mask(batch["input_ids"].shape)
    with pytest.raises(IndexError, match="out of range for a model with 4 layers"):
        layer_contribution(model, batch, mask, layers=[4])
    with pytest.raises(ValueError, match="duplicate layer index 3"):
        layer_contribution(model, batch, mask, layers=[3, -1])
    with pytest.raises(TypeError, match="is a bool"):
        layer_contribution(model, batch, mask, layers=[True])
    with pytest.raises(ValueError, match="unknown method"):
        layer_contribution(model, batch, mask, method="fast")
    with pytest.raises(TypeError, match="token_mask must be a bool tensor"):
        layer_contribution(model, batch, mask.long())
    with pytest.raises(ValueError, match="token_mask has shape"):
        layer_contribution(model, batch, mask[:, :-1])
    with pytest.raises(ValueError, match="without a KV cache"):
        layer_contribution(model, {**batch, "past_key_values": DynamicCache()}, mask)


def test_reading_positions():
    right = {"input_ids": torch.zeros(2, 4, dtype=torch.long),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}
    left = {**right, "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])}
    no_mask = {"input_ids": right["input_ids"]}
    assert reading_positions(right).nonzero().tolist() == [[0, 3], [1, 1]]
    assert reading_positions(left).nonzero().tolist() == [[0, 3], [1, 3]]
    assert reading_positions(no_mask).nonzero().tolist() == [[0, 3], [1, 3]]
    several = right["attention_mask"].bool()
    assert torch.equal(reading_positions(right, several), several)
    with pytest.raises(ValueError, match="include padding"):
        reading_positions(right, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="selects no token"):
        reading_positions(right, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="positions has shape"):
        reading_positions(right, several[:1])
    with pytest.raises(ValueError, match="has no real token"):
        reading_positions({**right, "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])})


def test_token_groups(llava):
    model, batch = llava
    groups = token_groups(model, batch["input_ids"], batch["attention_mask"])
    real = batch["attention_mask"].bool()
    assert not real.all()  # the batch is padded
    assert groups["visual"].sum(dim=1).tolist() == [16, 16]  # (56 px / 14)² per image
    assert torch.equal(groups["visual"], batch["input_ids"] == model.config.image_token_id)
    assert torch.equal(groups["text"], real & ~groups["visual"])
    without_mask = token_groups(model, batch["input_ids"])
    assert torch.equal(without_mask["text"], ~groups["visual"])


def test_token_groups_errors(llava, llama):
    with pytest.raises(ValueError, match="has no image token"):
        token_groups(llama[0], llama[1]["input_ids"])
    text_only = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="hold no image token"):
        token_groups(llava[0], text_only)
