"""What the token-skipping engine supports (decoder layers, attention implementations) and how
it reads a ``forward`` call's arguments, by keyword or position."""

from __future__ import annotations

import functools
import inspect

from torch import nn

from shortlab.arch import ModelParts, UnsupportedArchitectureError


SUPPORTED_LAYERS = (
    "LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
    "GemmaDecoderLayer", "Gemma2DecoderLayer", "Gemma3DecoderLayer",
    # Qwen2-VL's multimodal RoPE reaches the layers already merged: the text stack's rotary
    # embedding interleaves the temporal/height/width sections (mrope_section) into one cos/sin
    # table [batch, seq, head_dim], which the attention applies like Llama's.
    "Qwen2VLDecoderLayer", "Qwen2_5_VLDecoderLayer",
)
# Attention classes that pass ``attn_logit_softcapping`` to the attention function. Gemma 3's
# keeps the attribute but, in transformers 5.23, does not pass it.
SOFTCAP_ATTENTION = ("Gemma2Attention",)
SUPPORTED_ATTENTION = ("eager", "sdpa")

PREFILL_ONLY = (
    "fastv is prefill-only here: call the model with use_cache=False (a KV cache, and so "
    "generate, is not supported: dropped tokens would leave the later layers' caches shorter)"
)


# ---------------------------------------------------------------- checks and argument access


def _check_supported(parts: ModelParts) -> None:
    for index, layer in enumerate(parts.layers):
        names = {cls.__name__ for cls in type(layer).__mro__}
        if not names & set(SUPPORTED_LAYERS):
            raise UnsupportedArchitectureError(
                f"ShortV/FastV token skipping does not support decoder layer {index} "
                f"({type(layer).__name__}) of {type(parts.model).__name__}; supported: "
                f"{', '.join(SUPPORTED_LAYERS)}"
            )
        if not getattr(getattr(layer, parts.attention_attr), "is_causal", True):
            # The engine reads "no mask" as causal; a bidirectional stack has no such default.
            raise UnsupportedArchitectureError(
                f"ShortV/FastV token skipping needs causal attention; decoder layer {index} of "
                f"{type(parts.model).__name__} attends bidirectionally "
                f"(config.use_bidirectional_attention)"
            )
    _check_attention(parts.text_config._attn_implementation)


def _check_attention(implementation: str) -> None:
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"ShortV/FastV token skipping needs attention implementation "
            f"{' or '.join(SUPPORTED_ATTENTION)} (it passes explicit 4D masks), got "
            f"{implementation!r}; use model.set_attn_implementation('sdpa')"
        )


def _image_token_id(parts: ModelParts) -> int | None:
    return getattr(parts.model.config, "image_token_id", None)


@functools.cache
def _parameter_names(cls: type) -> tuple[str, ...]:
    return tuple(list(inspect.signature(cls.forward).parameters)[1:])  # drop ``self``


def _argument(module: nn.Module, name: str, args: tuple, kwargs: dict):
    """The value of ``forward`` parameter ``name`` in a call, by keyword or position; None if
    not given."""
    if name in kwargs:
        return kwargs[name]
    names = _parameter_names(type(module))
    position = names.index(name) if name in names else None
    return args[position] if position is not None and position < len(args) else None
