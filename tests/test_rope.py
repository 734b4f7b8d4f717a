import math
import types

import numpy as np
import pytest
import torch
from transformers import AutoConfig, Gemma3TextConfig, LlamaConfig, PhiConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from shortlab.references import paper_numbers
from shortlab.rope import (
    _DIRECT_M, _FIRST_CHUNK, _HALF_WIDTH, PAPER_BOUNDS_D128, PAPER_CONTEXTS, SUPPORTED_ROPE_TYPES, _has_negative,
    _top_down_blocks, bias_from_frequencies, bound_table, check_base, context_length,
    dynamic_ntk_base, max_context, max_context_from_frequencies, min_base, naive_min_base,
    pair_variances_from_vectors, pair_weights, rope_bias, rope_frequencies, rope_report,
    rope_setup, scaled_frequencies, shipped_configs, weighted_rope_bias,
)


def python_bias(m, thetas):
    """B(m) by the definition, one math.cos at a time."""
    return sum(math.cos(m * theta) for theta in thetas)


def first_negative_by_definition(base, head_dim, stop):
    """First m < stop with B(m) < 0 (or None) from one direct evaluation of every m."""
    negative = np.flatnonzero(rope_bias(np.arange(stop), base, head_dim) < 0)
    return int(negative[0]) if negative.size else None


# ----------------------------------------------------------------------------- the bias B(m)

def test_rope_frequencies_are_the_papers_thetas():
    thetas = rope_frequencies(10_000.0, 8)
    assert thetas.dtype == np.float64 and thetas.shape == (4,)
    np.testing.assert_allclose(thetas, [1.0, 10_000 ** -0.25, 10_000 ** -0.5, 10_000 ** -0.75],
                               rtol=1e-15)


def test_rope_bias_matches_a_python_double_loop_at_long_distances():
    positions = np.array([0, 1, 7, 1000, 12_345, 1_000_003, 2**24 + 1])
    for base, head_dim in ((10.0, 8), (10_000.0, 64), (5e8, 128)):
        thetas = rope_frequencies(base, head_dim)
        expected = np.array([python_bias(float(m), thetas) for m in positions])
        np.testing.assert_allclose(rope_bias(positions, base, head_dim), expected, rtol=0,
                                   atol=1e-11)
        # θ from Python's own pow differs by an ulp, which m·θ magnifies: phase error ≤ m·ulp
        own_thetas = [base ** (-2 * i / head_dim) for i in range(head_dim // 2)]
        independent = np.array([python_bias(float(m), own_thetas) for m in positions])
        tolerance = 1e-12 + head_dim / 2 * positions * 2.3e-16
        assert np.all(np.abs(rope_bias(positions, base, head_dim) - independent) <= tolerance)
    assert rope_bias(0, 1e4, 128) == 64.0
    assert rope_bias(np.zeros((2, 3)), 1e4, 16).shape == (2, 3)
    # chunking must not change anything
    positions = np.arange(0, 50_000, 7)
    np.testing.assert_array_equal(rope_bias(positions, 3e5, 128, chunk=100),
                                  rope_bias(positions, 3e5, 128))


def test_head_dim_two_is_cos_m_for_every_base():
    positions = np.arange(200)
    for base in (1.5, 1e4, 1e9):
        np.testing.assert_allclose(rope_bias(positions, base, 2), np.cos(positions), atol=1e-15)
        assert max_context(base, 2) == 1  # cos(1) > 0 > cos(2)
        assert max_context(base, 2, m_range="half_open") == 2
    with pytest.raises(ValueError, match="head_dim 2"):
        min_base(2, 2)
    every_base = min_base(1, 2, base_min=3.0)  # m in {0, 1}: any base works, nothing below searched
    assert every_base.smallest == 3.0 and every_base.smallest_bracket == (None, 3.0)


def test_fast_scan_finds_the_same_first_negative_as_direct_evaluation():
    rng = np.random.default_rng(0)
    stop = 40_000  # spans the direct prefix and several matrix-product blocks
    for head_dim in (16, 64, 128):
        for base in 10 ** rng.uniform(2, 7, size=8):
            first = first_negative_by_definition(base, head_dim, stop + 1)
            expected = stop if first is None else first - 1
            assert max_context(base, head_dim, limit=stop) == expected, (base, head_dim)
            assert max_context(base, head_dim, limit=stop, m_range="half_open") == (
                stop if first is None or first >= stop else first)


def test_max_context_at_block_boundaries_and_limit():
    base, head_dim = 1e6, 128
    first = first_negative_by_definition(base, head_dim, 100_000)
    assert first is not None and first > 20_000
    # where the fast scan switches from direct chunks to matrix-product blocks of growing size
    edges = [_DIRECT_M, _DIRECT_M + 8 * _HALF_WIDTH, _DIRECT_M + 24 * _HALF_WIDTH]
    for limit in [edge + offset for edge in edges for offset in (-1, 0, 1)] + [first - 1, first]:
        assert max_context(base, head_dim, limit=limit) == min(limit, first - 1), limit
        assert max_context(base, head_dim, limit=limit, m_range="half_open") == min(limit, first)


def test_top_down_validity_scan_sees_every_position():
    rng = np.random.default_rng(2)
    checked = 0
    for head_dim in (16, 128):
        for base in 10 ** rng.uniform(2, 6.5, size=8):
            negative = np.flatnonzero(rope_bias(np.arange(60_000), base, head_dim) < 0)
            if negative.size == 0:
                continue
            thetas = rope_frequencies(base, head_dim)
            first = int(negative[0])
            # [0, first) has no negative; [0, first + 1) has one, at its very top
            assert not _has_negative(thetas, first) and _has_negative(thetas, first + 1), base
            # stopping where a later run of negatives starts leaves negatives only below the top
            gaps = np.flatnonzero(np.diff(negative) > _FIRST_CHUNK)
            if gaps.size:
                assert _has_negative(thetas, int(negative[gaps[0] + 1])), base
                checked += 1
    assert checked >= 3


def test_top_down_blocks_tile_the_range_without_gaps():
    for stop in (_DIRECT_M + 1, _DIRECT_M + 2 * _HALF_WIDTH, _DIRECT_M + 2 * _HALF_WIDTH + 1,
                 50_000, 1_048_577, 3_000_001):
        blocks = _top_down_blocks(stop)
        tops = [low + 2 * _HALF_WIDTH * centres for low, centres in blocks]
        assert tops[0] == stop
        assert all(top == low for top, (low, _) in zip(tops[1:], blocks))  # contiguous
        assert 0 <= blocks[-1][0] <= _DIRECT_M
    assert _top_down_blocks(_DIRECT_M) == []


def test_weighted_scan_and_bias_follow_the_weights():
    thetas = rope_frequencies(2e4, 32)
    weights = np.linspace(0.2, 3.0, 16)
    positions = np.arange(30_000)
    values = bias_from_frequencies(positions, thetas, weights)
    expected = [sum(w * math.cos(m * t) for w, t in zip(weights, thetas)) for m in (0, 5, 29_999)]
    np.testing.assert_allclose(values[[0, 5, 29_999]], expected, atol=1e-11)
    first = int(np.flatnonzero(values < 0)[0])
    assert max_context_from_frequencies(thetas, weights=weights, limit=29_999) == first - 1
    assert max_context_from_frequencies(thetas, weights=weights, limit=29_999) != max_context(
        2e4, 32, limit=29_999)


# ----------------------------------------------------------------------------- the weighted form

def test_weighted_rope_bias_with_equal_variances_is_two_sigma_squared_b():
    positions = np.arange(0, 5000, 37)
    variances = np.full(64, 0.7)
    for layout in ("interleaved", "half"):
        np.testing.assert_allclose(weighted_rope_bias(positions, 1e4, variances, layout=layout),
                                   2 * 0.7 * rope_bias(positions, 1e4, 64), rtol=1e-13)


def test_pair_layouts_pick_different_dimensions():
    variances = np.zeros(8)
    variances[4] = 1.0  # dimension d/2
    # rotate_half pairs (i, i + d/2): dimension 4 belongs to pair 0; interleaved (2i, 2i+1): pair 2
    np.testing.assert_array_equal(pair_weights(variances, layout="half"), [1, 0, 0, 0])
    np.testing.assert_array_equal(pair_weights(variances, layout="interleaved"), [0, 0, 1, 0])


def test_pair_variances_from_vectors():
    generator = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 2.0, 3.0, 4.0])
    vectors = torch.randn(4, 50_000, 4, generator=generator) * scale + 5.0  # mean is removed
    np.testing.assert_allclose(pair_variances_from_vectors(vectors, layout="interleaved"),
                               [1 + 4, 9 + 16], rtol=0.03)
    np.testing.assert_allclose(pair_variances_from_vectors(vectors, layout="half"),
                               [1 + 9, 4 + 16], rtol=0.03)
    with pytest.raises(ValueError, match="at least 2"):
        pair_variances_from_vectors(torch.ones(1, 4), layout="half")


def test_half_layout_is_how_transformers_rotates():
    # ⟨R_m q, R_0 q⟩ = Σ_i (q_a(i)² + q_b(i)²) cos(m θ_i) exactly, for the pairs RoPE rotates.
    head_dim, base = 16, 500.0
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 1, head_dim, dtype=torch.float64, generator=generator)
    thetas = rope_frequencies(base, head_dim)
    positions = np.array([0, 3, 50, 777])
    angles = torch.from_numpy(np.outer(positions, np.concatenate((thetas, thetas))))[None]
    rotated, _ = apply_rotary_pos_emb(q.expand(1, 1, len(positions), head_dim), q,
                                      angles.cos(), angles.sin())
    dots = (rotated[0, 0] * rotated[0, 0, 0]).sum(-1).numpy()
    squares = (q[0, 0, 0] ** 2).numpy()
    np.testing.assert_allclose(
        bias_from_frequencies(positions, thetas, pair_weights(squares, layout="half")), dots,
        rtol=1e-12)
    assert not np.allclose(
        bias_from_frequencies(positions, thetas, pair_weights(squares, layout="interleaved")),
        dots, rtol=1e-3)


# ----------------------------------------------------------------------------- bounds on the base

@pytest.fixture(scope="module")
def bound_1k():
    return min_base(1024, 128, base_min=1000.0)


def test_min_base_is_valid_and_a_base_just_below_fails(bound_1k):
    assert max_context(bound_1k.smallest, 128) >= 1024
    assert check_base(bound_1k.smallest, 1024, 128) == (True, None)
    below, smallest = bound_1k.smallest_bracket
    assert smallest == bound_1k.smallest and smallest / below - 1 <= bound_1k.refine_rtol
    ok, first = check_base(below, 1024, 128)
    assert not ok and first <= 1024
    assert bound_1k.smallest <= bound_1k.grid_smallest < bound_1k.smallest * (1 + 1e-3)
    assert f"{bound_1k.smallest:.2g}" == "4.3e+03"  # the paper's 1K value, to its precision
    assert check_base(bound_1k.stable, 1024, 128)[0]


def test_valid_bases_form_islands_that_bisection_gets_wrong(bound_1k):
    # A base above the smallest valid one that fails: validity is not monotone in the base.
    invalid_above = bound_1k.stable_bracket[0]
    assert invalid_above > 1.3 * bound_1k.smallest
    assert check_base(invalid_above, 1024, 128)[0] is False
    # Plain bisection between an invalid and a valid base lands on some island edge instead.
    lower, upper = 1000.0, 1e6
    while upper / lower - 1 > 1e-6:
        middle = math.sqrt(lower * upper)
        lower, upper = (lower, middle) if check_base(middle, 1024, 128)[0] else (middle, upper)
    assert check_base(upper, 1024, 128)[0]
    assert upper > 1.3 * bound_1k.smallest


@pytest.mark.parametrize("context, head_dim, base_min, base_max, m_range", [
    (600, 16, 1e4, 1e7, "closed"),
    (5000, 16, 1e6, 1e9, "closed"),
    (5000, 32, 1e5, 1e8, "half_open"),
    (2048, 64, 1e3, 1e6, "closed"),
])
def test_naive_and_fast_agree(context, head_dim, base_min, base_max, m_range):
    grids = dict(grid_rtol=0.02, stable_grid_rtol=0.05)
    fast = min_base(context, head_dim, base_min=base_min, base_max=base_max, m_range=m_range,
                    **grids)
    naive = naive_min_base(context, head_dim, base_min=base_min, base_max=base_max,
                           m_range=m_range, **grids)
    assert (fast.grid_smallest, fast.grid_stable) == naive
    assert fast.smallest <= fast.grid_smallest and fast.search_max == base_max


def test_min_base_reports_an_empty_range():
    with pytest.raises(ValueError, match="no base in"):
        min_base(4096, 128, base_min=100.0, base_max=1000.0)
    with pytest.raises(ValueError, match="no base in"):
        naive_min_base(4096, 128, base_min=100.0, base_max=1000.0, grid_rtol=0.05)


def test_published_bounds_come_from_the_references_file():
    # one table, kept with its source in shortlab/references: contexts 1K … 1M in order, bases rising
    published = paper_numbers("rope_base")["published_lower_bounds"]
    assert PAPER_BOUNDS_D128 == published["bounds"] and published["head_dim"] == 128
    assert PAPER_CONTEXTS == ("1K", "2K", "4K", "8K", "16K", "32K", "64K", "128K", "256K", "512K", "1M")
    assert all(low < high for low, high in zip(PAPER_BOUNDS_D128.values(), list(PAPER_BOUNDS_D128.values())[1:]))
    assert PAPER_BOUNDS_D128["4K"] == 2.7e4


def test_published_values_depend_on_what_1k_means():
    # The paper's 4K bound 2.7e4 first fails at m = 4079: inside 4096, beyond 4000.
    assert check_base(PAPER_BOUNDS_D128["4K"], "4K", 128, k=1024) == (False, 4079)
    assert check_base(PAPER_BOUNDS_D128["4K"], "4K", 128, k=1000) == (True, None)
    assert check_base(PAPER_BOUNDS_D128["4K"], 4078, 128) == (True, None)
    # half-open [0, L − 1]: L = 4079 no longer reaches the failing distance, 4080 does
    assert check_base(PAPER_BOUNDS_D128["4K"], 4079, 128, m_range="half_open") == (True, None)
    assert check_base(PAPER_BOUNDS_D128["4K"], 4080, 128, m_range="half_open") == (False, 4079)


def test_bound_table_rows():
    rows = bound_table(["1K", "2K", 3000], k=1024, base_min=1000.0)
    assert [row["L"] for row in rows] == [1024, 2048, 3000]
    one_k, two_k, plain = rows
    assert one_k["published"] == 4.3e3 and one_k["published_ok"] and one_k["matches_published"]
    assert two_k["published_ok"] and two_k["smallest"] < two_k["published"]  # an island below
    assert plain["published"] is None and plain["matches_published"] is None
    # nested validity: a longer context never needs a smaller base
    assert one_k["smallest"] <= two_k["smallest"] <= plain["smallest"]
    for row in rows:
        assert check_base(row["smallest"], row["L"], 128)[0]
        assert not check_base(row["smallest_fails_at"], row["L"], 128)[0]


def test_context_length():
    assert context_length("32K") == 32_768 and context_length("32k", k=1000) == 32_000
    assert context_length("1M") == 1_048_576 and context_length("1M", k=1000) == 1_000_000
    assert context_length(4096) == 4096 and context_length("4096") == 4096
    for bad, match in (("32X", "cannot read"), ("K", "cannot read"), (0, ">= 1"), ("0K", ">= 1"),
                       (True, "int or a label"), (2.5, "int or a label")):
        with pytest.raises(ValueError, match=match):
            context_length(bad)
    with pytest.raises(ValueError, match="k must be one of"):
        context_length("1K", k=512)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="even and >= 2"):
        rope_frequencies(1e4, 7)
    with pytest.raises(ValueError, match="even and >= 2"):
        rope_bias(1, 1e4, 0)
    for base in (1.0, 0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="base must be a finite number > 1"):
            max_context(base, 64)
    with pytest.raises(ValueError, match=">= 1"):
        check_base(1e4, 0, 64)
    with pytest.raises(ValueError, match="unknown m_range 'open'"):
        max_context(1e4, 64, m_range="open")
    with pytest.raises(ValueError, match="unknown pair layout 'adjacent'"):
        weighted_rope_bias(1, 1e4, np.ones(8), layout="adjacent")
    with pytest.raises(ValueError, match="non-negative"):
        max_context_from_frequencies([1.0, 0.1], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="one weight per frequency"):
        bias_from_frequencies(1, [1.0, 0.1], [1.0])
    with pytest.raises(ValueError, match="refine_rtol"):
        min_base(1024, 128, refine_rtol=0.5)
    with pytest.raises(ValueError, match="base_max"):
        min_base(1024, 128, base_min=1e4, base_max=1e3)


# ----------------------------------------------------------------------------- model configs

class _Float64Torch:
    """``torch`` as transformers' RoPE functions see it, with float32 meaning float64: they
    compute inv_freq in float32, and an oracle at 1e-12 needs their formulas in float64."""

    float = torch.float64
    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


def float64_version(function):
    return types.FunctionType(function.__code__, dict(function.__globals__, torch=_Float64Torch()),
                              function.__name__, function.__defaults__, function.__closure__)


def assert_matches_transformers(ours, init_function, config, **kwargs):
    exact, _ = float64_version(init_function)(config, **kwargs)
    assert exact.dtype == torch.float64
    np.testing.assert_allclose(ours, exact.numpy(), rtol=1e-12, atol=0)
    as_shipped, _ = init_function(config, **kwargs)  # the real float32 code, unpatched
    np.testing.assert_allclose(ours, as_shipped.double().numpy(), rtol=2e-6, atol=0)


SCALINGS = [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 1024,
     "beta_fast": 16, "beta_slow": 2, "truncate": False},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s["rope_type"])
def test_scaled_frequencies_match_transformers(scaling):
    config = LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=16_384,
                         rope_parameters={"rope_theta": 5e5, **scaling})
    variant = rope_setup(config).variants["full_attention"]
    assert variant.rope_type == scaling["rope_type"] and variant.rotary_dim == 128
    function = ROPE_INIT_FUNCTIONS[scaling["rope_type"]]
    for seq_len in ((None, 8192, 50_000) if scaling["rope_type"] == "dynamic" else (None,)):
        assert_matches_transformers(variant.frequencies(seq_len), function, config, seq_len=seq_len)
    # the same model described as a legacy config.json gives the same frequencies
    legacy = {"hidden_size": 256, "num_attention_heads": 2, "num_hidden_layers": 2,
              "max_position_embeddings": 16_384, "rope_theta": 5e5,
              "rope_scaling": {("type" if key == "rope_type" else key): value
                               for key, value in scaling.items()}}
    np.testing.assert_array_equal(rope_setup(legacy).variants["full_attention"].frequencies(),
                                  variant.frequencies())


def test_default_and_partial_rotary_match_transformers():
    config = LlamaConfig(hidden_size=256, num_attention_heads=4,
                         rope_parameters={"rope_theta": 1e4})
    ours = rope_setup(config).variants["full_attention"].frequencies()
    assert_matches_transformers(ours, LlamaRotaryEmbedding.compute_default_rope_parameters, config)
    phi = PhiConfig(hidden_size=320, num_attention_heads=4, partial_rotary_factor=0.4,
                    rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    variant = rope_setup(phi).variants["full_attention"]
    assert variant.rotary_dim == 32  # int(80 × 0.4)
    assert_matches_transformers(variant.frequencies(), ROPE_INIT_FUNCTIONS["linear"], phi)


def test_gemma3_local_and_global_bases_match_transformers():
    config = Gemma3TextConfig(hidden_size=512, num_attention_heads=2, head_dim=256,
                              num_hidden_layers=12, sliding_window=1024,
                              max_position_embeddings=131_072,
                              rope_theta=1e6, rope_local_base_freq=1e4,
                              rope_scaling={"rope_type": "linear", "factor": 8.0})
    setup = rope_setup(config)
    full, local = setup.variants["full_attention"], setup.variants["sliding_attention"]
    assert (full.num_layers, local.num_layers) == (2, 10)
    assert (full.base, full.rope_type) == (1e6, "linear")
    assert (local.base, local.rope_type) == (1e4, "default")
    assert (full.attention_span, local.attention_span) == (131_072, 1024)
    assert_matches_transformers(full.frequencies(), ROPE_INIT_FUNCTIONS["linear"], config,
                                layer_type="full_attention")
    np.testing.assert_allclose(local.frequencies(), rope_frequencies(1e4, 256), rtol=1e-15)


def test_dynamic_ntk_grows_the_base_only_beyond_max_positions():
    assert dynamic_ntk_base(1e4, 128, 2.0, 1000, 4096) == 1e4
    longer = dynamic_ntk_base(1e4, 128, 2.0, 3 * 4096, 4096)
    assert longer == pytest.approx(1e4 * 5 ** (128 / 126))
    variant = rope_setup({"hidden_size": 512, "num_attention_heads": 4, "num_hidden_layers": 1,
                          "max_position_embeddings": 4096, "rope_theta": 1e4,
                          "rope_scaling": {"type": "dynamic", "factor": 2.0}}
                         ).variants["full_attention"]
    assert variant.bound_context(3 * 4096) == max_context(longer, 128)
    assert variant.bound_context(3 * 4096) > variant.bound_context()


def test_config_errors_name_the_problem():
    base = {"hidden_size": 512, "num_attention_heads": 4, "num_hidden_layers": 1,
            "max_position_embeddings": 4096}
    with pytest.raises(ValueError, match=r"unsupported rope_scaling type 'longrope'.*'yarn'"):
        rope_setup({**base, "rope_theta": 1e4, "rope_scaling": {"type": "longrope"}})
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'ntk'"):
        scaled_frequencies("ntk", 1e4, 64)
    with pytest.raises(ValueError, match="no RoPE base"):
        rope_setup(base)
    with pytest.raises(ValueError, match="rotary dimension"):
        rope_setup({**base, "rope_theta": 1e4, "partial_rotary_factor": 0.01})
    with pytest.raises(ValueError, match="neither head_dim nor hidden_size"):
        rope_setup({"rope_theta": 1e4, "max_position_embeddings": 4096, "num_hidden_layers": 1})
    with pytest.raises(TypeError, match="transformers config or a dict"):
        rope_setup(42)
    assert SUPPORTED_ROPE_TYPES == ("default", "linear", "dynamic", "yarn", "llama3")


def test_shipped_configs_read_like_transformers_reads_them():
    configs = shipped_configs()
    assert {"llama-2-7b", "llama-3.1-8b", "gemma-3-4b", "smollm2-135m",
            "baichuan2-7b"} <= set(configs)
    for name, fields in configs.items():
        assert fields["source"] and fields["max_position_embeddings"], name
        setup = rope_setup(fields)
        if fields["model_type"] == "baichuan":  # remote code: no transformers config class
            continue
        kwargs = {key: value for key, value in fields.items()
                  if key not in ("source", "note", "model_type")}
        reference = rope_setup(AutoConfig.for_model(fields["model_type"], **kwargs))
        assert setup.variants.keys() == reference.variants.keys(), name
        for layer_type, variant in setup.variants.items():
            other = reference.variants[layer_type]
            assert (variant.num_layers, variant.attention_span) == (other.num_layers,
                                                                    other.attention_span), name
            np.testing.assert_allclose(variant.frequencies(), other.frequencies(), rtol=1e-15)
    gemma = rope_setup(configs["gemma-3-4b"])
    assert gemma.head_dim == 256
    assert {t: v.num_layers for t, v in gemma.variants.items()} == {"sliding_attention": 29,
                                                                    "full_attention": 5}
    assert rope_setup(configs["llama-3.1-8b"]).variants["full_attention"].rope_type == "llama3"
    mistral = rope_setup(configs["mistral-7b-v0.1"]).variants
    assert list(mistral) == ["sliding_attention"]
    assert mistral["sliding_attention"].attention_span == 4096
    assert rope_setup(configs["phi-2"]).variants["full_attention"].rotary_dim == 32


def test_rope_report_rows():
    configs = shipped_configs()
    rows = rope_report({name: configs[name] for name in ("llama-2-7b", "gemma-3-4b")})
    assert [(row["name"], row["layer_type"]) for row in rows] == [
        ("llama-2-7b", "full_attention"), ("gemma-3-4b", "sliding_attention"),
        ("gemma-3-4b", "full_attention")]
    llama, local, full = rows
    assert llama["bound"] == max_context(1e4, 128) < 4096 and not llama["bound_covers_advertised"]
    assert local["bound"] == max_context(1e4, 256) and local["bound_covers_span"]
    assert not local["bound_covers_advertised"]
    assert full["scaling"] == "linear(factor=8.0)" and full["bound_covers_advertised"]
    assert full["bound"] == max_context_from_frequencies(rope_frequencies(1e6, 256) / 8)
