"""ShortV's Layer Contribution (Yuan et al., 2025): how far the next-token distribution moves when
one decoder layer stops updating a group of tokens (e.g. the visual tokens of a LLaVA model).

For layer l and a token group G, the modified model is the original one except that in layer l
the tokens of G leave with their input hidden state (no attention or MLP update) while still
serving as keys and values for the other tokens: ``hooks.keep_tokens_unchanged``. The Layer
Contribution is KL(P_modified ‖ P_original) of the next-token distribution at the reading
positions (by default the answer position, the last real token of each row), as in ShortV's
public code. Layers whose visual contribution is smallest are the ones ShortV freezes.

``token_groups`` builds the visual / text masks from the image token id in the model config.

Works on every architecture ``arch.model_parts`` supports; for ShortV on VLMs: LLaVA, LLaVA-NeXT
(anyres: the visual mask follows each row's own number of image tokens), Gemma 3, Qwen2-VL and
Qwen2.5-VL (the rerun reuses each layer's recorded multimodal RoPE table).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from shortlab.arch import ModelParts, forward_for_hidden_states, model_parts, validate_layer_indices
from shortlab.hooks import _hidden_in, _hidden_out, _hooks, eval_mode, keep_tokens_unchanged

Method = Literal["rerun", "full_forward"]
METHODS: tuple[str, ...] = ("rerun", "full_forward")


def _padding_free(attention_mask: object) -> torch.Tensor | None:
    """bool [batch, seq], True at real tokens, when ``attention_mask`` is a 2D 0/1 mask; None
    otherwise (no mask, or a 4D / additive mask, e.g. packed sequences)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return None
    if not ((attention_mask == 0) | (attention_mask == 1)).all():
        return None
    return attention_mask == 1


def token_groups(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The token groups ShortV compares, as bool masks of ``input_ids``' shape [batch, seq]:
    ``"visual"`` where the token is the model's image token (one per visual feature, as the
    LLaVA processor expands them) and ``"text"`` at every other real token, padding excluded
    where ``attention_mask`` (2D, 0/1) marks it.

    The image token id is read from ``model.config.image_token_id`` (or ``image_token_index``),
    never inferred from positions. Raises ``ValueError`` if the config names no image token or
    ``input_ids`` holds none.
    """
    config = model.config
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(config, "image_token_index", None)
    if image_token_id is None:
        raise ValueError(
            f"{type(model).__name__} has no image token (config.image_token_id / "
            f"image_token_index): it is not a multimodal model, so there are no visual tokens"
        )
    real = _padding_free(attention_mask)
    if real is None:
        real = torch.ones_like(input_ids, dtype=torch.bool)
    real = real.to(input_ids.device)
    visual = (input_ids == image_token_id) & real
    if not visual.any():
        raise ValueError(
            f"input_ids hold no image token (id {image_token_id}); pass the processor's output "
            f"for a prompt with an image"
        )
    return {"visual": visual, "text": real & ~visual}


def _check_bool_mask(name: str, mask: object, shape: tuple[int, int]) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = getattr(mask, "dtype", type(mask).__name__)
        raise TypeError(f"{name} must be a bool tensor [batch, seq], got {got}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, the batch's tokens are {shape}")
    return mask


def _token_shape(batch: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    tokens = batch.get("input_ids")
    if tokens is None:
        tokens = batch.get("inputs_embeds")
    if tokens is None:
        raise ValueError("the batch holds neither input_ids nor inputs_embeds")
    return tuple(tokens.shape[:2])


def reading_positions(
    batch: Mapping[str, torch.Tensor], positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Where the next-token distributions are read, bool [batch, seq].

    ``positions=None`` gives one position per row: the last real token of a 2D 0/1
    ``attention_mask`` (left or right padding), or the last token when the batch has no such mask.
    Given ``positions`` are checked (bool, the batch's shape, at least one True, no padding).
    """
    shape = _token_shape(batch)
    real = _padding_free(batch.get("attention_mask"))
    if positions is None:
        read = torch.zeros(shape, dtype=torch.bool)
        if real is None:
            read[:, -1] = True
            return read
        real = real.cpu()
        if not real.any(dim=1).all():
            raise ValueError("a row of the batch has no real token (its attention_mask is all 0)")
        # The last True of each row: the first True of the reversed row, counted from the end.
        last = shape[1] - 1 - real.flip(1).int().argmax(dim=1)
        read[torch.arange(shape[0]), last] = True
        return read
    positions = _check_bool_mask("positions", positions, shape)
    if not positions.any():
        raise ValueError("positions selects no token to read the distribution at")
    if real is not None and (positions.cpu() & ~real.cpu()).any():
        raise ValueError("positions include padding tokens")
    return positions


def _kl_divergence(modified_logits: torch.Tensor, original_logits: torch.Tensor) -> float:
    """Mean over rows of KL(P_modified ‖ P_original); logits [n_positions, vocab], in float64 so
    that the small divergences of unimportant layers are not rounding noise."""
    log_p = F.log_softmax(modified_logits.double(), dim=-1)
    log_q = F.log_softmax(original_logits.double().to(log_p.device), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean().item()


def _head_logits(model: nn.Module, parts: ModelParts, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of the last layer's output ``hidden`` [..., hidden_size]: final norm, LM head, and
    the logit soft-capping that Gemma 2/3's causal-LM wrappers apply after the head (each wrapper
    reads its own config; Gemma 3's multimodal wrapper has none and does not cap)."""
    logits = parts.lm_head(parts.final_norm(hidden))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _rerun_contributions(
    model: nn.Module, parts: ModelParts, batch: Mapping[str, torch.Tensor],
    token_mask: torch.Tensor, chosen: list[int], read: torch.Tensor,
) -> dict[int, float]:
    """One clean forward that records, for every layer from the first chosen one on, the
    arguments it was called with (the chosen layers' input hidden states included), then per
    chosen layer l a rerun of layers l..L-1 from the stored input, with layer l keeping the masked
    tokens unchanged, and the head at the reading positions only."""
    first = chosen[0]
    wanted = set(chosen)
    inputs: dict[int, torch.Tensor] = {}
    # Everything but the hidden state a layer received: attention mask, position embeddings,
    # position ids... They are the same in the modified model (only hidden states change), and
    # they differ between layers in some stacks (Gemma 3's sliding / full attention), hence per
    # layer. Keeping references costs no memory: every layer shares the same tensors.
    other_args: dict[int, tuple[tuple, dict]] = {}
    clean_final: list[torch.Tensor] = []

    def make_recorder(index: int):
        def record(module, args, kwargs):
            if index in wanted:
                inputs[index] = _hidden_in(args, kwargs)
            rest = {name: value for name, value in kwargs.items() if name != "hidden_states"}
            other_args[index] = (args[1:], rest)

        return record

    def keep_final(module, args, kwargs, output):
        hidden = _hidden_out(output)
        clean_final.append(hidden[read.to(hidden.device)])

    num_layers = parts.num_layers
    with _hooks(
        pre=[(parts.layers[i], make_recorder(i)) for i in range(first, num_layers)],
        post=[(parts.layers[num_layers - 1], keep_final)],
    ):
        forward_for_hidden_states(model, batch)
    original = _head_logits(model, parts, clean_final[0])

    def run_layer(index: int, hidden: torch.Tensor) -> torch.Tensor:
        args, kwargs = other_args[index]
        return _hidden_out(parts.layers[index](hidden, *args, **kwargs))

    contributions = {}
    for index in chosen:
        with keep_tokens_unchanged(model, [index], token_mask):
            hidden = run_layer(index, inputs.pop(index))
        for later in range(index + 1, num_layers):
            hidden = run_layer(later, hidden)
        modified = _head_logits(model, parts, hidden[read.to(hidden.device)])
        contributions[index] = _kl_divergence(modified, original)
    return contributions


def _full_forward_contributions(
    model: nn.Module, batch: Mapping[str, torch.Tensor], token_mask: torch.Tensor,
    chosen: list[int], read: torch.Tensor,
) -> dict[int, float]:
    """The definition run literally: one clean forward, then one full forward per chosen layer
    under ``keep_tokens_unchanged``, comparing the model's own logits."""

    def logits_at_reading_positions() -> torch.Tensor:
        logits = model(**batch, use_cache=False).logits
        return logits[read.to(logits.device)]

    original = logits_at_reading_positions()
    contributions = {}
    for index in chosen:
        with keep_tokens_unchanged(model, [index], token_mask):
            contributions[index] = _kl_divergence(logits_at_reading_positions(), original)
    return contributions


def layer_contribution(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    token_mask: torch.Tensor,
    layers: Iterable[int] | None = None,
    positions: torch.Tensor | None = None,
    method: Method = "rerun",
) -> dict[int, float]:
    """ShortV's Layer Contribution of each decoder layer for one token group.

    ``batch``: model inputs (``input_ids`` [batch, seq], ``attention_mask``, and for a LLaVA
    model ``pixel_values``; the processor has already expanded each image into its visual tokens,
    so seq is the decoder's sequence length). ``token_mask``: bool [batch, seq], the group that
    layer l stops updating (e.g. ``token_groups(model, ids, mask)["visual"]``). ``layers``:
    indices (negative from the end) or None for every layer.

    Returns ``{l: KL(P_modified_l ‖ P_original)}`` in nats, where P is the next-token
    distribution [vocab] at a reading position and "modified_l" means that in layer l only, the
    tokens of ``token_mask`` leave with their input hidden state while still serving as keys and
    values (``hooks.keep_tokens_unchanged``). The KL is computed in float64 and averaged over all
    reading positions of the batch. Reading positions (``reading_positions``): by default the
    answer position, the last real token of each row (from a 2D 0/1 ``attention_mask``, else the
    last token); ``positions`` (bool [batch, seq]) may select others, e.g. every answer token.

    ``method="rerun"`` (default) runs one forward of the full model, storing each chosen layer's
    input hidden state and the arguments every layer from the first chosen one receives; then for
    each chosen layer l it reruns only the decoder layers l..L-1 from the stored input, and the
    final norm and LM head only at the reading positions. That is about 1 + L/2 decoder passes
    for all L layers, and it keeps ``len(layers)`` hidden states [batch, seq, hidden] alive.
    ``method="full_forward"`` is the reference: one full forward of the model (vision tower and
    full-sequence logits included) for the clean run and for each chosen layer. Both give the same
    values up to float rounding.

    Runs without KV cache, gradient or dropout (every module's training flag is restored) and
    leaves no hook behind. Hooks already on the model's layers run in both methods. Raises
    ``IndexError`` / ``ValueError`` / ``TypeError`` for bad layer indices (see
    ``arch.validate_layer_indices``), ``TypeError`` / ``ValueError`` for a mask that is not bool
    or not of the batch's shape, and ``ValueError`` for a batch carrying ``past_key_values``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if batch.get("past_key_values") is not None:
        # The reruns would append to the cache again; the measure is defined on a plain prefill.
        raise ValueError("layer_contribution runs without a KV cache; drop past_key_values")
    parts = model_parts(model)
    chosen = (
        list(range(parts.num_layers)) if layers is None else validate_layer_indices(parts, layers)
    )
    token_mask = _check_bool_mask("token_mask", token_mask, _token_shape(batch))
    read = reading_positions(batch, positions)
    with torch.inference_mode(), eval_mode(model):
        if method == "rerun":
            return _rerun_contributions(model, parts, batch, token_mask, chosen, read)
        return _full_forward_contributions(model, batch, token_mask, chosen, read)


TOKEN_GROUPS: tuple[str, ...] = ("visual", "text")


def mean_layer_contribution(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    group: str | Callable[[Mapping[str, torch.Tensor]], torch.Tensor] = "visual",
    layers: Iterable[int] | None = None,
    method: Method = "rerun",
) -> dict[int, float]:
    """Layer Contribution averaged over calibration batches, as ShortV scores layers before it
    picks the lowest: the mean of ``layer_contribution`` over every reading position of every
    batch. With the default reading position (the answer position, one per row) every question
    counts once, however the questions are split into batches: each batch's mean is weighted by
    its number of reading positions.

    ``group`` is the token group that layer l stops updating: a ``token_groups`` key ("visual"
    or "text"), recomputed for each batch from its ``input_ids`` and ``attention_mask``, or a
    function of a batch returning a bool mask [batch, seq]. ``batches`` yields model inputs
    (``input_ids`` [batch, seq], ``attention_mask``, ``pixel_values``); it is iterated once, so
    a generator building batches lazily is fine. ``layers`` and ``method`` as in
    ``layer_contribution``.

    Returns ``{l: mean KL(P_modified_l ‖ P_original)}`` in nats. Raises ``ValueError`` for an
    unknown group name or when ``batches`` yields nothing.
    """
    if isinstance(group, str) and group not in TOKEN_GROUPS:
        raise ValueError(f"unknown token group {group!r}; choose one of {', '.join(TOKEN_GROUPS)} "
                         f"or pass a function of the batch returning a bool mask")
    chosen = None if layers is None else list(layers)  # reused for every batch
    totals: dict[int, float] = {}
    n_positions = 0
    for batch in batches:
        if isinstance(group, str):
            mask = token_groups(model, batch["input_ids"], batch.get("attention_mask"))[group]
        else:
            mask = group(batch)
        weight = int(reading_positions(batch).sum())
        values = layer_contribution(model, batch, mask, layers=chosen, method=method)
        for layer, value in values.items():
            totals[layer] = totals.get(layer, 0.0) + weight * value
        n_positions += weight
    if not n_positions:
        raise ValueError("empty calibration set: no batch was given")
    return {layer: total / n_positions for layer, total in totals.items()}
