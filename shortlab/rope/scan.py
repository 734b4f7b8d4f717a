"""Scans over m: the longest context L_θ a set of frequencies supports, and exact checks.

``max_context_from_frequencies`` / ``max_context`` find the first integer m with B(m) < 0 by
the fast scan (``_first_negative``: direct cosines for small m, angle addition as matrix
products beyond); ``check_base`` evaluates every m directly. ``_has_negative`` runs the fast
scan from the top down, the cheap way to reject an invalid base (used by ``shortlab.rope.bounds``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from shortlab.rope.bias import _tensors, rope_frequencies
from shortlab.rope.conventions import (
    DEFAULT_CHUNK, DEFAULT_LIMIT, _check_frequencies, _check_weights, _scan_stop,
    _single_threaded, context_length,
)

# Fast scan. Positions below _DIRECT_M are evaluated directly, in chunks doubling from
# _FIRST_CHUNK so that a base failing early costs little (most invalid bases do). Beyond, blocks
# of 2 × _HALF_WIDTH positions around centres m0 come from one table of cos/sin(c θ), c ≤
# _HALF_WIDTH, via cos((m0 ± c)θ) = cos m0θ cos cθ ∓ sin m0θ sin cθ: matrix products, ~3 ns per
# position at d = 128 instead of ~70 ns for 64 cosines, once the table (~140 µs, as much as
# ~2000 direct positions) is paid for.
_FIRST_CHUNK = 64
_DIRECT_M = 2048
_HALF_WIDTH = 512
_MAX_CENTRES = 128  # centres per matrix product, reached by doubling like the direct chunks


def _direct(low: int, high: int, theta_t: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i cos(m θ_i) for m = low … high − 1, one cosine per position and frequency."""
    positions = torch.arange(low, high, dtype=torch.float64)
    return torch.cos(torch.outer(positions, theta_t)) @ weight_t


def _tables(theta_t: torch.Tensor, weight_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w_i cos(c θ_i) and w_i sin(c θ_i) for c = 0 … _HALF_WIDTH: two (n, C + 1) arrays."""
    phase = torch.outer(theta_t, torch.arange(_HALF_WIDTH + 1, dtype=torch.float64))
    return torch.cos(phase) * weight_t[:, None], torch.sin(phase) * weight_t[:, None]


def _block(low: int, centres: int, theta_t: torch.Tensor,
           tables: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """B(m) for m = low … low + 2C·centres − 1 by angle addition around the centres
    m0 = low + C + 2Cj: (B(m0 − c) for c = 1 … C, B(m0 + c) for c = 0 … C − 1), two
    (centres, C) arrays; ``_in_order`` lays them out by m."""
    m0 = low + _HALF_WIDTH + 2 * _HALF_WIDTH * torch.arange(centres, dtype=torch.float64)
    phase = torch.outer(m0, theta_t)
    p = torch.cos(phase) @ tables[0]  # Σ w cos m0θ cos cθ, (centres, C + 1)
    q = torch.sin(phase) @ tables[1]  # Σ w sin m0θ sin cθ
    return (p + q)[:, 1:], (p - q)[:, :_HALF_WIDTH]


def _in_order(below: torch.Tensor, above: torch.Tensor) -> torch.Tensor:
    return torch.cat((below.flip(1), above), dim=1).reshape(-1)


def _first_index(mask: torch.Tensor) -> int:
    return int(torch.nonzero(mask)[0, 0])


def _first_negative_exact(thetas: np.ndarray, weights: np.ndarray | None, stop: int,
                          chunk: int = DEFAULT_CHUNK) -> int | None:
    """First integer m in [0, stop) with Σ w_i cos(m θ_i) < 0, by direct evaluation block by
    block (stopping at the first negative), or None."""
    theta_t, weight_t = _tensors(thetas, weights)
    for low in range(0, stop, chunk):
        values = _direct(low, min(stop, low + chunk), theta_t, weight_t)
        if values.min() < 0:
            return low + _first_index(values < 0)
    return None


def _first_negative(thetas: np.ndarray, weights: np.ndarray | None, stop: int) -> int | None:
    """First integer m in [0, stop) with Σ w_i cos(m θ_i) < 0, or None: the fast scan.

    Checks every integer m in float64 like ``_first_negative_exact`` but, past the first
    _DIRECT_M positions, obtains them from matrix products (see the comment at _FIRST_CHUNK),
    about n multiply-adds per position instead of n cosines. The angle addition rounds
    differently from the direct product m·θ_i, by ~1e-10 in B at m ~ 1e6; ``min_base``
    therefore re-checks what it returns with the direct method.
    """
    theta_t, weight_t = _tensors(thetas, weights)
    low, chunk = 0, _FIRST_CHUNK
    while low < min(stop, _DIRECT_M):
        high = min(stop, _DIRECT_M, low + chunk)
        values = _direct(low, high, theta_t, weight_t)
        if values.min() < 0:
            return low + _first_index(values < 0)
        low, chunk = high, 2 * chunk
    if stop <= _DIRECT_M:
        return None
    tables = _tables(theta_t, weight_t)
    low, centres = _DIRECT_M, 4
    while low < stop:
        below, above = _block(low, centres, theta_t, tables)
        end = low + 2 * _HALF_WIDTH * centres
        # Positions are only put in order to locate a negative or to cut the block at ``stop``.
        if end > stop or min(below.min(), above.min()) < 0:
            values = _in_order(below, above)[: stop - low]
            if values.min() < 0:
                return low + _first_index(values < 0)
        low = end
        centres = min(2 * centres, _MAX_CENTRES)
    return None


def _top_down_blocks(stop: int) -> list[tuple[int, int]]:
    """(low, centres) of ``_block`` calls covering [_DIRECT_M, stop) from the top down, each
    ending where the previous one starts and growing like the bottom-up scan's; the lowest may
    reach below _DIRECT_M (never below 0), a harmless overlap with the direct chunks."""
    blocks, high, centres = [], stop, 4
    while high > _DIRECT_M:
        centres = min(centres, math.ceil((high - _DIRECT_M) / (2 * _HALF_WIDTH)))
        low = high - 2 * _HALF_WIDTH * centres
        blocks.append((low, centres))
        high, centres = low, min(2 * centres, _MAX_CENTRES)
    return blocks


def _has_negative(thetas: np.ndarray, stop: int) -> bool:
    """Whether B(m) < 0 for some integer m in [0, stop): the fast scan of ``_first_negative``
    run from the top down. Validity needs any negative, not the first, and an invalid base
    near the bound is negative at many large m, so it is usually rejected by the first block
    instead of after a scan up to its first negative."""
    theta_t, weight_t = _tensors(thetas, None)
    # A cheap direct probe at the very top first: it rejects most invalid bases on its own.
    if _direct(max(0, stop - _FIRST_CHUNK), stop, theta_t, weight_t).min() < 0:
        return True
    blocks = _top_down_blocks(stop)
    if blocks:
        tables = _tables(theta_t, weight_t)
        for low, centres in blocks:
            below, above = _block(low, centres, theta_t, tables)
            if min(below.min(), above.min()) < 0:
                return True
    high, chunk = min(stop, _DIRECT_M), _FIRST_CHUNK
    while high > 0:
        low = max(0, high - chunk)
        if _direct(low, high, theta_t, weight_t).min() < 0:
            return True
        high, chunk = low, 2 * chunk
    return False


@_single_threaded
def max_context_from_frequencies(thetas, *, weights=None, limit: int = DEFAULT_LIMIT,
                                 m_range: str = "closed") -> int:
    """L_θ for arbitrary frequencies (scaled RoPE, partial rotary, weighted pairs).

    ``"closed"``: the largest L with Σ w_i cos(m θ_i) ≥ 0 for every integer m in [0, L] (first
    negative m minus 1); ``"half_open"``: the largest L with it for m in [0, L − 1] (the first
    negative m). Scans m up to ``limit`` only and returns ``limit`` when no negative is found by
    then, so the result is exact when below ``limit`` and means "at least limit" when equal.
    """
    thetas = _check_frequencies(thetas)
    weights = _check_weights(weights, thetas.size)
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    first = _first_negative(thetas, weights, _scan_stop(limit, m_range))
    if first is None:
        return limit
    return first - 1 if m_range == "closed" else first


def max_context(base: float, head_dim: int, *, limit: int = DEFAULT_LIMIT,
                m_range: str = "closed") -> int:
    """L_θ of plain RoPE with this base and head dimension; see ``max_context_from_frequencies``
    for the conventions and the meaning of ``limit``."""
    return max_context_from_frequencies(rope_frequencies(base, head_dim), limit=limit,
                                        m_range=m_range)


@_single_threaded
def check_base(base: float, context: int | str, head_dim: int, *, m_range: str = "closed",
               k: int = 1024) -> tuple[bool, int | None]:
    """Whether B(m) ≥ 0 for every integer m in [0, L] (``"closed"``) or [0, L − 1]
    (``"half_open"``), by direct float64 evaluation of every such m. Returns (ok, first m with
    B(m) < 0, or None when ok). ``context`` may be a label such as "32K" (``k`` per "K")."""
    context = context_length(context, k)
    first = _first_negative_exact(rope_frequencies(base, head_dim), None,
                                  _scan_stop(context, m_range))
    return first is None, first
