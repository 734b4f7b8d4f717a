"""Small metrics on hidden states, masked over padding, and ShortGPT's Block Influence."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from shortlab.arch import forward_for_hidden_states, model_parts, validate_layer_indices
from shortlab.hooks import capture_layer_io


def token_cosine(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each token's hidden state before and after a layer.

    x_in, x_out: [batch, seq, hidden] → [batch, seq] on x_in's device (x_out is moved there: under
    a ``device_map`` a layer's input and output can sit on different devices), computed in
    float32 per token (never an N×N matrix), so half-precision models do not lose the small
    differences BI is made of.
    """
    if x_in.shape != x_out.shape:
        raise ValueError(f"hidden-state shapes differ: {tuple(x_in.shape)} vs {tuple(x_out.shape)}")
    return F.cosine_similarity(x_in.float(), x_out.to(x_in.device).float(), dim=-1)


def masked_sum_and_count(values: torch.Tensor, mask: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of ``values`` [batch, seq] where ``mask`` [batch, seq] is nonzero, and how many
    positions that is (all of them when mask is None); both 0-d tensors on values' device, so
    accumulating them never forces a device sync."""
    if mask is None:
        return values.sum(), torch.tensor(values.numel(), device=values.device)
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {tuple(values.shape)}")
    keep = mask.to(device=values.device, dtype=values.dtype)
    return (values * keep).sum(), keep.sum()


class BlockInfluenceAccumulator:
    """Streaming BI_i = 1 − mean over non-padding tokens of cos(x_i, x_{i+1}).

    Use as the ``reduce`` of ``hooks.capture_layer_io``: it keeps one running sum and count per
    layer instead of any hidden state. Set ``mask`` to the batch's attention mask before each
    forward pass.
    """

    def __init__(self, layers: Iterable[int]):
        self.layers = tuple(layers)
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None

    def __call__(self, layer_index: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        total, count = masked_sum_and_count(token_cosine(hidden_in, hidden_out), self.mask)
        self.sums[layer_index] = self.sums.get(layer_index, 0) + total.double()
        self.counts[layer_index] = self.counts.get(layer_index, 0) + count.double()

    def result(self) -> dict[int, float]:
        missing = [i for i in self.layers if i not in self.sums]
        if missing:
            raise RuntimeError(f"no forward pass reached layers {missing}")
        empty = [i for i in self.layers if self.counts[i].item() == 0]
        if empty:
            raise ValueError("every token was masked out: no non-padding token to average over")
        return {i: 1.0 - (self.sums[i] / self.counts[i]).item() for i in self.layers}


TokenMask = torch.Tensor | Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
"""A bool [batch, seq] mask, or a function of a batch returning one."""


def _tokens_to_average(batch: Mapping[str, torch.Tensor], token_mask: TokenMask | None
                       ) -> torch.Tensor | None:
    """The [batch, seq] mask of tokens whose cosines enter the mean: the batch's attention mask,
    restricted to ``token_mask`` where one is given (None: every token)."""
    attention_mask = batch.get("attention_mask")
    if token_mask is None:
        return attention_mask
    selected = token_mask(batch) if callable(token_mask) else token_mask
    if not isinstance(selected, torch.Tensor) or selected.dtype != torch.bool:
        got = getattr(selected, "dtype", type(selected).__name__)
        raise TypeError(f"token_mask must be a bool tensor [batch, seq], got {got}")
    if attention_mask is None:
        return selected
    if selected.shape != attention_mask.shape:  # ``&`` would broadcast a [1, seq] mask silently
        raise ValueError(f"token_mask shape {tuple(selected.shape)} does not match the attention "
                         f"mask {tuple(attention_mask.shape)}")
    return attention_mask.bool() & selected.to(attention_mask.device)


def block_influence(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
                    layers: Iterable[int] | None = None,
                    token_mask: TokenMask | None = None) -> dict[int, float]:
    """ShortGPT's Block Influence of each decoder layer over calibration batches.

    ``batches`` yields model inputs (``input_ids`` [batch, seq] and ``attention_mask``, which
    excludes padding from the mean). One forward pass per batch; layer inputs and outputs are
    taken from the decoder layers themselves and reduced on the fly, so no more than one layer's
    hidden states are alive at a time. Returns {layer index: BI}.

    ``token_mask`` restricts the mean to some tokens (padding stays excluded): a bool
    [batch, seq] tensor used for every batch, or a function of a batch returning one, e.g. the
    visual tokens for ShortV's cosine-similarity baseline (``token_groups`` from
    ``shortlab.contribution``),
    ``lambda b: token_groups(model, b["input_ids"], b["attention_mask"])["visual"]``.
    """
    parts = model_parts(model)
    chosen = range(parts.num_layers) if layers is None else validate_layer_indices(parts, layers)
    accumulator = BlockInfluenceAccumulator(chosen)
    seen_batch = False
    with torch.inference_mode(), capture_layer_io(model, accumulator.layers, reduce=accumulator):
        for batch in batches:
            seen_batch = True
            accumulator.mask = _tokens_to_average(batch, token_mask)
            forward_for_hidden_states(model, batch)
    if not seen_batch:
        raise ValueError("empty calibration set: no batch was given")
    return accumulator.result()


def _unit_tokens(hidden: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The kept tokens of ``hidden`` [batch, seq, hidden] as float32 unit vectors [n_kept, hidden]
    (``keep``: bool [batch, seq], None keeps every token)."""
    tokens = hidden.float().flatten(0, 1) if keep is None else hidden.float()[keep.to(hidden.device)]
    return F.normalize(tokens, dim=-1)


def layer_similarity(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """Mean cosine similarity between the residual stream at every pair of depths.

    Point ``i < L`` is the input of decoder layer ``i`` (so point 0 is the embeddings as the
    decoder stack receives them) and point ``L`` is the last layer's output, before the final
    norm: the same states Block Influence compares, so ``1 - S[i, i + 1]`` is layer ``i``'s BI.
    ``S[i, j]`` = mean over non-padding tokens t of cos(x_{i,t}, x_{j,t}).

    ``batches`` yields model inputs (``input_ids`` [batch, seq], optional ``attention_mask``);
    one forward pass per batch, and only that batch's L + 1 states (unit vectors of its
    non-padding tokens) are held at a time. Returns float64 [L + 1, L + 1] on the CPU,
    symmetric. As in ``token_cosine``, a state that is exactly zero has cosine 0 with
    everything, itself included, so the diagonal is 1 unless some token's state is zero (e.g.
    a zero-initialised padding embedding of a random model used as an ordinary token).
    """
    parts = model_parts(model)
    num_layers = parts.num_layers
    device = parts.embed_tokens.weight.device  # where the states meet (layers may be sharded)
    states: list[torch.Tensor | None] = [None] * (num_layers + 1)
    keep: list[torch.Tensor | None] = [None]

    def collect(index: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        states[index] = _unit_tokens(hidden_in, keep[0]).to(device)
        if index == num_layers - 1:
            states[num_layers] = _unit_tokens(hidden_out, keep[0]).to(device)

    sums: torch.Tensor | None = None
    n_tokens = 0
    with torch.inference_mode(), capture_layer_io(model, reduce=collect):
        for batch in batches:
            mask = batch.get("attention_mask")
            keep[0] = None if mask is None else mask.bool()
            forward_for_hidden_states(model, batch)
            stacked = torch.stack(states).flatten(1)  # [L + 1, n_kept * hidden]
            gram = (stacked @ stacked.T).double()  # summed cosines over this batch's tokens
            sums = gram if sums is None else sums + gram
            n_tokens += states[0].shape[0]
            states[:] = [None] * (num_layers + 1)
    if sums is None:
        raise ValueError("empty calibration set: no batch was given")
    if n_tokens == 0:
        raise ValueError("every token was masked out: no non-padding token to average over")
    return (sums / n_tokens).cpu()
