"""Figures of notebook 01 that are more than a few lines, drawn on axes the caller owns from
arrays the evidence gives, so that a notebook cell stays one glance long."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from shortlab.pruning import lowest_layers

RANKING_LABELS = {"block_influence": "BI", "iterative_block_influence": "iterative BI", "reverse_order": "reverse order",
                  "relative_magnitude": "relative magnitude", "angular_distance": "angular distance"}


def ranking_label(name: str) -> str:
    """A ranking's short name for tick labels ("iterative BI" for iterative_block_influence)."""
    return RANKING_LABELS.get(name, name.replace("_", " "))


def plain_log_ticks(ax) -> None:
    """Tick labels of a log-scale y axis as plain numbers (1.02, 30, 6e-08) rather than powers of
    ten. Minor ticks are labelled only where the axis spans few decades (all of them below 0.4
    decades, else those at 2, 3 and 5 times a power of ten up to 1.5 decades), with a digit more
    on a narrow axis, so that labels neither crowd nor repeat."""
    import math

    from matplotlib.ticker import FuncFormatter

    def decades() -> float:
        low, high = ax.get_ylim()
        return math.log10(high / low) if low > 0 and high > 0 else math.inf

    def plain(value: float) -> str:
        return f"{value:.{4 if decades() < 0.1 else 3}g}"

    def minor(value: float, _) -> str:
        span = decades()
        if value <= 0 or span > 1.5:
            return ""
        mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
        if span > 0.4 and not any(abs(mantissa - m) < 1e-6 for m in (2, 3, 5)):
            return ""
        return plain(value)

    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: plain(value)))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


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
    ax_bands.set_ylabel("model")
    ax_bands.set_title(f"filled: the lowest-BI {fraction:.0%} of the layers (the paper's: the layers it removed)")


def draw_healing(ax_perplexity, ax_accuracy, rows: Sequence[Mapping], metric: str = "acc") -> None:
    """What healing changed, per criterion (rows of ``shortgpt_evidence.healing_comparison``):
    left, perplexity ÷ the dense model's before and after healing (log scale, 95 % intervals);
    right, pooled accuracy before and after. The healed dense model (the control) has only its
    "after" point; a dotted line marks the dense model."""
    names = [row["criterion"] for row in rows]
    x = np.arange(len(names))
    labels = ["dense (the control)" if name == "dense" else ranking_label(name) for name in names]
    for ax, key, label in ((ax_perplexity, "perplexity ÷ dense", "perplexity ÷ the unhealed dense model's"),
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
        ax.set_xticks(x, labels, rotation=20, ha="right")
        ax.set_xlabel("model: the layers removed by each criterion, or none")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    ax_perplexity.set_yscale("log")
    plain_log_ticks(ax_perplexity)
    ax_perplexity.axhline(1.0, color="black", ls=":", lw=1)


def draw_random_removal(ax, random_ratios: Mapping[int, Sequence[float]], reference: Mapping[int, float],
                        reference_label: str = "block_influence") -> None:
    """Perplexity ÷ dense of seeded random removals at each k (``random_ratios`` {k: one ratio per
    draw}) as a box (median, quartiles, whiskers at the 2.5 and 97.5 % of the draws) with the
    draws as points, and a ranking's ratio on the same blocks (``reference`` {k: ratio}) as a line;
    log scale."""
    ks = sorted(random_ratios)
    ax.set_yscale("log")
    # the whiskers are the interpolated 2.5 and 97.5 % quantiles (np.quantile), as the tables
    # print them; matplotlib's own whiskers would stop at the last draw inside them
    stats = []
    for k in ks:
        values = np.asarray(random_ratios[k], dtype=np.float64)
        low, q1, median, q3, high = np.quantile(values, [0.025, 0.25, 0.5, 0.75, 0.975])
        stats.append({"whislo": low, "q1": q1, "med": median, "q3": q3, "whishi": high, "fliers": []})
    ax.bxp(stats, positions=range(len(ks)), widths=0.3, patch_artist=True,
           boxprops={"facecolor": "0.88", "edgecolor": "0.5"}, medianprops={"color": "0.3"})
    rng = np.random.default_rng(0)
    for i, k in enumerate(ks):
        values = np.asarray(random_ratios[k], dtype=np.float64)
        ax.scatter(i + rng.uniform(-0.1, 0.1, values.size), values, s=9, color="0.4", alpha=0.7,
                   label="random draws (box: quartiles, whiskers 2.5–97.5 %)" if i == 0 else None)
    shown = [k for k in ks if k in reference]
    ax.plot([ks.index(k) for k in shown], [reference[k] for k in shown], "o-", color="tab:red", label=reference_label)
    ax.axhline(1.0, color="black", lw=0.8)
    plain_log_ticks(ax)
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set_xlabel("layers removed (k)")
    ax.set_ylabel("perplexity ÷ dense (same blocks)")
    ax.legend(fontsize=8, loc="upper left")


def draw_rankings_at_k(ax, ratios: Mapping[str, object], highlight: str = "block_influence") -> None:
    """Each ranking's perplexity ÷ dense at one k with its 95 % interval (``ratios`` {ranking:
    Interval}), one column per ranking, log scale; ``highlight`` in red."""
    names = list(ratios)
    for i, name in enumerate(names):
        found = ratios[name]
        ax.errorbar(i, found.estimate, yerr=[[found.estimate - found.low], [found.high - found.estimate]], fmt="o",
                    capsize=3, color="tab:red" if name == highlight else "tab:blue")
    ax.set_yscale("log")
    plain_log_ticks(ax)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)), [ranking_label(n) for n in names], rotation=25, ha="right")
    ax.set_xlabel("ranking")
    ax.set_ylabel("perplexity ÷ dense (95 % interval)")


def draw_ratio_claims(ax, ratios: Mapping[str, object], margin: float, clip: tuple[float, float] = (0.25, 4.0)) -> None:
    """Ratios judged against 1 (``ratios`` {name: Interval}, e.g. BI's perplexity ÷ each
    baseline's), with the band 1 ± ``margin`` where a ratio counts as a tie, on a log axis limited
    to ``clip``: an interval reaching outside it is drawn to the edge with an arrow and its value
    written beside it, so that a 1e8 ratio does not squash the 1.1 ones that carry verdicts."""
    low_edge, high_edge = clip
    ax.set_yscale("log")
    ax.axhspan(1 - margin, 1 + margin, color="0.9", zorder=0, label=f"tie: 1 ± {margin:g}")
    ax.axhline(1.0, color="black", lw=0.8)
    names = list(ratios)
    for i, name in enumerate(names):
        found = ratios[name]
        estimate = min(max(found.estimate, low_edge), high_edge)
        low, high = max(found.low, low_edge), min(found.high, high_edge)
        if found.estimate != estimate:  # off the axis: an arrow to the edge, the value written inside the axes
            ax.annotate(f"{found.estimate:.2g}", (i, estimate), xytext=(0, 16 if estimate == low_edge else -24),
                        textcoords="offset points", ha="center", fontsize=8,
                        arrowprops={"arrowstyle": "->", "color": "tab:red"})
            ax.plot(i, estimate, marker="v" if estimate == low_edge else "^", color="tab:red")
        else:
            ax.errorbar(i, estimate, yerr=[[estimate - low], [high - estimate]], fmt="o", capsize=3, color="tab:red")
    ax.set_ylim(low_edge / 1.15, high_edge * 1.15)
    plain_log_ticks(ax)
    ax.set_xticks(range(len(names)), [ranking_label(n) for n in names], rotation=25, ha="right")
    ax.set_xlabel("compared with")
    ax.set_ylabel("ratio (95 % interval)")
    ax.legend(fontsize=8, loc="upper left")
