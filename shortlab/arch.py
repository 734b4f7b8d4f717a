"""One adapter over the decoder-only architectures shortlab supports.

``model_parts(model)`` finds, for a causal LM or a LLaVA-style wrapper, the decoder stack, its
``nn.ModuleList`` of layers, the token embeddings, the final norm, the LM head, the text config the
stack reads, each layer's attention module and KV-cache index, and (LLaVA wrappers) the vision
tower and the multimodal projector. Everything else in shortlab
reaches module internals through it, so supporting a new architecture means adding one registry
entry here.

Dispatch is by class name, walking the model's MRO, not by ``config.model_type``: the module layout
is a property of the class, and one ``model_type`` covers classes with different layouts
(``LlamaModel`` and ``LlamaForCausalLM`` are both "llama"; a Gemma 3 text model is "gemma3_text"
inside a "gemma3" multimodal wrapper). Walking the MRO keeps user subclasses working, and matching
names rather than classes avoids importing every model module. Wrappers and decoder stacks are
registered separately, so a LLaVA (or LLaVA-NeXT) wrapper around any supported stack (Llama,
Mistral, Qwen2...) works without a new entry.

Supported: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 and Phi-3 causal LMs, GPT-2, and
the multimodal LLaVA, LLaVA-NeXT, Gemma 3, Qwen2-VL and Qwen2.5-VL wrappers.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedArchitectureError(ValueError):
    """The model (or its decoder stack) has no entry in shortlab's architecture registry."""


@dataclass(frozen=True)
class StackSpec:
    """Where the parts of a decoder stack live, as dotted paths relative to the stack module."""

    family: str
    layers: str
    embed_tokens: str
    final_norm: str
    attention: str  # relative to one decoder layer
    # Attributes (relative to one decoder layer) holding the layer's own index. The first is the
    # attention's, which indexes the KV cache; the others must follow it when layers are renumbered.
    kv_index_attrs: tuple[str, ...]


@dataclass(frozen=True)
class WrapperSpec:
    """Where a top-level model keeps its decoder stack and LM head (dotted paths), and for
    LLaVA-style wrappers its vision tower (called with ``pixel_values`` and
    ``output_hidden_states=True``, features picked by ``config.vision_feature_layer`` and
    ``config.vision_feature_select_strategy``) and the projector mapping those features to the
    decoder width."""

    family: str
    decoder: str
    lm_head: str
    vision_tower: str | None = None
    projector: str | None = None


def _llama_like(family: str, *extra_index_attrs: str) -> StackSpec:
    return StackSpec(
        family=family, layers="layers", embed_tokens="embed_tokens", final_norm="norm",
        attention="self_attn", kv_index_attrs=("self_attn.layer_idx", *extra_index_attrs),
    )


STACKS: dict[str, StackSpec] = {
    "LlamaModel": _llama_like("llama"),
    "MistralModel": _llama_like("mistral"),
    "Qwen2Model": _llama_like("qwen2"),
    "Qwen3Model": _llama_like("qwen3"),
    "GemmaModel": _llama_like("gemma"),
    "Gemma2Model": _llama_like("gemma2"),
    # Gemma 3 decoder layers keep their own copy of the index next to the attention's.
    "Gemma3TextModel": _llama_like("gemma3", "layer_idx"),
    "Phi3Model": _llama_like("phi3"),
    # The text stacks of Qwen2-VL / Qwen2.5-VL (multimodal RoPE, computed by the stack).
    "Qwen2VLTextModel": _llama_like("qwen2_vl"),
    "Qwen2_5_VLTextModel": _llama_like("qwen2_5_vl"),
    # GPT-2 blocks built with add_cross_attention carry a second attention indexed the same way.
    "GPT2Model": StackSpec(
        family="gpt2", layers="h", embed_tokens="wte", final_norm="ln_f", attention="attn",
        kv_index_attrs=("attn.layer_idx", "crossattention.layer_idx"),
    ),
}

WRAPPERS: dict[str, WrapperSpec] = {
    **{
        name: WrapperSpec(family=family, decoder="model", lm_head="lm_head")
        for name, family in (
            ("LlamaForCausalLM", "llama"),
            ("MistralForCausalLM", "mistral"),
            ("Qwen2ForCausalLM", "qwen2"),
            ("Qwen3ForCausalLM", "qwen3"),
            ("GemmaForCausalLM", "gemma"),
            ("Gemma2ForCausalLM", "gemma2"),
            ("Gemma3ForCausalLM", "gemma3"),
            ("Phi3ForCausalLM", "phi3"),
        )
    },
    "GPT2LMHeadModel": WrapperSpec(family="gpt2", decoder="transformer", lm_head="lm_head"),
    # Multimodal wrappers: the stack's config is the wrapper's ``config.text_config``.
    "LlavaForConditionalGeneration": WrapperSpec(
        family="llava", decoder="model.language_model", lm_head="lm_head",
        vision_tower="model.vision_tower", projector="model.multi_modal_projector",
    ),
    "LlavaNextForConditionalGeneration": WrapperSpec(
        family="llava_next", decoder="model.language_model", lm_head="lm_head",
        vision_tower="model.vision_tower", projector="model.multi_modal_projector",
    ),
    "Qwen2VLForConditionalGeneration": WrapperSpec(
        family="qwen2_vl", decoder="model.language_model", lm_head="lm_head"
    ),
    "Qwen2_5_VLForConditionalGeneration": WrapperSpec(
        family="qwen2_5_vl", decoder="model.language_model", lm_head="lm_head"
    ),
    "Gemma3ForConditionalGeneration": WrapperSpec(
        family="gemma3", decoder="model.language_model", lm_head="lm_head"
    ),
}

# Config attributes holding one entry per decoder layer; removing layer i must remove entry i.
# (Checked against every list-valued attribute of the supported configs in tests/test_arch.py.)
PER_LAYER_CONFIG_FIELDS: tuple[str, ...] = ("layer_types",)


def supported_architectures() -> list[str]:
    """The model class names ``model_parts`` accepts (subclasses of these work too)."""
    return sorted(WRAPPERS)


def _lookup(cls: type, registry: dict, what: str):
    for base in cls.__mro__:
        if base.__name__ in registry:
            return registry[base.__name__]
    raise UnsupportedArchitectureError(
        f"unsupported {what} {cls.__name__}; supported: {', '.join(sorted(registry))}"
    )


def _get_path(root: nn.Module, path: str):
    obj = root
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def _index_owner(layer: nn.Module, dotted: str) -> tuple[object | None, str]:
    """``(module holding the attribute, attribute name)``; the module is None where it is absent."""
    owner_path, _, attr = dotted.rpartition(".")
    owner = layer
    for name in filter(None, owner_path.split(".")):
        owner = getattr(owner, name, None)
    return (owner if owner is not None and hasattr(owner, attr) else None), attr


@dataclass(frozen=True, eq=False, repr=False)
class ModelParts:
    """The pieces of a decoder-only model that layer-level analyses need.

    A snapshot: after structural edits (replacing ``layers``, removing layers) call
    ``model_parts`` again. Hidden states flowing between ``layers`` are ``[batch, seq, hidden]``.

    Removing layers in transformers 5.23 takes three things besides shortening ``layers``:
    ``text_config.num_hidden_layers`` must follow (Llama-style stacks run
    ``layers[:num_hidden_layers]``); the kept layers must be renumbered 0..n-1 with
    ``set_kv_cache_index`` (attention indexes the cache by ``layer_idx``, and
    ``DynamicCache(config=...)`` creates one slot per layer); and every field in
    ``per_layer_config_fields`` must drop the removed entries (the cache takes each slot's
    sliding/full type from ``layer_types``, and configs refuse to load when its length differs
    from ``num_hidden_layers``).
    """

    model: nn.Module
    family: str  # the wrapper's family: "llama", "gpt2", "llava", ...
    text_family: str  # the decoder stack's family ("llama" for a LLaVA-1.5)
    decoder: nn.Module  # the stack that runs embeddings -> layers -> final norm
    decoder_path: str
    layers: nn.ModuleList
    layers_path: str  # dotted path from ``model``, e.g. "model.layers" or "transformer.h"
    embed_tokens: nn.Module
    final_norm: nn.Module
    lm_head: nn.Module
    text_config: object  # the config object the stack reads (``decoder.config``)
    attention_attr: str  # attribute of each layer holding its attention module
    kv_index_attrs: tuple[str, ...]
    per_layer_config_fields: tuple[str, ...]  # present on ``text_config``, one entry per layer
    # LLaVA-style wrappers only (None elsewhere): see ``WrapperSpec``.
    vision_tower: nn.Module | None = None
    projector: nn.Module | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:  # the default would print every module in full
        return (
            f"ModelParts({type(self.model).__name__}: family={self.family!r}, "
            f"text_family={self.text_family!r}, layers={self.layers_path!r} x{self.num_layers}, "
            f"per_layer_config_fields={self.per_layer_config_fields})"
        )

    def layer(self, layer: int | nn.Module) -> nn.Module:
        """The decoder layer at an index (negative counts from the end), or ``layer`` itself."""
        if isinstance(layer, nn.Module):
            return layer
        (index,) = validate_layer_indices(self.num_layers, [layer])
        return self.layers[index]

    def attention(self, layer: int | nn.Module) -> nn.Module:
        """The self-attention module of a decoder layer (index or module)."""
        return getattr(self.layer(layer), self.attention_attr)

    def kv_cache_index(self, layer: int | nn.Module) -> int:
        """The index a layer's attention reads and writes in the KV cache (``layer_idx``)."""
        owner, attr = _index_owner(self.layer(layer), self.kv_index_attrs[0])
        return getattr(owner, attr)

    def set_kv_cache_index(self, layer: int | nn.Module, index: int) -> None:
        """Renumber a layer: set its attention's cache index and every copy of it in the layer."""
        module = self.layer(layer)
        index = operator.index(index)
        for dotted in self.kv_index_attrs:
            owner, attr = _index_owner(module, dotted)
            if owner is not None:
                setattr(owner, attr, index)


def model_parts(model: nn.Module) -> ModelParts:
    """Locate the decoder stack and its parts in a supported model.

    Raises ``UnsupportedArchitectureError`` naming the model (or stack) class and listing the
    supported ones.
    """
    wrapper = _lookup(type(model), WRAPPERS, "model architecture")
    decoder = _get_path(model, wrapper.decoder)
    stack = _lookup(type(decoder), STACKS, f"decoder stack inside {type(model).__name__}:")
    layers = _get_path(decoder, stack.layers)
    text_config = decoder.config
    for i, layer in enumerate(layers):
        if _index_owner(layer, stack.kv_index_attrs[0])[0] is None:
            raise UnsupportedArchitectureError(
                f"layer {i} ({type(layer).__name__}) of {type(model).__name__} has no "
                f"{stack.kv_index_attrs[0]}; the registry entry for {type(decoder).__name__} "
                f"does not match this transformers version"
            )
    return ModelParts(
        model=model,
        family=wrapper.family,
        text_family=stack.family,
        decoder=decoder,
        decoder_path=wrapper.decoder,
        layers=layers,
        layers_path=f"{wrapper.decoder}.{stack.layers}",
        embed_tokens=_get_path(decoder, stack.embed_tokens),
        final_norm=_get_path(decoder, stack.final_norm),
        lm_head=_get_path(model, wrapper.lm_head),
        text_config=text_config,
        attention_attr=stack.attention,
        kv_index_attrs=stack.kv_index_attrs,
        per_layer_config_fields=tuple(
            field for field in PER_LAYER_CONFIG_FIELDS
            if getattr(text_config, field, None) is not None
        ),
        vision_tower=None if wrapper.vision_tower is None else _get_path(model, wrapper.vision_tower),
        projector=None if wrapper.projector is None else _get_path(model, wrapper.projector),
    )


def validate_layer_indices(
    parts_or_num_layers: ModelParts | int,
    indices: Iterable[int],
    allow_empty: bool = False,
) -> list[int]:
    """Check layer indices and return them normalised (negatives resolved) and sorted.

    Raises ``TypeError`` for a non-iterable or a non-integer index (bools included, since ``True``
    would silently mean layer 1), ``IndexError`` for an index out of range, and ``ValueError`` for
    a duplicate (also after normalising, e.g. ``-1`` and ``n - 1``) or for an empty selection
    unless ``allow_empty``.
    """
    num_layers = (
        parts_or_num_layers.num_layers
        if isinstance(parts_or_num_layers, ModelParts)
        else operator.index(parts_or_num_layers)
    )
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
        raise TypeError(
            f"layer indices must be an iterable of ints, got {type(indices).__name__} {indices!r}"
        )
    normalised: dict[int, object] = {}
    for raw in indices:
        if isinstance(raw, bool):
            raise TypeError(f"layer index {raw!r} is a bool, not an int")
        try:
            index = operator.index(raw)
        except TypeError:
            raise TypeError(
                f"layer index {raw!r} is a {type(raw).__name__}, not an int"
            ) from None
        if not -num_layers <= index < num_layers:
            raise IndexError(
                f"layer index {index} is out of range for a model with {num_layers} layers "
                f"(valid: 0..{num_layers - 1}, or -{num_layers}..-1 from the end)"
            )
        resolved = index % num_layers
        if resolved in normalised:
            raise ValueError(
                f"duplicate layer index {resolved} (given as {normalised[resolved]!r} and {raw!r})"
            )
        normalised[resolved] = raw
    if not normalised and not allow_empty:
        raise ValueError("no layer indices given; select at least one layer")
    return sorted(normalised)


def supports_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward can compute the LM head on the last positions only."""
    return "logits_to_keep" in inspect.signature(type(model).forward).parameters


def forward_for_hidden_states(model: nn.Module, batch: Mapping[str, torch.Tensor]):
    """Run the model for what its decoder layers compute: no KV cache, and the LM head on the last
    position only where the model allows it (full-sequence logits are a large share of a small
    model's compute and memory, and hidden-state metrics never read them)."""
    extra = {"logits_to_keep": 1} if supports_logits_to_keep(model) else {}
    return model(**batch, use_cache=False, **extra)
