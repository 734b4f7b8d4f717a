"""Figures of notebook 02 that are more than a few lines: drawn on an axis the caller owns, from
the rows the evidence functions return, so a cell stays one glance long."""

from __future__ import annotations

import numpy as np


def _interval_bars(ax, x, intervals, **style) -> None:
    """Points at each interval's estimate with its 95 % range as error bars."""
    ax.errorbar(x, [i.estimate for i in intervals],
                yerr=[[i.estimate - i.low for i in intervals], [i.high - i.estimate for i in intervals]],
                capsize=3, **style)


def _finish_against_n(ax, counts, band: float, band_label: str, xlabel: str, ylabel: str, title: str) -> None:
    """The frame of a difference plotted against N: the band ± ``band`` where it counts as none,
    the zero line, one tick per N in ``counts``, labels, title and legend."""
    ax.axhspan(-band, band, color="0.9", zorder=0, label=band_label)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(counts)), [str(n) for n in counts])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)


def draw_type_losses(ax, rows: list[dict], tolerance: float, title: str = "") -> None:
    """Accuracy lost per question type against the number of frozen layers N (rows of
    ``evidence.family_losses``: one line per type, 95 % intervals as error bars), with the band
    ± ``tolerance`` where a loss counts as none."""
    types = list(dict.fromkeys(row["type"] for row in rows))
    width = 0.8 / max(len(types), 1)
    counts = sorted({row["N"] for row in rows})
    for k, kind in enumerate(types):
        mine = [row for row in rows if row["type"] == kind]
        x = np.array([counts.index(row["N"]) for row in mine]) + (k - (len(types) - 1) / 2) * width * 0.5
        _interval_bars(ax, x, [row["loss"] for row in mine], marker="o", label=f"{kind} ({mine[0]['questions']} questions)")
    _finish_against_n(ax, counts, tolerance, f"no loss (± {tolerance:g})",
                      "layers with frozen visual tokens (N, lowest visual LC)",
                      "accuracy lost: dense − frozen (95 % interval)", title)


def draw_choice_comparisons(ax, rows: list[dict], margin: float, title: str = "") -> None:
    """How much better LC's layers are than visual cosine's and than random draws, against the
    number of frozen layers N (rows of ``evidence.choice_comparisons``; 95 % intervals), with the
    band ± ``margin`` where a difference counts as none."""
    comparisons = list(dict.fromkeys(row["comparison"] for row in rows))
    counts = sorted({row["N"] for row in rows})
    for k, (comparison, marker) in enumerate(zip(comparisons, "os^v")):
        mine = [row["judgement"].interval for row in rows if row["comparison"] == comparison]
        x = np.arange(len(mine)) + (k - (len(comparisons) - 1) / 2) * 0.2
        _interval_bars(ax, x, mine, marker=marker, ls="none", label=comparison)
    _finish_against_n(ax, counts, margin, f"no difference (± {margin:g})", "layers with frozen visual tokens (N)",
                      "accuracy difference (95 % interval)", title)
