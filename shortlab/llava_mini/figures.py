"""Figures of notebook 02 that are more than a few lines: drawn on an axis the caller owns, from
the rows the evidence functions return, so a cell stays one glance long."""

from __future__ import annotations

import numpy as np

from shortlab.plotting import place_labels


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
    ax.tick_params(labelleft=True)  # a panel sharing its y axis with another still shows the values
    _finish_against_n(ax, counts, margin, f"no difference (± {margin:g})", "layers with frozen visual tokens (N)",
                      "accuracy difference (95 % interval)", title)


def accuracy_limits(ax, values, references=()) -> None:
    """A y range that shows every accuracy in ``values`` (estimates and interval ends) and the
    ``references`` (no-model rules drawn as lines) with a margin, clipped to [0, 1.02]: points at
    1.0 stay off the frame, and a curve that spans only a few points is not flattened by a 0–1 axis."""
    finite = [float(v) for v in [*values, *references] if v is not None and np.isfinite(v)]
    if not finite:
        ax.set_ylim(0, 1.02)
        return
    low, high = min(finite), max(finite)
    pad = max(0.03, 0.08 * (high - low))
    ax.set_ylim(max(0.0, low - pad), min(1.02, high + pad))


def reference_lines(ax, blank, prior) -> list[float]:
    """The blank-image and question-prior accuracies (intervals) as labelled horizontal lines;
    returns their values for ``accuracy_limits``."""
    ax.axhline(blank.estimate, color="tab:grey", ls=":", label=f"blank image {blank.estimate:.3f}")
    ax.axhline(prior.estimate, color="tab:brown", ls="--", label=f"question prior {prior.estimate:.3f}")
    return [blank.estimate, prior.estimate]


def draw_layer_contribution(ax, visual: np.ndarray, text: np.ndarray, frozen: list[int], title: str = "") -> None:
    """Visual and text Layer Contribution per layer [layers] as bars on a log axis, the ``frozen``
    layers marked. A log axis cannot show 0, and LC is exactly 0 where a layer's update cannot
    reach the answer position (the visual tokens in the last layer): those bars are drawn hatched
    at the axis floor and named in the legend."""
    layers = np.arange(len(visual))
    positive = np.concatenate([visual[visual > 0], text[text > 0]])
    floor = positive.min() / 4 if positive.size else 1e-6
    width = 0.4
    for offset, values, label, color in [(-width / 2, visual, "visual tokens", "tab:orange"),
                                         (width / 2, text, "text tokens", "tab:blue")]:
        ax.bar(layers + offset, np.where(values > 0, values, np.nan), width, label=label, color=color)
        zero = values <= 0
        if zero.any():
            ax.bar(layers[zero] + offset, floor, width, color="white", edgecolor=color, hatch="///",
                   label=f"{label}: exactly 0")
    ax.scatter(frozen, visual[frozen].clip(min=floor), marker="v", color="black", zorder=3, label="frozen by ShortV")
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, positive.max() * 30 if positive.size else 1)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("LC = KL(P_mod ‖ P_orig)  [nats]")
    ax.set_xticks(layers[:: max(1, len(layers) // 15)])
    ax.set_xlim(-0.7, len(layers) - 0.3)
    if title:
        ax.set_title(title)
    ax.legend(ncol=3, fontsize=8, loc="upper left")


def draw_baselines(ax, reports: dict[str, dict], groups: list[str], title: str = "") -> None:
    """Accuracy per question group of each reference (``llava_mini.accuracy_report`` rows: the
    dense model and the rules that need no image) as grouped bars with 95 % intervals."""
    width = 0.8 / len(reports)
    colors = ["black", "tab:grey", "tab:brown", "tab:pink", "tab:olive"]
    for k, (name, color) in enumerate(zip(reports, colors)):
        x = np.arange(len(groups)) + (k - (len(reports) - 1) / 2) * width
        values = [reports[name][g]["accuracy"] for g in groups]
        errors = [[v - reports[name][g]["low"] for v, g in zip(values, groups)],
                  [reports[name][g]["high"] - v for v, g in zip(values, groups)]]
        ax.bar(x, values, width, yerr=errors, capsize=3, color=color, label=name)
        for position, value in zip(x, values):
            if value == 0:  # a bar of height 0 would look like a missing one
                ax.annotate("0", (position, 0), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=7)
    first = next(iter(reports.values()))
    ax.set_xticks(range(len(groups)), [f"{g}\n(n={first[g]['n']:,})" for g in groups], fontsize=8)
    ax.set_ylim(0, 1.25)  # the legend sits above the bars
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_xlabel("questions")
    ax.set_ylabel("accuracy (95 % interval, clustered by image)")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, ncol=len(reports), loc="upper center")


CHOICE_STYLE = {"layer_contribution": ("o", "tab:orange", "LC"), "visual_cosine": ("s", "tab:green", "visual cosine"),
                "random": ("D", "tab:purple", "random")}


def draw_frozen_curves(ax, curve, dense, blank, prior, draws: int) -> None:
    """Accuracy against the number of frozen layers N for each layer choice (``curve``: a frame
    with choice, N, estimate, low, high), N = 0 being the dense model (an interval), with the
    blank-image and question-prior lines."""
    shown = [dense.low, dense.high]
    for choice, (marker, color, name) in CHOICE_STYLE.items():
        rows = curve[curve.choice == choice]
        x, y = [0, *rows.N], [dense.estimate, *rows.estimate]
        low, high = [dense.low, *rows.low], [dense.high, *rows.high]
        ax.errorbar(x, y, yerr=[np.subtract(y, low), np.subtract(high, y)], marker=marker, color=color, capsize=3,
                    label=name + (f" (mean of {draws} draws)" if choice == "random" else ""))
        shown += [*low, *high]
    references = reference_lines(ax, blank, prior)
    accuracy_limits(ax, shown, references)
    ax.set_xlabel("layers with frozen visual tokens (N); N = 0 is the dense model")
    ax.set_ylabel("accuracy (95 % interval)")
    ax.legend(fontsize=8, loc="lower left")


def draw_random_draws(ax, draw_accuracies: dict[int, np.ndarray], chosen: dict[str, dict[int, object]]) -> None:
    """Each seeded random layer set's accuracy as a distribution per N (box and points), with the
    intervals of the ``chosen`` layer sets ({"LC": {N: Interval}, "visual cosine": ...}) beside it."""
    counts = sorted(draw_accuracies)
    shown = []
    for k, n in enumerate(counts):
        values = np.asarray(draw_accuracies[n])
        ax.boxplot([values], positions=[k], widths=0.35, showfliers=False, medianprops={"color": "tab:purple"})
        jitter = np.random.default_rng(n).uniform(-0.08, 0.08, len(values))
        ax.scatter(k + jitter, values, color="tab:purple", s=14, alpha=0.7,
                   label=f"random draws ({len(values)} per N)" if k == 0 else None)
        shown += list(values)
    for offset, (name, intervals) in zip([-0.3, 0.3], chosen.items()):
        marker, color = ("o", "tab:orange") if name == "LC" else ("s", "tab:green")
        found = [intervals[n] for n in counts]
        _interval_bars(ax, np.arange(len(counts)) + offset, found, fmt=marker, color=color, label=name)
        shown += [i.low for i in found] + [i.high for i in found]
    ax.set_xticks(range(len(counts)), [str(n) for n in counts])
    accuracy_limits(ax, shown)
    ax.set_xlabel("layers with frozen visual tokens (N)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8, loc="lower left")


def draw_token_choice(ax, intervals: dict[str, object], blank, prior, title: str = "") -> None:
    """Accuracy (95 % intervals) with each token group frozen in the same layers, beside the dense
    model (``intervals``: {"dense": ..., "visual": ..., "text": ...})."""
    names = list(intervals)
    found = list(intervals.values())
    colors = ["black", "tab:orange", "tab:blue", "tab:purple", "tab:olive", "tab:cyan"]
    ax.bar(names, [i.estimate for i in found], yerr=[[i.estimate - i.low for i in found], [i.high - i.estimate for i in found]],
           capsize=3, color=colors[: len(names)], zorder=3)
    reference_lines(ax, blank, prior)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("tokens frozen in the chosen layers (dense: none)")
    ax.set_ylabel("accuracy (95 % interval)")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")


FRONTIER_STYLE = [("*", "black"), ("o", "tab:orange"), ("s", "tab:green"), ("P", "tab:cyan"), ("D", "tab:red")]


def draw_frontier(ax, frontier, blank, prior) -> None:
    """Accuracy against the fraction of dense prefill FLOPs (``frontier``: a frame with method,
    label, flops_fraction, estimate, low, high), one line per method. Each point's label goes where it overlaps no other label or marker
    (``plotting.place_labels``)."""
    shown, points, labels, colors = [], [], [], []
    for (method, rows), (marker, color) in zip(frontier.groupby("method", sort=False), FRONTIER_STYLE):
        ax.errorbar(rows.flops_fraction, rows.estimate, yerr=[rows.estimate - rows.low, rows.high - rows.estimate],
                    marker=marker, color=color, capsize=3, ls="-" if len(rows) > 1 else "none", label=method)
        labelled = rows[rows.label != ""]
        points += list(zip(labelled.flops_fraction, labelled.estimate))
        labels += list(labelled.label)
        colors += [color] * len(labelled)
        shown += [*rows.low, *rows.high]
    references = reference_lines(ax, blank, prior)
    accuracy_limits(ax, shown, references)
    ax.set_xlim(0, 1.08)
    place_labels(ax, points, labels, colors)
    ax.set_xlabel("decoder prefill FLOPs (fraction of dense)")
    ax.set_ylabel("accuracy (95 % interval)")
    ax.legend(fontsize=8, loc="lower right")


def draw_published_frontier(ax, points: dict[str, list[tuple[float, float, str]]]) -> None:
    """The paper's scores against its FLOPs fractions ({benchmark: [(flops, score, method)]}),
    one marker per benchmark, each labelled where it overlaps no other label or marker."""
    for (benchmark, found), (marker, color) in zip(points.items(), [("o", "tab:blue"), ("s", "tab:olive"), ("^", "tab:red")]):
        ax.scatter([p[0] for p in found], [p[1] for p in found], marker=marker, color=color, label=benchmark)
    ax.set_xlim(0, 1.08)
    found = [point for benchmark in points.values() for point in benchmark]
    place_labels(ax, [(x, y) for x, y, _ in found], [label for _, _, label in found])
    ax.set_xlabel("prefill FLOPs (fraction of vanilla)")
    ax.set_ylabel(f"published score, 0–100 ({' / '.join(points)})")
    ax.legend(fontsize=8, loc="lower right")


def draw_stability(ax_overlap, ax_accuracy, stability, main, dense, blank, prior, shortv_n: int) -> None:
    """LC's layer choice across calibration subsets (``stability``: a frame with pool, size,
    jaccard, accuracy, low, high): left, each subset's Jaccard overlap with the main layer set;
    right, the accuracy of its layers (95 % intervals) against the main choice's interval (band)
    and the dense model."""
    pools = list(dict.fromkeys(stability.pool))
    sizes = sorted(set(stability["size"]))
    position = {size: k for k, size in enumerate(sizes)}
    for k, pool in enumerate(pools):
        rows = stability[stability.pool == pool]
        x = np.array([position[s] for s in rows["size"]]) + (k - (len(pools) - 1) / 2) * 0.1
        ax_overlap.scatter(x, rows.jaccard, label=pool, s=18)
        ax_accuracy.errorbar(x, rows.accuracy, yerr=[rows.accuracy - rows.low, rows.high - rows.accuracy],
                             fmt="o", ms=4, capsize=2, label=pool)
    for ax in (ax_overlap, ax_accuracy):
        ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
        ax.set_xlabel("calibration questions in the subset")
    ax_overlap.set_ylim(0, 1.05)
    ax_overlap.set_ylabel(f"Jaccard overlap with the main {shortv_n}-layer set")
    ax_overlap.legend(fontsize=7, ncol=2, loc="lower right", title="calibration pool", title_fontsize=7)
    ax_accuracy.axhspan(main.low, main.high, color="tab:orange", alpha=0.2, label="main choice (95 %)")
    ax_accuracy.axhline(dense.estimate, color="black", label=f"dense {dense.estimate:.3f}")
    references = reference_lines(ax_accuracy, blank, prior)
    accuracy_limits(ax_accuracy, [*stability.low, *stability.high, main.low, dense.estimate], references)
    ax_accuracy.set_ylabel("accuracy of the chosen layers (95 % interval)")
    handles, labels = ax_accuracy.get_legend_handles_labels()
    keep = [k for k, label in enumerate(labels) if label not in pools]  # the pools' colours are named on the left
    ax_accuracy.legend([handles[k] for k in keep], [labels[k] for k in keep], fontsize=7, loc="lower right")


def draw_speedup(ax, speed, title: str = "") -> None:
    """Measured and FLOPs-predicted decoder prefill speed-up against N (``speed``: a frame indexed
    by N with measured_speedup and predicted_speedup)."""
    ax.plot(speed.index, speed.predicted_speedup, "s--", color="grey", label="FLOPs-predicted (1 / FLOPs fraction)")
    ax.plot(speed.index, speed.measured_speedup, "o-", color="tab:red", label="measured (median of interleaved runs)")
    ax.set_xlabel("layers with frozen visual tokens (N)")
    ax.set_ylabel("decoder prefill speed-up over dense")
    ax.set_xticks(list(speed.index))
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")


def draw_lc_heatmaps(ax_lc, ax_chosen, pool_lc, chosen, shortv_n: int) -> None:
    """Top: the mean visual LC of each calibration pool per layer (``pool_lc``: a frame [pools,
    layers], log colour scale; cells where LC is exactly 0 are left blank). Bottom: which layers
    each calibration subset freezes (``chosen``: a 0/1 frame [subsets, layers])."""
    import seaborn as sns

    with np.errstate(divide="ignore"):
        sns.heatmap(np.log10(pool_lc.where(pool_lc > 0)), cmap="viridis", ax=ax_lc,
                    cbar_kws={"label": "log10 visual LC [nats]"})
    ax_lc.set(xlabel="decoder layer (blank: LC exactly 0)", ylabel="calibration pool (questions)")
    sns.heatmap(chosen, cmap="Greys", cbar=False, linewidths=0.2, linecolor="0.9", ax=ax_chosen, yticklabels=True)
    ax_chosen.set(xlabel="decoder layer", ylabel="calibration subset (pool size/seed)",
                  title=f"the {shortv_n} layers each calibration subset freezes (black)")
    ax_chosen.tick_params(axis="y", labelsize=6)
    for ax in (ax_lc, ax_chosen):
        ax.grid(False)  # the theme's grid would show through the blank (LC = 0) cells


def draw_photo_lc(ax, task_lc: np.ndarray, photo_lc: dict[str, np.ndarray], frozen: list[int], task_label: str) -> None:
    """Each photograph's own visual LC per layer beside the task's mean (log axis; values of
    exactly 0 are not drawn), with the frozen layers shaded."""
    for layer in frozen:
        ax.axvspan(layer - 0.5, layer + 0.5, color="0.92", zorder=0)
    ax.plot(range(len(task_lc)), np.where(task_lc > 0, task_lc, np.nan), "k-", lw=2.5, label=task_label)
    for name, values in photo_lc.items():
        ax.plot(range(len(values)), np.where(values > 0, values, np.nan), "o-", ms=3, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer (shaded: ShortV's frozen layers; a value of exactly 0 is not drawn)")
    ax.set_ylabel("visual-token LC [nats]")
    ax.set_xticks(range(0, len(task_lc), max(1, len(task_lc) // 15)))
    ax.legend(fontsize=8, loc="upper right")  # the first layers carry the largest values
