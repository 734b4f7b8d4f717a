"""Layer removal and the layer rankings that choose what to remove (ShortGPT and its baselines).

Every ranking has the signature ``rank(model, batches, n_remove, seed=0) -> list[int]``: the
original indices of the ``n_remove`` decoder layers to delete, in the order the method picks
them. ``batches`` is a re-iterable sequence of model inputs (``input_ids``, ``attention_mask``)
from a calibration set; rankings that ignore data (reverse order, random) accept it all the same.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from shortlab.arch import forward_for_hidden_states, model_parts, validate_layer_indices
from shortlab.hooks import capture_layer_io
from shortlab.metrics import block_influence, masked_sum_and_count

Batches = Sequence[Mapping[str, torch.Tensor]]


def remove_layers(model: nn.Module, indices: Iterable[int], inplace: bool = False) -> nn.Module:
    """Delete decoder layers for real: the result runs, caches, generates and saves as a
    smaller model of the same class.

    With ``inplace=False`` (default) the model is deep-copied first and the caller's model is
    untouched (the copy needs as much memory again); ``inplace=True`` edits ``model`` itself.
    Besides shortening the layer list, the config's ``num_hidden_layers`` and per-layer lists
    (``layer_types``) follow, and the kept layers' KV-cache indices are renumbered 0..n-1 so
    ``generate()`` with a cache addresses the right slots.
    """
    parts = model_parts(model)
    removed = set(validate_layer_indices(parts, indices, allow_empty=True))
    if len(removed) == parts.num_layers:
        raise ValueError(f"cannot remove all {parts.num_layers} decoder layers")
    if getattr(parts.text_config, "is_heterogeneous", False):
        raise ValueError(
            f"{type(model).__name__} has a heterogeneous per-layer config; removing its layers "
            "would need its per_layer_config remapped, which shortlab does not do"
        )
    target = model if inplace else copy.deepcopy(model)
    target_parts = model_parts(target)
    kept = [i for i in range(parts.num_layers) if i not in removed]
    new_layers = nn.ModuleList([target_parts.layers[i] for i in kept])
    owner_path, _, attribute = target_parts.layers_path.rpartition(".")
    owner = target.get_submodule(owner_path) if owner_path else target
    setattr(owner, attribute, new_layers)
    for new_index, layer in enumerate(new_layers):
        target_parts.set_kv_cache_index(layer, new_index)
    config = target_parts.text_config
    for field in target_parts.per_layer_config_fields:
        values = getattr(config, field)
        setattr(config, field, [values[i] for i in kept])
    config.num_hidden_layers = len(kept)
    return target


def _check_n_remove(model: nn.Module, n_remove: int) -> int:
    num_layers = model_parts(model).num_layers
    if not 0 <= n_remove < num_layers:
        raise ValueError(f"n_remove must be in [0, {num_layers - 1}] for {num_layers} layers, got {n_remove}")
    return num_layers


def _lowest(scores: Mapping[int, float], n: int) -> list[int]:
    return sorted(scores, key=lambda i: (scores[i], i))[:n]


def rank_block_influence(model: nn.Module, batches: Batches, n_remove: int, seed: int = 0) -> list[int]:
    """ShortGPT, one shot: the ``n_remove`` layers with the lowest Block Influence."""
    _check_n_remove(model, n_remove)
    return _lowest(block_influence(model, batches), n_remove)


def iterative_block_influence(model: nn.Module, batches: Batches, n_remove: int
                              ) -> tuple[list[int], dict[int, float]]:
    """Remove the lowest-BI layer, recompute BI on the pruned model, repeat (on a copy).

    Returns the removed layers (original indices, in removal order) and each one's BI at the
    step it was removed.
    """
    num_layers = _check_n_remove(model, n_remove)
    original = list(range(num_layers))  # original index of each layer of the working copy
    working = copy.deepcopy(model) if n_remove else model
    chosen: list[int] = []
    scores: dict[int, float] = {}
    for _ in range(n_remove):
        influence = block_influence(working, batches)
        (position,) = _lowest(influence, 1)
        layer = original.pop(position)
        chosen.append(layer)
        scores[layer] = influence[position]
        remove_layers(working, [position], inplace=True)
    return chosen, scores


def rank_iterative_block_influence(model: nn.Module, batches: Batches, n_remove: int,
                                   seed: int = 0) -> list[int]:
    """Iterative BI (``iterative_block_influence``): the removed layers in removal order."""
    return iterative_block_influence(model, batches, n_remove)[0]


def rank_reverse_order(model: nn.Module, batches: Batches, n_remove: int, seed: int = 0) -> list[int]:
    """The paper's reverse-order ablation: the deepest layers first."""
    num_layers = _check_n_remove(model, n_remove)
    return list(range(num_layers - 1, num_layers - 1 - n_remove, -1))


def rank_random(model: nn.Module, batches: Batches, n_remove: int, seed: int = 0) -> list[int]:
    """A seeded uniformly random choice (``random_layers``)."""
    return random_layers(_check_n_remove(model, n_remove), n_remove, seed)


def random_layers(num_layers: int, n_remove: int, seed: int = 0, *, allow_all: bool = False) -> list[int]:
    """``n_remove`` of ``num_layers`` layer indices drawn uniformly without replacement, seeded:
    the set ``rank_random`` removes from a model of that depth. ``allow_all``: ``n_remove`` may
    be every layer (a choice of layers to freeze rather than to delete)."""
    largest = num_layers if allow_all else num_layers - 1
    if not 0 <= n_remove <= largest:
        raise ValueError(f"n_remove must be in [0, {largest}] for {num_layers} layers, got {n_remove}")
    return random.Random(seed).sample(range(num_layers), n_remove)


def relative_magnitude(model: nn.Module, batches: Batches) -> dict[int, float]:
    """Mean over non-padding tokens of ‖f(x)‖ / ‖x + f(x)‖ per layer, f(x) = x_out − x_in."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, torch.Tensor] = {}
    mask: list[torch.Tensor | None] = [None]

    def accumulate(index: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        hidden_in, hidden_out = hidden_in.float(), hidden_out.float()
        ratio = (hidden_out - hidden_in).norm(dim=-1) / hidden_out.norm(dim=-1).clamp_min(1e-12)
        total, count = masked_sum_and_count(ratio, mask[0])
        sums[index] = sums.get(index, 0) + total.double()
        counts[index] = counts.get(index, 0) + count.double()

    with torch.inference_mode(), capture_layer_io(model, reduce=accumulate):
        for batch in batches:
            mask[0] = batch.get("attention_mask")
            forward_for_hidden_states(model, batch)
    if not sums:
        raise ValueError("empty calibration set: no batch was given")
    return {i: (sums[i] / counts[i]).item() for i in sorted(sums)}


def rank_relative_magnitude(model: nn.Module, batches: Batches, n_remove: int, seed: int = 0) -> list[int]:
    """The paper's relative-magnitude ablation: lowest ‖f(x)‖/‖x+f(x)‖ first."""
    _check_n_remove(model, n_remove)
    return _lowest(relative_magnitude(model, batches), n_remove)


def _last_token_states(model: nn.Module, batches: Batches) -> list[torch.Tensor]:
    """Hidden state of each sequence's last non-padding token entering every layer, plus the last
    layer's output: ``L + 1`` tensors of [n_sequences, hidden] (one token per sequence is kept)."""
    num_layers = model_parts(model).num_layers
    states: list[list[torch.Tensor]] = [[] for _ in range(num_layers + 1)]
    last: list[torch.Tensor | None] = [None]

    def keep_last(index: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        rows = torch.arange(hidden_in.shape[0], device=hidden_in.device)
        last_positions = last[0].to(hidden_in.device)
        states[index].append(hidden_in[rows, last_positions].float().cpu())
        if index == num_layers - 1:
            states[num_layers].append(hidden_out[rows, last_positions].float().cpu())

    with torch.inference_mode(), capture_layer_io(model, reduce=keep_last):
        for batch in batches:
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(ids)
            # last index where the mask is 1 (right or left padding alike)
            positions = torch.arange(ids.shape[1], device=mask.device).expand_as(mask)
            last[0] = torch.where(mask.bool(), positions, -1).amax(dim=1)
            forward_for_hidden_states(model, batch)
    if not states[0]:
        raise ValueError("empty calibration set: no batch was given")
    return [torch.cat(per_layer) for per_layer in states]


def angular_distances(model: nn.Module, batches: Batches, block_size: int) -> dict[int, float]:
    """Gromov et al. (2024): for each start l, the mean over sequences of
    arccos(cos(x_l, x_{l+n})) / π at the last token, between the input of layer l and the output
    of layer l + n − 1. Returns {l: distance} for l = 0 … L − n."""
    num_layers = model_parts(model).num_layers
    if not 1 <= block_size <= num_layers:
        raise ValueError(f"block_size must be in [1, {num_layers}], got {block_size}")
    return _angular_distances_from_states(_last_token_states(model, batches), block_size)


def _angular_distances_from_states(states: list[torch.Tensor], block_size: int) -> dict[int, float]:
    num_layers = len(states) - 1
    distances = {}
    for start in range(num_layers - block_size + 1):
        cosine = torch.nn.functional.cosine_similarity(states[start], states[start + block_size], dim=-1)
        distances[start] = (torch.arccos(cosine.clamp(-1.0, 1.0)) / math.pi).mean().item()
    return distances


def rank_angular_distance(model: nn.Module, batches: Batches, n_remove: int, seed: int = 0) -> list[int]:
    """Gromov et al. (2024): the block of ``n_remove`` consecutive layers whose input and output
    are closest in angle (the earliest block on ties)."""
    _check_n_remove(model, n_remove)
    if n_remove == 0:
        return []
    return _closest_block(_last_token_states(model, batches), n_remove)


def _closest_block(states: list[torch.Tensor], block_size: int) -> list[int]:
    distances = _angular_distances_from_states(states, block_size)
    start = min(distances, key=lambda first: (distances[first], first))
    return list(range(start, start + block_size))


Ranking = Callable[[nn.Module, Batches, int, int], list[int]]

RANKINGS: dict[str, Ranking] = {
    "block_influence": rank_block_influence,
    "iterative_block_influence": rank_iterative_block_influence,
    "reverse_order": rank_reverse_order,
    "random": rank_random,
    "relative_magnitude": rank_relative_magnitude,
    "angular_distance": rank_angular_distance,
}


def rank_layers(method: str, model: nn.Module, batches: Batches, n_remove: int, seed: int = 0) -> list[int]:
    """Dispatch to a ranking by name (``RANKINGS``)."""
    if method not in RANKINGS:
        raise ValueError(f"unknown ranking {method!r}; known: {sorted(RANKINGS)}")
    return RANKINGS[method](model, batches, n_remove, seed)


def rank_layers_for_counts(method: str, model: nn.Module, batches: Batches, counts: Iterable[int],
                           seed: int = 0) -> dict[int, list[int]]:
    """``{k: rank_layers(method, model, batches, k, seed)}`` for every ``k`` in ``counts``, with
    one analysis of the model instead of one per ``k``: score-based rankings (BI, relative
    magnitude) score the layers once; iterative BI runs once up to the largest ``k`` (it is
    greedy, so its choice for ``k`` is its first ``k`` removals); angular distance collects the
    last-token states once and compares blocks of every size on them."""
    if method not in RANKINGS:
        raise ValueError(f"unknown ranking {method!r}; known: {sorted(RANKINGS)}")
    counts = sorted(set(counts))
    for n_remove in counts:
        _check_n_remove(model, n_remove)
    if not counts:
        return {}
    if method in _SCORES:
        scores = _SCORES[method](model, batches)
        return {k: _lowest(scores, k) for k in counts}
    if method == "iterative_block_influence":
        order = rank_iterative_block_influence(model, batches, counts[-1])
        return {k: order[:k] for k in counts}
    if method == "angular_distance":
        states = _last_token_states(model, batches) if counts[-1] else []
        return {k: _closest_block(states, k) if k else [] for k in counts}
    return {k: RANKINGS[method](model, batches, k, seed) for k in counts}


_SCORES: dict[str, Callable[[nn.Module, Batches], dict[int, float]]] = {
    "block_influence": block_influence,
    "relative_magnitude": relative_magnitude,
}


def lowest_layers(scores: Mapping[int, float] | Sequence[float], k: int) -> list[int]:
    """The ``k`` layers with the lowest scores, lowest first, ties broken by the smaller index.

    ``scores``: ``{layer: score}`` (as ``block_influence`` returns) or one score per layer in
    order (a list or 1-D array). ``k`` may be 0 … the number of layers; the full ordering is
    ``lowest_layers(scores, len(scores))``. Raises ValueError on a NaN score, which would make
    the order arbitrary.
    """
    by_layer = dict(scores) if isinstance(scores, Mapping) else dict(enumerate(scores))
    values = {layer: float(value) for layer, value in by_layer.items()}
    nan = [layer for layer, value in values.items() if math.isnan(value)]
    if nan:
        raise ValueError(f"scores of layers {nan} are NaN; cannot rank them")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(values):
        raise ValueError(f"k must be an int in 0..{len(values)} (the number of scores), got {k!r}")
    return _lowest(values, k)
