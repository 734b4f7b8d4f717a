"""The engine ``freeze_visual_tokens`` and ``fastv`` share on one model: it patches every decoder
layer's ``forward`` (on the instance, restored exactly on exit), tracks each forward pass through
hooks on the model and its decoder stack, and runs a layer on its plan's tokens, ranking FastV's
visual tokens in layer ``k − 1``."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from shortlab.arch import model_parts
from shortlab.hooks import _hidden_in, _mask_window, _patched_forward
from shortlab.shortv.attention import _attend, _heads, _repeat_kv, _rope, _sandwich_norms, _softcap
from shortlab.shortv.checks import (
    PREFILL_ONLY, _argument, _check_attention, _check_supported, _image_token_id,
)
from shortlab.shortv.plans import _Plan
from shortlab.shortv.tokens import _take, _TokenSet


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
