"""ShortV inference (visual tokens frozen in chosen layers) and the FastV baseline, both skipping
real compute.

* ``freeze_visual_tokens(model, layers, token_mask=None)`` — ShortV (Yuan et al., 2025): in each
  chosen decoder layer the visual tokens are not queries. Their input norm and k/v projections
  (with k_norm and RoPE) are still computed, so every token serves as a key and value and the KV
  cache receives every token; only the other tokens go through q, attention, o, the
  post-attention norm and the MLP, and the visual tokens leave the layer with their input hidden
  state. This computes what ``hooks.keep_tokens_unchanged`` (the zeroed-update reference) does,
  without computing what it then throws away.
* ``fastv(model, k, ratio, token_mask=None, query_mask=None)`` — FastV (Chen et al., 2024): in
  layer ``k − 1`` the visual tokens are ranked by the attention the last token (or the mean of the
  ``query_mask`` rows) pays them (softmax row of that layer, averaged over heads), and the ``ratio`` share with the least attention (``ratio · v`` rounded
  half up, per sequence) leave the computation of layers ``≥ k``: they are neither keys nor
  queries there (their hidden states, RoPE tables and mask rows/columns are gathered away).
  FastV's public code does the same (at layer K = ``fast_v_agg_layer`` it ranks the image
  tokens by the head-averaged attention weights layer K − 1 returned, read at the last position).

Both run through one engine per model that patches every decoder layer's ``forward`` (on the
instance, restored exactly on exit). In each forward pass a patched layer gets a plan: the *key*
tokens (all tokens, or FastV's kept tokens from layer ``k`` on) and the *query* tokens among them
(all keys, or the keys that are not frozen). Layers with nothing to skip, and calls where nothing
is frozen (e.g. ``generate``'s decode steps, which carry no visual tokens), run the layer's own
forward unchanged. The two context managers compose: ShortV + FastV freezes the kept visual
tokens in frozen layers from ``k`` on.

Which tokens are visual: ``token_mask`` (bool ``[batch, seq]``, absolute positions as in
``keep_tokens_unchanged``: a forward over positions ``past .. past + seq − 1`` uses that window,
positions beyond the mask are not visual) if given; otherwise, at every top-level forward,
``input_ids == config.image_token_id`` of that call, so ``model.generate(**processor_inputs)``
works as is. A call without ``input_ids`` (``inputs_embeds`` only, e.g. packed evaluation through
the decoder stack) needs ``token_mask``.

Batched rows may differ in their number of frozen or dropped tokens: gathered queries and keys are
padded per row (a padded slot repeats a real one and is never written back; padded keys are
masked). Attention masks: none (causal), the 4D masks transformers builds from a 2D padding mask,
and custom 4D additive or boolean masks (e.g. ``llava_mini.packed_batch``): the engine slices the
rows of the kept queries and the columns of the kept keys.

Supported: Llama, Mistral, Qwen2, Qwen3 (q/k norms), Gemma, Gemma 2 (post-attention and pre/post
feed-forward norms, attention-logit soft-capping, query_pre_attn_scalar, sliding-window layers) and
Gemma 3 (also q/k norms and local/global RoPE tables) decoder layers, alone or inside a LLaVA,
LLaVA-NeXT or Gemma 3 multimodal wrapper, and the Qwen2-VL / Qwen2.5-VL text stacks (their
multimodal RoPE reaches the layers as one merged cos/sin table), with the ``eager`` or ``sdpa``
attention implementation (Gemma 2 is eager-only in transformers); anything else, and stacks with
bidirectional attention, raise ``arch.UnsupportedArchitectureError`` naming the class.

Limitations: FastV is prefill-only (call with ``use_cache=False``; a KV cache or ``generate``
raises, because the dropped tokens would leave later layers' caches shorter than the others); a
layer that skips tokens computes its attention itself, without calling its attention module's
``forward``, so hooks on ``self_attn`` and ``output_attentions`` miss it (hooks on the decoder
layers and their linear submodules see it); FastV's dropped positions keep, from layer ``k``
on, the hidden state they entered layer ``k`` with, so the final hidden states there are not
meaningful.
"""

from __future__ import annotations

import functools
import inspect
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .arch import ModelParts, UnsupportedArchitectureError, model_parts, validate_layer_indices
from .flops import check_fastv_k, check_fastv_ratio
from .hooks import _check_token_mask, _hidden_in, _mask_window, _patched_forward

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


# ---------------------------------------------------------------- gathering tokens


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j], ...]``: x ``[batch or 1, n, ...]``, index ``[batch, width]`` →
    ``[batch, width, ...]``."""
    x = x.expand(index.shape[0], *x.shape[1:])
    trailing = x.shape[2:]
    index = index.view(*index.shape, *(1,) * len(trailing)).expand(*index.shape, *trailing)
    return x.gather(1, index)


@dataclass(frozen=True)
class _TokenSet:
    """Selected positions of each row, ascending, padded to one width.

    ``index`` ``[batch, width]``; a row with fewer positions repeats its last one (position 0 in an
    empty row), so a padded slot computes a copy of a real slot and never has an empty attention
    row. ``valid`` ``[batch, width]`` is False at padded slots, None when no row is padded.
    """

    index: torch.Tensor
    valid: torch.Tensor | None

    @classmethod
    def where(cls, selected: torch.Tensor) -> _TokenSet:
        """The True positions of ``selected`` (bool ``[batch, n]``)."""
        counts = selected.sum(dim=1)
        width = int(counts.max()) if selected.numel() else 0
        # A stable sort puts each row's selected positions first, in their original order.
        order = torch.argsort((~selected).to(torch.uint8), dim=1, stable=True)[:, :width]
        if bool((counts == width).all()):
            return cls(order, None)
        valid = torch.arange(width, device=selected.device) < counts[:, None]
        last = order.gather(1, (counts - 1).clamp(min=0)[:, None])
        last = torch.where(counts[:, None] > 0, last, torch.zeros_like(last))
        return cls(torch.where(valid, order, last), valid)


# ---------------------------------------------------------------- per-layer plans


class _Plan:
    """What one patched layer computes in one forward pass: the key tokens (``keys``, positions
    in the call; None = all) and the query tokens among them (``queries``, indices into the key
    set; None = all keys), their RoPE tables, and how updated queries go back into place.

    Shared by every layer with the same role in a forward pass, so masks and tables are gathered
    once per pass, not once per layer.
    """

    def __init__(self, keys: _TokenSet | None, queries: _TokenSet | None, length: int,
                 cos: torch.Tensor, sin: torch.Tensor):
        self.keys, self.queries, self.length = keys, queries, length
        if queries is not None:
            self.positions = queries.index if keys is None else keys.index.gather(1, queries.index)
            self.valid = queries.valid
        elif keys is not None:
            self.positions, self.valid = keys.index, keys.valid
        else:
            self.positions, self.valid = None, None  # every token is a query: nothing to gather
        if self.positions is None:
            self.cos_q, self.sin_q = cos, sin
        else:
            self.cos_q, self.sin_q = _take(cos, self.positions), _take(sin, self.positions)
        if keys is None:
            self.cos_k, self.sin_k = cos, sin
        else:
            self.cos_k, self.sin_k = _take(cos, keys.index), _take(sin, keys.index)
        if self.valid is not None:
            # Write back real slots only: a padded slot repeats a real position.
            self._rows, self._slots = self.valid.nonzero(as_tuple=True)
            self._targets = self.positions[self._rows, self._slots]
        self._masks: dict[tuple, torch.Tensor | None] = {}

    @property
    def num_queries(self) -> int:
        return self.length if self.positions is None else self.positions.shape[1]

    def attention_mask(self, mask: torch.Tensor | None, kv_length: int, batch: int,
                       eager: bool) -> torch.Tensor | None:
        """The layer's mask ``[batch or 1, 1, seq, kv]`` (or None = causal) cut to the plan's
        queries (rows) and keys (columns): ``[batch, 1, queries, keys]``."""
        key = (id(mask), kv_length)
        if key not in self._masks:
            self._masks[key] = self._cut_mask(mask, kv_length, batch, eager)
        return self._masks[key]

    def _cut_mask(self, mask, kv_length, batch, eager):
        if self.positions is None and self.keys is None:
            return mask
        device = self.cos_q.device
        queries = (
            torch.arange(self.length, device=device).expand(batch, -1)
            if self.positions is None else self.positions
        )
        if mask is None:
            # Causal: keys at or before each query, in cache coordinates (the cache holds
            # kv_length - length earlier tokens).
            if self.keys is None:
                keys = torch.arange(kv_length, device=device).expand(batch, -1)
                queries = queries + (kv_length - self.length)
            else:
                keys = self.keys.index
            allowed = keys[:, None, :] <= queries[:, :, None]
            if self.keys is not None and self.keys.valid is not None:
                allowed = allowed & self.keys.valid[:, None, :]
            allowed = allowed[:, None]
            if not eager:
                return allowed
            dtype = self.cos_q.dtype
            return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        mask = mask.expand(batch, *mask.shape[1:])
        if self.positions is not None:
            rows = queries[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3])
            mask = mask.gather(2, rows)
        if self.keys is not None:
            mask = mask.gather(
                3, self.keys.index[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1)
            )
            if self.keys.valid is not None:
                padded = ~self.keys.valid[:, None, None, :]
                mask = (mask & ~padded) if mask.dtype == torch.bool else mask.masked_fill(
                    padded, torch.finfo(mask.dtype).min
                )
        return mask

    def scatter(self, hidden: torch.Tensor, updated: torch.Tensor) -> torch.Tensor:
        """The layer output: ``hidden`` ``[batch, seq, hidden]`` with the queries' rows replaced
        by ``updated`` ``[batch, queries, hidden]``; every other token keeps its input."""
        if self.positions is None:
            return updated
        # A copy, not in place: the input may be held by hooks or by the caller.
        out = hidden.clone()
        if self.valid is None:
            out.scatter_(1, self.positions[..., None].expand(-1, -1, hidden.shape[-1]), updated)
        else:
            out[self._rows, self._targets] = updated[self._rows, self._slots]
        return out


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


# ---------------------------------------------------------------- the engine


@dataclass(frozen=True)
class _FreezeSpec:
    layers: frozenset[int]
    token_mask: torch.Tensor | None


@dataclass
class FastVRecord:
    """What ``fastv`` decided in the latest forward pass.

    ``dropped``: bool ``[batch, seq]``, the visual tokens left out of layers ``≥ k``; ``scores``:
    ``[batch, seq]`` float32, the attention the query rows paid each token in layer ``k − 1``,
    averaged over heads (and over the query rows); ``queries``: bool ``[batch, seq]``, those query
    rows. All None until a forward pass scored tokens (and after one where nothing was to be
    dropped, ``dropped`` is all False).
    """

    k: int
    ratio: float
    dropped: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    queries: torch.Tensor | None = None


@dataclass(frozen=True)
class _FastVSpec:
    k: int
    ratio: float
    token_mask: torch.Tensor | None
    query_mask: torch.Tensor | None
    record: FastVRecord


@dataclass
class _Call:
    """State of one forward pass through the decoder stack."""

    ids_mask: torch.Tensor | None  # input_ids == image token of this call, [batch, seq]
    padding: torch.Tensor | None  # the 2D attention mask the stack received, [batch, past + seq]
    windows: dict = field(default_factory=dict)
    plans: dict = field(default_factory=dict)
    scored: bool = False  # FastV's layer k - 1 ran
    fastv_visual: torch.Tensor | None = None  # FastV's visual tokens of this call, [batch, seq]
    fastv_drop: torch.Tensor | None = None  # how many of them each row drops, [batch]
    kept: _TokenSet | None = None  # FastV's kept tokens (None: nothing dropped)


class _Engine:
    """The patches that ``freeze_visual_tokens`` and ``fastv`` share on one model: every decoder
    layer's forward, a pre-hook on the top-level model (to read ``input_ids``) and hooks on the
    decoder stack (to start and end a forward pass)."""

    def __init__(self, model: nn.Module):
        parts = model_parts(model)
        _check_supported(parts)
        self.parts = parts
        self.image_token_id = _image_token_id(parts)
        self.freeze: _FreezeSpec | None = None
        self.fastv: _FastVSpec | None = None
        self.call: _Call | None = None
        self._pending_ids_mask: torch.Tensor | None = None
        with ExitStack() as stack:
            for index, layer in enumerate(parts.layers):
                forward = self._layer_forward(index, layer, layer.forward)
                stack.enter_context(_patched_forward(layer, forward))
            for module, pre, post in (
                (parts.model, self._model_pre_hook, self._model_post_hook),
                (parts.decoder, self._stack_pre_hook, self._stack_post_hook),
            ):
                stack.callback(module.register_forward_pre_hook(pre, with_kwargs=True).remove)
                # always_call: a forward that raises must not leave its state to the next one.
                stack.callback(module.register_forward_hook(post, always_call=True).remove)
            self._undo = stack.pop_all()

    def close(self) -> None:
        self._undo.close()

    @property
    def idle(self) -> bool:
        return self.freeze is None and self.fastv is None

    # -- forward-pass state

    def _ids_mask(self, ids) -> torch.Tensor | None:
        if ids is None or self.image_token_id is None:
            return None
        return ids == self.image_token_id

    def _model_pre_hook(self, module, args, kwargs):
        self._pending_ids_mask = self._ids_mask(_argument(module, "input_ids", args, kwargs))

    def _model_post_hook(self, module, args, output):
        self._pending_ids_mask = None

    def _stack_pre_hook(self, module, args, kwargs):
        ids_mask = self._pending_ids_mask  # the top-level call's, when the stack runs inside it
        self._pending_ids_mask = None
        if ids_mask is None:
            ids_mask = self._ids_mask(_argument(module, "input_ids", args, kwargs))
        padding = _argument(module, "attention_mask", args, kwargs)
        if not (isinstance(padding, torch.Tensor) and padding.dim() == 2):
            padding = None
        self.call = _Call(ids_mask=ids_mask, padding=padding)

    def _stack_post_hook(self, module, args, output):
        self.call = None

    def _window(self, call: _Call, token_mask, hidden, past, has_cache, index) -> torch.Tensor:
        """Which tokens of this call are visual, ``[batch, seq]``, from ``token_mask`` or the
        call's ``input_ids``."""
        key = (id(token_mask), past)
        if key not in call.windows:
            if token_mask is not None:
                window = _mask_window(token_mask, hidden, past, has_cache, index)
            elif call.ids_mask is None:
                raise ValueError(
                    "no token_mask was given and this forward pass has no input_ids to find the "
                    "image tokens in (called with inputs_embeds?); pass token_mask"
                )
            elif call.ids_mask.shape != hidden.shape[:2]:
                raise ValueError(
                    f"the image-token mask from input_ids {tuple(call.ids_mask.shape)} does not "
                    f"match the hidden states {tuple(hidden.shape[:2])} entering layer {index}"
                )
            else:
                window = call.ids_mask.to(hidden.device)
            call.windows[key] = window
        return call.windows[key]

    # -- the patched layer

    def _layer_forward(self, index: int, layer: nn.Module, original: Callable) -> Callable:
        kv_index = self.parts.kv_cache_index(index)

        def forward(*args, **kwargs):
            call, freeze, fastv = self.call, self.freeze, self.fastv
            frozen_here = call is not None and freeze is not None and index in freeze.layers
            scoring = call is not None and fastv is not None and index == fastv.k - 1
            dropping = call is not None and fastv is not None and index >= fastv.k
            if not (frozen_here or scoring or dropping):
                return original(*args, **kwargs)
            hidden = _hidden_in(args, kwargs)
            cache = _argument(layer, "past_key_values", args, kwargs)
            if (scoring or dropping) and cache is not None:
                raise ValueError(PREFILL_ONLY)
            past = 0 if cache is None else cache.get_query_offset(kv_index)
            frozen = None
            if frozen_here:
                frozen = self._window(
                    call, freeze.token_mask, hidden, past, cache is not None, index
                )
                if not bool(frozen.any()):
                    frozen = None
            if dropping and not call.scored:
                raise RuntimeError(
                    f"FastV scores tokens in layer {fastv.k - 1}, which did not run through the "
                    f"FastV engine in this forward pass (is another patch replacing it?)"
                )
            kept = call.kept if dropping else None
            score = scoring and self._needs_scoring(call, fastv, hidden, index)
            if frozen is None and kept is None and not score:
                return original(*args, **kwargs)
            position_embeddings = _argument(layer, "position_embeddings", args, kwargs)
            if position_embeddings is None:
                raise ValueError(f"decoder layer {index} was called without position_embeddings")
            plan_key = (frozen is not None, kept is not None, past, id(position_embeddings[0]))
            if plan_key not in call.plans:
                call.plans[plan_key] = self._plan(frozen, kept, hidden, position_embeddings)
            return self._run(
                call, layer, hidden, _argument(layer, "attention_mask", args, kwargs),
                position_embeddings, cache, call.plans[plan_key], score,
            )

        return forward

    def _needs_scoring(self, call: _Call, fastv: _FastVSpec, hidden, index) -> bool:
        """Layer ``k − 1`` of a pass: decide whether any visual token is to be dropped; if none
        is, layers ``≥ k`` run unchanged."""
        call.scored = True
        visual = self._window(call, fastv.token_mask, hidden, 0, False, index)
        call.fastv_drop = torch.floor(visual.sum(dim=1).double() * fastv.ratio + 0.5).long()
        call.fastv_visual = visual
        if bool((call.fastv_drop > 0).any()):
            return True
        record = fastv.record
        record.dropped, record.scores, record.queries = torch.zeros_like(visual), None, None
        return False

    @staticmethod
    def _plan(frozen, kept: _TokenSet | None, hidden, position_embeddings) -> _Plan:
        cos, sin = position_embeddings
        queries = None
        if frozen is not None:
            active = ~frozen if kept is None else ~_take(frozen, kept.index)
            if kept is not None and kept.valid is not None:
                active = active & kept.valid
            queries = _TokenSet.where(active)
        return _Plan(kept, queries, hidden.shape[1], cos, sin)

    def _run(self, call: _Call, layer, hidden, attention_mask, position_embeddings, cache,
             plan: _Plan, score: bool) -> torch.Tensor:
        """The layer on the plan's tokens: ``hidden`` ``[batch, seq, hidden]`` in and out."""
        attention = layer.self_attn
        implementation = attention.config._attn_implementation
        _check_attention(implementation)
        batch = hidden.shape[0]

        keys_in = hidden if plan.keys is None else _take(hidden, plan.keys.index)
        normed = layer.input_layernorm(keys_in)
        key_states = _rope(
            _heads(attention, attention.k_proj(normed), getattr(attention, "k_norm", None)),
            plan.cos_k, plan.sin_k,
        )
        value_states = _heads(attention, attention.v_proj(normed), None)
        if cache is not None:  # every token's keys and values, frozen ones included
            key_states, value_states = cache.update(key_states, value_states, attention.layer_idx)
        if score:
            self._score(call, attention, normed, key_states, attention_mask, position_embeddings)
        if plan.num_queries == 0:  # every token frozen: only the cache needed this layer
            return hidden

        if plan.queries is None:
            query_in, residual = normed, keys_in
        else:
            query_in = _take(normed, plan.queries.index)
            residual = _take(keys_in, plan.queries.index)
        query_states = _rope(
            _heads(attention, attention.q_proj(query_in), getattr(attention, "q_norm", None)),
            plan.cos_q, plan.sin_q,
        )
        mask = plan.attention_mask(
            attention_mask, key_states.shape[2], batch, eager=implementation == "eager"
        )
        attended = _attend(attention, implementation, query_states, key_states, value_states, mask)
        attended = attention.o_proj(attended.reshape(*query_in.shape[:2], -1))
        if _sandwich_norms(layer):
            updated = residual + layer.post_attention_layernorm(attended)
            updated = updated + layer.post_feedforward_layernorm(
                layer.mlp(layer.pre_feedforward_layernorm(updated))
            )
        else:
            updated = residual + attended
            updated = updated + layer.mlp(layer.post_attention_layernorm(updated))
        return plan.scatter(hidden, updated)

    # -- FastV

    def _score(self, call: _Call, attention, normed, key_states, attention_mask,
               position_embeddings) -> None:
        """Rank the visual tokens by the query rows' attention in this layer (``k − 1``) and
        keep all but the ``ratio`` share with the least; sets ``call.kept``."""
        fastv = self.fastv
        visual, n_drop = call.fastv_visual, call.fastv_drop
        batch, length = visual.shape
        queries = self._query_rows(call, attention_mask, batch, length, visual.device)
        rows = _TokenSet.where(queries)  # [batch, q]
        cos, sin = (_take(table, rows.index) for table in position_embeddings)
        query = _rope(
            _heads(attention, attention.q_proj(_take(normed, rows.index)),
                   getattr(attention, "q_norm", None)),
            cos, sin,
        )  # [batch, heads, q, head_dim]
        keys = _repeat_kv(key_states, attention.num_key_value_groups)
        logits = (query @ keys.transpose(2, 3)) * attention.scaling  # [batch, heads, q, seq]
        softcap = _softcap(attention)
        if softcap is not None:  # as Gemma 2's eager attention: cap, then mask
            logits = torch.tanh(logits / softcap) * softcap
        if attention_mask is None:
            allowed = torch.arange(length, device=visual.device)[None, None, :] <= rows.index[:, :, None]
            logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        else:
            mask = attention_mask.expand(batch, *attention_mask.shape[1:])
            index = rows.index[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3])
            row = mask.gather(2, index)  # [batch, 1, q, seq]
            if row.dtype == torch.bool:
                logits = logits.masked_fill(~row, float("-inf"))
            else:
                logits = logits + row
        # softmax in float32 as eager attention does, then the mean over heads and query rows
        probabilities = torch.softmax(logits, dim=-1, dtype=torch.float32).mean(dim=1)  # [batch, q, seq]
        if rows.valid is None:
            scores = probabilities.mean(dim=1)
        else:
            weights = rows.valid.to(probabilities.dtype)
            scores = (probabilities * weights[:, :, None]).sum(1) / weights.sum(1).clamp(min=1)[:, None]
        # Rank each row's visual tokens by score (stable: ties keep position order); the n_drop
        # lowest go.
        order = torch.where(visual, scores, torch.inf).argsort(dim=1, stable=True)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(length, device=order.device).expand(batch, -1)
        )
        dropped = visual & (rank < n_drop[:, None])
        call.kept = _TokenSet.where(~dropped)
        record = fastv.record
        record.dropped, record.scores, record.queries = dropped, scores, queries

    def _query_rows(self, call: _Call, attention_mask, batch: int, length: int, device) -> torch.Tensor:
        """FastV's query rows, bool ``[batch, seq]``: the given ``query_mask``, else the last
        non-padding token of each row (from the 2D mask the stack got), or for a custom 4D mask
        the last row that attends to more than itself (padding rows of a packed batch attend to
        nothing or only to themselves)."""
        if self.fastv.query_mask is not None:
            queries = self.fastv.query_mask.to(device)
            if queries.shape != (batch, length):
                raise ValueError(f"fastv's query_mask has shape {tuple(queries.shape)}, the forward "
                                 f"pass has {(batch, length)} tokens")
            if not bool(queries.any(dim=1).all()):
                raise ValueError("fastv's query_mask selects no query token in some row")
            return queries
        if call.padding is not None:
            real = call.padding[:, -length:].to(device=device, dtype=torch.bool)
        elif attention_mask is None:
            real = torch.ones((batch, length), dtype=torch.bool, device=device)
        else:
            mask = attention_mask.expand(batch, *attention_mask.shape[1:])[:, 0, :, :]
            allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
            real = allowed.sum(dim=-1) > 1
        from_end = real.flip(1).to(torch.uint8).argmax(dim=1)  # 0 when a row has no real token
        last = torch.zeros((batch, length), dtype=torch.bool, device=device)
        last[torch.arange(batch, device=device), length - 1 - from_end] = True
        return last


_ENGINES: weakref.WeakKeyDictionary[nn.Module, _Engine] = weakref.WeakKeyDictionary()


@contextmanager
def _engaged(model: nn.Module, role: str, spec) -> Iterator[None]:
    """Install the model's engine (or join the one installed) with ``spec`` as its ``role``
    ("freeze" or "fastv"); the last role to leave removes every patch."""
    engine = _ENGINES.get(model)
    if engine is None:
        engine = _ENGINES[model] = _Engine(model)
    elif getattr(engine, role) is not None:
        raise ValueError(
            f"{'freeze_visual_tokens' if role == 'freeze' else 'fastv'} is already active on this "
            f"model; one of each can be active at a time (freeze_visual_tokens and fastv nest)"
        )
    setattr(engine, role, spec)
    try:
        yield
    finally:
        setattr(engine, role, None)
        if engine.idle:
            del _ENGINES[model]
            engine.close()


# ---------------------------------------------------------------- public API


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
