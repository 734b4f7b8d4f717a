"""The attention math of a layer that skips tokens, as the supported models compute it: head
split with q/k norms, RoPE, attention through the model's own function (or CPU sdpa with GQA),
soft-capping and the Gemma 2/3 sandwich norms."""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from shortlab.shortv.checks import SOFTCAP_ATTENTION


def _softcap(attention: nn.Module) -> float | None:
    """The attention-logit soft-cap the model's own attention applies (Gemma 2), else None."""
    names = {cls.__name__ for cls in type(attention).__mro__}
    return attention.attn_logit_softcapping if names & set(SOFTCAP_ATTENTION) else None


def _sandwich_norms(layer: nn.Module) -> bool:
    """Whether the layer norms the attention and MLP outputs too (Gemma 2/3: the attention output
    goes through ``post_attention_layernorm`` before the residual add, and the MLP sits between
    ``pre_feedforward_layernorm`` and ``post_feedforward_layernorm``)."""
    return hasattr(layer, "pre_feedforward_layernorm")


def _heads(attention: nn.Module, projected: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
    """``[batch, tokens, heads · head_dim]`` → ``[batch, heads, tokens, head_dim]``, with the
    per-head norm (Qwen3's q_norm/k_norm) applied before the transpose, as the models do."""
    states = projected.view(*projected.shape[:2], -1, attention.head_dim)
    if norm is not None:
        states = norm(states)
    return states.transpose(1, 2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as the Llama-family ``apply_rotary_pos_emb`` computes it, for one tensor:
    x ``[batch, heads, tokens, head_dim]``, cos/sin ``[batch or 1, tokens, head_dim]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def _attend(attention: nn.Module, implementation: str, query, key, value,
            mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of ``query`` ``[batch, heads, queries, d]`` over ``key``/``value``
    ``[batch, kv_heads, keys, d]`` under ``mask`` (None: causal); returns
    ``[batch, queries, heads, d]``, as the model's attention functions do.

    On CPU, sdpa takes the key/value heads as they are (``enable_gqa``): transformers' sdpa path
    copies them ``heads / kv_heads`` times whenever a mask is given (CUDA kernels need that), and
    with the few queries of a frozen layer that copy costs as much as the attention itself.
    Attention with a logit soft-cap (Gemma 2, eager only) goes through the model's own attention
    function, which applies it.
    """
    dropout = attention.attention_dropout if attention.training else 0.0
    softcap = _softcap(attention)
    if implementation == "sdpa" and query.device.type == "cpu" and softcap is None:
        attended = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=attention.scaling,
            is_causal=mask is None and query.shape[2] > 1,
            enable_gqa=attention.num_key_value_groups > 1,
        )
        return attended.transpose(1, 2)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(
        implementation, sys.modules[type(attention).__module__].eager_attention_forward
    )
    attended, _ = attend(attention, query, key, value, mask, dropout=dropout,
                         scaling=attention.scaling, softcap=softcap)
    return attended


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[batch, kv_heads, n, d]`` → ``[batch, kv_heads · groups, n, d]`` (GQA)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)
