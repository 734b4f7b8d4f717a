"""Bounds on the base: base_L, the smallest base that keeps B(m) ≥ 0 up to context L.

Neither B(m) in m nor validity in b is monotone: the bases that satisfy the criterion form
islands, so base_L is found by scanning a log grid of bases and refining island edges, never by
bisection over the whole range (``min_base``; ``naive_min_base`` is its slow reference,
``bound_table`` one row per context beside the paper's published values).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from shortlab.references import paper_numbers
from shortlab.rope.bias import rope_bias, rope_frequencies
from shortlab.rope.conventions import (
    _check_base, _check_head_dim, _check_m_range, _scan_stop, _single_threaded, context_length,
)
from shortlab.rope.scan import _first_negative_exact, _has_negative, check_base

# The paper's published lower bounds on the base for d = 128 (context label -> base), kept with
# their source in shortlab/references/rope_base.json.
_PUBLISHED = paper_numbers("rope_base")["published_lower_bounds"]
if _PUBLISHED["head_dim"] != 128:
    raise ValueError(f"rope_base.json: published_lower_bounds must be for head_dim 128, got {_PUBLISHED['head_dim']}")
PAPER_BOUNDS_D128 = {label: float(base) for label, base in _PUBLISHED["bounds"].items()}
PAPER_CONTEXTS = tuple(PAPER_BOUNDS_D128)

_BASE_CEILING = 1e30  # min_base gives up above this base when no base_max is given


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
