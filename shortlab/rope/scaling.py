"""Scaled RoPE: the effective frequencies of transformers' rope_scaling types, in float64.

``scaled_frequencies`` reproduces transformers' ROPE_INIT_FUNCTIONS for "default", "linear",
"dynamic" (``dynamic_ntk_base``), "yarn" and "llama3"; feed the result to
``shortlab.rope.scan.max_context_from_frequencies``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from shortlab.rope.bias import rope_frequencies

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


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
