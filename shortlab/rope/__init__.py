"""RoPE's long-context bound (Men et al., 2024, arXiv 2405.14591) and the RoPE of real models.

The paper's quantities, for a head of dimension d (even) and RoPE base b:

* frequencies θ_i = b^(−2i/d), i = 0 … d/2−1 (radians per position);
* B(m) = Σ_i cos(m θ_i), proportional to how much more attention a similar key gets than a
  random one at relative distance m (general form Σ_i (σ²_a(i) + σ²_b(i)) cos(m θ_i) with the
  per-dimension variances of the two dimensions rotated by θ_i);
* L_θ = sup{L : B(m) ≥ 0 for all integers 0 ≤ m ≤ L}: the longest context the base supports;
* base_L = inf{b : B(m) ≥ 0 for all 0 ≤ m ≤ L}: the smallest base that supports context L.

The package is split by topic; every name is importable from ``shortlab.rope`` itself:

* ``conventions``: m ranges ("closed" [0, L] / "half_open" [0, L − 1]), what "K" means in a
  context label (``context_length``), input checks;
* ``bias``: B(m) and its weighted form, exact in float64;
* ``scan``: L_θ of any frequencies (``max_context_from_frequencies``, ``max_context``) and the
  exact ``check_base``;
* ``bounds``: base_L (``min_base``, ``naive_min_base``, ``bound_table``) and the paper's
  published bounds;
* ``scaling``: effective frequencies of scaled RoPE (linear, dynamic NTK, YaRN, Llama-3);
* ``configs``: the RoPE of real models read from their configs (``rope_setup``,
  ``shipped_configs``, ``rope_report``).

All arithmetic is float64: m θ_i reaches 1e6+ radians for long contexts, far beyond what float32
can resolve.
"""

from shortlab.rope.bias import (
    bias_from_frequencies, pair_variances_from_vectors, pair_weights, rope_bias, rope_frequencies,
    weighted_rope_bias,
)
from shortlab.rope.bounds import (
    PAPER_BOUNDS_D128, PAPER_CONTEXTS, BaseBound, bound_table, min_base, naive_min_base,
)
from shortlab.rope.configs import RopeSetup, RopeVariant, rope_report, rope_setup, shipped_configs
from shortlab.rope.conventions import (
    CONTEXT_K, DEFAULT_CHUNK, DEFAULT_LIMIT, LAYOUTS, M_RANGES, context_length,
)
from shortlab.rope.scaling import SUPPORTED_ROPE_TYPES, dynamic_ntk_base, scaled_frequencies
from shortlab.rope.scan import check_base, max_context, max_context_from_frequencies

# Internals the tests check directly, reachable from here as they were from the single module.
from shortlab.rope.scan import _DIRECT_M as _DIRECT_M
from shortlab.rope.scan import _FIRST_CHUNK as _FIRST_CHUNK
from shortlab.rope.scan import _HALF_WIDTH as _HALF_WIDTH
from shortlab.rope.scan import _has_negative as _has_negative
from shortlab.rope.scan import _top_down_blocks as _top_down_blocks

__all__ = [
    "CONTEXT_K", "DEFAULT_CHUNK", "DEFAULT_LIMIT", "LAYOUTS", "M_RANGES", "PAPER_BOUNDS_D128",
    "PAPER_CONTEXTS", "SUPPORTED_ROPE_TYPES", "BaseBound", "RopeSetup", "RopeVariant",
    "bias_from_frequencies", "bound_table", "check_base", "context_length", "dynamic_ntk_base",
    "max_context", "max_context_from_frequencies", "min_base", "naive_min_base",
    "pair_variances_from_vectors", "pair_weights", "rope_bias", "rope_frequencies", "rope_report",
    "rope_setup", "scaled_frequencies", "shipped_configs", "weighted_rope_bias",
]
