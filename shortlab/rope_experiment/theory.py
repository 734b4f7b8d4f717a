"""The theorem's objects, checked numerically, and the paper's published bounds re-checked.

``rope_matrix`` R_m and ``rotate`` (RoPE applied to vectors at positions, in either pair
layout) let a notebook verify (R_a q)·(R_b k) = qᵀR_(b−a)k; ``score_gap_monte_carlo`` samples
E[qᵀR_m k*] − E[qᵀR_m k] to set beside 2σ²B(m). ``valid_bases``, ``nearest_valid_base`` and
``published_checks`` test published bases against the criterion under every convention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from shortlab.rope import (
    CONTEXT_K, M_RANGES, check_base, context_length, max_context, rope_frequencies,
)
from shortlab.rope.conventions import _check_layout


def rope_matrix(m: float, base: float, head_dim: int, *, layout: str = "interleaved"
                ) -> torch.Tensor:
    """R_m: the (d, d) float64 rotation RoPE applies at position m, one 2×2 rotation by m·θ_i
    per pair; ``layout`` says which dimensions form pair i (see ``shortlab.rope.pair_weights``).
    Rotating a vector x at position m is R_m x, and R_aᵀ R_b = R_{b−a}."""
    thetas = torch.from_numpy(rope_frequencies(base, head_dim))
    half = head_dim // 2
    first, second = ((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2))
                     if _check_layout(layout) == "interleaved"
                     else (torch.arange(half), torch.arange(half, head_dim)))
    cos, sin = torch.cos(m * thetas), torch.sin(m * thetas)
    matrix = torch.zeros(head_dim, head_dim, dtype=torch.float64)
    matrix[first, first] = cos
    matrix[second, second] = cos
    matrix[first, second] = -sin
    matrix[second, first] = sin
    return matrix


def rotate(x: torch.Tensor, positions, base: float, *, layout: str = "interleaved"
           ) -> torch.Tensor:
    """RoPE: rotate each vector x[..., j, :] (d = x.shape[-1]) by its position positions[j].

    ``positions`` broadcasts against x.shape[:-1] (a scalar, or one position per vector). Computed
    in float64. ``layout="half"`` is transformers' ``x·cos + rotate_half(x)·sin``.
    """
    x = x.to(torch.float64)
    head_dim = x.shape[-1]
    thetas = torch.from_numpy(rope_frequencies(base, head_dim))
    angles = torch.as_tensor(positions, dtype=torch.float64)[..., None] * thetas  # [..., d/2]
    cos, sin = torch.cos(angles), torch.sin(angles)
    if _check_layout(layout) == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    a, b = x[..., : head_dim // 2], x[..., head_dim // 2:]
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


def score_gap_monte_carlo(base: float, head_dim: int, distances: Sequence[int], *,
                          n_samples: int = 4096, sigma: float = 1.0, noise_std: float = 0.5,
                          layout: str = "interleaved", seed: int = 0) -> dict[str, np.ndarray]:
    """The theorem's two expectations by sampling, at each relative distance m.

    Draws q and a random key k i.i.d. N(0, σ²) per dimension and a similar key k* = q + ε
    (ε ~ N(0, noise_std²)); places the key at a random position p and the query at p + m,
    rotates both with ``rotate`` and takes the dot product, as attention does. Returns
    float64 arrays over ``distances``: "similar" (mean score with k*), "random" (with k),
    "gap" (their mean paired difference) and "gap_stderr"; the theorem says gap = 2σ²·B(m).
    """
    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2, got {n_samples}")
    generator = torch.Generator().manual_seed(seed)
    q = sigma * torch.randn(n_samples, head_dim, generator=generator, dtype=torch.float64)
    k_random = sigma * torch.randn(n_samples, head_dim, generator=generator, dtype=torch.float64)
    k_similar = q + noise_std * torch.randn(n_samples, head_dim, generator=generator,
                                            dtype=torch.float64)
    key_positions = torch.randint(0, 10_000, (n_samples,), generator=generator)
    out = {name: np.empty(len(distances)) for name in ("similar", "random", "gap", "gap_stderr")}
    for index, m in enumerate(distances):
        rotated_q = rotate(q, key_positions + m, base, layout=layout)
        similar = (rotated_q * rotate(k_similar, key_positions, base, layout=layout)).sum(-1)
        random = (rotated_q * rotate(k_random, key_positions, base, layout=layout)).sum(-1)
        difference = similar - random
        out["similar"][index] = similar.mean()
        out["random"][index] = random.mean()
        out["gap"][index] = difference.mean()
        out["gap_stderr"][index] = difference.std() / math.sqrt(n_samples)
    return out


# ----------------------------------------------------------------------------- published bounds

def valid_bases(bases, context: int, head_dim: int, *, m_range: str = "closed") -> np.ndarray:
    """Whether each base keeps B(m) ≥ 0 on the context's m range (``shortlab.rope.max_context``
    scanned up to ``context``): a bool array, for maps of the islands of valid bases."""
    return np.array([max_context(float(base), head_dim, limit=context, m_range=m_range) == context
                     for base in np.asarray(bases, dtype=np.float64).ravel()]).reshape(np.shape(bases))


def nearest_valid_base(base: float, context: int, head_dim: int, *, direction: int,
                       m_range: str = "closed", rtol: float = 1e-4, span: float = 4.0
                       ) -> float | None:
    """The first base of the log grid base·(1 + rtol)^(±j), j ≥ 1, going up (``direction=+1``) or
    down (−1) at most a factor ``span``, that satisfies the criterion (confirmed by
    ``check_base``); None if there is none in that range."""
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    steps = math.ceil(math.log(span) / math.log1p(rtol))
    for j in range(1, steps + 1):
        candidate = base * math.exp(direction * j * math.log1p(rtol))
        if candidate > 1 and max_context(candidate, head_dim, limit=context,
                                         m_range=m_range) == context:
            if check_base(candidate, context, head_dim, m_range=m_range)[0]:
                return candidate
    return None


def published_checks(published, head_dim: int, *, ks: Sequence[int] = CONTEXT_K,
                     m_ranges: Sequence[str] = M_RANGES) -> list[dict]:
    """Each published (context label → base) checked against the criterion itself under every
    convention: "1K" as 1000 or 1024 (``ks``) and m in [0, L] or [0, L − 1] (``m_ranges``).

    One row per label: context, base, and for each convention a key ``"k=<k> <m_range>"``
    holding (ok, first m with B(m) < 0 or None), plus ``holds_under``: the conventions under
    which the base is valid.
    """
    rows = []
    for label, base in published.items():
        row = {"context": label, "base": float(base)}
        for k in ks:
            for m_range in m_ranges:
                row[f"k={k} {m_range}"] = check_base(base, context_length(label, k), head_dim,
                                                     m_range=m_range)
        row["holds_under"] = [name for name, value in row.items()
                              if name.startswith("k=") and value[0]]
        rows.append(row)
    return rows
