"""The FLOP formulas against the ShortV paper and against torch's FlopCounterMode on real forward
passes, with the token-skipping implementations of shortlab.shortv active."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from shortlab.arch import model_parts
from shortlab.flops import (
    DecoderShape, counted_layer_flops, dense_layer_flops, fastv_num_dropped, fastv_ratio_matching_flops, flops_ratio,
    frozen_layer_flops, prefill_flops,
)
from shortlab.models import load_model
from shortlab.shortv import fastv, freeze_visual_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

# LLaVA-1.5-7B's decoder (Llama-2-7B: multi-head attention, q_dim = kv_dim = h).
LLAVA_7B = DecoderShape(num_layers=32, hidden=4096, intermediate=11008, q_dim=4096, kv_dim=4096)


def test_multi_head_attention_gives_the_papers_formulas():
    h, m = LLAVA_7B.hidden, LLAVA_7B.intermediate
    for t, v in [(1, 0), (37, 576), (64, 576), (300, 0)]:
        n = t + v
        assert dense_layer_flops(LLAVA_7B, n) == 2 * n * (4 * h + 3 * m) * h + 4 * n**2 * h
        assert frozen_layer_flops(LLAVA_7B, t, v) == (
            2 * t * (4 * h + 3 * m) * h + 4 * v * h**2 + 4 * t * (t + v) * h
        )
    assert frozen_layer_flops(LLAVA_7B, 50, 0) == dense_layer_flops(LLAVA_7B, 50)


def test_the_published_llava_numbers():
    """ShortV's table for LLaVA-1.5-7B (576 visual tokens; a 64-token text prompt reproduces the
    vanilla 8.5 TFLOPs): ShortV N = 19 keeps 55 %, FastV K = 2, R = 50 % keeps 58 %."""
    t, v = 64, 576
    assert prefill_flops(LLAVA_7B, t, v) / 1e12 == pytest.approx(8.5, abs=0.05)
    assert flops_ratio(LLAVA_7B, t, v, frozen_layers=range(13, 32)) == pytest.approx(0.55, abs=0.01)
    assert flops_ratio(LLAVA_7B, t, v, fastv_k=2, fastv_ratio=0.5) == pytest.approx(0.58, abs=0.01)
    # Which layers are frozen barely matters without FastV; with it, frozen layers before k
    # freeze more visual tokens.
    assert flops_ratio(LLAVA_7B, t, v, range(19)) == flops_ratio(LLAVA_7B, t, v, range(13, 32))
    assert (flops_ratio(LLAVA_7B, t, v, range(19), 2, 0.5)
            < flops_ratio(LLAVA_7B, t, v, range(13, 32), 2, 0.5))


def test_grouped_query_attention_and_config_reading():
    model, _ = load_model("tiny-llama")
    shape = DecoderShape.from_config(model.config)
    assert shape == DecoderShape(num_layers=4, hidden=64, intermediate=128, q_dim=64, kv_dim=32)
    n = 10
    projections, mlp, attention = 2 * n * 64 * (2 * 64 + 2 * 32), 6 * n * 64 * 128, 4 * n * n * 64
    assert dense_layer_flops(model.config, n) == projections + mlp + attention
    llava, _ = load_model("tiny-llava")
    assert DecoderShape.from_config(llava.config) == shape  # the text config of a LLaVA


def test_prefill_totals_and_validation():
    s = LLAVA_7B
    assert prefill_flops(s, 10, 20) == 32 * dense_layer_flops(s, 30)
    frozen = prefill_flops(s, 10, 20, frozen_layers=[0, -1])
    assert frozen == 30 * dense_layer_flops(s, 30) + 2 * frozen_layer_flops(s, 10, 20)
    dropped = fastv_num_dropped(20, 0.3)
    assert dropped == 6 and fastv_num_dropped(5, 0.5) == 3 and fastv_num_dropped(7, 0.0) == 0
    both = prefill_flops(s, 10, 20, frozen_layers=[0, 5], fastv_k=3, fastv_ratio=0.3)
    assert both == (
        frozen_layer_flops(s, 10, 20) + 2 * dense_layer_flops(s, 30)
        + frozen_layer_flops(s, 10, 14) + 28 * dense_layer_flops(s, 24)
    )
    assert flops_ratio(s, 10, 20) == 1.0
    with pytest.raises(IndexError):
        prefill_flops(s, 10, 20, frozen_layers=[32])
    with pytest.raises(ValueError, match="k must be in 1..31"):
        prefill_flops(s, 10, 20, fastv_k=0, fastv_ratio=0.5)
    with pytest.raises(ValueError, match="needs fastv_k"):
        prefill_flops(s, 10, 20, fastv_ratio=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prefill_flops(s, 10, 20, fastv_k=1, fastv_ratio=-0.1)


def test_fastv_ratio_matching_shortv_flops_is_the_smallest_that_fits():
    t, v, k = 64, 576, 2
    shortv = prefill_flops(LLAVA_7B, t, v, frozen_layers=range(13, 32))
    ratio = fastv_ratio_matching_flops(LLAVA_7B, t, v, shortv, k)
    dropped = fastv_num_dropped(v, ratio)
    assert ratio == dropped / v
    assert prefill_flops(LLAVA_7B, t, v, fastv_k=k, fastv_ratio=ratio) <= shortv
    # one token fewer dropped no longer fits: the ratio is the smallest, within one token
    assert prefill_flops(LLAVA_7B, t, v, fastv_k=k, fastv_ratio=(dropped - 1) / v) > shortv
    assert flops_ratio(LLAVA_7B, t, v, fastv_k=k, fastv_ratio=ratio) == pytest.approx(
        flops_ratio(LLAVA_7B, t, v, frozen_layers=range(13, 32)), abs=1e-3)
    # the same token count as bisecting the ratio itself, as notebook 02 used to
    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        cost = prefill_flops(LLAVA_7B, t, v, fastv_k=k, fastv_ratio=middle)
        low, high = (middle, high) if cost > shortv else (low, middle)
    assert fastv_num_dropped(v, high) == dropped


def test_fastv_matched_ratio_falls_as_the_budget_grows():
    t, v, k = 10, 20, 1
    dense = prefill_flops(LLAVA_7B, t, v)
    floor = prefill_flops(LLAVA_7B, t, v, fastv_k=k, fastv_ratio=1.0)
    budgets = [floor + (dense - floor) * j / 10 for j in range(11)]
    ratios = [fastv_ratio_matching_flops(LLAVA_7B, t, v, budget, k) for budget in budgets]
    assert ratios == sorted(ratios, reverse=True) and len(set(ratios)) > 5
    assert ratios[0] == 1.0 and ratios[-1] == 0.0
    assert fastv_ratio_matching_flops(LLAVA_7B, t, v, 2 * dense, k) == 0.0


def test_fastv_matched_ratio_errors():
    t, v = 10, 20
    floor = prefill_flops(LLAVA_7B, t, v, fastv_k=3, fastv_ratio=1.0)
    with pytest.raises(ValueError, match="no FastV ratio after layer 3 reaches"):
        fastv_ratio_matching_flops(LLAVA_7B, t, v, floor - 1, 3)
    with pytest.raises(ValueError, match="n_visual = 0"):
        fastv_ratio_matching_flops(LLAVA_7B, t, 0, floor, 3)
    with pytest.raises(ValueError, match="k must be in 1..31"):
        fastv_ratio_matching_flops(LLAVA_7B, t, v, floor, 32)


# ---------------------------------------------------------------- against FlopCounterMode


def _layer_flops(model, ids) -> dict[int, int]:
    """FLOPs counted per decoder layer in one forward of the stack (no LM head), by layer index;
    eager attention's two matmuls count every query row against every key column, masked or not:
    the full n × n the formulas count."""
    with torch.no_grad():
        return counted_layer_flops(model, lambda: model_parts(model).decoder(input_ids=ids, use_cache=False))


def test_counting_restores_the_attention_implementation_and_reads_llava_layers():
    model, _ = load_model("tiny-llava")
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    implementation = model.config._attn_implementation
    counted = counted_layer_flops(model, lambda: model(input_ids=ids))
    assert model.config._attn_implementation == implementation == "sdpa"
    assert counted == {i: dense_layer_flops(model.config, 12) for i in range(4)}
    with pytest.raises(RuntimeError, match="boom"):
        counted_layer_flops(model, lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert model.config._attn_implementation == implementation


def test_counted_flops_of_tiny_llama_dense_frozen_and_fastv():
    model, _ = load_model("tiny-llama")
    config = model.config
    t, v = 9, 15
    ids = torch.randint(0, 1000, (1, t + v), generator=torch.Generator().manual_seed(0))
    visual = torch.zeros_like(ids, dtype=torch.bool)
    visual[0, 3 : 3 + v] = True
    n, q_dim = t + v, 64

    dense = _layer_flops(model, ids)
    assert dense == {i: dense_layer_flops(config, n) for i in range(4)}

    frozen_layers = [1, 2]
    with freeze_visual_tokens(model, frozen_layers, visual):
        frozen = _layer_flops(model, ids)
    assert frozen == {i: frozen_layer_flops(config, t, v) if i in frozen_layers
                      else dense_layer_flops(config, n) for i in range(4)}
    assert sum(frozen.values()) == prefill_flops(config, t, v, frozen_layers)

    k, ratio = 2, 0.4
    kept = n - fastv_num_dropped(v, ratio)
    # FastV's scoring in layer k - 1: one extra query projection and one row of QK^T.
    scoring = 2 * config.hidden_size * q_dim + 2 * n * q_dim
    with fastv(model, k, ratio, visual):
        pruned = _layer_flops(model, ids)
    assert pruned == {0: dense_layer_flops(config, n), 1: dense_layer_flops(config, n) + scoring,
                      2: dense_layer_flops(config, kept), 3: dense_layer_flops(config, kept)}
    predicted = prefill_flops(config, t, v, fastv_k=k, fastv_ratio=ratio)
    assert sum(pruned.values()) == predicted + scoring

    with freeze_visual_tokens(model, [1, 3], visual), fastv(model, k, ratio, visual):
        both = _layer_flops(model, ids)
    assert sum(both.values()) == prefill_flops(config, t, v, [1, 3], k, ratio) + scoring
    assert both[3] == frozen_layer_flops(config, t, kept - t)


def test_counted_flops_of_the_llava_mini_decoder(smollm2):
    """llava-mini's language model is SmolLM2-135M (30 layers, 9 query / 3 key-value heads);
    256 visual tokens as at 224 px, the deepest 18 layers frozen."""
    model = smollm2[0]
    config = model.config
    t, v = 20, 256
    ids = torch.randint(0, 1000, (1, t + v), generator=torch.Generator().manual_seed(0))
    visual = torch.zeros_like(ids, dtype=torch.bool)
    visual[0, 4 : 4 + v] = True
    frozen_layers = list(range(12, 30))
    dense = _layer_flops(model, ids)
    with freeze_visual_tokens(model, frozen_layers, visual):
        frozen = _layer_flops(model, ids)
    assert sum(dense.values()) == prefill_flops(config, t, v)
    assert sum(frozen.values()) == prefill_flops(config, t, v, frozen_layers)
    assert sum(frozen.values()) / sum(dense.values()) == pytest.approx(
        flops_ratio(config, t, v, frozen_layers)
    )
