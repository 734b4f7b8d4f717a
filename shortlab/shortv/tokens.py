"""Gathering a subset of token positions per row of a batch, padded to one width."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
