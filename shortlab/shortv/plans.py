"""Per-layer plans: which tokens a patched decoder layer computes as keys and as queries in one
forward pass, their RoPE tables and attention-mask cut, and how updated queries go back in place."""

from __future__ import annotations

import torch

from shortlab.shortv.tokens import _take, _TokenSet


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
