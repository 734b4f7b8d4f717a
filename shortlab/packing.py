"""Packing a token tree into one sequence: a shared prefix, segments that hang below it (or below
an earlier segment), each attending to its ancestors and causally to itself through a 4D
attention mask, with position ids that continue after its parent. A segment gets exactly the
logits it would get as one plain sequence with its ancestors, while the shared tokens are
computed once: one image prefix for several questions (``shortlab.llava_mini``), one question's
context for all its answer choices (``shortlab.evaluate``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedSequence:
    """One image's packed token tree: segment 0 is the prefix, others hang below a parent."""

    input_ids: list[int]
    position_ids: list[int]
    segment_of: list[int]  # segment index of every token
    parents: list[int | None]  # parent segment of each segment
    starts: list[int]  # first token of each segment

    def segment_end(self, segment: int) -> int:
        """Index of the last token of ``segment``."""
        nxt = self.starts[segment + 1] if segment + 1 < len(self.starts) else len(self.input_ids)
        return nxt - 1


def pack(prefix: list[int], segments: list[tuple[list[int], int]]) -> PackedSequence:
    """Lay out ``prefix`` then ``segments`` ``(tokens, parent_segment)`` (parent 0 = the prefix,
    k = the k-th segment, 1-based, which must come earlier). A segment's positions continue after
    its parent's last token; it attends to its ancestors and causally to itself."""
    ids, positions, segment_of = list(prefix), list(range(len(prefix))), [0] * len(prefix)
    parents: list[int | None] = [None]
    starts = [0]
    ends = [len(prefix) - 1]
    for k, (tokens, parent) in enumerate(segments, start=1):
        if not 0 <= parent < k:
            raise ValueError(f"segment {k} has parent {parent}; parents must come first")
        first = positions[ends[parent]] + 1
        starts.append(len(ids))
        ids.extend(tokens)
        positions.extend(range(first, first + len(tokens)))
        segment_of.extend([k] * len(tokens))
        parents.append(parent)
        ends.append(len(ids) - 1)
    return PackedSequence(ids, positions, segment_of, parents, starts)


def packed_attention_mask(sequences: list[PackedSequence], length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask [batch, 1, length, length] for padded packed sequences (0 = attend)."""
    masks = []
    for seq in sequences:
        n = len(seq.input_ids)
        segment = torch.tensor(seq.segment_of)
        num_segments = len(seq.parents)
        ancestor = torch.eye(num_segments, dtype=torch.bool)  # ancestor[s, t]: s may see t
        for s in range(num_segments):
            p = seq.parents[s]
            while p is not None:
                ancestor[s, p] = True
                p = seq.parents[p]
        allowed = ancestor[segment][:, segment]
        allowed &= ~((segment[:, None] == segment[None, :]) & (torch.arange(n)[None, :] > torch.arange(n)[:, None]))
        full = torch.eye(length, dtype=torch.bool)  # padding rows see themselves only
        full[:n, :n] = allowed
        masks.append(full)
    allowed = torch.stack(masks)[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def packed_batch(sequences: list[PackedSequence], pad_id: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
    """``(input_ids, position_ids, attention_mask)`` tensors for a batch of packed sequences:
    [batch, length], [batch, length] and [batch, 1, length, length], on ``device`` (default
    the CPU). They are built on the CPU, where their many small writes are cheap, and moved once."""
    length = max(len(s.input_ids) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq.input_ids)] = torch.tensor(seq.input_ids)
        position_ids[row, : len(seq.input_ids)] = torch.tensor(seq.position_ids)
    mask = packed_attention_mask(sequences, length, dtype)
    return input_ids.to(device), position_ids.to(device), mask.to(device)
