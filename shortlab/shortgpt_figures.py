"""Figures of notebook 01 that are more than a few lines, drawn on axes the caller owns from
arrays the evidence gives, so that a notebook cell stays one glance long."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from shortlab.pruning import lowest_layers


def relative_depth(layers: Sequence[int], num_layers: int) -> np.ndarray:
    """Layer index / (L − 1): 0 for the first decoder layer, 1 for the last."""
    return np.asarray(layers, dtype=np.float64) / max(num_layers - 1, 1)


def low_band(influence: Sequence[float] | np.ndarray, fraction: float) -> dict:
    """The ``round(fraction · L)`` layers of lowest Block Influence (at least one) of a profile
    [L]: {"layers" (sorted), "from", "to" (their relative depths' range), "centre" (mean
    relative depth)}."""
    values = np.asarray(influence, dtype=np.float64)
    chosen = sorted(lowest_layers(values, max(1, round(fraction * values.size))))
    depth = relative_depth(chosen, values.size)
    return {"layers": chosen, "from": float(depth.min()), "to": float(depth.max()), "centre": float(depth.mean())}


def draw_bi_atlas(ax_profiles, ax_bands, profiles: Mapping[str, np.ndarray], fraction: float,
                  published: Mapping[str, tuple[Sequence[int], int]] | None = None) -> None:
    """Left (``ax_profiles``): Block Influence against relative depth, one line per model in
    ``profiles`` ({name: BI [L]}), log scale. Right (``ax_bands``): one row per model, every layer
    a dot at its relative depth and the lowest-BI ``fraction`` of them filled; ``published``
    ({name: (removed layers, L)}) adds the paper's removals below, as filled dots only."""
    for name, values in profiles.items():
        values = np.asarray(values, dtype=np.float64)
        ax_profiles.plot(relative_depth(range(values.size), values.size), values, marker="o", ms=3,
                         label=f"{name} ({values.size} layers)")
    ax_profiles.set_yscale("log")
    ax_profiles.set_xlabel("relative depth (layer / (L − 1))")
    ax_profiles.set_ylabel("Block Influence")
    ax_profiles.legend(fontsize=8)
    rows = [(name, low_band(values, fraction)["layers"], len(values)) for name, values in profiles.items()]
    rows += [(f"{name} (paper)", list(removed), n) for name, (removed, n) in (published or {}).items()]
    for row, (name, removed, n) in enumerate(rows):
        if not name.endswith("(paper)"):
            ax_bands.scatter(relative_depth(range(n), n), np.full(n, row), s=14, facecolors="none",
                             edgecolors="0.6", linewidths=0.8)
        ax_bands.scatter(relative_depth(removed, n), np.full(len(removed), row), s=22, color=f"C{row}", zorder=3)
    ax_bands.set_yticks(range(len(rows)), [name for name, _, _ in rows])
    ax_bands.invert_yaxis()
    ax_bands.set_xlim(-0.03, 1.03)
    ax_bands.set_xlabel("relative depth (layer / (L − 1))")
    ax_bands.set_title(f"filled: the lowest-BI {fraction:.0%} of the layers (the paper's: the layers it removed)")


def draw_healing(ax_perplexity, ax_accuracy, rows: Sequence[Mapping], metric: str = "acc") -> None:
    """What healing changed, per criterion (rows of ``shortgpt_evidence.healing_comparison``):
    left, perplexity ÷ the dense model's before and after healing (log scale, 95 % intervals);
    right, pooled accuracy before and after. The healed dense model (the control) has only its
    "after" point; a dotted line marks the dense model."""
    names = [row["criterion"] for row in rows]
    x = np.arange(len(names))
    for ax, key, label in ((ax_perplexity, "perplexity ÷ dense", "perplexity ÷ dense model's"),
                           (ax_accuracy, f"pooled {metric}", f"pooled {metric}")):
        for offset, stage, marker in ((-0.12, "pruned", "o"), (0.12, "healed", "s")):
            points = [(i, row.get(f"{key}, {stage}")) for i, row in enumerate(rows)]
            points = [(i, interval) for i, interval in points if interval is not None]
            if not points:
                continue
            where, intervals = zip(*points)
            ax.errorbar(np.array(where) + offset, [i.estimate for i in intervals],
                        yerr=[[max(i.estimate - i.low, 0) for i in intervals], [max(i.high - i.estimate, 0) for i in intervals]],
                        fmt=marker, capsize=3, label=f"{stage}" if stage == "pruned" else "after healing")
        ax.set_xticks(x, names, rotation=20, ha="right")
        ax.set_xlabel("layers removed by")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    ax_perplexity.set_yscale("log")
    ax_perplexity.axhline(1.0, color="black", ls=":", lw=1)
