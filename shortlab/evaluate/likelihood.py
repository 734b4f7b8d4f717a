"""Log-likelihood primitives: tokenising context/continuation pairs, scoring them, perplexity.

Contexts and continuations are tokenized together and split, with a context's trailing
whitespace moved to the continuation, and without special tokens, as the harness's HF backend
does (``encode_pair``). ``loglikelihoods`` batches requests longest first, right-padded, and
shares one forward pass between requests with identical model inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from shortlab.arch import supports_logits_to_keep
from shortlab.hooks import eval_mode


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split from the encoding of their concatenation.

    As the harness does: trailing whitespace of the context moves to the continuation, no
    special tokens are added, and an empty context becomes the BOS (else EOS) token.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        prefix = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        )
        return [prefix], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False, verbose=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False, verbose=False)["input_ids"]
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


@torch.inference_mode()
def loglikelihoods(
    model,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "loglikelihood",
) -> torch.Tensor:
    """Summed log p(continuation | context) of each (context ids, continuation ids) request.

    Returns DoubleTensor[len(requests)]. Requests with identical model inputs (e.g. one long
    MMLU prompt followed by " A".." D") share one forward pass. Inputs are sorted longest
    first and right-padded, so padding never precedes a scored position of a causal model.
    Inputs longer than the model's context are left-truncated, as the harness does.
    """
    max_length = _model_max_length(model)
    units: dict[tuple[int, ...], list[int]] = {}
    for index, (context, continuation) in enumerate(requests):
        units.setdefault(_model_inputs(context, continuation, max_length), []).append(index)
    ordered = sorted(units.items(), key=lambda unit: -len(unit[0]))
    device = torch.device(device) if device is not None else input_device(model)
    results = torch.zeros(len(requests), dtype=torch.float64)
    batches = list(_batches(ordered, batch_size))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, unit="batch")
    with eval_mode(model):
        for batch in batches:
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
