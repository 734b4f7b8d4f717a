"""RoPE's long-context bound (Men et al., 2024, arXiv 2405.14591) and the RoPE of real models.

The paper's quantities, for a head of dimension d (even) and RoPE base b:

* frequencies θ_i = b^(−2i/d), i = 0 … d/2−1 (radians per position);
* B(m) = Σ_i cos(m θ_i), proportional to how much more attention a similar key gets than a
  random one at relative distance m (general form Σ_i (σ²_a(i) + σ²_b(i)) cos(m θ_i) with the
  per-dimension variances of the two dimensions rotated by θ_i);
* L_θ = sup{L : B(m) ≥ 0 for all integers 0 ≤ m ≤ L}: the longest context the base supports;
* base_L = inf{b : B(m) ≥ 0 for all 0 ≤ m ≤ L}: the smallest base that supports context L.

Neither B(m) in m nor validity in b is monotone: the bases that satisfy the criterion form
islands, so base_L is found by scanning a log grid of bases and refining island edges, never by
bisection over the whole range (see ``min_base``).

Conventions, explicit everywhere they matter:

* ``m_range="closed"`` checks m in [0, L] (the paper's definition); ``"half_open"`` checks
  [0, L − 1], the distances that actually occur among L tokens;
* ``k`` is what "K" means in a context label: ``context_length("32K", k=1024) == 32768``.

All arithmetic is float64: m θ_i reaches 1e6+ radians for long contexts, far beyond what float32
can resolve.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch

M_RANGES = ("closed", "half_open")
LAYOUTS = ("interleaved", "half")
CONTEXT_K = (1000, 1024)
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")

DEFAULT_LIMIT = 2**24  # longest context any scan looks at unless told otherwise (~16.8M)
DEFAULT_CHUNK = 8192  # positions per block in exact evaluations: chunk × d/2 float64 in memory

# The paper's published lower bounds on the base for d = 128 (context label -> base).
PAPER_BOUNDS_D128 = {
    "1K": 4.3e3, "2K": 1.6e4, "4K": 2.7e4, "8K": 8.4e4, "16K": 3.1e5, "32K": 6.4e5,
    "64K": 2.1e6, "128K": 7.8e6, "256K": 3.6e7, "512K": 6.4e7, "1M": 5.1e8,
}
PAPER_CONTEXTS = tuple(PAPER_BOUNDS_D128)

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

_BASE_CEILING = 1e30  # min_base gives up above this base when no base_max is given


def _single_threaded(function):
    """Run ``function`` with torch's intra-op pool at one thread, restoring the caller's setting.

    The tensors here are small (hundreds of positions × d/2 frequencies) and a multi-threaded
    pool spends more time waking and spinning than computing: on a busy 2-core machine a scan
    that takes 11 ms on one thread took 0.9 s on two (measured), and small scans 250× longer.
    """
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        if threads == 1:
            return function(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


# ----------------------------------------------------------------------------- validation

def _check_head_dim(head_dim: int) -> int:
    if isinstance(head_dim, bool) or not isinstance(head_dim, (int, np.integer)):
        raise ValueError(f"head_dim must be an integer, got {head_dim!r}")
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be even and >= 2 (RoPE rotates pairs), got {head_dim}")
    return int(head_dim)


def _check_base(base: float) -> float:
    if not (math.isfinite(base) and base > 1):
        raise ValueError(f"RoPE base must be a finite number > 1, got {base!r}")
    return float(base)


def _check_m_range(m_range: str) -> str:
    if m_range not in M_RANGES:
        raise ValueError(f"unknown m_range {m_range!r}; use one of {M_RANGES}")
    return m_range


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown pair layout {layout!r}; use one of {LAYOUTS}")
    return layout


def _check_frequencies(thetas) -> np.ndarray:
    thetas = np.asarray(thetas, dtype=np.float64)
    if thetas.ndim != 1 or thetas.size == 0 or not np.all(np.isfinite(thetas)):
        raise ValueError(f"frequencies must be a non-empty 1-D array of finite numbers, got shape "
                         f"{thetas.shape}")
    return thetas


def _check_weights(weights, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (n,):
        raise ValueError(f"need one weight per frequency: shape ({n},), got {weights.shape}")
    # Variances: negative ones are a bug upstream, and all-zero makes B(0) = 0 and L meaningless.
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    return weights


def context_length(label: int | str, k: int = 1024) -> int:
    """A context length in tokens: ints pass through, "32K" is 32·k, "1M" is k², "4096" is 4096.

    ``k`` (1000 or 1024) is what the label's "K" means; the paper does not say which it used.
    """
    if k not in CONTEXT_K:
        raise ValueError(f"k must be one of {CONTEXT_K} (what '1K' means), got {k!r}")
    if isinstance(label, str):
        text = label.strip().upper()
        scale = {"K": k, "M": k * k}.get(text[-1:], 1)
        digits = text[:-1] if scale != 1 else text
        if not digits.isdigit():
            raise ValueError(f"cannot read context length {label!r}; use e.g. 4096, '32K' or '1M'")
        value = int(digits) * scale
    elif isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        value = int(label)
    else:
        raise ValueError(f"context length must be an int or a label like '32K', got {label!r}")
    if value < 1:
        raise ValueError(f"context length must be >= 1, got {value}")
    return value


def _scan_stop(context: int, m_range: str) -> int:
    """Number of positions m = 0, 1, … that must keep B(m) ≥ 0 for context ``context``."""
    return context + 1 if _check_m_range(m_range) == "closed" else context


# ----------------------------------------------------------------------------- exact bias

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


# ----------------------------------------------------------------------------- scans over m

def _tensors(thetas: np.ndarray, weights: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(thetas), torch.from_numpy(_check_weights(weights, thetas.size))


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


# ----------------------------------------------------------------------------- bounds on the base

@dataclass(frozen=True)
class BaseBound:
    """Result of ``min_base``: which bases keep B(m) ≥ 0 on the context's range of m.

    ``smallest`` and ``stable`` satisfy the criterion (re-checked at every m by direct float64
    evaluation). Each is the lower edge of an island of valid bases, located by bisection to
    ``refine_rtol`` inside one grid step; the bracket's first element is a base just below that
    fails (None when ``smallest`` is the first grid point, below which nothing was searched).

    Resolution: ``smallest`` is the first valid base of the log grid search_min·(1 + grid_rtol)^j
    (``grid_smallest``) refined downwards, so islands narrower than a grid step can be missed.
    ``stable`` is where the region starts in which every base of the coarser grid
    search_min·(1 + stable_grid_rtol)^j up to ``search_max`` is valid (``grid_stable`` before
    refinement; None when ``search_max`` itself fails, which only an explicit ``base_max``
    allows); invalid islands narrower than that step can hide above it.
    """

    context: int
    head_dim: int
    m_range: str
    smallest: float
    smallest_bracket: tuple[float | None, float]
    stable: float | None
    stable_bracket: tuple[float | None, float] | None
    grid_smallest: float
    grid_stable: float | None
    search_min: float
    search_max: float
    grid_rtol: float
    stable_grid_rtol: float
    refine_rtol: float


@dataclass(frozen=True)
class _Grid:
    """The log grid base_min · (1 + rtol)^j, j = 0, 1, …; the fast and the naive searches share
    it so that they look at bitwise-identical bases."""

    base_min: float
    rtol: float

    def __getitem__(self, index: int) -> float:
        return self.base_min * math.exp(index * math.log1p(self.rtol))

    def last_index(self, base_max: float) -> int:
        """Index of the largest grid base ≤ base_max (to rounding)."""
        return int(math.floor(math.log(base_max / self.base_min) / math.log1p(self.rtol) + 1e-9))

    def first_index_above(self, base: float) -> int:
        """Index of the smallest grid base > base."""
        index = max(self.last_index(base), 0)
        while self[index] <= base:
            index += 1
        return index


def _check_grids(base_min: float, base_max: float | None, grid_rtol: float,
                 stable_grid_rtol: float) -> None:
    _check_base(base_min)
    if base_max is not None and not base_max >= base_min:
        raise ValueError(f"base_max ({base_max!r}) must be >= base_min ({base_min!r})")
    for name, value in (("grid_rtol", grid_rtol), ("stable_grid_rtol", stable_grid_rtol)):
        if not 0 < value <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def _check_refinement(refine_rtol: float, grid_rtol: float, stable_grid_rtol: float,
                      search_factor: float) -> None:
    if not 0 < refine_rtol <= min(grid_rtol, stable_grid_rtol):
        raise ValueError(f"refine_rtol must be in (0, min(grid_rtol, stable_grid_rtol)], got "
                         f"{refine_rtol!r}")
    if not search_factor > 1:
        raise ValueError(f"search_factor must be > 1, got {search_factor!r}")


def _check_reachable(context: int, head_dim: int, m_range: str) -> None:
    # θ_0 = 1 for every base, so with a single pair B(m) = cos(m), negative from m = 2 on.
    if head_dim == 2 and _scan_stop(context, m_range) > 2:
        raise ValueError(f"with head_dim 2, B(m) = cos(m) for every base and B(2) < 0: no base "
                         f"supports context {context} ({m_range})")


def _is_valid(base: float, head_dim: int, stop: int) -> bool:
    """B(m) ≥ 0 for every integer m in [0, stop), by the fast scan."""
    return not _has_negative(rope_frequencies(base, head_dim), stop)


def _refined_edge(lower: float, upper: float, rtol: float, stop: int, head_dim: int
                  ) -> tuple[float, float]:
    """Locate a valid/invalid transition between ``lower`` (fails) and ``upper`` (valid), one
    grid step apart, by bisection in log(base) down to relative width ``rtol``. Returns
    (failing base, valid base); the valid one is re-checked by direct evaluation of every m."""
    valid_candidates = [upper]
    while upper / lower - 1 > rtol:
        middle = math.sqrt(lower * upper)
        if _is_valid(middle, head_dim, stop):
            upper = middle
            valid_candidates.append(middle)
        else:
            lower = middle
    # The fast scan's rounding differs from direct evaluation by ~1e-10 in B; where they
    # disagree on a sign, fall back to the next larger candidate the direct check accepts.
    for candidate in reversed(valid_candidates):
        if _first_negative_exact(rope_frequencies(candidate, head_dim), None, stop) is None:
            return lower, candidate
        lower = candidate
    raise RuntimeError(f"the fast and the direct scans disagree on every base in "
                       f"[{valid_candidates[-1]:.6g}, {valid_candidates[0]:.6g}] (d={head_dim})")


def _search(context: int, head_dim: int, m_range: str, fine: _Grid, coarse: _Grid,
            refine_rtol: float, base_max: float | None, search_factor: float, start_index: int
            ) -> tuple[BaseBound, int]:
    """``min_base`` from fine-grid index ``start_index`` on (only correct when no smaller grid
    base can be valid); also returns the fine-grid index of the smallest valid base."""
    stop = _scan_stop(context, m_range)
    last = fine.last_index(_BASE_CEILING if base_max is None else base_max)
    # Upwards until the first valid base: invalid bases are cheap, the top-down scan mostly
    # rejects them within its first block.
    smallest_index = start_index
    while not _is_valid(fine[smallest_index], head_dim, stop):
        smallest_index += 1
        if smallest_index > last:
            raise ValueError(f"no base in [{fine[0]:g}, {fine[last]:g}] keeps B(m) >= 0 for "
                             f"context {context} ({m_range}, d={head_dim})")
    smallest = fine[smallest_index]
    smallest_bracket = (_refined_edge(fine[smallest_index - 1], smallest, refine_rtol, stop,
                                      head_dim)
                        if smallest_index > 0 else (None, smallest))
    # Every valid base costs a full scan, hence the coarser grid for the all-valid region.
    bottom = coarse.first_index_above(smallest)
    if base_max is None:
        jump = math.ceil(math.log(search_factor) / math.log1p(coarse.rtol))
        top = bottom + jump
        while not _is_valid(coarse[top], head_dim, stop):  # "valid up to the top" needs a valid top
            top += jump
    else:
        top = coarse.last_index(base_max)
    # Downwards from the top, every base passed is valid, until the first one that fails.
    failing = next((j for j in range(top, bottom - 1, -1)
                    if not _is_valid(coarse[j], head_dim, stop)), None)
    if failing is None:
        grid_stable, stable_bracket = smallest, smallest_bracket
    elif failing == top:
        grid_stable, stable_bracket = None, None
    else:
        grid_stable = coarse[failing + 1]
        stable_bracket = _refined_edge(coarse[failing], grid_stable, refine_rtol, stop, head_dim)
    bound = BaseBound(
        context=context, head_dim=head_dim, m_range=m_range,
        smallest=smallest_bracket[1], smallest_bracket=smallest_bracket,
        stable=None if stable_bracket is None else stable_bracket[1], stable_bracket=stable_bracket,
        grid_smallest=smallest, grid_stable=grid_stable, search_min=fine[0],
        search_max=coarse[top] if base_max is None else base_max, grid_rtol=fine.rtol,
        stable_grid_rtol=coarse.rtol, refine_rtol=refine_rtol,
    )
    return bound, smallest_index


@_single_threaded
def min_base(context: int | str, head_dim: int, *, k: int = 1024, m_range: str = "closed",
             grid_rtol: float = 1e-3, stable_grid_rtol: float = 1e-2, refine_rtol: float = 1e-6,
             base_min: float = 2.0, base_max: float | None = None, search_factor: float = 16.0
             ) -> BaseBound:
    """The paper's lower bound base_L: the smallest base with B(m) ≥ 0 on the context's m range.

    Valid bases come in islands (at d = 128 some are ~0.05 % wide), so bisection over the
    whole range would return some island edge, not the smallest. Instead: scan the log grid
    base_min·(1 + grid_rtol)^j upwards to the first valid base (an invalid base is usually
    rejected by the first block of a scan from m = L down); then scan the coarser grid
    (``stable_grid_rtol``) downwards from the top of the search (``base_max``, or
    ``search_factor`` × the smallest, raised until valid) to the first invalid base, which
    bounds the region where every base is valid; refine both transitions by bisection inside
    their grid step and re-check the returned bases by direct evaluation. See ``BaseBound`` for
    what is returned and its resolution. Finer grids find smaller bases in narrower islands:
    the answer depends on ``grid_rtol``, which is why it is part of the result.
    """
    context = context_length(context, k)
    head_dim = _check_head_dim(head_dim)
    _check_m_range(m_range)
    _check_grids(base_min, base_max, grid_rtol, stable_grid_rtol)
    _check_refinement(refine_rtol, grid_rtol, stable_grid_rtol, search_factor)
    _check_reachable(context, head_dim, m_range)
    return _search(context, head_dim, m_range, _Grid(base_min, grid_rtol),
                   _Grid(base_min, stable_grid_rtol), refine_rtol, base_max, search_factor,
                   start_index=0)[0]


@_single_threaded
def naive_min_base(context: int | str, head_dim: int, *, base_min: float, base_max: float,
                   k: int = 1024, m_range: str = "closed", grid_rtol: float = 1e-3,
                   stable_grid_rtol: float = 1e-2) -> tuple[float, float | None]:
    """Deliberately simple reference for ``min_base``: the bench's baseline and the tests' oracle.

    Evaluates B(m) directly at every m of the range (no early exit, no matrix-product trick,
    no refinement) for the bases of the same grids: upwards along the fine grid to the first
    valid base, then every coarse-grid base above it up to base_max. Returns (smallest valid
    grid base, coarse-grid base from which all up to base_max are valid: the smallest itself
    when all are, None when base_max's grid point fails), which equal ``grid_smallest`` and
    ``grid_stable`` of ``min_base`` called with the same arguments.
    """
    context = context_length(context, k)
    head_dim = _check_head_dim(head_dim)
    _check_m_range(m_range)
    _check_grids(base_min, base_max, grid_rtol, stable_grid_rtol)
    positions = np.arange(_scan_stop(context, m_range))
    fine, coarse = _Grid(base_min, grid_rtol), _Grid(base_min, stable_grid_rtol)

    def valid(base: float) -> bool:
        return bool(np.all(rope_bias(positions, base, head_dim) >= 0))

    smallest = next((fine[j] for j in range(fine.last_index(base_max) + 1) if valid(fine[j])),
                    None)
    if smallest is None:
        raise ValueError(f"no base in [{base_min:g}, {base_max:g}] keeps B(m) >= 0 for context "
                         f"{context} ({m_range}, d={head_dim})")
    above = [coarse[j] for j in range(coarse.last_index(base_max) + 1) if coarse[j] > smallest]
    failing = [j for j, base in enumerate(above) if not valid(base)]
    if not failing:
        return smallest, smallest
    return smallest, above[failing[-1] + 1] if failing[-1] + 1 < len(above) else None


@_single_threaded
def bound_table(contexts: Iterable[int | str] = PAPER_CONTEXTS, head_dim: int = 128, *,
                k: int = 1024, m_range: str = "closed", grid_rtol: float = 1e-3,
                stable_grid_rtol: float = 1e-2, refine_rtol: float = 1e-6, base_min: float = 2.0,
                search_factor: float = 16.0, published: Mapping[str, float] | None = None
                ) -> list[dict[str, Any]]:
    """``min_base`` for each context, one dict per row, next to the paper's published bound.

    ``published`` maps context labels to published bases (default: the paper's d = 128 table
    when head_dim is 128, else none); each is checked with ``check_base`` under the same
    conventions, and compared with our smallest base rounded to the published precision (two
    significant figures). Contexts are searched in increasing order, each starting from the
    previous smallest grid base: a base valid for a longer context is valid for a shorter one,
    so no smaller grid base can be valid (same result, less work). Row keys: context, L, k,
    m_range, smallest, smallest_fails_at, stable, published, published_ok,
    published_first_negative, smallest_2sf, matches_published.
    """
    head_dim = _check_head_dim(head_dim)
    _check_m_range(m_range)
    _check_grids(base_min, None, grid_rtol, stable_grid_rtol)
    _check_refinement(refine_rtol, grid_rtol, stable_grid_rtol, search_factor)
    if published is None:
        published = PAPER_BOUNDS_D128 if head_dim == 128 else {}
    labels = list(contexts)
    lengths = [context_length(label, k) for label in labels]
    for length in lengths:
        _check_reachable(length, head_dim, m_range)
    fine, coarse = _Grid(base_min, grid_rtol), _Grid(base_min, stable_grid_rtol)
    rows: dict[int, dict[str, Any]] = {}
    start = 0
    for position in sorted(range(len(labels)), key=lengths.__getitem__):
        bound, start = _search(lengths[position], head_dim, m_range, fine, coarse, refine_rtol,
                               None, search_factor, start)
        label = labels[position]
        paper = published.get(label) if isinstance(label, str) else None
        ok, first = (check_base(paper, lengths[position], head_dim, m_range=m_range)
                     if paper is not None else (None, None))
        rounded = float(f"{bound.smallest:.2g}")
        rows[position] = {
            "context": label, "L": lengths[position], "k": k, "m_range": m_range,
            "smallest": bound.smallest, "smallest_fails_at": bound.smallest_bracket[0],
            "stable": bound.stable, "published": paper, "published_ok": ok,
            "published_first_negative": first, "smallest_2sf": rounded,
            "matches_published": None if paper is None else rounded == paper,
        }
    return [rows[position] for position in range(len(labels))]


# ----------------------------------------------------------------------------- scaled RoPE

def dynamic_ntk_base(base: float, rotary_dim: int, factor: float, seq_len: int,
                     max_position_embeddings: int) -> float:
    """Dynamic-NTK's effective base at sequence length ``seq_len`` (transformers' formula):
    base · (factor · s / max_pos − (factor − 1))^(d / (d − 2)) with s = max(seq_len, max_pos),
    so it equals ``base`` up to max_position_embeddings and grows beyond."""
    seq_len = max(seq_len, max_position_embeddings)
    return base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (
        rotary_dim / (rotary_dim - 2))


def _yarn_frequencies(base: float, rotary_dim: int, params: Mapping[str, Any],
                      max_position_embeddings: int | None) -> np.ndarray:
    """YaRN: frequencies that turn fewer than beta_slow times over the original context are
    interpolated (÷ factor), those that turn more than beta_fast times are kept, and a linear
    ramp over the pair index blends the two in between."""
    original = params["original_max_position_embeddings"]
    factor = params.get("factor")
    if factor is None:  # as transformers: the extension ratio stands in for a missing factor
        if max_position_embeddings is None:
            raise ValueError("yarn scaling without a factor needs max_position_embeddings")
        factor = max_position_embeddings / original
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def pair_index_turning(turns: float) -> float:
        # The (fractional) pair index whose wavelength fits ``turns`` times in the original context
        return rotary_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = pair_index_turning(beta_fast), pair_index_turning(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    thetas = rope_frequencies(base, rotary_dim)
    return thetas / factor * ramp + thetas * (1 - ramp)


def _llama3_frequencies(base: float, rotary_dim: int, params: Mapping[str, Any]) -> np.ndarray:
    """Llama-3.1: wavelengths longer than original/low_freq_factor are divided by ``factor``,
    those shorter than original/high_freq_factor kept, and the ones between blended smoothly."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    original = params["original_max_position_embeddings"]
    thetas = rope_frequencies(base, rotary_dim)
    wavelength = 2 * math.pi / thetas
    smooth = (original / wavelength - low) / (high - low)
    scaled = np.where(wavelength > original / low, thetas / factor, thetas)
    medium = (wavelength >= original / high) & (wavelength <= original / low)
    return np.where(medium, (1 - smooth) * thetas / factor + smooth * thetas, scaled)


def scaled_frequencies(rope_type: str, base: float, rotary_dim: int,
                       params: Mapping[str, Any] | None = None,
                       max_position_embeddings: int | None = None,
                       seq_len: int | None = None) -> np.ndarray:
    """Effective frequencies (rotary_dim/2,) in radians per position after RoPE scaling, as
    transformers' ROPE_INIT_FUNCTIONS compute them (but in float64).

    ``params`` holds the scaling fields (factor, beta_fast, …). ``max_position_embeddings`` is
    needed by "dynamic" (the length up to which nothing changes) and by "yarn"/"llama3" when
    ``original_max_position_embeddings`` is missing; ``seq_len`` is used by "dynamic" only
    (default: max_position_embeddings, i.e. the unscaled frequencies).
    """
    params = dict(params or {})
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: "
                         f"{SUPPORTED_ROPE_TYPES}")
    if rope_type in ("yarn", "llama3") and "original_max_position_embeddings" not in params:
        if max_position_embeddings is None:
            raise ValueError(f"{rope_type} scaling needs original_max_position_embeddings or "
                             f"max_position_embeddings")
        params["original_max_position_embeddings"] = max_position_embeddings
    if rope_type == "default":
        return rope_frequencies(base, rotary_dim)
    if rope_type == "linear":
        return rope_frequencies(base, rotary_dim) / params["factor"]
    if rope_type == "dynamic":
        if max_position_embeddings is None:
            raise ValueError("dynamic scaling needs max_position_embeddings")
        effective = dynamic_ntk_base(base, rotary_dim, params["factor"],
                                     seq_len or max_position_embeddings, max_position_embeddings)
        return rope_frequencies(effective, rotary_dim)
    if rope_type == "yarn":
        return _yarn_frequencies(base, rotary_dim, params, max_position_embeddings)
    return _llama3_frequencies(base, rotary_dim, params)


# ----------------------------------------------------------------------------- model configs

@dataclass(frozen=True)
class RopeVariant:
    """The RoPE of one kind of attention layer in a model.

    ``attention_span`` is the longest query–key distance these layers see: the sliding window
    for sliding-window layers, max_position_embeddings otherwise. ``scaling`` holds the
    rope_parameters besides rope_theta, rope_type and partial_rotary_factor.
    """

    layer_type: str
    num_layers: int
    base: float
    rope_type: str
    scaling: Mapping[str, Any]
    rotary_dim: int
    max_position_embeddings: int
    attention_span: int

    def frequencies(self, seq_len: int | None = None) -> np.ndarray:
        """Effective θ (rotary_dim/2,) after scaling; ``seq_len`` matters for "dynamic" only."""
        return scaled_frequencies(self.rope_type, self.base, self.rotary_dim, self.scaling,
                                  self.max_position_embeddings, seq_len)

    def bound_context(self, seq_len: int | None = None, *, limit: int = DEFAULT_LIMIT,
                      m_range: str = "closed") -> int:
        """L_θ of the effective frequencies (``limit`` means "at least limit")."""
        return max_context_from_frequencies(self.frequencies(seq_len), limit=limit,
                                            m_range=m_range)


@dataclass(frozen=True)
class RopeSetup:
    """A model's RoPE as read by ``rope_setup``: one ``RopeVariant`` per attention-layer type
    (e.g. Gemma-3's "sliding_attention" and "full_attention"), and the advertised context."""

    model_type: str | None
    head_dim: int
    max_position_embeddings: int
    variants: Mapping[str, RopeVariant]


def _config_dict(config: Any) -> dict[str, Any]:
    """A plain dict of config fields from a transformers config or a (config.json) mapping; a
    multimodal config's text_config when the RoPE fields live there (e.g. Gemma-3)."""
    if isinstance(config, Mapping):
        fields = dict(config)
    elif hasattr(config, "to_dict"):
        fields = config.to_dict()
    else:
        raise TypeError(f"expected a transformers config or a dict, got {type(config).__name__}")
    has_rope = any(key in fields for key in ("rope_parameters", "rope_theta"))
    if not has_rope and isinstance(fields.get("text_config"), Mapping):
        return dict(fields["text_config"])
    return fields


def _rope_type(params: dict[str, Any]) -> str:
    # Old config.json files name the type "type"; transformers 5 names it "rope_type".
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: "
                         f"{SUPPORTED_ROPE_TYPES}")
    return rope_type


def _rope_parameter_sets(fields: Mapping[str, Any]) -> dict[str | None, dict[str, Any]]:
    """RoPE parameters per layer type (key None: the same for every layer), each with
    rope_theta and the scaling fields, from either transformers-5 ``rope_parameters`` (flat or
    nested by layer type) or legacy ``rope_theta`` + ``rope_scaling`` (+ Gemma-3's
    ``rope_local_base_freq`` for its sliding-window layers, which are never scaled)."""
    parameters = fields.get("rope_parameters")
    if parameters:
        nested = {key: dict(value) for key, value in parameters.items()
                  if isinstance(value, Mapping)}
        sets = nested or {None: dict(parameters)}
    elif "rope_theta" in fields:
        full = {"rope_theta": fields["rope_theta"], **(fields.get("rope_scaling") or {})}
        if "rope_local_base_freq" in fields:
            sets = {"full_attention": full,
                    "sliding_attention": {"rope_theta": fields["rope_local_base_freq"]}}
        else:
            sets = {None: full}
    else:
        raise ValueError("config has no RoPE base: neither rope_parameters nor rope_theta "
                         "(transformers would silently assume 10000; set it explicitly)")
    for params in sets.values():
        if "rope_theta" not in params:
            if "rope_theta" not in fields:
                raise ValueError(f"rope parameters {params} have no rope_theta")
            params["rope_theta"] = fields["rope_theta"]
    return sets


def _layer_types(fields: Mapping[str, Any], sets: Mapping[str | None, Any]) -> list[str]:
    """The attention type of every layer: ``layer_types`` if given, else Gemma-3's legacy
    ``sliding_window_pattern`` (every n-th layer global, n = 6 by default as in transformers),
    else all sliding-window when a window is in force (Mistral-7B-v0.1), else all full."""
    if fields.get("layer_types"):
        return list(fields["layer_types"])
    count = fields.get("num_hidden_layers")
    if not count:
        raise ValueError("config has neither layer_types nor num_hidden_layers")
    if "sliding_attention" in sets or "sliding_window_pattern" in fields:
        pattern = fields.get("sliding_window_pattern", 6)
        return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                for i in range(count)]
    windowed = fields.get("sliding_window") and fields.get("use_sliding_window", True)
    return [("sliding_attention" if windowed else "full_attention")] * count


def rope_setup(config: Any) -> RopeSetup:
    """Read a model's RoPE from a transformers config object or a config.json-style dict.

    Understands rope_theta / rope_scaling (legacy) and rope_parameters (transformers 5, flat or
    per layer type), Gemma-3's rope_local_base_freq + sliding_window_pattern, head_dim (else
    hidden_size // num_attention_heads), partial_rotary_factor (the first int(head_dim · factor)
    dimensions rotate, as in transformers) and scaling types in SUPPORTED_ROPE_TYPES.
    """
    fields = _config_dict(config)
    head_dim = fields.get("head_dim")
    if not head_dim:
        if not (fields.get("hidden_size") and fields.get("num_attention_heads")):
            raise ValueError("config has neither head_dim nor hidden_size and "
                             "num_attention_heads")
        head_dim = fields["hidden_size"] // fields["num_attention_heads"]
    head_dim = _check_head_dim(head_dim)
    max_positions = fields.get("max_position_embeddings")
    if not max_positions:
        raise ValueError("config has no max_position_embeddings (the advertised context)")
    sets = _rope_parameter_sets(fields)
    layer_types = _layer_types(fields, sets)
    variants = {}
    for layer_type in dict.fromkeys(layer_types):
        if layer_type in sets:
            params = dict(sets[layer_type])
        elif None in sets:
            params = dict(sets[None])
        else:
            raise ValueError(f"no rope parameters for layer type {layer_type!r}; have {list(sets)}")
        base = _check_base(params.pop("rope_theta"))
        rope_type = _rope_type(params)
        if rope_type in ("yarn", "llama3") and "original_max_position_embeddings" in fields:
            # a top-level value wins, as in transformers (Phi-3 style configs keep it there)
            params["original_max_position_embeddings"] = fields["original_max_position_embeddings"]
        partial = params.pop("partial_rotary_factor", fields.get("partial_rotary_factor")) or 1.0
        rotary_dim = int(head_dim * partial)
        if rotary_dim < 2 or rotary_dim % 2:
            raise ValueError(f"rotary dimension int({head_dim} × {partial}) = {rotary_dim} must "
                             f"be even and >= 2")
        window = fields.get("sliding_window")
        sliding = layer_type == "sliding_attention" and window
        variants[layer_type] = RopeVariant(
            layer_type=layer_type, num_layers=layer_types.count(layer_type), base=base,
            rope_type=rope_type, scaling=params, rotary_dim=rotary_dim,
            max_position_embeddings=max_positions,
            attention_span=min(window, max_positions) if sliding else max_positions,
        )
    return RopeSetup(model_type=fields.get("model_type"), head_dim=head_dim,
                     max_position_embeddings=max_positions, variants=variants)


def shipped_configs() -> dict[str, dict[str, Any]]:
    """The RoPE-relevant config.json fields of well-known models shipped in
    shortlab/model_configs/ (each with a "source" hub id and, where a value is uncertain or
    not in the hub file, a "note"), by file name without ".json"."""
    folder = resources.files("shortlab") / "model_configs"
    return {entry.name.removesuffix(".json"): json.loads(entry.read_text())
            for entry in sorted(folder.iterdir(), key=lambda e: e.name.removesuffix(".json"))
            if entry.name.endswith(".json")}


def _scaling_label(variant: RopeVariant) -> str:
    if variant.rope_type == "default":
        return "none"
    fields = ", ".join(f"{key}={value}" for key, value in sorted(variant.scaling.items()))
    return f"{variant.rope_type}({fields})"


@_single_threaded
def rope_report(configs: Mapping[str, Any] | None = None, *, seq_len: int | None = None,
                limit: int = DEFAULT_LIMIT, m_range: str = "closed") -> list[dict[str, Any]]:
    """One row per model and attention-layer type: name, layer_type, num_layers, base,
    head_dim, rotary_dim, scaling, bound (L_θ of the effective frequencies; equal to ``limit``
    means at least that), advertised (max_position_embeddings), span (longest distance those
    layers attend over), bound_covers_advertised, bound_covers_span. ``configs`` defaults to
    ``shipped_configs()``; ``seq_len`` is passed to dynamic-NTK scaling."""
    configs = shipped_configs() if configs is None else configs
    rows = []
    for name, config in configs.items():
        setup = rope_setup(config)
        for variant in setup.variants.values():
            bound = variant.bound_context(seq_len, limit=limit, m_range=m_range)
            rows.append({
                "name": name, "layer_type": variant.layer_type, "num_layers": variant.num_layers,
                "base": variant.base, "head_dim": setup.head_dim, "rotary_dim": variant.rotary_dim,
                "scaling": _scaling_label(variant), "bound": bound,
                "advertised": setup.max_position_embeddings, "span": variant.attention_span,
                "bound_covers_advertised": bound >= setup.max_position_embeddings,
                "bound_covers_span": bound >= variant.attention_span,
            })
    return rows
