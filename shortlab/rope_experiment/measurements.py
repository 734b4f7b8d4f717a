"""Measurements on any causal LM: loss by position, retrieval accuracy, per-head B_w weights.

``per_position_nll`` and ``binned_perplexity`` give perplexity by position;
``retrieval_accuracy`` scores ``stack_examples`` batches by greedy prediction.

Per-head weights of the weighted bias B_w(m), from the model's own queries and keys before
rotation (outputs of each attention's q_proj and k_proj, captured by hooks):

* ``qk_pair_covariances`` — the theorem's quantity. For a query q and a key k of the same
  token, E[(R_(p+m) q)·(R_p k)] − E[(R_(p+m) q)·(R_p k')] with k' an independent key is
  ``score_gap`` G(m) = Σ_i c_i cos(m θ_i) + s_i sin(m θ_i), with c_i = Cov(q_a, k_a) +
  Cov(q_b, k_b) and s_i = Cov(q_a, k_b) − Cov(q_b, k_a) over the pair (a, b) that θ_i rotates.
  Under the theorem's assumptions (k = q + noise, i.i.d. dimensions of variance σ²) c_i = 2σ²
  and s_i = 0, which gives 2σ²B(m); ``score_gap_bound`` is the first m where G turns negative.
* ``qk_pair_weights`` — a heuristic: the pooled per-dimension variances σ²_a(i) + σ²_b(i) of
  queries and keys together. It equals c_i only when keys copy queries; it ignores how queries
  and keys co-vary, which is what the theorem's expectation is about.

``half_accuracy_distance`` reads where a retrieval-by-distance curve falls halfway to chance
(``crossing_distance``), with a bootstrap over seeds and trials.

The LM head runs in chunks of positions (``_next_token_stats``), so long inputs with large
vocabularies never materialise full logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from shortlab.arch import model_parts
from shortlab.rope import pair_variances_from_vectors
from shortlab.rope.conventions import _check_layout
from shortlab.stats import (
    CANNOT_TELL, SUPPORTED, FamilyVerdicts, Interval, _check_resampling, family_verdicts, verdict,
)

# Names the rule the retrieval verdicts follow; stored verdicts made under another rule are not
# compared with recomputed ones (their estimates still are).
VERDICT_RULE = "halfway-gated/1"


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


def _captured_queries_and_keys(model, input_ids: torch.Tensor
                               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (queries [N, T, heads, d], keys [N, T, kv_heads, d]) before rotation: the
    outputs of q_proj and k_proj for input_ids [N, T], captured by hooks that are removed on
    every exit."""
    parts = model_parts(model)
    config = parts.text_config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    captured: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    try:
        for index in range(parts.num_layers):
            attention = parts.attention(index)
            for name in ("q_proj", "k_proj"):
                def hook(module, args, output, index=index, name=name):
                    captured[(index, name)] = output.detach()
                handles.append(getattr(attention, name).register_forward_hook(hook))
        parts.decoder(input_ids=input_ids.to(parts.embed_tokens.weight.device))
    finally:
        for handle in handles:
            handle.remove()
    return [(captured[(index, "q_proj")].unflatten(-1, (heads, head_dim)),
             captured[(index, "k_proj")].unflatten(-1, (kv_heads, head_dim)))
            for index in range(parts.num_layers)]


@torch.inference_mode()
def qk_pair_weights(model, input_ids: torch.Tensor) -> np.ndarray:
    """A heuristic for the weights of B_w(m) (see the module docstring): per layer and head, the
    pooled variances σ²_a(i) + σ²_b(i) of the model's queries and keys together
    (``pair_variances_from_vectors``), as if keys were noisy copies of queries.

    Pairs follow transformers' rotate_half layout ("half"). A query head is pooled with the
    key head it reads (grouped-query attention). Returns float64 [layers, heads, head_dim/2].
    """
    layers = _captured_queries_and_keys(model, input_ids)
    heads, kv_heads, head_dim = layers[0][0].shape[-2], layers[0][1].shape[-2], layers[0][0].shape[-1]
    weights = np.empty((len(layers), heads, head_dim // 2))
    for index, (q, k) in enumerate(layers):
        for head in range(heads):
            pooled = torch.cat((q[..., head, :], k[..., head * kv_heads // heads, :]))
            weights[index, head] = pair_variances_from_vectors(pooled, layout="half")
    return weights


def qk_pair_covariance(queries: torch.Tensor, keys: torch.Tensor, *, layout: str = "half"
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The theorem's per-pair weights from aligned samples: queries [..., d] and keys [..., d],
    sample j of each from the same token. Returns float64 (c, s), each (d/2,):
    c_i = Cov(q_a, k_a) + Cov(q_b, k_b) and s_i = Cov(q_a, k_b) − Cov(q_b, k_a) for the pair
    (a, b) rotated by θ_i in ``layout`` ("half": (i, i + d/2); "interleaved": (2i, 2i + 1)).
    Population covariances over all leading axes."""
    if queries.shape != keys.shape or queries.ndim < 1:
        raise ValueError(f"queries and keys must be aligned samples [..., d], got "
                         f"{tuple(queries.shape)} and {tuple(keys.shape)}")
    q = queries.detach().reshape(-1, queries.shape[-1]).to(torch.float64)
    k = keys.detach().reshape(-1, keys.shape[-1]).to(torch.float64)
    if q.shape[0] < 2:
        raise ValueError(f"need at least 2 samples to estimate a covariance, got {q.shape[0]}")
    if q.shape[1] % 2:
        raise ValueError(f"the head dimension must be even, got {q.shape[1]}")
    q, k = q - q.mean(0), k - k.mean(0)
    half = q.shape[1] // 2
    a, b = ((torch.arange(0, 2 * half, 2), torch.arange(1, 2 * half, 2))
            if _check_layout(layout) == "interleaved" else (torch.arange(half), torch.arange(half, 2 * half)))

    def cov(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x * y).mean(0)

    c = cov(q[:, a], k[:, a]) + cov(q[:, b], k[:, b])
    s = cov(q[:, a], k[:, b]) - cov(q[:, b], k[:, a])
    return c.cpu().numpy(), s.cpu().numpy()


@torch.inference_mode()
def qk_pair_covariances(model, input_ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``qk_pair_covariance`` of every layer and head of ``model`` on input_ids [N, T]: each
    query head with the key head it reads (grouped-query attention), the query and key of the
    same token paired, in transformers' rotate_half layout. Returns float64 (c, s), each
    [layers, heads, head_dim/2]."""
    layers = _captured_queries_and_keys(model, input_ids)
    heads, kv_heads, head_dim = layers[0][0].shape[-2], layers[0][1].shape[-2], layers[0][0].shape[-1]
    c = np.empty((len(layers), heads, head_dim // 2))
    s = np.empty_like(c)
    for index, (q, k) in enumerate(layers):
        for head in range(heads):
            c[index, head], s[index, head] = qk_pair_covariance(
                q[..., head, :], k[..., head * kv_heads // heads, :], layout="half")
    return c, s


def score_gap(m, thetas, cos_weights, sin_weights) -> np.ndarray:
    """G(m) = Σ_i c_i cos(m θ_i) + s_i sin(m θ_i) (see the module docstring) for every distance
    in ``m`` (any shape; the query m positions after the key), float64 with m's shape."""
    thetas = np.asarray(thetas, dtype=np.float64)
    c, s = np.asarray(cos_weights, dtype=np.float64), np.asarray(sin_weights, dtype=np.float64)
    if thetas.ndim != 1 or c.shape != thetas.shape or s.shape != thetas.shape:
        raise ValueError(f"need one cos and one sin weight per frequency: {thetas.shape}, got "
                         f"{c.shape} and {s.shape}")
    angles = np.multiply.outer(np.asarray(m, dtype=np.float64), thetas)
    return np.cos(angles) @ c + np.sin(angles) @ s


def score_gap_bound(thetas, cos_weights, sin_weights, *, limit: int, chunk: int = 8192) -> int:
    """The largest L with G(m) ≥ 0 for every integer m in [0, L] (``score_gap``), scanning m up
    to ``limit``: returns ``limit`` when G stays non-negative that far ("at least limit"), and
    −1 when G(0) < 0 (the head's query and key are anti-correlated: no distance is favoured)."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    for start in range(0, limit + 1, chunk):
        m = np.arange(start, min(start + chunk, limit + 1))
        negative = np.flatnonzero(score_gap(m, thetas, cos_weights, sin_weights) < 0)
        if negative.size:
            return int(m[negative[0]]) - 1
    return limit


def crossing_distance(distances: Sequence[float], accuracy: np.ndarray, level: float) -> np.ndarray:
    """First distance at which ``accuracy`` [..., D] (over the increasing ``distances`` [D]) falls
    to ``level`` or below, interpolated linearly between the grid points around the crossing;
    ``inf`` where it never does within the grid (the crossing lies beyond the largest distance).
    Shape [...]."""
    d = np.asarray(distances, dtype=np.float64)
    a = np.asarray(accuracy, dtype=np.float64)
    if d.ndim != 1 or a.shape[-1] != d.size or d.size == 0:
        raise ValueError(f"accuracy's last axis ({a.shape[-1] if a.ndim else 0}) must match the {d.size} distances")
    if np.any(np.diff(d) <= 0):
        raise ValueError("distances must increase")
    below = a <= level
    first = np.argmax(below, axis=-1)
    crossed = below.any(axis=-1)
    previous = np.maximum(first - 1, 0)
    a_prev = np.take_along_axis(a, previous[..., None], -1)[..., 0]
    a_first = np.take_along_axis(a, first[..., None], -1)[..., 0]
    step = np.where(first > 0, (a_prev - level) / np.where(a_prev > a_first, a_prev - a_first, 1.0), 0.0)
    at = d[previous] + step * (d[first] - d[previous])
    return np.where(crossed, at, np.inf)


def halfway_level(chance: float) -> float:
    """The accuracy halfway from perfect (1) to ``chance``: where retrieval counts as broken."""
    return (1.0 + chance) / 2


def half_accuracy_distance(distances: Sequence[int], correct: np.ndarray, chance: float, *,
                           n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Distance at which retrieval accuracy falls halfway from perfect to ``chance``, from 0/1
    outcomes ``correct`` [seeds, distances, trials] (the seed-pooled curve, ``crossing_distance``),
    with a bootstrap that resamples seeds and each distance's trials together. ``inf`` in the
    estimate or a bound: accuracy stays above the halfway level up to the largest distance."""
    correct = np.asarray(correct, dtype=np.float64)
    if correct.ndim != 3:
        raise ValueError(f"correct must be [seeds, distances, trials], got shape {correct.shape}")
    _check_resampling(level, n_resamples)
    halfway = halfway_level(chance)
    n_seeds, n_distances, n_trials = correct.shape
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, n_seeds, (n_resamples, n_seeds, 1, 1))
    trial_draws = rng.integers(0, n_trials, (n_resamples, 1, n_distances, n_trials))
    curves = correct[seed_draws, np.arange(n_distances)[None, None, :, None], trial_draws].mean(axis=(1, 3))
    draws = crossing_distance(distances, curves, halfway)
    estimate = float(crossing_distance(distances, correct.mean(axis=(0, 2)), halfway))
    tail = (1 - level) / 2
    # "lower"/"higher" pick order statistics: interpolating next to an inf draw would give nan
    low, high = np.quantile(draws, tail, method="lower"), np.quantile(draws, 1 - tail, method="higher")
    return Interval(estimate, float(low), float(high), level,
                    f"bootstrap over {n_seeds} seeds × {n_trials} probes per distance")


def _finite_or_none(value: float) -> float | None:
    return None if math.isinf(value) else value


def half_accuracy_summary(distances: Sequence[int], correct: np.ndarray, chance: float, bound: int,
                          ratio_margin: float = 0.1) -> dict:
    """``half_accuracy_distance`` and the same in units of ``bound``, with the ``bound``, as JSON-safe dicts
    {estimate, low, high, method} where ``None`` means beyond the largest distance (JSON has no
    infinity), "below_at_shortest": accuracy is already at or below the halfway level at the
    first distance, and, when the bound lies inside the distances (else a crossing beyond them
    says nothing about it), "verdict" on "retrieval holds up to the bound": the half-accuracy
    distance is not short of the bound by more than ``ratio_margin`` × L_θ (supported when its
    interval over L_θ lies wholly above 1 − margin, contradicted when wholly below). A curve
    already below halfway at the shortest distance cannot support it: if that distance lies
    beyond 1 − margin of the bound, whether retrieval held before it is unknown ("reason").
    """
    half = half_accuracy_distance(distances, correct, chance)
    correct = np.asarray(correct, dtype=np.float64)
    summary = {"bound": int(bound), "distance": {}, "over_bound": {}, "halfway_level": halfway_level(chance),
               "below_at_shortest": bool(correct[:, 0].mean() <= halfway_level(chance)),
               "ratio_margin": float(ratio_margin)}
    for key, scale in (("distance", 1.0), ("over_bound", float(bound))):
        summary[key] = {"estimate": _finite_or_none(half.estimate / scale), "low": _finite_or_none(half.low / scale),
                        "high": _finite_or_none(half.high / scale), "method": half.method}
    if bound < max(distances):
        over = Interval(half.estimate / bound, half.low / bound, half.high / bound, half.level, half.method)
        outcome = verdict(over, 1.0 - ratio_margin, claim="above")
        if outcome == SUPPORTED and summary["below_at_shortest"]:
            outcome = CANNOT_TELL
            summary["reason"] = ("accuracy is below halfway already at the shortest distance: whether retrieval "
                                 "held before it is not measured")
        summary["verdict"] = outcome
    return summary


def describe_half_accuracy(half: dict | None, distances: Sequence[int]) -> str:
    """``half_accuracy_summary``'s result as text, e.g. "halves at 64 [63, 65] = 3.37 [3.30,
    3.42] × L_θ; retrieval holds up to the bound: supported"; a crossing beyond the largest of
    ``distances`` reads "> <largest>"."""
    if half is None:
        return "half-accuracy distance not computed (distances with different numbers of trials)"
    largest = max(distances)

    def text(value, scale, spec):
        return f"> {largest / scale:{spec}}" if value is None else f"{value:{spec}}"

    def interval(name, scale, spec):
        values = half[name]
        return (f"{text(values['estimate'], scale, spec)} [{text(values['low'], scale, spec)}, "
                f"{text(values['high'], scale, spec)}]")

    if half["below_at_shortest"]:
        line = (f"at or below {half['halfway_level']:.2f} already at the shortest distance, {min(distances)} "
                f"= {min(distances) / half['bound']:.2f} × L_θ")
    elif half["distance"]["estimate"] is None:
        line = (f"does not halve within the probed distances (up to {largest} = {largest / half['bound']:.2f} × L_θ)")
    else:
        line = (f"halves at {interval('distance', 1.0, '.0f')} = {interval('over_bound', half['bound'], '.2f')} "
                f"× L_θ")
    if "unjudged" in half:
        return line + f"; no verdict: {half['unjudged']}"
    if "verdict" in half:
        margin = half.get("ratio_margin", 0.0)
        line += f"; retrieval holds up to the bound (ratio above {1 - margin:g}): {half['verdict']}"
        return line + (f" ({half['reason']})" if "reason" in half else "")
    return line + " (the bound lies beyond the probed distances: no verdict)"


# ---------------------------------------------------------------- the bound's retrieval claims


def retrieval_gate(within: Interval, level: float) -> str | None:
    """Why a model's accuracy within its bound (``within``) does not let the bound be tested, or
    None when it retrieves there (the interval wholly above ``level``, the halfway level): a
    bound cannot be tested on a model that does not retrieve at all."""
    if within.low > level:
        return None
    if within.high <= level:
        return (f"it does not retrieve within its bound (accuracy {within.estimate:.2f} [{within.low:.2f}, "
                f"{within.high:.2f}], not above the halfway level {level:.2f}): the bound cannot be tested on a "
                "model that does not retrieve")
    return (f"whether it retrieves within its bound cannot be told (accuracy {within.estimate:.2f} "
            f"[{within.low:.2f}, {within.high:.2f}] reaches the halfway level {level:.2f})")


def interval_json(interval: Interval) -> dict:
    """An ``Interval`` as the JSON dict {estimate, low, high, method} the results files store
    (``interval_from`` reads it back)."""
    return {"estimate": interval.estimate, "low": interval.low, "high": interval.high, "method": interval.method}


def fails_beyond_verdict(within: Interval, beyond: Interval, chance: float) -> dict:
    """"Retrieval fails beyond the bound": accuracy beyond the bound (``beyond``) lies below the
    halfway level from perfect to ``chance``. Supported when the ``beyond`` interval lies wholly
    below it *and* the model retrieves within its bound (``within`` wholly above it); contradicted
    when ``beyond`` lies wholly above it (the model retrieves past its bound); otherwise cannot
    tell, with the "reason" when the model does not retrieve within its bound.
    Returns {within, beyond: interval dicts, halfway_level, verdict, reason (or None)}."""
    level = halfway_level(chance)
    reason = retrieval_gate(within, level)
    outcome = verdict(beyond, level, claim="below")
    if outcome == SUPPORTED and reason is not None:
        outcome = CANNOT_TELL
    return {"within": interval_json(within), "beyond": interval_json(beyond), "halfway_level": level,
            "verdict": outcome, "reason": reason if outcome == CANNOT_TELL else None}


def gated_verdict(interval: Interval, threshold: float, *, claim: str, margin: float,
                  reason: str | None) -> dict:
    """``verdict`` of a claim that only means something when ``reason`` is None (e.g. a drop of
    retrieval that needs a model that retrieves): with a ``reason`` it cannot be supported, and
    it cannot be told either way when it would be. {estimate, low, high, method, verdict, margin, reason}."""
    outcome = verdict(interval, threshold, claim=claim, margin=margin)
    if reason is not None and outcome == SUPPORTED:
        outcome = CANNOT_TELL
    return dict(interval_json(interval), verdict=outcome, margin=margin,
                reason=reason if outcome == CANNOT_TELL else None)


def interval_from(stored: dict, level: float = 0.95) -> Interval:
    """An ``Interval`` back from its JSON dict {estimate, low, high, method}."""
    return Interval(stored["estimate"], stored["low"], stored["high"], level, stored.get("method", ""))


def gated_family(claims: dict[str, dict], threshold: float, *, claim: str, margin: float = 0.0,
                 interval_key: str | None = None) -> FamilyVerdicts:
    """``family_verdicts`` (Holm) over several settings judged on one claim, from their verdict
    dicts (``claims``: setting → dict with the interval, or with it under ``interval_key``, and
    "reason"): a setting whose claim cannot be judged (a "reason") stays "cannot tell" after the
    adjustment too, as it is alone."""
    intervals = {name: interval_from(c[interval_key] if interval_key else c) for name, c in claims.items()}
    family = family_verdicts(intervals, threshold, claim=claim, margin=margin)
    gated = {name for name, c in claims.items() if c.get("reason")}

    def gate(verdicts):
        return {name: CANNOT_TELL if name in gated and v == SUPPORTED else v for name, v in verdicts.items()}

    return FamilyVerdicts(gate(family.per_setting), gate(family.holm), family.expected_by_chance, family.level)


def passkey_chance(digits: int = 5) -> float:
    """The strongest rule that needs no model on the passkey: the keys are uniform over the
    ``digits``-digit numbers, so answering the most frequent key is no better than a guess,
    1 / (9 · 10^(digits − 1))."""
    return 1.0 / (9 * 10 ** (digits - 1))
