"""Conventions shared by the RoPE modules, and the checks that enforce them.

* ``m_range="closed"`` checks m in [0, L] (the paper's definition); ``"half_open"`` checks
  [0, L − 1], the distances that actually occur among L tokens;
* ``k`` is what "K" means in a context label: ``context_length("32K", k=1024) == 32768``;
* ``layout`` names which two head dimensions one frequency rotates (see
  ``shortlab.rope.bias.pair_weights``).

Also ``_single_threaded``, which every public entry point that runs a scan wears.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

M_RANGES = ("closed", "half_open")
LAYOUTS = ("interleaved", "half")
CONTEXT_K = (1000, 1024)

DEFAULT_LIMIT = 2**24  # longest context any scan looks at unless told otherwise (~16.8M)
DEFAULT_CHUNK = 8192  # positions per block in exact evaluations: chunk × d/2 float64 in memory


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
