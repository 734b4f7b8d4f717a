"""The paper's bias B(m) and its weighted form, evaluated exactly in float64.

θ_i = b^(−2i/d) for i = 0 … d/2−1 (``rope_frequencies``); B(m) = Σ_i cos(m θ_i)
(``rope_bias``); the general form Σ_i (σ²_a(i) + σ²_b(i)) cos(m θ_i) with per-dimension
variances paired by the RoPE layout (``pair_weights``, ``weighted_rope_bias``,
``pair_variances_from_vectors``). m θ_i reaches 1e6+ radians for long contexts, far beyond
what float32 resolves, hence float64 throughout.
"""

from __future__ import annotations

import numpy as np
import torch

from shortlab.rope.conventions import (
    DEFAULT_CHUNK, _check_base, _check_frequencies, _check_head_dim, _check_layout,
    _check_weights, _single_threaded,
)


def _tensors(thetas: np.ndarray, weights: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(thetas), torch.from_numpy(_check_weights(weights, thetas.size))


def rope_frequencies(base: float, head_dim: int) -> np.ndarray:
    """θ_i = base^(−2i/d) for i = 0 … d/2−1: float64 array of shape (d/2,), radians per position."""
    head_dim = _check_head_dim(head_dim)
    base = _check_base(base)
    return base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


@_single_threaded
def bias_from_frequencies(m, thetas, weights=None, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Σ_i w_i cos(m θ_i) for every position in ``m`` (any shape, ints or floats).

    thetas: (n,) radians per position; weights: (n,) or None for all ones (the paper's B).
    Returns float64 with m's shape. Exact in float64: each m θ_i is one float64 product, and
    at most ``chunk`` positions × n frequencies are held in memory at once.
    """
    thetas = _check_frequencies(thetas)
    theta_t, weight_t = _tensors(thetas, weights)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    positions = np.asarray(m, dtype=np.float64)
    flat = torch.from_numpy(positions.ravel())
    out = torch.empty(flat.numel(), dtype=torch.float64)
    for start in range(0, flat.numel(), chunk):
        block = flat[start:start + chunk]
        out[start:start + chunk] = torch.cos(torch.outer(block, theta_t)) @ weight_t
    return out.numpy().reshape(positions.shape)


def rope_bias(m, base: float, head_dim: int, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """The paper's B(m; base, d) = Σ_{i<d/2} cos(m θ_i) for every position in ``m``, float64,
    same shape as ``m``. B(0) = d/2."""
    return bias_from_frequencies(m, rope_frequencies(base, head_dim), chunk=chunk)


def pair_weights(variances, *, layout: str) -> np.ndarray:
    """Per-frequency weights w_i = σ²_a(i) + σ²_b(i) from per-dimension variances (d,) → (d/2,).

    ``layout`` says which two dimensions θ_i rotates together:

    * ``"interleaved"``: (2i, 2i + 1), as in the RoFormer paper, Meta's original Llama code
      (complex numbers over adjacent pairs) and GPT-J;
    * ``"half"``: (i, i + d/2), transformers' ``rotate_half``, used by its Llama, Mistral, Qwen2
      and Gemma implementations (Meta's checkpoints are permuted on conversion to match).
    """
    layout = _check_layout(layout)
    variances = np.asarray(variances, dtype=np.float64)
    if variances.ndim != 1:
        raise ValueError(f"variances must be 1-D (one per head dimension), got shape "
                         f"{variances.shape}")
    head_dim = _check_head_dim(variances.size)
    if layout == "interleaved":
        return variances[0::2] + variances[1::2]
    return variances[: head_dim // 2] + variances[head_dim // 2:]


def weighted_rope_bias(m, base: float, variances, *, layout: str,
                       chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """The paper's general form Σ_i (σ²_a(i) + σ²_b(i)) cos(m θ_i), θ from ``base`` and d =
    len(variances); ``variances`` are per-dimension (d,), paired according to ``layout`` (see
    ``pair_weights``). Float64 with m's shape; equals 2σ²·B(m) when every variance is σ²."""
    weights = pair_weights(variances, layout=layout)
    return bias_from_frequencies(m, rope_frequencies(base, 2 * weights.size), weights, chunk)


def pair_variances_from_vectors(vectors: torch.Tensor, *, layout: str) -> np.ndarray:
    """Per-frequency weights σ²_a(i) + σ²_b(i) from sample vectors [..., d] → float64 (d/2,).

    σ² is each dimension's (population) variance over all leading axes. The paper's σ² is that
    of q and k together: pass ``torch.cat((q, k))`` to pool them. Feed the result to
    ``bias_from_frequencies`` or ``max_context_from_frequencies`` as ``weights``.
    """
    if vectors.ndim < 1:
        raise ValueError("vectors must have a last axis of head dimensions")
    samples = vectors.detach().reshape(-1, vectors.shape[-1]).to(torch.float64)
    if samples.shape[0] < 2:
        raise ValueError(f"need at least 2 vectors to estimate a variance, got {samples.shape[0]}")
    return pair_weights(samples.var(dim=0, correction=0).cpu().numpy(), layout=layout)
