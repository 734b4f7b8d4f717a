"""The public context managers: ``freeze_visual_tokens`` (ShortV) and ``fastv`` (FastV)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from shortlab.arch import ModelParts, model_parts, validate_layer_indices
from shortlab.flops import check_fastv_k, check_fastv_ratio
from shortlab.hooks import _check_token_mask
from shortlab.shortv.checks import _check_supported, _image_token_id
from shortlab.shortv.engine import FastVRecord, _engaged, _FastVSpec, _FreezeSpec


def _resolve_mask_source(parts: ModelParts, token_mask: torch.Tensor | None, who: str):
    if token_mask is not None:
        return _check_token_mask(token_mask)
    if _image_token_id(parts) is None:
        raise ValueError(
            f"{who}: {type(parts.model).__name__}'s config has no image_token_id to find the "
            f"visual tokens by; pass token_mask (bool [batch, seq])"
        )
    return None


@contextmanager
def freeze_visual_tokens(
    model: nn.Module, layers: Iterable[int], token_mask: torch.Tensor | None = None
) -> Iterator[None]:
    """ShortV inference: in the given decoder layers, visual tokens are not updated, and their
    query, attention output, o_proj, post-attention norm and MLP compute is skipped for real.

    They still serve as keys and values (input norm, k/v projections, k_norm, RoPE are computed for
    every token, and a KV cache receives every token) and leave the layer with their input hidden
    state: the outputs equal ``hooks.keep_tokens_unchanged(model, layers, mask)``. Visual tokens
    are ``token_mask`` (bool ``[batch, seq]``, absolute positions) or, without it,
    ``input_ids == config.image_token_id`` of each top-level call (``generate`` works; decode steps
    run the layers unchanged). Layer indices may be negative; an empty selection is a no-op.
    See the module docstring for masks, batching and limitations.
    """
    parts = model_parts(model)
    _check_supported(parts)
    chosen = validate_layer_indices(parts, layers, allow_empty=True)
    token_mask = _resolve_mask_source(parts, token_mask, "freeze_visual_tokens")
    if not chosen:
        yield
        return
    with _engaged(model, "freeze", _FreezeSpec(frozenset(chosen), token_mask)):
        yield


@contextmanager
def fastv(
    model: nn.Module, k: int, ratio: float, token_mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
) -> Iterator[FastVRecord]:
    """FastV: from decoder layer ``k`` on, the ``ratio`` share of visual tokens (``ratio · v``
    rounded half up, per sequence) that received the least attention from the last token in layer
    ``k − 1`` (softmax row averaged over heads) are left out: no query, key or value for them.

    The last token is each row's last non-padding token (custom 4D masks: the last row attending
    to more than itself); ``query_mask`` (bool ``[batch, seq]``) names other query rows, whose
    head-averaged attention is averaged (e.g. each question's last token in a packed sequence). Outputs at kept positions come back at their original positions; a
    dropped position keeps the hidden state it entered layer ``k`` with. Prefill only: call with
    ``use_cache=False`` (a KV cache or ``generate`` raises ``ValueError``). ``1 ≤ k < num_layers``,
    ``0 ≤ ratio ≤ 1``; ratio 0 is the plain model. Visual tokens as in ``freeze_visual_tokens``;
    the two nest (frozen layers then freeze the kept visual tokens). Yields a ``FastVRecord`` of the
    latest forward pass's decision.
    """
    parts = model_parts(model)
    _check_supported(parts)
    k = check_fastv_k(parts.num_layers, k)
    ratio = check_fastv_ratio(ratio)
    token_mask = _resolve_mask_source(parts, token_mask, "fastv")
    if query_mask is not None:
        query_mask = _check_token_mask(query_mask)
    record = FastVRecord(k=k, ratio=ratio)
    with _engaged(model, "fastv", _FastVSpec(k, ratio, token_mask, query_mask, record)):
        yield record
