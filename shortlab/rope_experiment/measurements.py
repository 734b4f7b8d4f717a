"""Measurements on any causal LM: loss by position, retrieval accuracy, per-head B_w weights.

``per_position_nll`` and ``binned_perplexity`` give perplexity by position;
``retrieval_accuracy`` scores ``stack_examples`` batches by greedy prediction;
``qk_pair_weights`` reads the weights σ²_a(i) + σ²_b(i) of the paper's B_w(m) from the model's
own queries and keys. The LM head runs in chunks of positions (``_next_token_stats``), so long
inputs with large vocabularies never materialise full logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from shortlab.arch import model_parts
from shortlab.rope import pair_variances_from_vectors


def _next_token_stats(model, input_ids: torch.Tensor, chunk: int = 512
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """For every position t ≥ 1 of input_ids [N, T]: log p(token t | tokens < t) and the argmax
    prediction for position t, both [N, T − 1] (index t − 1). The LM head runs on ``chunk``
    positions at a time, so a 49k-word vocabulary at 8k tokens needs no 8k × 49k logits."""
    parts = model_parts(model)
    if getattr(parts.text_config, "final_logit_softcapping", None):
        raise ValueError("models with final_logit_softcapping are not supported here")
    device = parts.embed_tokens.weight.device
    input_ids = input_ids.to(device)
    hidden = parts.decoder(input_ids=input_ids).last_hidden_state[:, :-1]
    targets = input_ids[:, 1:]
    logprobs, argmax = [], []
    for start in range(0, hidden.shape[1], chunk):
        logits = parts.lm_head(hidden[:, start: start + chunk]).float().log_softmax(-1)
        logprobs.append(logits.gather(2, targets[:, start: start + chunk, None]).squeeze(2))
        argmax.append(logits.argmax(-1))
    return torch.cat(logprobs, 1).cpu(), torch.cat(argmax, 1).cpu()


@torch.inference_mode()
def per_position_nll(model, input_ids: torch.Tensor, target_mask: torch.Tensor | None = None,
                     batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Loss by position: (nll_sum, count), float64 arrays of length T for input_ids [N, T].

    Index t holds the summed negative log-likelihood of token t given tokens < t over the rows
    where target_mask[row, t] is True (default: every row), and how many rows that is; index 0
    (nothing to predict from) has count 0. Sums rather than means so that results over
    batches or sequences of different lengths add up; ``binned_perplexity`` turns them into
    perplexities.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [N, T], got shape {tuple(input_ids.shape)}")
    if target_mask is None:
        target_mask = torch.ones_like(input_ids, dtype=torch.bool)
    if target_mask.shape != input_ids.shape:
        raise ValueError(f"target_mask {tuple(target_mask.shape)} must match input_ids "
                         f"{tuple(input_ids.shape)}")
    length = input_ids.shape[1]
    nll_sum, count = np.zeros(length), np.zeros(length)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            logprobs, _ = _next_token_stats(model, input_ids[rows])
            keep = target_mask[rows, 1:].bool()
            nll_sum[1:] += (-logprobs.double() * keep).sum(0).numpy()
            count[1:] += keep.sum(0).numpy()
    finally:
        model.train(was_training)
    return nll_sum, count


def binned_perplexity(nll_sum: np.ndarray, count: np.ndarray, edges: Sequence[int]
                      ) -> np.ndarray:
    """exp(mean NLL) over positions [edges[j], edges[j+1]) for each bin (NaN where empty)."""
    edges = np.asarray(edges)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"edges must be increasing with at least two entries, got {edges}")
    out = np.full(edges.size - 1, np.nan)
    for j, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        n = count[low:high].sum()
        if n > 0:
            out[j] = math.exp(nll_sum[low:high].sum() / n)
    return out


@torch.inference_mode()
def retrieval_accuracy(model, batch: dict[str, torch.Tensor], batch_size: int = 16
                       ) -> np.ndarray:
    """Whether each query of a ``stack_examples`` batch is answered: every answer token is the
    model's argmax given the true text before it (what greedy decoding would write). Returns
    a bool array [N, n_queries]."""
    input_ids, positions = batch["input_ids"], batch["answer_positions"]
    correct = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start: start + batch_size]
            _, argmax = _next_token_stats(model, ids)
            where = positions[start: start + batch_size]  # token positions t; argmax index t − 1
            predicted = argmax.gather(1, (where - 1).flatten(1)).view_as(where)
            truth = ids.gather(1, where.flatten(1)).view_as(where)
            correct.append((predicted == truth).all(-1))
    finally:
        model.train(was_training)
    return torch.cat(correct).numpy()


@torch.inference_mode()
def qk_pair_weights(model, input_ids: torch.Tensor) -> np.ndarray:
    """Per layer and head, the weights σ²_a(i) + σ²_b(i) of the paper's B_w(m), from the model's
    own queries and keys before rotation (outputs of each attention's q_proj and k_proj,
    captured by hooks), pooled as the theorem's σ² is (``pair_variances_from_vectors``).

    Pairs follow transformers' rotate_half layout ("half"). A query head is pooled with the
    key head it reads (grouped-query attention). Returns float64 [layers, heads, head_dim/2].
    """
    parts = model_parts(model)
    config = parts.text_config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    captured: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for index in range(parts.num_layers):
        attention = parts.attention(index)
        for name in ("q_proj", "k_proj"):
            def hook(module, args, output, index=index, name=name):
                captured[(index, name)] = output.detach()
            handles.append(getattr(attention, name).register_forward_hook(hook))
    try:
        parts.decoder(input_ids=input_ids.to(parts.embed_tokens.weight.device))
    finally:
        for handle in handles:
            handle.remove()
    weights = np.empty((parts.num_layers, heads, head_dim // 2))
    for index in range(parts.num_layers):
        q = captured[(index, "q_proj")].unflatten(-1, (heads, head_dim))
        k = captured[(index, "k_proj")].unflatten(-1, (kv_heads, head_dim))
        for head in range(heads):
            pooled = torch.cat((q[..., head, :], k[..., head * kv_heads // heads, :]))
            weights[index, head] = pair_variances_from_vectors(pooled, layout="half")
    return weights
