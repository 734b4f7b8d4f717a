"""The RoPE of real models: read from configs, with the bound of each attention-layer type.

``rope_setup`` reads a transformers config or config.json dict (legacy rope_theta /
rope_scaling or transformers-5 rope_parameters, per-layer-type bases, partial rotary);
``shipped_configs`` loads the configs of well-known models shipped in shortlab/model_configs/;
``rope_report`` sets each model's bound L_θ beside its advertised context and attention span.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from shortlab.rope.conventions import DEFAULT_LIMIT, _check_base, _check_head_dim, _single_threaded
from shortlab.rope.scaling import SUPPORTED_ROPE_TYPES, scaled_frequencies
from shortlab.rope.scan import max_context_from_frequencies


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
