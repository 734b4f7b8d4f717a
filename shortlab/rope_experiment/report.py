"""Notebook 03's sections as functions, so that each notebook cell reads in one glance.

The theory (``shortlab.rope``, ``theory``), the experiments' stores (``from_scratch``,
``finetune``, ``protocols``) and their statistics live elsewhere; this module puts them together
the way the notebook reports them: each section returns what it shows (numbers, rows, words) and
a ``figure_*`` function draws it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib import ticker

from shortlab import rope
from shortlab.shortgpt_figures import plain_log_ticks
from shortlab.stats import describe, wilson_interval

# the sizes of a FAST run: the same code in seconds
FAST_SIZES = {"mc_samples": 2000, "mc_max_distance": 500, "island_context": "4K", "island_points": 200,
              "passkey_distances": [64, 256], "passkey_trials": 2, "bw_rows": 1, "bw_tokens": 256,
              "perplexity_rows": 1}


def notebook_options(options: Mapping, *, contexts: Sequence[str], fast: bool = False) -> tuple[dict, list[str]]:
    """Notebook 03's options (``fast``: shrunk to ``FAST_SIZES``) and the contexts of the bound
    table (``fast``: the first four). The caller's dict is not changed."""
    used = {**options, **(FAST_SIZES if fast else {})}
    return used, list(contexts[:4] if fast else contexts)


def repository_path(name: str | Path) -> Path:
    """A results path as given, read from the repository root when relative."""
    from shortlab.plotting import repository_root

    path = Path(name)
    return path if path.is_absolute() else (repository_root() or Path.cwd()) / path


# ---------------------------------------------------------------- 1. the criterion


def plain_versus_package(plain_bias: Callable, plain_bound: Callable, bases: Sequence[float], head_dim: int,
                         limit: int = 100_000) -> tuple[float, list[tuple[float, int, int]]]:
    """The notebook's plain B(m) and bound against ``rope.rope_bias`` and ``rope.max_context``:
    the largest |difference| of B over every 7th distance up to ``limit`` and every base, and
    (base, plain bound, package bound) per base."""
    positions = np.arange(0, limit, 7)
    gap = max(np.abs(plain_bias(positions, base, head_dim) - rope.rope_bias(positions, base, head_dim)).max()
              for base in bases)
    rows = [(base, plain_bound(base, head_dim, limit), rope.max_context(base, head_dim, limit=limit)) for base in bases]
    return float(gap), rows


def relative_position_check(head_dim: int, base: float, seed: int = 0) -> tuple[float, float]:
    """Max |(R_a q)·(R_b k) − qᵀR_(b−a)k| over both pair layouts and a few positions, and max
    |tr R_m − 2·B(m)|: the score depends on the distance only, and its trace is 2·B(m)."""
    import torch

    from shortlab.rope_experiment.theory import rope_matrix, rotate

    generator = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, head_dim, generator=generator, dtype=torch.float64)
    checks = [abs(float((rotate(q, a, base, layout=layout) * rotate(k, b, base, layout=layout)).sum()
                        - q @ rope_matrix(b - a, base, head_dim, layout=layout) @ k))
              for layout in ("interleaved", "half") for a, b in [(0, 7), (100, 107), (5000, 5007), (3, 1000)]]
    trace = max(abs(float(torch.trace(rope_matrix(m, base, head_dim))) - 2 * float(rope.rope_bias(m, base, head_dim)))
                for m in (0, 1, 17, 1000, 123456))
    return max(checks), trace


@dataclasses.dataclass
class MonteCarlo:
    """Sampled scores of a similar and a random key (``sampled``: ``theory.score_gap_monte_carlo``)
    at ``distances`` beside the theorem's 2σ²B(m) (``theory``), and their z-scores."""

    distances: np.ndarray
    sampled: dict
    theory: np.ndarray
    base: float
    head_dim: int
    sigma: float
    samples: int

    @property
    def z(self) -> np.ndarray:
        return (self.sampled["gap"] - self.theory) / self.sampled["gap_stderr"]

    def words(self) -> str:
        z = np.abs(self.z)
        return (f"{len(self.distances)} distances; |Monte Carlo − 2σ²B(m)| / s.e.: median {np.median(z):.2f}, max "
                f"{z.max():.2f}; within 2 s.e.: {np.mean(z < 2):.0%}")


def monte_carlo(base: float, head_dim: int, *, samples: int, sigma: float, max_distance: int, seed: int = 0) -> MonteCarlo:
    from shortlab.rope_experiment.theory import score_gap_monte_carlo

    distances = np.concatenate(([0], np.unique(np.round(np.geomspace(1, max_distance, 60)).astype(int))))
    sampled = score_gap_monte_carlo(base, head_dim, distances, n_samples=samples, sigma=sigma, seed=seed)
    return MonteCarlo(distances, sampled, 2 * sigma**2 * rope.rope_bias(distances, base, head_dim), base, head_dim, sigma,
                      samples)


def _symlog_distances(ax, max_distance: int) -> None:
    """A symlog distance axis from 0 with plain labels at 0 and the powers of ten (no negative
    ticks: a distance is never negative)."""
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, max_distance * 1.2)
    ax.xaxis.set_major_locator(ticker.FixedLocator([0, *10.0 ** np.arange(0, int(np.log10(max_distance)) + 1)]))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.xaxis.set_minor_locator(ticker.NullLocator())


def figure_monte_carlo(mc: MonteCarlo):
    fig, (ax_scores, ax_gap) = plt.subplots(1, 2, figsize=(12, 4))
    ax_scores.plot(mc.distances, mc.sampled["similar"], ".", label="similar key  k* = q + ε")
    ax_scores.plot(mc.distances, mc.sampled["random"], ".", label="random key  k")
    ax_scores.set(xlabel="relative distance m", ylabel="mean score  qᵀR_m k",
                  title=f"Sampled attention scores (d = {mc.head_dim}, base {mc.base:g}, σ = {mc.sigma})")
    ax_scores.legend()
    ax_gap.errorbar(mc.distances, mc.sampled["gap"], yerr=2 * mc.sampled["gap_stderr"], fmt=".",
                    label=f"Monte Carlo (±2 s.e., {mc.samples} samples)")
    ax_gap.plot(mc.distances, mc.theory, "-", color="k", lw=1, label="2σ²·B(m)")
    ax_gap.axhline(0, color="grey", lw=0.5)
    ax_gap.set(xlabel="relative distance m", ylabel="E[qᵀR_m k*] − E[qᵀR_m k]", title="The theorem: score gap = 2σ²·B(m)")
    ax_gap.legend()
    for ax in (ax_scores, ax_gap):
        _symlog_distances(ax, int(mc.distances.max()))
    fig.tight_layout()
    return fig


def figure_bias_curves(bases: Sequence[float], head_dim: int):
    """B(m)/B(0) for each base, its first negative distance marked."""
    bounds = {base: rope.max_context(base, head_dim) for base in bases}
    m = np.unique(np.round(np.geomspace(1, 1.5 * max(bounds.values()), 4000)).astype(int))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for base, color in zip(bases, plt.cm.viridis(np.linspace(0, 0.85, len(bases)))):
        ax.plot(m, rope.rope_bias(m, base, head_dim) / (head_dim / 2), color=color, lw=1,
                label=f"base {base:.0e}:  L_θ = {bounds[base]:,}")
        ax.axvline(bounds[base] + 1, color=color, ls="--", lw=1)
        ax.plot(bounds[base] + 1, rope.rope_bias(bounds[base] + 1, base, head_dim) / (head_dim / 2), "o", color=color)
    ax.axhline(0, color="k", lw=0.6)
    ax.set(xscale="log", xlabel="relative distance m", ylabel="B(m) / B(0)", ylim=(-0.25, 1.02),
           title=f"B(m) for d = {head_dim}; dashed: first m with B(m) < 0")
    ax.legend()
    fig.tight_layout()
    return fig


def bias_curve_words(bases: Sequence[float], head_dim: int) -> str:
    lines = []
    for base in bases:
        bound = rope.max_context(base, head_dim)
        lines.append(f"base {base:9.0e}: B(m) >= 0 up to m = {bound:,}; B({bound + 1:,}) = "
                     f"{rope.rope_bias(bound + 1, base, head_dim):+.4f}")
    return "\n".join(lines)


def figure_bias_map(bases: Sequence[float], head_dim: int) -> tuple[object, str]:
    """B(m)/B(0) over a log grid of bases (rows) and distances (columns), each base's bound drawn;
    with one sentence on how the bound moves with the base."""
    m_max = int(1.5 * max(rope.max_context(base, head_dim) for base in bases))
    grid = np.geomspace(min(bases) / 10, max(bases) * 10, 41)
    m = np.unique(np.round(np.geomspace(1, 20 * m_max, 120)).astype(int))
    values = np.array([rope.rope_bias(m, base, head_dim) / (head_dim / 2) for base in grid])
    bounds = [rope.max_context(base, head_dim) for base in grid]
    fig, ax = plt.subplots(figsize=(11, 5))
    sns.heatmap(values, cmap="RdBu", vmin=-0.2, vmax=0.2, ax=ax,  # clipped: the sign is what matters
                cbar_kws={"label": "B(m) / B(0), clipped to ±0.2", "extend": "both"},
                xticklabels=[f"{v:,}" if i % 12 == 0 else "" for i, v in enumerate(m)],
                yticklabels=[f"{v:.0e}" if i % 5 == 0 else "" for i, v in enumerate(grid)])
    # each base's bound, placed between the grid columns it falls between
    ax.plot(np.interp(np.log(bounds), np.log(m), np.arange(m.size)) + 0.5, np.arange(grid.size) + 0.5, color="k", lw=1.2,
            label="bound L_θ")
    ax.set(xlabel="relative distance m (log grid)", ylabel="RoPE base (log grid)",
           title=f"B(m) / B(0) for d = {head_dim}: red where negative, first beyond the bound")
    ax.legend(loc="lower left")
    fig.tight_layout()
    words = (f"bases {grid[0]:.0e} … {grid[-1]:.0e}: bounds {min(bounds):,} … {max(bounds):,}; L_θ is not monotone in "
             f"the base: it shrinks as the base grows at {int(np.sum(np.diff(bounds) < 0))} of {len(grid) - 1} grid steps")
    return fig, words


# ---------------------------------------------------------------- 2. the table


def bound_tables(contexts: Sequence[str], head_dim: int, grid_rtol: float) -> dict[int, list[dict]]:
    """``rope.bound_table`` with 1K = 1024 and 1K = 1000, every smallest and stable base
    re-checked at every distance (an ``AssertionError`` names the one that fails)."""
    tables = {k: rope.bound_table(contexts, head_dim, k=k, grid_rtol=grid_rtol) for k in (1024, 1000)}
    for rows in tables.values():
        for row in rows:
            assert rope.check_base(row["smallest"], row["L"], head_dim)[0], row
            assert row["smallest_fails_at"] is None or not rope.check_base(row["smallest_fails_at"], row["L"], head_dim)[0]
            assert rope.check_base(row["stable"], row["L"], head_dim)[0] and row["smallest"] <= row["stable"], row
    return tables


def bound_table_text(tables: Mapping[int, list[dict]]) -> str:
    lines = [f"{'context':>7} {'L (k=1024)':>10} {'smallest':>10} {'stable':>10} | {'L (k=1000)':>10} {'smallest':>10} | "
             f"{'published':>9}"]
    for row, row_1000 in zip(tables[1024], tables[1000]):
        published = f"{row['published']:9.2g}" if row["published"] else f"{'—':>9}"
        lines.append(f"{row['context']:>7} {row['L']:>10,} {row['smallest']:10.3g} {row['stable']:10.3g} | "
                     f"{row_1000['L']:>10,} {row_1000['smallest']:10.3g} | {published}")
    return "\n".join(lines)


def published_verdicts(published: Mapping[str, float], tables: Mapping[int, list[dict]], head_dim: int) -> list[dict]:
    """For every published base: under which conventions it keeps B(m) ≥ 0 on its context, and
    where it fails, the nearest valid bases below and above; beside our smallest base."""
    from shortlab.rope_experiment.theory import nearest_valid_base, published_checks

    ours = {row["context"]: row for row in tables[1024]}
    rows = []
    for check in published_checks(published, head_dim):
        label, base, holds = check["context"], check["base"], check["holds_under"]
        if len(holds) == 4:
            finding = "holds under every convention"
        elif holds:
            finding = "holds only with " + ", ".join(holds)
        else:
            L = rope.context_length(label, 1024)
            near = {side: nearest_valid_base(base, L, head_dim, direction=side) for side in (-1, +1)}
            where = {side: "none within 4x" if v is None else f"{v:.6g} ({v / base - 1:+.2%})" for side, v in near.items()}
            finding = (f"fails under every convention: B({check['k=1024 closed'][1]:,}) < 0; nearest valid bases below "
                       f"{where[-1]}, above {where[+1]}")
        smallest = ours[label]["smallest"]
        rows.append({"context": label, "base": base, "finding": finding,
                     "relation": "= ours to 2 s.f." if float(f"{smallest:.2g}") == base else f"ours {smallest:.3g}"})
    return rows


def published_words(rows: Sequence[dict], published: Mapping[str, float], tables: Mapping[int, list[dict]]) -> str:
    lines = [f"{r['context']:>5} published {r['base']:8.2g} ({r['relation']}): {r['finding']}" for r in rows]
    for k, table in tables.items():
        ours = {row["context"]: row for row in table}
        matches = sum(float(f"{ours[label]['smallest']:.2g}") == base for label, base in published.items())
        lines.append(f"our smallest base rounded to 2 s.f. equals the published value for {matches}/{len(published)} "
                     f"contexts with 1K = {k}")
    return "\n".join(lines)


@dataclasses.dataclass
class Islands:
    """Which bases keep B(m) ≥ 0 up to one context, on a fine grid around its smallest base."""

    context: str
    length: int
    row: dict
    bases: np.ndarray
    valid: np.ndarray
    first_negative: np.ndarray

    def words(self) -> str:
        below = self.bases < self.row["smallest"]
        above = self.bases >= self.row["stable"]
        islands = self.valid[below].sum()
        return (f"{self.valid.mean():.0%} of {len(self.bases)} bases valid between {self.bases[0]:.3g} and "
                f"{self.bases[-1]:.3g}; {islands} valid below the smallest found by the search"
                + (" (islands narrower than its grid step)" if islands else "")
                + f", {self.valid[~below & ~above].mean():.0%} between smallest and stable, "
                f"{self.valid[above].mean():.0%} above stable")


def islands(tables: Mapping[int, list[dict]], context: str, head_dim: int, points: int) -> Islands:
    from shortlab.rope_experiment.theory import valid_bases

    length = rope.context_length(context, 1024)
    row = {r["context"]: r for r in tables[1024]}[context]
    bases = np.geomspace(row["smallest"] / 1.6, row["stable"] * 1.25, points)
    first = np.array([rope.max_context(b, head_dim, limit=length) + 1 for b in bases])
    return Islands(context, length, row, bases, valid_bases(bases, length, head_dim), first)


def figure_islands(found: Islands, head_dim: int):
    row = found.row
    fig, (ax_valid, ax_first) = plt.subplots(2, 1, figsize=(11, 5), sharex=True, gridspec_kw={"height_ratios": [1, 2]})
    ax_valid.fill_between(found.bases, 0, found.valid.astype(float), step="mid", color="tab:green", alpha=0.7)
    ax_valid.set(ylabel="valid", yticks=[0, 1], yticklabels=["no", "yes"],
                 title=f"Which bases keep B(m) ≥ 0 for all m ≤ {found.length:,} ({found.context}, d = {head_dim})?")
    ax_first.plot(found.bases, np.minimum(found.first_negative, found.length + 1), ".", ms=2, color="tab:blue")
    ax_first.axhline(found.length, color="k", lw=0.6)
    ax_first.set(xscale="log", yscale="log", xlabel="RoPE base", ylabel="first m with B(m) < 0 (capped)")
    lines = [("tab:green", "--", f"smallest valid {row['smallest']:.4g}", row["smallest"]),
             ("tab:purple", "--", f"stable from {row['stable']:.4g}", row["stable"])]
    if row["published"]:
        lines.append(("tab:red", "-", f"published {row['published']}", row["published"]))
    for ax in (ax_valid, ax_first):
        for color, style, _, x in lines:
            ax.axvline(x, color=color, ls=style, lw=1)
    ax_first.legend(handles=[plt.Line2D([], [], color=c, ls=s, label=label) for c, s, label, _ in lines], loc="lower right")
    fig.tight_layout()
    return fig


def figure_bound_trend(tables: Mapping[int, list[dict]], published: Mapping[str, float], head_dim: int
                       ) -> tuple[object, dict[str, float]]:
    """Smallest and stable bases (and the published ones) against the context, log-log, each with
    its least-squares power law; returns the figure and the exponents."""
    lengths = np.array([row["L"] for row in tables[1024]])
    series = {"smallest (ours)": (lengths, np.array([row["smallest"] for row in tables[1024]]), "o", None),
              "stable (ours)": (lengths, np.array([row["stable"] for row in tables[1024]]), "s", None)}
    if published:
        series["published"] = (np.array([rope.context_length(label, 1024) for label in published]),
                               np.array(list(published.values())), "x", "tab:red")
    fits = {}
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, (x, y, marker, color) in series.items():
        slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
        fits[name] = slope
        line = ax.plot(x, y, marker, color=color, ms=8 if marker == "x" else 6, label=f"{name}: base ∝ L^{slope:.2f}")[0]
        ax.plot(x, np.exp(intercept) * x**slope, "-", color=line.get_color(), lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="context length L (1K = 1024)", ylabel="lower bound on the RoPE base",
           title=f"Smallest RoPE base whose B(m) stays ≥ 0 up to L (d = {head_dim})")
    ax.legend()
    fig.tight_layout()
    return fig, fits


# ---------------------------------------------------------------- 3. explorer


def figure_bias_explorer(base: float, head_dim: int, context: int):
    """B(m)/B(0) on m ≤ 1.5·max(context, bound), with the context and the bound L_θ marked."""
    bound = rope.max_context(base, head_dim, limit=100 * context)
    positions = np.arange(int(1.5 * max(context, min(bound, 100 * context))) + 2)
    fig, ax = plt.subplots(figsize=(10, 3.8))
    ax.plot(positions, rope.rope_bias(positions, base, head_dim) / (head_dim / 2), lw=0.8)
    ax.axvspan(0, context, color="tab:blue", alpha=0.08, label=f"context {context:,}")
    ax.axvline(bound, color="tab:red", ls="--", label=f"bound L_θ = {bound:,}" + (" (or more)" if bound == 100 * context else ""))
    ax.axhline(0, color="k", lw=0.6)
    covers = "covers" if bound >= context else "does NOT cover"
    ax.set(xlabel="relative distance m", ylabel="B(m) / B(0)", title=f"base {base:.3g}, d = {head_dim}: the bound {covers} the context")
    ax.legend(loc="upper right")
    return fig


def bias_explorer(base: float, head_dim: int, context: int):
    """Sliders for the base, head dimension and context that redraw ``figure_bias_explorer``."""
    import ipywidgets as widgets

    controls = {"base": widgets.FloatLogSlider(value=base, base=10, min=1, max=9, step=0.05, description="base"),
                "head_dim": widgets.IntSlider(value=head_dim, min=8, max=256, step=8, description="head dim"),
                "context": widgets.IntSlider(value=context, min=64, max=65536, step=64, description="context")}
    output = widgets.Output()

    def redraw(change=None):
        with output:
            output.clear_output(wait=True)
            figure_bias_explorer(**{name: control.value for name, control in controls.items()})
            plt.show()

    for control in controls.values():
        control.observe(redraw, names="value")
    return widgets.VBox([widgets.HBox(list(controls.values())), output])


# ---------------------------------------------------------------- 4. real configs


def model_bounds_text(report: Sequence[dict]) -> str:
    lines = [f"{'model':26s} {'layers':>16s} {'base':>8s} {'rot.dim':>7s} {'bound':>9s} {'advertised':>10s} {'span':>8s}  scaling"]
    for row in report:
        lines.append(f"{row['name']:26s} {row['layer_type']:>13s} x{row['num_layers']:<2d} {row['base']:8.0e} "
                     f"{row['rotary_dim']:7d} {row['bound']:9,} {row['advertised']:10,} {row['span']:8,}  {row['scaling']}"
                     f"{'' if row['bound_covers_span'] else '   <- bound below span'}")
    below = [row for row in report if not row["bound_covers_span"]]
    lines.append(f"\n{len(below)} of {len(report)} model/layer types attend over more tokens than their bound supports")
    return "\n".join(lines)


def figure_model_bounds(report: Sequence[dict]):
    labels = [row["name"] + (f" ({row['layer_type'].split('_')[0]})" if row["layer_type"] != "full_attention" else "")
              for row in report]
    y = np.arange(len(report))
    fig, ax = plt.subplots(figsize=(10, 5.5))
    ax.scatter([row["span"] for row in report], y, marker="|", s=300, color="k", label="attention span (advertised or window)")
    ax.scatter([row["bound"] for row in report], y, c=["tab:green" if row["bound_covers_span"] else "tab:red" for row in report],
               s=40, zorder=3, label="bound L_θ (green: covers the span, red: below it)")
    for yi, row in zip(y, report):
        ax.plot([row["bound"], row["span"]], [yi, yi], color="grey", lw=0.8)
    ax.set(xscale="log", yticks=y, yticklabels=labels, xlabel="tokens", ylabel="model (config)",
           title="RoPE bound vs attention span of real models")
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 5. small models trained here


@dataclasses.dataclass
class FromScratch:
    """The from-scratch experiment (``results``: its store, read or recomputed), where it came
    from (``origin``), and its ``summary`` (``from_scratch.summarize``) at the notebook's
    practical sizes."""

    results: dict
    origin: str
    summary: dict

    @property
    def config(self):
        from shortlab.rope_experiment.from_scratch import ExperimentConfig

        return ExperimentConfig.from_dict(self.results["config"])

    def describe(self) -> str:
        c, results, summary = self.config, self.results, self.summary
        text = results["text"]
        text = (f"{text['source']}, {text['train_chars']:,} characters for training, {text['eval_chars']:,} held out"
                if isinstance(text, dict) and {"source", "train_chars", "eval_chars"} <= set(text) else text)
        lines = [f"Experiment {self.origin}; text: {text}",
                 f"{c.num_layers}-layer Llamas, hidden {c.hidden_size}, head dim {c.head_dim}, context {c.context}; "
                 f"induction warm-up {c.induction_steps} steps, pretrained {c.pretrain_steps} steps, fine-tuned {c.steps} "
                 f"steps per (base, model), batch {c.batch_size}; {len(c.pretrain_seeds)} pretrained model(s) × "
                 f"fine-tuning seeds {list(c.seeds)}"]
        lines += [f"  base {e['base']:>10.6g}: bound L_θ = {e['bound']:>6,}"
                  + ("  (control: the pretraining base)" if e["control"] else f" = {e['bound'] / c.context:.2f} × context")
                  for e in results["bases"]]
        done, expected = len(results["runs"]), len(c.models()) * len(results["bases"])
        lines.append(f"{done}/{expected} fine-tuning runs present"
                     + ("" if done == expected else " (bases missing a model are left out below)"))
        if summary.get("pretrained"):
            pre = summary["pretrained"]
            rate = pre["short_distance_accuracy"]
            lines.append(f"pretrained models, distances ≤ {pre['max_short_distance']}: accuracy {rate['rate']:.2f} "
                         f"[{rate['low']:.2f}, {rate['high']:.2f}] against chance {summary['chance']:.2f}")
            if pre.get("by_depth") and c.probe_depths:
                lines.append("  by depth of the record: " + ", ".join(
                    f"{depth:g}: {r['rate']:.2f} [{r['low']:.2f}, {r['high']:.2f}]" for depth, r in zip(c.probe_depths, pre["by_depth"])))
            where = "" if pre.get("hardest_depth") is None else f" at every depth (judged at {pre['hardest_depth']:g}, the weakest)"
            lines.append(f"  learned retrieval{where}, above the halfway level {summary['halfway_level']:.2f}: {pre['learned']}")
        lines.append("Rules that need no model (what every accuracy here stands beside): "
                     + ", ".join(f"{name} {value:.2f}" for name, value in summary["rules"].items()))
        from shortlab.runs import describe_runs

        lines.append("Where it ran: " + (describe_runs(results["sessions"], what="sessions") if results.get("sessions")
                                         else "this store records no revision, versions or command (made before stores "
                                              "kept them)"))
        return "\n".join(lines)


def head_bounds_of(found: FromScratch, base: float) -> np.ndarray:
    """Every head's own bound (first distance where its G(m) < 0; −1 for an anti-correlated head)
    over all models of ``base``, flattened."""
    from shortlab.rope_experiment.from_scratch import base_runs

    return np.concatenate([np.ravel(run["covariance_bounds"]) for run in base_runs(found.results, base)])


def from_scratch(path: str | Path, *, recompute: bool, fast: bool, device: str, practical: Mapping,
                 cpu_sizes: Mapping | None = None) -> FromScratch | None:
    """Read the store at ``path`` (an earlier schema upgraded), or rerun the experiment here at
    smoke (``fast``) or ``cpu_sizes`` (``recompute``) sizes into a temporary file, never the
    committed one; None (and a line saying how to make it) when the store is absent."""
    import tempfile

    from shortlab.rope_experiment.from_scratch import (
        SMOKE_SIZES, ExperimentConfig, load_text, run_experiment, summarize, upgrade,
    )

    path = repository_path(path)
    if fast or recompute:
        config = dataclasses.replace(ExperimentConfig(), **(SMOKE_SIZES if fast else dict(cpu_sizes)))
        train_ids, eval_ids, text_info = load_text(None)
        output = Path(tempfile.mkdtemp(prefix="rope_from_scratch_")) / "results.json"
        results = run_experiment(config, output, train_ids, eval_ids, text_info=text_info, device=device)
        origin = f"recomputed in this run at {'FAST' if fast else 'CPU'} sizes on {device}"
    elif path.is_file():
        results = upgrade(json.loads(path.read_text(encoding="utf-8")))
        origin = f"read from {path.name} (run on {results.get('device')})"
    else:
        print(f"{path} does not exist: run scripts/rope_from_scratch.py (or set OPTIONS['recompute_from_scratch']); "
              "the rest of section 5 is skipped.")
        return None
    return FromScratch(results, origin, summarize(results, **practical))


def _signed(interval: Mapping) -> str:
    return f"{interval['estimate']:+.2f} [{interval['low']:+.2f}, {interval['high']:+.2f}]"


def from_scratch_table(found: FromScratch, accuracy_margin: float, ppl_tolerance: float):
    """One row per base: retrieval within and beyond its bound, "fails beyond the bound", beyond −
    within relative to the control's and its verdict, the perplexity ratio beyond the bound, and
    the heads' own bounds (how many heads are anti-correlated and have none)."""
    import pandas as pd

    rows = []
    for row in found.summary["bases"]:
        within, beyond = row.get("within"), row.get("beyond")
        ratio = row.get("perplexity_ratio_beyond_bound")
        heads = head_bounds_of(found, row["base"])
        bounded = heads[heads >= 0]  # −1: an anti-correlated head (G(0) < 0), which has no bound
        rows.append({"base": f"{row['base']:.6g}", "bound": row["bound"],
                     "within": f"{within['rate']:.2f} [{within['low']:.2f}, {within['high']:.2f}]" if within else "—",
                     "beyond": f"{beyond['rate']:.2f} [{beyond['low']:.2f}, {beyond['high']:.2f}]" if beyond else "—",
                     "fails beyond the bound": row.get("verdict", "no probe beyond the bound"),
                     "beyond − within, minus the control's": _signed(row["relative_to_control"])
                     if "relative_to_control" in row else "—",
                     f"drops more (by > {accuracy_margin})": row.get("relative_verdict", "—"),
                     "ppl ratio beyond": f"{ratio['estimate']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}]" if ratio else "—",
                     f"comparable (< {ppl_tolerance})": row.get("perplexity_verdict", "—"),
                     "heads: anti-correlated": f"{heads.size - bounded.size} of {heads.size}",
                     "the others' own bound, median (range)": f"{np.median(bounded):.0f} ({bounded.min()}–{bounded.max()})"
                     if bounded.size else "—"})
    return pd.DataFrame(rows).set_index("base")


def from_scratch_words(found: FromScratch, accuracy_margin: float) -> str:
    """The reasons some bases get no verdict, the bases as families (Holm), and where retrieval
    fails for each base."""
    from shortlab.rope_experiment.from_scratch import from_scratch_families
    from shortlab.rope_experiment.measurements import describe_half_accuracy

    summary = found.summary
    lines = [f"base {row['base']:.4g}: no verdict on the bound because {row['verdict_reason']}"
             for row in summary["bases"] if row.get("verdict_reason")]
    lines.append("The bases together, per claim (Holm's adjustment over the bases):")
    lines += [f"  {claim}: {family.summary(accuracy_margin if 'control' in claim else None)}"
              for claim, family in from_scratch_families(summary).items()]
    lines.append("Where retrieval fails (accuracy halfway from perfect to chance; 95 % bootstrap over the models × "
                 "probes; '> d': beyond the largest probed distance), in units of the base's bound:")
    lines += [f"  base {row['base']:>10.6g} (L_θ {row['bound']:>4}): "
              f"{describe_half_accuracy(row['half_accuracy'], found.results['distances'])}" for row in summary["bases"]]
    return "\n".join(lines)


def figure_from_scratch(found: FromScratch):
    """Retrieval by distance (per model thin), perplexity by position, and each head's own bound
    against the plain one, for every base."""
    results, summary, config = found.results, found.summary, found.config
    distances, edges = np.array(results["distances"]), np.array(results["position_edges"])
    colors = dict(zip([e["base"] for e in results["bases"]], plt.cm.plasma(np.linspace(0, 0.85, len(results["bases"])))))
    fig, (ax_acc, ax_ppl, ax_heads) = plt.subplots(1, 3, figsize=(18, 4.8))
    anticorrelated = 0
    for row in summary["bases"]:
        color = colors[row["base"]]
        label = f"base {row['base']:.4g} (L_θ = {row['bound']:,})" + (" control" if row["control"] else "")
        accuracy = row["accuracy"]
        ax_acc.errorbar(distances, [a["rate"] for a in accuracy], fmt="o-", color=color, capsize=2, label=label,
                        yerr=[[a["rate"] - a["low"] for a in accuracy], [a["high"] - a["rate"] for a in accuracy]])
        for per_model in np.array([a["per_seed"] for a in accuracy]).T:
            ax_acc.plot(distances, per_model, "-", color=color, lw=0.6, alpha=0.4)
        if row["bound"] <= distances.max():
            for ax in (ax_acc, ax_ppl):
                ax.axvline(row["bound"], color=color, ls="--", lw=1)
        ppl = row["perplexity"]
        ax_ppl.errorbar((edges[:-1] + edges[1:]) / 2, [p["estimate"] for p in ppl], fmt="o-", color=color, capsize=2,
                        yerr=[[p["estimate"] - p["low"] for p in ppl], [p["high"] - p["estimate"] for p in ppl]])
        heads = head_bounds_of(found, row["base"])
        anticorrelated += int((heads < 0).sum())
        heads = heads[heads > 0]  # an anti-correlated head (G(0) < 0) has no bound: counted in the title
        jitter = np.exp(np.random.default_rng(0).normal(0, 0.03, heads.size))
        ax_heads.scatter(np.full(heads.size, row["bound"]) * jitter, heads, color=color, s=14, label=label)
    ax_acc.axhline(summary["chance"], color="grey", lw=0.6, label="chance")
    ax_acc.set(xscale="log" if distances.min() > 0 and distances.max() / distances.min() > 20 else "linear",
               xlabel="key–query distance (characters)", ylabel="retrieval accuracy (95 % Wilson; thin: per model)",
               ylim=(-0.03, 1.03), title="retrieval by distance (dashed: bounds)")
    ax_acc.legend(fontsize=7)
    ax_ppl.set(xlabel="position in held-out text", ylabel="perplexity per character (95 % bootstrap)",
               title="perplexity by position")
    reach = max(e["bound"] for e in results["bases"])
    ax_heads.plot([1, reach], [1, reach], color="k", lw=0.6, label="G bound = L_θ")
    ax_heads.axhline(config.context, color="grey", ls=":", lw=1, label="context")
    ax_heads.set(xscale="log", yscale="log", xlabel="plain bound L_θ of the base", ylabel="head's own bound (first G(m) < 0)",
                 title=f"each head's own bound\n({anticorrelated} anti-correlated heads not drawn)")
    ax_heads.legend(fontsize=7)
    fig.suptitle(f"Pretrained with base {config.pretrain_base:g}, fine-tuned with each base; "
                 f"{len(config.pretrain_seeds)} pretrained model{'s' if len(config.pretrain_seeds) > 1 else ''} × "
                 f"{len(config.seeds)} fine-tuning seed{'s' if len(config.seeds) > 1 else ''} per base; "
                 f"context {config.context}")
    fig.tight_layout()
    return fig


def figure_depth_grid(found: FromScratch):
    from shortlab.rope_experiment.figures import draw_depth_grid

    rows = [row for row in found.summary["bases"] if "by_depth" in row]
    fig, axes = plt.subplots(1, len(rows), figsize=(3.4 * len(rows), 3.6), squeeze=False)
    for ax, row in zip(axes[0], rows):
        image = draw_depth_grid(ax, row["by_depth"], found.results["distances"], row["bound"],
                                title=f"base {row['base']:.4g} (L_θ {row['bound']})")
    fig.colorbar(image, ax=axes[0].tolist(), label="retrieval accuracy")
    return fig


def depth_words(found: FromScratch, margin: float) -> str:
    return "\n".join(f"base {row['base']:>9.4g}: accuracy with the record last minus first "
                     f"{_signed(row['late_minus_early'])} -> 'a late record is retrieved better': "
                     f"{describe(row['depth_verdict'], margin)}"
                     for row in found.summary["bases"] if "by_depth" in row)


def predictor_words(comparison: Mapping, margin: float) -> str:
    """Each predictor's leave-one-base-out error, then the verdict on the paper's bound."""
    from shortlab.rope_experiment.predictors import PAPER_PREDICTOR

    rows = sorted(comparison["rows"], key=lambda r: (r["error"] is None, r["error"].estimate if r["error"] else 0))
    errors = {row["predictor"]: row["error"] for row in comparison["rows"]}
    lines = [f"{row['predictor']:>22}: leave-one-base-out error " + (str(row["error"]) if row["error"]
                                                                     else "— (never fires at some base)") for row in rows]
    lines.append(f"Across {len(comparison['measured'])} bases whose models all fail inside the probed distances, the paper's "
                 f"first zero of B(m) misses the failure distance by a mean |log| of {errors[PAPER_PREDICTOR]}, the best "
                 f"alternative ({comparison['best_alternative']}) by {errors[comparison['best_alternative']]}; the paper's "
                 f"minus the alternative's error is {comparison['difference']}, so \"the paper's bound predicts better\" is "
                 f"{describe(comparison['verdict'], margin)} (practical size {margin}).")
    return "\n".join(lines)


def figure_predictors(comparison: Mapping):
    from shortlab.rope_experiment.figures import draw_predictors
    from shortlab.rope_experiment.predictors import PAPER_PREDICTOR

    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    draw_predictors(ax, comparison, [PAPER_PREDICTOR, comparison["best_alternative"]])
    ax.set_title("where retrieval fails, against two predictors")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 6. a real model


@dataclasses.dataclass
class RealModel:
    """The RoPE of a loaded model (``setup``: ``rope.rope_setup``; ``variant``: the layers that
    attend over the advertised context) and its plain bound."""

    name: str
    setup: object
    variant: object
    bound: int

    def words(self, distances: Sequence[int]) -> str:
        advertised = self.setup.max_position_embeddings
        return (f"**{self.name}**: RoPE base {self.variant.base:g}, rotary dimension {self.variant.rotary_dim}, scaling "
                f"{self.variant.rope_type}: bound $L_\\theta$ = {self.bound:,} tokens, "
                f"{'inside' if self.bound < advertised else 'beyond'} its advertised context of {advertised:,}; the "
                f"passkey distances run from {min(distances):,} to {max(distances):,} tokens.")


def real_model(name: str, model) -> RealModel:
    setup = rope.rope_setup(model.config)
    variant = next(v for v in setup.variants.values() if v.attention_span == setup.max_position_embeddings)
    bound = variant.bound_context()
    if variant.rope_type == "default":
        assert bound == rope.max_context(variant.base, variant.rotary_dim), "the config's bound is the plain L_θ"
    return RealModel(name, setup, variant, bound)


@dataclasses.dataclass
class Passkey:
    """Passkey retrieval of the real model by distance (``rows``: {distance, n, correct, rate,
    low, high, found}), where the rows come from (``origin``), and the claim "retrieval fails
    beyond the bound" (``claims``: ``finetune.shipped_bound_verdict``; None without distances on
    both sides)."""

    rows: list[dict]
    origin: str
    claims: dict | None

    def words(self, bound: int) -> str:
        from shortlab.rope_experiment.finetune import describe_fails_beyond
        from shortlab.rope_experiment.measurements import passkey_chance

        found = np.array([row["correct"] for row in self.rows])
        n = np.array([row["n"] for row in self.rows])
        within = np.array([row["distance"] <= bound for row in self.rows])
        lines = [f"passkey {self.origin}"]
        for side, mask in (("within", within), ("beyond", ~within)):
            if mask.any():
                lines.append(f"found {side} the bound: {found[mask].sum()}/{n[mask].sum()} = "
                             f"{wilson_interval(int(found[mask].sum()), int(n[mask].sum()))} (95 % Wilson)")
        if self.claims is not None:
            lines.append(f"'retrieval fails beyond the bound' (chance {passkey_chance():.1e}, the strongest rule that needs "
                         f"no model: keys are uniform): {describe_fails_beyond(self.claims['fails_beyond'])}")
        return "\n".join(lines)


def stored_passkey(protocols: Mapping | None, model, tokenizer, model_name: str, dtype: str, *, distances: Sequence[int],
                   trials: int, seed: int, accuracy_margin: float, bound: int, setup: str = "essays-windows") -> Passkey:
    """The passkey grid on RULER's essays (every trial its own window, exact digit match): read
    from the protocols store when it measured this model in this dtype, else measured here at
    ``distances`` × ``trials``."""
    from shortlab.rope_experiment.finetune import shipped_bound_verdict
    from shortlab.rope_experiment.passkey import essay_token_ids, passkey_accuracy

    run = None if protocols is None or protocols.get("model") != model_name else protocols["runs"].get(f"{setup}|{dtype}")
    if run is not None:
        rows, origin = run["rows"], (f"read from the protocols store ({setup}, {dtype}, {protocols['trials']} trials per "
                                     f"distance, measured in {run['seconds']:.0f} s)")
    else:
        rows = passkey_accuracy(model, tokenizer, essay_token_ids(tokenizer), distances, trials=trials, seed=seed)
        origin = f"measured here ({setup}, {dtype}, {trials} trials per distance)"
    return Passkey(rows, origin, shipped_bound_verdict(rows, bound, accuracy_margin))


def passkey_recheck(passkey: Passkey, protocols: Mapping | None, model, tokenizer, *, seed: int) -> str:
    """Recompute the shortest distance of a stored passkey grid here (the prompts are a function of
    the seed, distance and filler, so each trial is the stored one) and say whether every trial's
    outcome matches; empty when the grid was measured here."""
    from shortlab.rope_experiment.passkey import essay_token_ids, passkey_accuracy

    if not passkey.origin.startswith("read"):
        return ""
    row = min(passkey.rows, key=lambda r: r["distance"])
    fresh = passkey_accuracy(model, tokenizer, essay_token_ids(tokenizer), [row["distance"]], trials=row["n"],
                             seed=protocols["seed"])[0]
    same = list(fresh["found"]) == list(row["found"])
    return (f"recomputed here at distance {row['distance']:,}: {fresh['correct']}/{fresh['n']} found, "
            + ("every trial as stored" if same else f"MISMATCH with the stored {row['correct']}/{row['n']} "
               f"(trials {[i for i, (a, b) in enumerate(zip(fresh['found'], row['found'])) if a != b]})"))


def essay_perplexity(model, tokenizer, rows: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Perplexity of RULER's essays by position: ``rows`` windows of ``length`` tokens from random
    offsets; returns the bin edges (log-spaced from position 8: a window starts mid-text, so its
    first tokens have almost no context) and the perplexity of each bin."""
    import torch

    from shortlab.rope_experiment.measurements import binned_perplexity, per_position_nll
    from shortlab.rope_experiment.passkey import essay_token_ids

    ids = essay_token_ids(tokenizer)
    offsets = np.random.default_rng(seed).integers(0, len(ids) - length, size=rows)
    windows = torch.tensor([ids[o: o + length] for o in offsets])
    nll, count = per_position_nll(model, windows.to(next(model.parameters()).device), batch_size=1)
    edges = np.unique(np.geomspace(8, length, 12).astype(int))
    return edges, binned_perplexity(nll, count, edges)


def _power_of_two_axis(ax) -> None:
    """Plain tick labels at powers of two on a log x axis, none on the minor ticks."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.LogLocator(base=2))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def figure_passkey(passkey: Passkey, edges: np.ndarray, perplexity: np.ndarray, model: RealModel):
    fig, (ax_found, ax_ppl) = plt.subplots(1, 2, figsize=(13, 4.2))
    rows = passkey.rows
    ax_found.errorbar([r["distance"] for r in rows], [r["rate"] for r in rows], fmt="o-", capsize=3,
                      yerr=[[r["rate"] - r["low"] for r in rows], [r["high"] - r["rate"] for r in rows]])
    ax_found.set(xlabel="passkey–question distance (tokens)", ylabel=f"passkey found (95 % Wilson, {rows[0]['n']} trials)",
                 ylim=(-0.03, 1.03), title=f"{model.name}: passkey on RULER's essays")
    ax_ppl.plot(np.sqrt(edges[:-1] * edges[1:]), perplexity, "o-")
    ax_ppl.set(yscale="log", xlabel="position in an essay window (tokens)", ylabel="perplexity",
               title=f"{model.name}: perplexity of the essays by position")
    plain_log_ticks(ax_ppl)
    for ax in (ax_found, ax_ppl):
        _power_of_two_axis(ax)
        ax.axvline(model.bound, color="tab:red", ls="--", label=f"bound L_θ = {model.bound:,}")
        ax.axvline(model.setup.max_position_embeddings, color="k", ls=":",
                   label=f"advertised {model.setup.max_position_embeddings:,}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def protocols_words(protocols: Mapping, bound: int, margin: float, seed: int = 0) -> str:
    """The passkey setups side by side: rates within and beyond the bound, the precision's paired
    effect and the filler's effect against RULER's essays."""
    from shortlab.rope_experiment.protocols import filler_effect, precision_effects, protocol_rates

    lines = [f"{protocols['trials']} trials at each of {len(protocols['distances'])} distances; bound L_θ = {bound:,}"]
    lines += [f"  {r['setup']:>15} {r['dtype']:>9}: within the bound {r['within']}, beyond {r['beyond']}"
              for r in protocol_rates(protocols, bound)]
    lines += [f"  {setup}: float32 minus bfloat16 on the same prompts {e['difference']} -> {describe(e['verdict'], margin)}"
              for setup, e in precision_effects(protocols, bound, margin=margin, seed=seed).items()]
    for setup in ("bible-shared", "wiki-windows"):
        effect = filler_effect(protocols, bound, setup, "essays-windows", margin=margin, seed=seed)
        if effect is not None:
            lines.append(f"  {setup} minus essays-windows (float32, independent trials): {effect['difference']} -> "
                         f"{describe(effect['verdict'], margin)}")
    return "\n".join(lines)


@dataclasses.dataclass
class HeadBounds:
    """Each head's own bound (first distance where its score gap G(m) < 0) from the theorem's
    query–key covariance weights (``covariance``) and from the pooled-variance heuristic
    (``heuristic``), [layers, heads]; −1 where G(0) < 0 (an anti-correlated head has no bound)."""

    covariance: np.ndarray
    heuristic: np.ndarray
    limit: int
    source: str

    def words(self, model: RealModel) -> str:
        advertised = model.setup.max_position_embeddings
        lines = [f"{model.name}: {self.covariance.shape[0]} layers × {self.covariance.shape[1]} heads, weights from {self.source}"]
        for name, bounds in (("query–key covariance (theorem)", self.covariance), ("pooled variance (heuristic)", self.heuristic)):
            valid = bounds[bounds >= 0]  # an anti-correlated head has no bound: left out of the median and shares
            median = f"{np.median(valid):,.0f}" if valid.size else "none"
            lines.append(f"  {name:32s}: anti-correlated (G(0) < 0, no bound): {np.mean(bounds < 0):.0%} of the heads; "
                         f"of the others, median head bound {median}, below the plain bound {model.bound:,}: "
                         f"{np.mean(valid < model.bound) if valid.size else 0:.0%}, reaching the advertised "
                         f"{advertised:,}: {np.mean(valid >= advertised) if valid.size else 0:.0%}"
                         + (f"; widest {valid.max():,}" + (" (scan limit)" if valid.max() == self.limit else "") if valid.size else ""))
        lines.append(f"share of heads whose covariance-weighted gap stays positive over the advertised context: "
                     f"{self.reaching(advertised)}")
        return "\n".join(lines)

    def reaching(self, advertised: int):
        return wilson_interval(int((self.covariance >= advertised).sum()), self.covariance.size)


def head_bounds(model, tokenizer, real: RealModel, *, source: str, rows: int, tokens: int, seed: int = 0) -> HeadBounds:
    """``measurements.qk_pair_covariances`` on ``rows`` × ``tokens`` of real text, each head's
    bound from them (``score_gap_bound``) and from the heuristic weights; G(0) = Σ c_i is checked
    against the covariances."""
    from shortlab.data import calibration_batch
    from shortlab.rope_experiment.measurements import qk_pair_covariances, qk_pair_weights, score_gap, score_gap_bound

    assert real.variant.rope_type == "default", "the per-head bounds use plain RoPE frequencies"
    ids = calibration_batch(tokenizer, source, rows, tokens, split="eval", seed=seed + 7)["input_ids"]
    cos_w, sin_w = qk_pair_covariances(model, ids)
    thetas = rope.rope_frequencies(real.variant.base, real.variant.rotary_dim)
    limit = 4 * real.setup.max_position_embeddings
    covariance = np.array([[score_gap_bound(thetas, c, s, limit=limit) for c, s in zip(lc, ls)] for lc, ls in zip(cos_w, sin_w)])
    heuristic = np.array([[rope.max_context_from_frequencies(thetas, weights=w, limit=limit) for w in layer]
                          for layer in qk_pair_weights(model, ids)])
    for layer_c, layer_s in zip(cos_w, sin_w):
        for c, s in zip(layer_c, layer_s):
            assert math.isclose(score_gap(0, thetas, c, s), c.sum(), rel_tol=1e-9, abs_tol=1e-9)
    return HeadBounds(covariance, heuristic, limit, f"{rows} × {tokens} tokens of {source} text")


def figure_head_bounds(found: HeadBounds, model: RealModel):
    """Each head's bound (log10) for both weightings on one colour scale; anti-correlated heads red."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    positive = np.concatenate([found.covariance[found.covariance > 0], found.heuristic[found.heuristic > 0]])
    scale = dict(vmin=np.log10(positive.min()), vmax=np.log10(positive.max()))  # one scale for both panels
    for ax, bounds, title in ((axes[0], found.covariance, "query–key covariance (theorem)"),
                              (axes[1], found.heuristic, "pooled variance (heuristic)")):
        ax.set_facecolor("tab:red")  # what the masked cells show: anti-correlated heads have no bound
        sns.heatmap(np.log10(np.where(bounds > 0, bounds, np.nan)), cmap="viridis", ax=ax,
                    yticklabels=max(1, len(bounds) // 10),
                    cbar_kws={"label": f"log10 head bound [tokens] (plain L_θ = {model.bound:,} → {np.log10(model.bound):.2f})"}, **scale)
        ax.set(xlabel="head", ylabel="layer", title=f"{title}\n(red: anti-correlated, G(0) < 0, {int((bounds < 0).sum())} heads)")
    fig.tight_layout()
    return fig


def finetunes(paths: Sequence[str | Path], practical: Mapping, model: RealModel) -> tuple[list[dict], str]:
    """``finetune.finetune_summary`` of each fine-tuning store present (recomputed from its raw
    measurements; a stored verdict that differs is a problem the summary names), with a paragraph
    per store: where it ran, what it found, and whether it fine-tuned this model's RoPE."""
    from shortlab.provenance import describe_provenance
    from shortlab.rope_experiment.finetune import describe_finetune, finetune_summary

    found, lines = [], []
    for name in paths:
        path = repository_path(name)
        if not path.is_file():
            lines.append(f"{name} does not exist: that fine-tuning run has not been made (scripts/rope_finetune.py); skipped.")
            continue
        summary = finetune_summary(json.loads(path.read_text(encoding="utf-8")), **practical)
        tuned = summary["model"]
        lines.append(f"== {name}\nWeights: {describe_provenance(tuned['name'], summary['parameters']['dtype'])}, "
                     f"fine-tuned by scripts/rope_finetune.py\n{describe_finetune(summary)}")
        if summary["problems"]:
            lines.append("MISMATCH between the stored summary and its recomputation: " + "; ".join(summary["problems"]))
        if (tuned["own_base"], tuned["head_dim"], tuned["max_positions"]) != (
                model.variant.base, model.setup.head_dim, model.setup.max_position_embeddings):
            lines.append(f"note: this file fine-tuned another RoPE set-up than {model.name}'s")
        found.append(summary)
    return found, "\n\n".join(lines)


def figure_finetune(finetune: Mapping):
    """Passkey by distance, perplexity by position and the training loss of every base (the
    control dashed, drawn last), and the shipped model's passkey around its own bound when
    measured; one legend below the panels."""
    shipped = finetune["shipped"]
    panels = 4 if shipped is not None else 3
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.6))
    ax_passkey, ax_perplexity, ax_loss = axes[:3]
    runs = sorted(finetune["runs"], key=lambda run: run["control"])  # the control last: drawn on top of the others
    colors = plt.cm.plasma(np.linspace(0, 0.8, max(1, len(runs) - 1)))
    for k, run in enumerate(runs):
        style = dict(color="black", ls="--", lw=2, zorder=5) if run["control"] else dict(color=colors[k], lw=1.2)
        label = (f"own base {run['base']:g} (control)" if run["control"] else f"base {run['base']:g}") + f", L_θ = {run['bound']:,}"
        table, bins = run["passkey"], run["perplexity"]["bins"]
        ax_passkey.errorbar([r["distance"] for r in table], [r["rate"] for r in table], marker="o", capsize=2, ms=3,
                            yerr=[[r["rate"] - r["low"] for r in table], [r["high"] - r["rate"] for r in table]],
                            label=label, **style)
        ax_perplexity.errorbar([(b["start"] + b["end"]) / 2 for b in bins], [b["perplexity"] for b in bins], marker="o",
                               capsize=2, ms=3, **style,
                               yerr=[[b["perplexity"] - b["low"] for b in bins], [b["high"] - b["perplexity"] for b in bins]])
        if run["bound"] < finetune["context"]:
            for ax in (ax_passkey, ax_perplexity):
                ax.axvline(run["bound"], color=style["color"], ls=":", lw=1)
        ax_loss.plot(run["loss_curve"]["step"], run["loss_curve"]["loss"], **style)
    trained_on = f"{finetune['parameters']['task_fraction']:.0%} passkey rows"
    ax_passkey.set(xlabel="passkey–question distance (tokens)", ylabel="passkey found (95 % Wilson)", ylim=(-0.03, 1.03),
                   title=f"passkey by distance ({trained_on}; dotted: bounds)")
    ax_perplexity.set(xscale="log", xlabel="position in a held-out row (tokens)", ylabel="perplexity (95 % bootstrap)",
                      title="perplexity by position")
    ax_loss.set(xlabel="fine-tuning step", ylabel="training loss (window mean)", title="fine-tuning loss")
    if shipped is not None:
        table = shipped["passkey"]
        axes[3].errorbar([r["distance"] for r in table], [r["rate"] for r in table], fmt="s-", color="k", capsize=2, ms=3,
                         yerr=[[r["rate"] - r["low"] for r in table], [r["high"] - r["rate"] for r in table]],
                         label=f"shipped model, base {shipped['base']:g}")
        axes[3].axvline(shipped["bound"], color="tab:red", ls="--", label=f"its bound L_θ = {shipped['bound']:,}")
        axes[3].axvline(finetune["model"]["max_positions"], color="grey", ls=":",
                        label=f"advertised {finetune['model']['max_positions']:,}")
        axes[3].set(xlabel="passkey–question distance (tokens)", ylabel="passkey found (95 % Wilson)", ylim=(-0.03, 1.03),
                    title="the shipped model around its own bound")
        axes[3].legend(fontsize=7, loc="lower left")
    fig.legend(*ax_passkey.get_legend_handles_labels(), loc="lower center", ncol=min(len(runs), 4), fontsize=8)
    fig.suptitle(f"{finetune['model']['label']}: fine-tuned with each base ({finetune['runs'][0]['steps']} steps, "
                 f"context {finetune['context']:,})")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig
