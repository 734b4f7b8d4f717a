"""Figures of notebook 03's experiments that are more than a few lines, drawn on axes the caller
owns from the summaries the experiment functions return."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def draw_depth_grid(ax, by_depth: Sequence[Mapping], distances: Sequence[int], bound: int, title: str = ""):
    """Retrieval accuracy by the record's depth (rows) and its distance to the query (columns),
    from ``from_scratch.summarize``'s "by_depth" rows of one base, with the base's bound marked;
    returns the image (for a colour bar)."""
    rates = np.array([[cell["rate"] for cell in row["accuracy"]] for row in by_depth])  # [depths, distances]
    image = ax.imshow(rates, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    distances = list(distances)
    step = max(1, len(distances) // 8)
    ax.set_xticks(range(0, len(distances), step), [str(d) for d in distances[::step]])
    ax.set_yticks(range(len(by_depth)), [f"{row['depth']:g}" for row in by_depth])
    if bound <= distances[-1]:  # the bound between the columns around it, on a log-spaced grid
        position = float(np.interp(np.log(bound), np.log(distances), np.arange(len(distances))))
        ax.axvline(position, color="white", ls="--", lw=1.5)
    ax.set_xlabel("record–query distance (dashed: L_θ)")
    ax.set_ylabel("record depth (0: first start, 1: last)")
    ax.grid(False)
    if title:
        ax.set_title(title)
    return image


def draw_predictors(ax, comparison: Mapping, names: Sequence[str]) -> None:
    """Measured failure distance (geometric mean over a base's models, the bar their range)
    against the distance each predictor in ``names`` gives for that base, scaled by the one factor
    fitted over all bases (``predictors.predictor_comparison``'s "measured" and "predicted"), on
    log axes with the line where they agree."""
    measured = comparison["measured"]
    bases = sorted(measured)
    low = high = None
    for name, marker in zip(names, "os^D"):
        predicted = comparison["predicted"][name]
        x = np.array([predicted[b] for b in bases], dtype=np.float64)
        means = np.array([np.exp(np.mean(np.log(measured[b]))) for b in bases])
        scale = float(np.exp(np.mean(np.log(means / x))))
        spread = np.array([[m - min(measured[b]), max(measured[b]) - m] for m, b in zip(means, bases)]).T
        ax.errorbar(scale * x, means, yerr=spread, fmt=marker, capsize=3, label=f"{name} (× {scale:.2f})")
        values = np.concatenate([scale * x, means])
        low = values.min() if low is None else min(low, values.min())
        high = values.max() if high is None else max(high, values.max())
    ax.plot([low / 1.2, high * 1.2], [low / 1.2, high * 1.2], color="black", lw=0.8, label="measured = predicted")
    ax.set(xscale="log", yscale="log", xlabel="predicted failure distance (scaled)",
           ylabel="measured half-accuracy distance")
    ax.legend(fontsize=8, loc="upper left")
