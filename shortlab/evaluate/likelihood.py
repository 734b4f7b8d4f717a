"""Log-likelihood primitives: tokenising context/continuation pairs, scoring them, perplexity.

Tokenisation is lm-evaluation-harness's (``encode_pair``): context and continuation are tokenized
together and split, a context's trailing whitespace moves to the continuation, and the tokenizer's
own special tokens are kept, so a tokenizer that starts every text with a BOS (Llama, Mistral,
Gemma) gets one before every context, and SmolLM2's or Qwen's get none.

``loglikelihoods`` scores a question's context once for all its continuations: each context is
packed with one branch per continuation below it (``shortlab.packing``), which gives every
continuation the logits it would get alone. Where packing would not be exact (an attention kernel
that ignores custom masks, a sliding window shorter than the sequence, a left-truncated input) a
request is scored as its own full sequence, as the harness's HF backend scores every request.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from shortlab.arch import supports_logits_to_keep
from shortlab.hooks import eval_mode
from shortlab.packing import pack, packed_batch


def special_prefix(tokenizer) -> list[int]:
    """The ids ``tokenizer`` puts before every text by default: ``[bos_id]`` for Llama, Mistral and
    Gemma tokenizers, ``[]`` for SmolLM2's and Qwen's."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    default = tokenizer(probe)["input_ids"]
    for start in range(len(default) - len(plain) + 1):
        if default[start : start + len(plain)] == plain:
            return list(default[:start])
    raise ValueError(f"the tokenizer's default encoding of {probe!r} ({default}) does not contain its "
                     f"plain encoding ({plain}): cannot tell what it adds before a text")


def prefix_token_id(tokenizer) -> int:
    """The token a continuation with an empty context is scored after: BOS, else EOS (the harness's)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to stand for an empty context")
    return token


def encode_text(tokenizer, text: str) -> list[int]:
    """``text``'s ids with the tokenizer's default special tokens, unless the text already starts
    with the prefix token's string (the harness's ``tok_encode``)."""
    starts_with_prefix = text.startswith(tokenizer.decode([prefix_token_id(tokenizer)]))
    kwargs = {"add_special_tokens": False} if starts_with_prefix else {}
    return tokenizer(text, verbose=False, **kwargs)["input_ids"]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split from the encoding of their concatenation.

    As the harness does: trailing whitespace of the context moves to the continuation, both texts
    get the tokenizer's default special tokens (a BOS before the context where the tokenizer adds
    one), and an empty context becomes the BOS (else EOS) token.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        return [prefix_token_id(tokenizer)], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    whole = encode_text(tokenizer, context + continuation)
    context_ids = encode_text(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


def input_device(model) -> torch.device:
    """Where the model wants its input ids (the input embeddings' device)."""
    return model.get_input_embeddings().weight.device


def next_token_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_last: int | None = None
) -> torch.Tensor:
    """Float32 log-softmax over the next token at each position: FloatTensor[B, T or n_last, V].

    ``input_ids``, ``attention_mask``: LongTensor[B, T]. With ``n_last``, only the last
    ``n_last`` positions are returned, and models that support ``logits_to_keep`` compute only
    those, which keeps long few-shot prompts from materialising [B, T, V] logits.
    """
    kwargs = {}
    if n_last is not None and supports_logits_to_keep(model):
        kwargs["logits_to_keep"] = n_last
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
    ).logits
    if n_last is not None:
        logits = logits[:, -n_last:]
    return torch.log_softmax(logits.float(), dim=-1)


def _model_max_length(model) -> int | None:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _model_inputs(
    context: Sequence[int], continuation: Sequence[int], max_length: int | None
) -> tuple[int, ...]:
    """The tokens fed to the model: context + continuation minus its last token, left-truncated."""
    if not context or not continuation:
        raise ValueError("a request needs at least one context token and one continuation token")
    if max_length is not None and len(continuation) > max_length:
        raise ValueError(
            f"a continuation of {len(continuation)} tokens exceeds the model's {max_length}"
        )
    tokens = tuple(context) + tuple(continuation[:-1])
    return tokens if max_length is None else tokens[-max_length:]


def _batches(items: list, batch_size: int) -> Iterator[list]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


PACKABLE_ATTENTION = ("eager", "sdpa")  # kernels that honour a custom 4D mask


def packing_limit(model) -> int | None:
    """The longest request (context + continuation) that ``model`` scores exactly when packed:
    ``None`` for any length, the sliding window where one applies (inside it a packed branch sees
    what it would see alone), 0 where the attention kernel ignores custom masks (flash, flex)."""
    if getattr(model.config, "_attn_implementation", None) not in PACKABLE_ATTENTION:
        return 0
    text = model.config.get_text_config()
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        uses_window = "sliding_attention" in layer_types
    else:
        uses_window = bool(getattr(text, "use_sliding_window", True))
    return window if window is not None and uses_window else None


def _score_plain(model, units, requests, batch_size, device, results, advance) -> None:
    """Score each distinct model input as one right-padded row (requests sharing it share it)."""
    ordered = sorted(units.items(), key=lambda unit: -len(unit[0]))
    for batch in _batches(ordered, batch_size):
        width = max(len(tokens) for tokens, _ in batch)
        # Only positions from the earliest scored one to the end of the widest row are needed.
        first_scored = min(
            len(tokens) - max(len(requests[i][1]) for i in indices) for tokens, indices in batch
        )
        n_last = width - first_scored
        # Pad value is irrelevant: right padding is masked and never feeds a scored position.
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (tokens, _) in enumerate(batch):
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            attention_mask[row, : len(tokens)] = 1
        logprobs = next_token_logprobs(
            model, input_ids.to(device), attention_mask.to(device), n_last
        ).cpu()
        offset = width - n_last
        for row, (tokens, indices) in enumerate(batch):
            for index in indices:
                continuation = torch.tensor(requests[index][1])
                start = len(tokens) - len(continuation) - offset
                picked = logprobs[row, start : start + len(continuation)].gather(
                    1, continuation[:, None]
                )
                results[index] = picked.double().sum()
        advance()


def _packed_tree(context: tuple[int, ...], continuations: list[tuple[int, ...]]):
    """The context with one branch per continuation (its tokens but the last, the model's inputs),
    and per continuation the positions whose next-token distribution scores each of its tokens."""
    branches = [c for c in continuations if len(c) > 1]
    sequence = pack(list(context), [(list(c[:-1]), 0) for c in branches])
    segment = {c: k for k, c in enumerate(branches, start=1)}
    positions = []
    for continuation in continuations:
        start = sequence.starts[segment[continuation]] if continuation in segment else 0
        positions.append([len(context) - 1] + list(range(start, start + len(continuation) - 1)))
    return sequence, positions


def _score_packed(model, groups, batch_size, device, results, advance) -> None:
    """Score each context once with all its continuations packed below it, several contexts per
    batch; ``groups``: [(context, {continuation: [request indices]})]."""
    trees = []
    for context, by_continuation in groups:
        continuations = list(by_continuation)
        sequence, positions = _packed_tree(context, continuations)
        trees.append((sequence, continuations, positions, by_continuation))
    trees.sort(key=lambda tree: -len(tree[0].input_ids))
    mask_dtype = model.get_input_embeddings().weight.dtype
    keep_on_model = supports_logits_to_keep(model)
    for batch in _batches(trees, batch_size):
        input_ids, position_ids, mask = packed_batch([tree[0] for tree in batch], 0, mask_dtype, device)
        needed = sorted({p for tree in batch for scored in tree[2] for p in scored})
        keep = torch.tensor(needed, dtype=torch.long)
        kwargs = {"logits_to_keep": keep.to(device)} if keep_on_model else {}
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                       use_cache=False, **kwargs).logits
        if not keep_on_model:
            logits = logits[:, keep.to(logits.device)]
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        column = {p: j for j, p in enumerate(needed)}
        for row, (_, continuations, positions, by_continuation) in enumerate(batch):
            for continuation, scored in zip(continuations, positions, strict=True):
                columns = torch.tensor([column[p] for p in scored])
                picked = logprobs[row, columns].gather(1, torch.tensor(continuation)[:, None])
                value = picked.double().sum()
                for index in by_continuation[continuation]:
                    results[index] = value
        advance()


@torch.inference_mode()
def loglikelihoods(
    model,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "loglikelihood",
    shared_context: bool = True,
) -> torch.Tensor:
    """Summed log p(continuation | context) of each (context ids, continuation ids) request.

    Returns DoubleTensor[len(requests)]. With ``shared_context`` (the default), requests with the
    same context are scored in one packed sequence, the context once and each continuation in a
    branch of its own below it (``batch_size`` contexts per forward pass), wherever that is exact
    (``packing_limit``). Other requests are scored as full sequences, longest first and
    right-padded, so padding never precedes a scored position; requests with identical model
    inputs (one long MMLU prompt followed by " A".." D") share one of them. Inputs longer than
    the model's context are left-truncated, as the harness does.
    """
    max_length = _model_max_length(model)
    limit = packing_limit(model) if shared_context else 0
    units: dict[tuple[int, ...], list[int]] = {}
    by_context: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
    for index, (context, continuation) in enumerate(requests):
        tokens = _model_inputs(context, continuation, max_length)
        length = len(context) + len(continuation) - 1
        if len(tokens) == length and (limit is None or length <= limit):
            by_context.setdefault(tuple(context), {}).setdefault(tuple(continuation), []).append(index)
        else:
            units.setdefault(tokens, []).append(index)
    groups = []
    for context, by_continuation in by_context.items():
        if len(by_continuation) > 1:
            groups.append((context, by_continuation))
        else:  # one continuation: a plain row costs the same and keeps the causal fast path
            (continuation, indices), = by_continuation.items()
            units.setdefault(context + continuation[:-1], []).extend(indices)
    device = torch.device(device) if device is not None else input_device(model)
    results = torch.zeros(len(requests), dtype=torch.float64)
    n_batches = -(-len(units) // max(batch_size, 1)) + -(-len(groups) // max(batch_size, 1))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_batches, desc=desc, unit="batch")

    def advance() -> None:
        if bar is not None:
            bar.update(1)

    try:
        with eval_mode(model):
            _score_packed(model, groups, batch_size, device, results, advance)
            _score_plain(model, units, requests, batch_size, device, results, advance)
    finally:
        if bar is not None:
            bar.close()
    return results


@torch.inference_mode()
def block_nll(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Summed next-token NLL (nats, float64) and number of predicted tokens of every row.

    ``input_ids``, ``attention_mask``: LongTensor[N, T] (mask defaults to all ones). Token t is
    predicted from tokens < t and counts only where both it and its predecessor have mask 1,
    so padding, wherever it sits, adds nothing. Returns (nll [N], counts [N]): per-block values
    for intervals that resample blocks (``stats.perplexity_interval``).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be [N, T]; got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    counted = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    if not counted.any():
        raise ValueError("no token to predict: every row has fewer than two unmasked tokens")
    device = input_device(model)
    nll = np.zeros(input_ids.shape[0], dtype=np.float64)
    with eval_mode(model):
        for rows in _batches(list(range(input_ids.shape[0])), batch_size):
            ids, mask = input_ids[rows].to(device), attention_mask[rows].to(device)
            logprobs = next_token_logprobs(model, ids, mask)[:, :-1]
            target_logprobs = logprobs.gather(2, ids[:, 1:, None]).squeeze(2)
            keep = counted[rows].to(device)
            nll[rows] = -(target_logprobs.double() * keep).sum(dim=1).cpu().numpy()
    return nll, counted.sum(dim=1).numpy().astype(np.float64)


def perplexity(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, batch_size: int = 8
) -> float:
    """Token-level perplexity exp(total NLL / number of predicted tokens) over held-out rows
    (``block_nll`` summed over rows)."""
    nll, counts = block_nll(model, input_ids, attention_mask, batch_size)
    return math.exp(nll.sum() / counts.sum())
