"""Notebook 01's sections as functions, so that each notebook cell reads in one glance.

The notebook measures (``shortgpt_evidence``), judges (``shortlab.stats``) and draws
(``shortgpt_figures``); this module puts those together the way the notebook reports them.
Each section returns a small record (tables as pandas frames, the claims it judged as
``Claim``s, its finding in words), ``figure_*`` functions build its figures from the record,
and ``findings`` turns the claims into the closing "What this run found".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.patches import Patch

from shortlab.findings import Finding, findings_markdown, significant
from shortlab.shortgpt_evidence import (
    EvidenceConfig, Prepared, accuracy_interaction, collect, conclusion, dense_precision, healing_configs, model_free_baselines,
    nll_arrays, open_store, perplexity_with_ratio, pooled_correct, quantisation_interaction, random_versus,
    store_provenance,
)
from shortlab.shortgpt_figures import (
    draw_bi_atlas, draw_random_removal, draw_rankings_at_k, draw_ratio_claims, low_band, ranking_label,
)
from shortlab.stats import (
    CANNOT_TELL, CONTRADICTED, SUPPORTED, Interval, bootstrap_interval, describe, equivalence_verdict, family_verdicts,
    paired_interval, paired_perplexity_ratio, perplexity_interval, retained_fraction_interval, sample_size_to_tell,
    strongest_rule, verdict, wilson_interval,
)

# the sizes of a FAST run: the same code on a tiny model in seconds
FAST_SIZES = {"n_calib": 2, "seq_len": 64, "eval_blocks": 4, "dense_blocks": 6, "eval_seq_len": 64, "limit": 4,
              "max_remove": 2, "remove_step": 1, "random_draws": 2, "random_blocks": 2, "stability_sizes": [1, 2],
              "speed_prompt_len": 32, "speed_new_tokens": 4, "speed_repeats": 2, "kv_context": 64, "explorer_blocks": 2,
              "heal_steps": 2, "heal_batch": 2, "heal_block": 32, "heal_warmup": 0}


def notebook_options(options: Mapping, *, eval_blocks: int, limit: int, model: str, fast: bool = False) -> dict:
    """Notebook 01's options with the two core sizes (``eval_blocks``, ``limit``) folded in;
    ``fast``: every size shrunk to ``FAST_SIZES`` and only ``model`` in the depth atlas. The
    caller's dict is not changed."""
    used = {**options, "eval_blocks": eval_blocks, "limit": limit}
    if fast:
        used.update(FAST_SIZES, depth_models=[model])
    if not 2 <= used["explorer_blocks"] <= used["eval_blocks"]:
        raise ValueError(f"explorer_blocks = {used['explorer_blocks']}: the explorer needs 2 to eval_blocks = "
                         f"{used['eval_blocks']} held-out blocks (an interval needs at least 2)")
    return used


def evidence_config(options: Mapping, *, tasks: Sequence[str], rankings: Sequence[str], table_fraction: float,
                    heal_seeds: Sequence[int], seed: int = 0) -> EvidenceConfig:
    """The ``EvidenceConfig`` of the notebook's parameters (``options``: ``notebook_options``):
    the same one ``scripts/shortgpt_evidence.py`` builds from its arguments, so the notebook
    reads the records the script stored."""
    if "block_influence" not in rankings:
        raise ValueError(f"RANKINGS must include 'block_influence': every comparison is against ShortGPT's ranking, "
                         f"got {list(rankings)}")
    o = options
    return EvidenceConfig(
        calib_source=o["calib_source"], n_calib=o["n_calib"], calib_seq_len=o["seq_len"], eval_source=o["eval_source"],
        eval_blocks=o["eval_blocks"], dense_blocks=o["dense_blocks"], eval_seq_len=o["eval_seq_len"],
        rankings=tuple(rankings), max_remove=o["max_remove"], remove_step=o["remove_step"], table_fraction=table_fraction,
        random_draws=o["random_draws"], random_blocks=o["random_blocks"], tasks=tuple(tasks), task_limit=o["limit"],
        task_rankings=None if o["task_rankings"] is None else tuple(o["task_rankings"]), bits=o["quant_bits"],
        group_size=o["quant_group"], batch_size=o["batch_size"], seed=seed,
        healing=healing_configs(heal_seeds, method=o["heal_method"], steps=o["heal_steps"], batch_size=o["heal_batch"],
                                block_size=o["heal_block"], warmup=o["heal_warmup"], source=o["calib_source"],
                                compute_dtype=o["heal_dtype"]),
        healing_rankings=tuple(o["heal_rankings"]))


def preparation_words(prepared: Prepared, config: EvidenceConfig, num_layers: int) -> str:
    plan = prepared.plan
    clipped = (f"max_remove = {config.max_remove} clipped to {num_layers - 1}: at least one layer must stay\n"
               if config.max_remove > num_layers - 1 else "")
    return (clipped + f"calibration: {config.n_calib} x {config.calib_seq_len} tokens of {config.calib_source}; held out: "
            f"{plan.eval_blocks} x {config.eval_seq_len} tokens of {config.eval_source}; questions: "
            + ", ".join(f"{len(v)} of {t}" for t, v in prepared.task_examples.items())
            + f"\nlayers removed: k = {list(plan.ks)}; the table uses k = {plan.table_k} "
              f"({plan.table_k / num_layers:.0%} of the layers)")


@dataclasses.dataclass
class Claim:
    """One judged claim: its words, the removal count ``k`` (0: none), the ``interval`` and
    ``verdict``, the practical size in words and as ``margin``, and, to say what sample would
    decide an undecided one, ``n`` items of ``unit`` against ``threshold`` in ``direction``."""

    claim: str
    k: int
    interval: Interval
    verdict: str
    practical: str = ""
    margin: float | None = None
    n: int | None = None
    threshold: float | None = None
    direction: str = "above"
    unit: str = "questions"
    against: str = ""  # the ranking BI is compared with, for a claim that compares two

    def finding(self) -> Finding:
        needed = None
        if self.verdict == CANNOT_TELL and self.threshold is not None:
            needed = sample_size_to_tell(self.interval, self.n, self.threshold, margin=self.margin, claim=self.direction)
        return Finding(f"{self.claim} at k = {self.k}" if self.k else self.claim, self.verdict, self.interval,
                       self.practical, self.margin,
                       to_tell=f"about {significant(needed)} {self.unit} instead of {self.n} would decide it" if needed else "")


def conclusions(claims: Sequence[Claim]) -> str:
    """One line per claim, "- <Verdict>: <claim> at k = <k> (<practical size>) (95 % interval ...)."
    (``shortgpt_evidence.conclusion``; the README's verdict table reads these lines)."""
    lines = []
    for c in claims:
        practical = f" {c.practical}" if c.practical.startswith("(") else f" ({c.practical})" if c.practical else ""
        lines.append("- " + conclusion(f"{c.claim}{f' at k = {c.k}' if c.k else ''}{practical}", c.verdict, c.interval))
    return "\n".join(lines)


def show_intervals(table: pd.DataFrame) -> pd.DataFrame:
    """A table with its intervals as text and its floats rounded, for display."""
    return table.map(lambda v: str(v) if hasattr(v, "low") else v if isinstance(v, str) or not isinstance(v, float)
                     else round(v, 3))


# ---------------------------------------------------------------- 1. Block Influence


def figure_block_influence(bi: np.ndarray, removed: set[int], title: str):
    fig, ax = plt.subplots(figsize=(10, 3.6))
    ax.bar(range(len(bi)), bi, color=["tab:red" if i in removed else "tab:blue" for i in range(len(bi))])
    ax.set_yscale("log")
    ax.set(xlabel="decoder layer", ylabel="Block Influence  1 − mean cos(x_in, x_out)", title=title)
    ax.legend(handles=[Patch(color="tab:red", label=f"the {len(removed)} lowest: removed first"),
                       Patch(color="tab:blue", label="kept")])
    fig.tight_layout()
    return fig


def bi_words(bi: np.ndarray, order: Sequence[int]) -> str:
    return (f"removal order (lowest BI first): {list(order)}\nBI ranges from {bi.min():.4f} (layer {bi.argmin()}) to "
            f"{bi.max():.4f} (layer {bi.argmax()}); median {np.median(bi):.4f}")


def figure_similarity(similarity: np.ndarray, title: str):
    fig, ax = plt.subplots(figsize=(7, 6))
    sns.heatmap(similarity, cmap="viridis", vmin=min(0.0, similarity.min()), vmax=1.0, square=True, ax=ax,
                cbar_kws={"shrink": 0.85, "label": "mean cosine"})
    ax.set(xlabel="residual-stream point j  (input of layer j; the last is the last layer's output)",
           ylabel="residual-stream point i", title=title)
    fig.tight_layout()
    return fig


def similarity_words(similarity: np.ndarray, spans: Sequence[int]) -> str:
    """The most similar run of n layers for each n in ``spans``: where the residual stream turns least."""
    num_layers = similarity.shape[0] - 1
    lines = []
    for n in sorted(set(spans)):
        found = {i: similarity[i, i + n] for i in range(num_layers - n + 1)}
        best = max(found, key=found.get)
        lines.append(f"most similar span of {n:2d} layer(s): input of layer {best} vs output of layer {best + n - 1}, "
                     f"mean cos {found[best]:.3f}")
    return "\n".join([*lines, f"input of the first layer vs output of the last: mean cos {similarity[0, num_layers]:.3f}"])


@dataclasses.dataclass
class CalibrationStability:
    """BI under several calibration settings (``bi``: {setting: [layers]}, the main one first):
    each layer's rank per setting (``ranks`` [settings, layers], 0 = lowest), the ``k``-layer set
    each would remove, and the Jaccard overlaps of those sets [settings, settings]."""

    bi: dict[str, np.ndarray]
    k: int

    @property
    def names(self) -> list[str]:
        return list(self.bi)

    @property
    def ranks(self) -> np.ndarray:
        from shortlab.pruning import lowest_layers

        return np.array([np.argsort(lowest_layers(values, len(values))) for values in self.bi.values()])

    @property
    def chosen(self) -> dict[str, frozenset[int]]:
        return {name: frozenset(np.flatnonzero(rank < self.k).tolist()) for name, rank in zip(self.names, self.ranks)}

    @property
    def jaccard(self) -> np.ndarray:
        chosen = self.chosen
        return np.array([[len(chosen[a] & chosen[b]) / len(chosen[a] | chosen[b]) for b in self.names] for a in self.names])

    def words(self) -> str:
        chosen, jaccard = self.chosen, self.jaccard
        off_diagonal = jaccard[~np.eye(len(jaccard), dtype=bool)]
        main = sorted(chosen[self.names[0]])
        num_layers = len(next(iter(self.bi.values())))
        return (f"removed under every setting: {sorted(frozenset.intersection(*chosen.values()))}; under at least one: "
                f"{sorted(frozenset.union(*chosen.values()))}\nJaccard overlap between settings: min "
                f"{off_diagonal.min():.2f}, median {np.median(off_diagonal):.2f}\nrelative depth of the main setting's "
                f"removed layers: {[round(i / (num_layers - 1), 2) for i in main]}")


def calibration_label(options: Mapping) -> str:
    """The main calibration set in words, e.g. "16 × 256 tokens of wiki"."""
    return f"{options['n_calib']} × {options['seq_len']} tokens of {options['calib_source']}"


def calibration_bi(model, tokenizer, source: str, n_blocks: int, options: Mapping, seed: int = 0) -> np.ndarray:
    """BI per layer [layers] on ``n_blocks`` calibration blocks of ``source`` (``options``' block
    length and batch size), on the model's input device."""
    from shortlab.data import calibration_batch, iter_batches
    from shortlab.evaluate import input_device
    from shortlab.metrics import block_influence

    blocks = calibration_batch(tokenizer, source, n_blocks, options["seq_len"], split="calib", seed=seed)
    values = block_influence(model, [{name: t.to(input_device(model)) for name, t in batch.items()}
                                     for batch in iter_batches(blocks, options["batch_size"])])
    return np.array([values[i] for i in range(len(values))])


def calibration_stability(model, tokenizer, main_bi: np.ndarray, options: Mapping, k: int, seed: int = 0
                          ) -> CalibrationStability:
    """BI on every calibration text of ``options["stability_sources"]`` at every number of blocks
    in ``options["stability_sizes"]``, beside the main BI."""
    found = {f"{options['calib_source']} × {options['n_calib']} (main)": np.asarray(main_bi)}
    for source in options["stability_sources"]:
        for size in options["stability_sizes"]:
            found[f"{source} × {size}"] = calibration_bi(model, tokenizer, source, size, options, seed)
    return CalibrationStability(found, k)


def figure_calibration_stability(stability: CalibrationStability):
    names, ranks, k = stability.names, stability.ranks, stability.k
    fig, (ax_rank, ax_jac) = plt.subplots(1, 2, figsize=(15, 0.45 * len(names) + 2.2), gridspec_kw={"width_ratios": [2.2, 1]})
    sns.heatmap(ranks, cmap="viridis_r", yticklabels=names, ax=ax_rank, cbar_kws={"shrink": 0.8, "label": "BI rank"})
    rows, cols = np.nonzero(ranks < k)
    ax_rank.scatter(cols + 0.5, rows + 0.5, marker="s", s=60, facecolors="none", edgecolors="red", linewidths=1.2)
    ax_rank.tick_params(axis="y", labelrotation=0)
    ax_rank.set(xlabel="decoder layer", ylabel="calibration text × blocks",
                title=f"BI rank per layer (0 = lowest); red: the {k} removed")
    sns.heatmap(stability.jaccard, cmap="magma", vmin=0, vmax=1, annot=True, fmt=".2f", annot_kws={"fontsize": 7},
                square=True, xticklabels=names, yticklabels=names, cbar=False, ax=ax_jac)
    ax_jac.tick_params(labelsize=8)
    ax_jac.tick_params(axis="y", labelrotation=0)
    ax_jac.set_xticklabels(ax_jac.get_xticklabels(), rotation=60, ha="right")
    ax_jac.set(xlabel="calibration setting", ylabel="calibration setting", title=f"Jaccard overlap of the removed {k}-layer sets")
    fig.tight_layout()
    return fig


def depth_profiles(main_name: str, main_bi: np.ndarray, options: Mapping, *, dtype: str, placement: Mapping,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """BI per layer of every model in ``options["depth_models"]`` (one pass over the same
    calibration text and sizes; ``main_name``'s is ``main_bi``), each model loaded, measured and
    freed in turn."""
    import time

    from shortlab.models import load_model

    profiles = {main_name: np.asarray(main_bi)}
    for name in [m for m in options["depth_models"] if m != main_name]:
        start = time.perf_counter()
        other, other_tokenizer = load_model(name, dtype=dtype, **placement)
        profiles[name] = calibration_bi(other, other_tokenizer, options["calib_source"], options["n_calib"], options, seed)
        print(f"{name}: BI of {len(profiles[name])} layers in {time.perf_counter() - start:.0f} s")
        del other
    return profiles


def figure_bi_atlas(profiles: Mapping[str, np.ndarray], fraction: float, paper: Mapping, title: str):
    """BI against relative depth per model, beside each model's lowest-BI band and the paper's
    removed layers (``paper``: ``references["removed_layers"]``)."""
    llama = paper["Llama-2-7B"]
    fig, (ax_profiles, ax_bands) = plt.subplots(1, 2, figsize=(14, 4), gridspec_kw={"width_ratios": [1.2, 1]})
    draw_bi_atlas(ax_profiles, ax_bands, profiles, fraction, {"Llama-2-7B": (llama["layers"], llama["of"])})
    ax_profiles.set_title(title)
    fig.tight_layout()
    return fig


def band_table(profiles: Mapping[str, np.ndarray], fraction: float) -> pd.DataFrame:
    bands = {name: low_band(values, fraction) for name, values in profiles.items()}
    return pd.DataFrame({name: {"layers": len(profiles[name]), "lowest-BI layers": band["layers"],
                                "relative depth": f"{band['from']:.2f}–{band['to']:.2f}", "centre": round(band["centre"], 2)}
                         for name, band in bands.items()}).T


# ---------------------------------------------------------------- 2. the stored evidence


class Study:
    """The measured settings as the notebook reads them: ``prepared`` (``shortgpt_evidence.prepare``)
    and ``evidence`` ({measurement: record}) read from ``store``, with the tasks and accuracy
    ``metric`` pooled over."""

    def __init__(self, prepared: Prepared, evidence: Mapping, tasks: Sequence[str], metric: str, seed: int = 0,
                 store=None):
        self.prepared, self.evidence, self.tasks, self.metric, self.seed = prepared, evidence, list(tasks), metric, seed
        self.store = store
        self.plan, self.table_k, self.choices = prepared.plan, prepared.plan.table_k, prepared.choices
        self.dense = self.record("dense", 0)

    def record(self, ranking: str, k: int, quantised: bool = False) -> Mapping:
        """The record of the one non-random, unhealed setting ``ranking`` at ``k`` layers removed."""
        (setting,) = [s for s in self.prepared.settings if (s.ranking, s.k, s.quantised) == (ranking, k, quantised)
                      and s.draw is None and not s.healed]
        return self.evidence[setting.measurement]

    def pooled(self, record: Mapping) -> np.ndarray:
        """1/0 per question [Σ questions] over the tasks, in order."""
        return pooled_correct(record, self.tasks, self.metric)

    def same_layers(self, ranking: str, k: int) -> bool:
        return sorted(self.choices[ranking][k]) == sorted(self.choices["block_influence"][k])

    def choices_table(self) -> pd.DataFrame:
        return pd.DataFrame({r: {k: sorted(c) for k, c in per_k.items()} for r, per_k in self.choices.items()}).rename_axis("k")


def load_study(model, tokenizer, name: str, dtype: str, prepared: Prepared, results_dir, *, tasks: Sequence[str],
               metric: str, batch_size: int, measure: bool, seed: int = 0) -> Study:
    """Open the store, measure what it lacks (``measure``) or stop naming the script that does,
    and read every planned measurement."""
    from shortlab.plotting import repository_relative

    store = open_store(results_dir, model, name, prepared, dtype)
    distinct = list(dict.fromkeys(setting.measurement for setting in prepared.settings))
    missing = [m for m in distinct if store.get(m) is None]
    if missing and not measure:
        raise RuntimeError(f"{len(missing)} of {len(distinct)} measurements are not stored in {results_dir} for these "
                           f"sizes; run scripts/shortgpt_evidence.py --model {name} with the same sizes, or set "
                           "OPTIONS['measure_missing'] = True")
    print(f"{len(distinct) - len(missing)} of {len(distinct)} measurements stored in "
          f"{repository_relative(results_dir) or 'memory'}; measuring {len(missing)}")
    evidence = collect(model, tokenizer, prepared.settings, store, prepared.held_out, prepared.task_examples, batch_size)
    print("where it was measured:", store_provenance(evidence.values()))
    return Study(prepared, evidence, tasks, metric, seed, store=store)


@dataclasses.dataclass
class DensePerplexity:
    """The dense model's perplexity on its own wider set of blocks (``wide``), and on the paired ones."""

    wide: Mapping
    interval: Interval
    paired: Interval

    def words(self, target: float, eval_blocks: int, seq_len: int) -> str:
        halves = (self.interval.low / self.interval.estimate - 1, self.interval.high / self.interval.estimate - 1)
        return (f"dense perplexity {self.interval} on {len(self.wide['nll'])} x {seq_len} held-out tokens "
                f"({halves[0]:+.1%} / {halves[1]:+.1%}; target ±{target:.0%}: "
                f"{'met' if max(map(abs, halves)) <= target else 'not met'}); on the first {eval_blocks}, where every "
                f"setting is compared: {self.paired}")


def dense_perplexity(model, tokenizer, config: EvidenceConfig, study: Study) -> DensePerplexity:
    # the absolute perplexity varies more between blocks than a paired ratio: it gets more of them
    wide = dense_precision(model, tokenizer, config, study.store)
    return DensePerplexity(wide, perplexity_interval(*nll_arrays(wide)), perplexity_with_ratio(study.dense, study.dense)[0])


def perplexity_table(study: Study) -> pd.DataFrame:
    """Perplexity and perplexity ÷ dense (paired) of every ranking at every k, indexed (k, ranking)."""
    rows = []
    for setting in study.prepared.settings:
        if setting.ranking in ("dense", "random") or setting.quantised or setting.healed:
            continue
        ppl, ratio = perplexity_with_ratio(study.evidence[setting.measurement], study.dense)
        rows.append({"ranking": setting.ranking, "k": setting.k, "removed": list(setting.measurement.removed),
                     "perplexity": ppl, "÷ dense": ratio})
    return pd.DataFrame(rows).set_index(["k", "ranking"]).sort_index()


def versus_baselines(study: Study, margin: float) -> tuple[pd.DataFrame, list[Claim]]:
    """BI's perplexity ÷ each other ranking's at the table's k, paired over blocks; the claim "BI
    removes less than it" (the ratio below 1 − ``margin``)."""
    k = study.table_k
    bi_nll, tokens = nll_arrays(study.record("block_influence", k))
    rows, claims = [], []
    for ranking in [r for r in study.choices if r != "block_influence"]:
        ratio = None if study.same_layers(ranking, k) else paired_perplexity_ratio(
            bi_nll, nll_arrays(study.record(ranking, k))[0], tokens)
        outcome = None if ratio is None else verdict(ratio, 1.0, claim="below", margin=margin)
        rows.append({"baseline": ranking, "BI ÷ baseline": "the same layers" if ratio is None else str(ratio),
                     f"verdict (below 1 − {margin})": "—" if ratio is None else describe(outcome, margin)})
        if ratio is not None:
            other = ranking_label(ranking)
            claims.append(Claim(f"BI's removal raises perplexity less than {other}'s", k, ratio, outcome,
                                f"(BI's perplexity ÷ {other}'s below {1 - margin:g})", margin, tokens.size, 1.0, "below",
                                "blocks", against=ranking))
    return pd.DataFrame(rows).set_index("baseline"), claims


# ---------------------------------------------------------------- 3. random removal


@dataclasses.dataclass
class RandomRemoval:
    """Random removal per k on the first blocks: the table (BI and the draws, perplexity ÷ dense,
    the share of draws worse than BI), each draw's ratio (``ratios``), BI's (``bi``), the claims
    and their family over k."""

    table: pd.DataFrame
    ratios: dict[int, list[float]]
    bi: dict[int, float]
    claims: list[Claim]
    family: object


def random_removal(study: Study, share: float, margin: float) -> RandomRemoval:
    blocks = study.plan.random_blocks
    dense_nll, dense_tokens = nll_arrays(study.dense, blocks)
    dense_ppl = math.exp(dense_nll.sum() / dense_tokens.sum())
    rows, ratios, bi, claims, shares = [], {}, {}, [], {}
    for k in study.plan.ks:
        draws = [study.evidence[s.measurement] for s in study.prepared.settings if s.ranking == "random" and s.k == k]
        reference, tokens = nll_arrays(study.record("block_influence", k), blocks)
        found = random_versus(reference, draws, tokens)
        ratios[k] = [math.exp(nll_arrays(d, blocks)[0].sum() / tokens.sum()) / dense_ppl for d in draws]
        bi[k] = found["reference"] / dense_ppl  # every column: perplexity ÷ dense on the same blocks
        shares[f"k = {k}"] = found["share_worse"]
        outcome = verdict(found["share_worse"], share, margin=margin)
        rows.append({"k": k, f"BI (first {len(dense_nll)} blocks)": round(bi[k], 3),
                     "random median": round(found["median"] / dense_ppl, 3),
                     "random 2.5 %": round(found["low"] / dense_ppl, 3), "random 97.5 %": round(found["high"] / dense_ppl, 3),
                     "share of draws worse than BI": str(found["share_worse"]), "verdict": outcome})
        claims.append(Claim(f"BI beats random removal ({found['draws']} draws)", k, found["share_worse"], outcome,
                            f"with more than {share + margin:.0%} of the draws worse than BI", margin, found["draws"],
                            share, "above", "draws"))
    return RandomRemoval(pd.DataFrame(rows).set_index("k"), ratios, bi, claims, family_verdicts(shares, share, margin=margin))


def figure_removal_curves(random: RandomRemoval, perplexities: pd.DataFrame, study: Study, model_name: str):
    k = study.table_k
    fig, (ax_random, ax_at_k) = plt.subplots(1, 2, figsize=(14, 4.4), gridspec_kw={"width_ratios": [1.3, 1]})
    draw_random_removal(ax_random, random.ratios, random.bi, reference_label="BI")
    ax_random.set_title(f"{model_name}: BI against random removal (first {study.plan.random_blocks} held-out blocks)")
    draw_rankings_at_k(ax_at_k, {ranking: perplexities.loc[(k, ranking), "÷ dense"] for ranking in study.choices})
    ax_at_k.set_title(f"every ranking at k = {k} ({study.plan.eval_blocks} held-out blocks)")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 4. benchmarks


@dataclasses.dataclass
class TaskAccuracy:
    """Section 4: per task, the dense model and BI at the table's k beside the rules that need no
    model (``table``); pooled over the tasks, 1/0 per question of the dense model, BI, chance and
    the strongest rule per task (``rule_names``); the dense model above that rule; the share of
    the dense accuracy BI keeps (``retained``) and of what the dense model scores above the rule
    (``retained_above_rule``; None when the dense model is not clearly above it); the claims."""

    table: pd.DataFrame
    dense: np.ndarray
    bi: np.ndarray
    chance: np.ndarray
    rule: np.ndarray
    rule_names: dict[str, str]
    dense_above_rule: Interval
    retained: Interval | None
    retained_above_rule: Interval | None
    claims: list[Claim]

    def words(self, metric: str, k: int, num_layers: int) -> str:
        text = (f"pooled {metric}: dense {wilson_interval(int(self.dense.sum()), self.dense.size)}, BI −{k} "
                f"{wilson_interval(int(self.bi.sum()), self.bi.size)}, chance {self.chance.mean():.3f}, strongest rule "
                f"without a model {self.rule.mean():.3f} (" + ", ".join(f"{t}: {n}" for t, n in self.rule_names.items())
                + f"); dense minus that rule {self.dense_above_rule}")
        if self.retained is None:
            return text + (f"\nthe dense model is not clearly above the strongest rule that needs no model on these "
                           f"{self.dense.size} questions: no share of its accuracy can be judged")
        return text + (f"\nBI −{k} of {num_layers} keeps {self.retained} of the dense {metric} (the paper's measure), and "
                       f"{self.retained_above_rule} of what the dense model scores above the strongest rule that needs "
                       "no model")


def task_accuracy(study: Study, num_layers: int, *, above_rule_margin: float, keeps_most: float,
                  share_margin: float) -> TaskAccuracy:
    k, metric, seed = study.table_k, study.metric, study.seed
    bi_record = study.record("block_influence", k)
    rows, chance, rule, names = [], [], [], {}
    for task, examples in study.prepared.task_examples.items():
        dense, bi = (np.asarray(r["correct"][task][metric], dtype=float) for r in (study.dense, bi_record))
        priors = model_free_baselines(examples)
        names[task], scores = strongest_rule(priors)
        chance.append(priors["chance"])
        rule.append(scores)
        rows.append({"task": task, "n": len(examples), "chance": priors["chance"].mean(),
                     "shortest answer": bootstrap_interval(priors["shortest answer"], seed=seed),
                     "longest answer": bootstrap_interval(priors["longest answer"], seed=seed),
                     "strongest rule": names[task], "dense": wilson_interval(int(dense.sum()), len(examples)),
                     f"BI −{k}": wilson_interval(int(bi.sum()), len(examples)),
                     "BI minus dense": paired_interval(bi, dense, seed=seed)})
    dense, bi = study.pooled(study.dense), study.pooled(bi_record)
    chance, rule = np.concatenate(chance), np.concatenate(rule)
    above = paired_interval(dense, rule, seed=seed)
    claims = [Claim("the dense model scores above the strongest rule that needs no model", 0, above,
                    verdict(above, 0.0, margin=above_rule_margin), f"by more than {above_rule_margin} in pooled {metric}",
                    above_rule_margin, dense.size, 0.0)]
    retained = retained_above = None
    if above.low > 0:
        retained = retained_fraction_interval(bi, dense, seed=seed)
        retained_above = retained_fraction_interval(bi, dense, rule, seed=seed)
        claims.append(Claim(f"removing {k} of {num_layers} layers by BI keeps most of what the dense model scores above "
                            "the strongest rule that needs no model", k, retained_above,
                            verdict(retained_above, keeps_most, margin=share_margin),
                            f"(more than {keeps_most + share_margin:.0%} of it)", share_margin, dense.size, keeps_most))
    else:
        claims.append(Claim(f"removing {k} of {num_layers} layers by BI keeps most of the accuracy (the dense model is "
                            "not clearly above the strongest rule that needs no model)", k, above, CANNOT_TELL))
    return TaskAccuracy(pd.DataFrame(rows).set_index("task"), dense, bi, chance, rule, names, above, retained,
                        retained_above, claims)


def ranking_accuracy(study: Study, perplexities: pd.DataFrame, margin: float) -> tuple[pd.DataFrame, list[Claim]]:
    """Every ranking's layer set at the table's k scored on the same questions, beside its
    perplexity; the claim "BI keeps more accuracy than it" (paired over questions)."""
    k, metric = study.table_k, study.metric
    bi = study.pooled(study.record("block_influence", k))
    rows, claims = [], []
    for ranking in study.choices:
        record = study.record(ranking, k)
        if not record["correct"]:
            continue  # not scored on the tasks (task_rankings)
        correct = study.pooled(record)
        row = {"ranking": ranking, "removed": sorted(study.choices[ranking][k]),
               "perplexity ÷ dense": str(perplexities.loc[(k, ranking), "÷ dense"]),
               f"pooled {metric}": str(wilson_interval(int(correct.sum()), correct.size))}
        if ranking != "block_influence" and not study.same_layers(ranking, k):
            difference = paired_interval(bi, correct, seed=study.seed)
            outcome = verdict(difference, 0.0, margin=margin)
            row.update({"BI − ranking": str(difference), f"verdict (BI above by > {margin})": describe(outcome, margin)})
            claims.append(Claim(f"BI's removal keeps more accuracy than {ranking_label(ranking)}'s", k, difference,
                                outcome, f"by more than {margin} in pooled {metric}", margin, correct.size, 0.0,
                                against=ranking))
        rows.append(row)
    return pd.DataFrame(rows).set_index("ranking").fillna("—"), claims


# ---------------------------------------------------------------- healing


@dataclasses.dataclass
class Healing:
    """What healing changed: the comparison of ``shortgpt_evidence.healing_comparison`` and the
    findings judged from it."""

    comparison: dict
    findings: list[Finding]
    lines: list[str]

    def table(self) -> pd.DataFrame:
        return (pd.DataFrame(self.comparison["rows"]).set_index("criterion").drop(columns="seeds")
                .rename(index=ranking_label).map(lambda value: "—" if value is None or value != value else str(value)))


def healing(study: Study, rule: np.ndarray, *, acc_margin: float, nll_margin: float, recover_share: float,
            share_margin: float) -> Healing:
    from shortlab.shortgpt_evidence import healed_records, healing_comparison, one_healing_per_removal

    metric = study.metric
    after = healed_records(study.prepared.settings, study.evidence)  # {criterion or "dense": {seed: record}}
    removed = {ranking: study.choices[ranking][study.table_k] for ranking in after if ranking != "dense"}
    after, twins = one_healing_per_removal(after, removed)
    before = {ranking: study.record(ranking, study.table_k) for ranking in after if ranking != "dense"}
    comparison = healing_comparison(before, after, study.dense, study.tasks, metric, rule, acc_margin=acc_margin,
                                    nll_margin=nll_margin, seed=study.seed)
    found, lines = [], []
    shared = "".join(f" {ranking_label(c).capitalize()} removes the same layers as {ranking_label(t)} at k = "
                     f"{study.table_k} ({', '.join(map(str, sorted(removed[c])))}): one healing, judged as {ranking_label(t)}."
                     for c, t in twins.items())
    lines += [shared.strip()] if shared else []

    def each(differences: Mapping) -> str:
        return "; ".join(f"{ranking_label(other)} {value}" for other, value in differences.items())
    for name, judged in ((metric, comparison.get("accuracy")), ("log-likelihood per token", comparison.get("perplexity"))):
        if judged is None:
            continue
        margin = acc_margin if name == metric else nll_margin
        lines.append(f"{name}: of the healed criteria, best before healing {ranking_label(judged['best_before'])} "
                     f"(ahead of {each(judged['before_against'])}), best after {ranking_label(judged['best_after'])}; "
                     + "; ".join(f"minus {ranking_label(other)}: {v} -> {describe(judged['verdicts'][other], margin)}"
                                 for other, v in judged["against"].items()))
        found.append(Finding(f"Of the healed criteria, the one whose removal scored best in {name} before healing "
                             f"({ranking_label(judged['best_before'])}) is still the best after healing", judged["outcome"],
                             practical=f"by more than {margin} over each of the others",
                             detail=f"Before healing it led {each(judged['before_against'])}; healed minus each: "
                                    f"{each(judged['against'])}." + shared))
    shares = {row["criterion"]: row[f"{metric} recovered above the rule"] for row in comparison["rows"]
              if row.get(f"{metric} recovered above the rule") is not None}
    if shares:
        recovered = family_verdicts(shares, recover_share, margin=share_margin)
        for criterion, share in shares.items():
            how = (f"healing lowered {metric} further (share recovered {share})" if share.estimate < 0
                   else f"healing recovers {share} of the {metric} lost above the rule")
            lines.append(f"{ranking_label(criterion)}: {how} -> "
                         f"{describe(recovered.per_setting[criterion], share_margin)} (after Holm: "
                         f"{describe(recovered.holm[criterion], share_margin)})")
            found.append(Finding(f"Healing the {ranking_label(criterion)} removal recovers most of the {metric} it lost above the strongest "
                                 "rule that needs no model", recovered.holm[criterion], share,
                                 practical=f"(more than {recover_share + share_margin:.0%} of it; judged after Holm's "
                                           "adjustment)", margin=share_margin))
    return Healing(comparison, found, lines)


def figure_healing(healed: Healing, metric: str, title: str):
    from shortlab.shortgpt_figures import draw_healing

    fig, (ax_ppl, ax_acc) = plt.subplots(1, 2, figsize=(13, 4.2))
    draw_healing(ax_ppl, ax_acc, healed.comparison["rows"], metric)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 5. the 2 x 2 design


@dataclasses.dataclass
class TwoByTwo:
    """Dense or BI-pruned × the model's or ``bits``-bit weights: each cell's perplexity, pooled
    accuracy and weight storage (``table``), the contrasts in nats per token (``nats``) and in
    accuracy (``accuracy``), and the two "compose" claims."""

    table: pd.DataFrame
    nats: dict[str, Interval]
    accuracy: dict[str, Interval]
    nll_margin: float
    claims: list[Claim]
    pooled: dict[str, float]

    def words(self) -> str:
        return (f"the weights' rounding costs {self.nats['quantise dense']} nats/token on the dense model and "
                f"{self.nats['quantise pruned']} on the pruned one; removing the layers costs {self.nats['remove layers']}")


def two_by_two(model, study: Study, pruned, *, bits: int, group: int | None, nll_margin: float, acc_margin: float) -> TwoByTwo:
    """``pruned``: the model with BI's table-k layers removed (for its storage)."""
    from shortlab.quantize import quantized_parameter_bytes
    from shortlab.speed import parameter_bytes

    k, metric = study.table_k, study.metric
    cells = {"dense": study.dense, f"{bits}-bit": study.record("dense", 0, True),
             f"BI −{k}": study.record("block_influence", k), f"BI −{k}, {bits}-bit": study.record("block_influence", k, True)}
    storage = [parameter_bytes(model), quantized_parameter_bytes(model, bits, group), parameter_bytes(pruned),
               quantized_parameter_bytes(pruned, bits, group)]
    rows, pooled = [], {}
    for (name, record), size in zip(cells.items(), storage):
        correct = study.pooled(record)
        pooled[name] = float(correct.mean())
        rows.append({"cell": name, "perplexity": str(perplexity_with_ratio(record, study.dense)[0]),
                     f"pooled {metric}": str(wilson_interval(int(correct.sum()), correct.size)), "weights MB": round(size / 1e6, 1)})
    nats = quantisation_interaction(*cells.values(), seed=study.seed)
    accuracy = accuracy_interaction(*(study.pooled(r) for r in cells.values()), seed=study.seed)
    margin = nll_margin * abs(nats["remove and quantise"].estimate)
    claims = [Claim(f"removal and {bits}-bit weights compose in perplexity (|interaction| below {margin:.3f} nats/token, "
                    f"{nll_margin:.0%} of their joint cost)", k, nats["interaction"], equivalence_verdict(nats["interaction"], margin)),
              Claim(f"removal and {bits}-bit weights compose in accuracy (interaction within ±{100 * acc_margin:g} points)",
                    k, accuracy["interaction"], equivalence_verdict(accuracy["interaction"], acc_margin))]
    return TwoByTwo(pd.DataFrame(rows).set_index("cell"), nats, accuracy, margin, claims, pooled)


def contrast_table(two: TwoByTwo, metric: str) -> pd.DataFrame:
    return pd.DataFrame({"Δ NLL (nats / token)": {n: str(i) for n, i in two.nats.items()},
                         f"Δ pooled {metric}": {n: str(i) for n, i in two.accuracy.items()}})


# ---------------------------------------------------------------- 6. speed and memory


def removal_speed(models: Mapping[str, object], options: Mapping, seed: int = 0) -> pd.DataFrame:
    """Prefill and decode speed of each of ``models`` (the dense one first), interleaved in one run
    (``speed.measure_speed`` at ``options``' speed_* sizes), beside the two ideals and the memory
    each needs (the KV cache after ``options["kv_context"]`` tokens)."""
    from shortlab.arch import model_parts
    from shortlab.speed import kv_cache_bytes, matmul_weight_count, measure_speed, parameter_bytes

    speeds = measure_speed(models, prompt_len=options["speed_prompt_len"], new_tokens=options["speed_new_tokens"],
                           batch_size=options["speed_batch_size"], repeats=options["speed_repeats"], seed=seed)
    kv_context = options["kv_context"]
    dense_name = next(iter(models))
    dense = models[dense_name]
    return pd.DataFrame([{
        "model": name, "layers": model_parts(candidate).num_layers,
        "prefill_tok_s": speeds[name].prefill_tokens_per_s, "decode_tok_s": speeds[name].decode_tokens_per_s,
        "prefill_speedup": speeds[name].prefill_tokens_per_s / speeds[dense_name].prefill_tokens_per_s,
        "decode_speedup": speeds[name].decode_tokens_per_s / speeds[dense_name].decode_tokens_per_s,
        "ideal_L_over_L_minus_n": model_parts(dense).num_layers / model_parts(candidate).num_layers,
        "ideal_matmul_weights": matmul_weight_count(dense) / matmul_weight_count(candidate),
        "parameters_MB": parameter_bytes(candidate) / 1e6, "kv_cache_MB": kv_cache_bytes(candidate, kv_context, seed=seed) / 1e6,
    } for name, candidate in models.items()]).set_index("model")


def figure_speed(speed: pd.DataFrame, options: Mapping, *, device: str, dtype: str, model_name: str):
    pruned = list(speed.index[1:])
    bars = {"prefill (measured)": "prefill_speedup", "decode (measured)": "decode_speedup",
            "ideal L/(L−n)": "ideal_L_over_L_minus_n", "ideal: matmul weights": "ideal_matmul_weights"}
    fig, (ax_speed, ax_memory) = plt.subplots(1, 2, figsize=(13, 4))
    width = 0.8 / len(bars)
    for b, (label, column) in enumerate(bars.items()):
        positions = np.arange(len(pruned)) + (b - (len(bars) - 1) / 2) * width
        ax_speed.bar(positions, speed.loc[pruned, column], width, label=label,
                     color=["tab:blue", "tab:orange", "0.55", "0.8"][b], hatch="" if "measured" in label else "//")
    ax_speed.axhline(1.0, color="black", lw=0.8)
    ax_speed.set_xticks(range(len(pruned)), [f"{n} ({speed.layers[n]} layers)" for n in pruned])
    import torch

    ax_speed.set(xlabel="model", ylabel="speedup over dense",
                 title=f"prefill {options['speed_prompt_len']} tokens, decode {options['speed_new_tokens']} tokens "
                       f"(batch {options['speed_batch_size']}, {device}, {torch.get_num_threads()} threads)")
    ax_speed.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    for m, (column, label) in enumerate([("parameters_MB", "parameters"), ("kv_cache_MB", "KV cache")]):
        positions = np.arange(len(speed)) + (m - 0.5) * 0.4
        relative = speed[column] / speed[column].iloc[0]
        ax_memory.bar(positions, relative, 0.4, label=label, color=["tab:green", "tab:olive"][m])
        for x, fraction, megabytes in zip(positions, relative, speed[column]):
            ax_memory.text(x, fraction + 0.01, f"{megabytes:.3g} MB", ha="center", va="bottom", fontsize=7)
    ax_memory.set_xticks(range(len(speed)), speed.index)
    ax_memory.set(xlabel="model", ylabel="fraction of dense", ylim=(0, 1.15),
                  title=f"memory (KV cache at {options['kv_context']} tokens, {dtype})")
    ax_memory.legend(fontsize=8, loc="lower left")
    fig.suptitle(f"{model_name}: what removing layers buys")
    fig.tight_layout()
    return fig


def speed_words(speed: pd.DataFrame, pruned: str) -> str:
    row, dense = speed.loc[pruned], speed.iloc[0]
    return (f"{pruned}: prefill {row.prefill_speedup:.2f}x, decode {row.decode_speedup:.2f}x measured; ideal "
            f"{row.ideal_L_over_L_minus_n:.2f}x by layers, {row.ideal_matmul_weights:.2f}x by matmul weights; parameters "
            f"{row.parameters_MB / dense.parameters_MB:.0%} and KV cache {row.kv_cache_MB / dense.kv_cache_MB:.0%} of dense"
            + "".join(f"; {phase} beats the layer-count ideal, which removal alone cannot do: the smaller model also fits "
                      "the caches better, or the timings carry the noise of a shared machine"
                      for phase, value in (("prefill", row.prefill_speedup), ("decode", row.decode_speedup))
                      if value > row.ideal_L_over_L_minus_n * 1.02))


# ---------------------------------------------------------------- 7. the paper beside ours


def relative_span(layers: Sequence[int], num_layers: int) -> str:
    return f"{min(layers) / (num_layers - 1):.2f}–{max(layers) / (num_layers - 1):.2f}"


def paper_beside(paper: Mapping, study: Study, tasks: TaskAccuracy, model_name: str, num_layers: int) -> pd.DataFrame:
    """The paper's Llama-2-7B (Table 2's average, its removed layers) beside this run."""
    llama = {row["method"]: row for row in paper["table2"]["rows"] if row["model"] == "Llama-2-7B"}
    removed = paper["removed_layers"]["Llama-2-7B"]
    ours = sorted(study.choices["block_influence"][study.table_k])
    return pd.DataFrame([
        {"model": "Llama-2-7B (paper)", "layers removed": f"{len(removed['layers'])} of {removed['of']}",
         "relative depth": relative_span(removed["layers"], removed["of"]), "dense": llama["dense"]["average"],
         "ShortGPT": llama["ShortGPT"]["average"], "retained": f"{llama['ShortGPT']['retained']:.3f}",
         "retained above the strongest rule": "not reported"},
        {"model": f"{model_name} (this run, pooled {study.metric} of {', '.join(study.tasks)})",
         "layers removed": f"{study.table_k} of {num_layers}", "relative depth": relative_span(ours, num_layers),
         "dense": round(100 * tasks.dense.mean(), 2), "ShortGPT": round(100 * tasks.bi.mean(), 2),
         "retained": str(tasks.retained) if tasks.retained is not None else "n/a (dense at chance)",
         "retained above the strongest rule": str(tasks.retained_above_rule) if tasks.retained_above_rule is not None else "n/a"},
    ]).set_index("model")


def table5_beside(paper: Mapping, two: TwoByTwo, model_name: str) -> pd.DataFrame:
    """The paper's Table 5 (MMLU and CMMLU, %) with this run's pooled accuracy (%) beside the
    settings it has: dense, rounded weights, removal, and removal then rounding ("—" for the
    paper's "quantise then remove", which this run does not measure)."""
    table5 = pd.DataFrame(paper["table5"]["rows"]).set_index("setting")
    removed_row = next(setting for setting in table5.index if setting.endswith("removed"))
    dense, rounded, removed, both = two.pooled.values()
    ours = {"baseline": dense, "4-bit": rounded, removed_row: removed, "remove then quantise": both}
    table5[f"ours ({model_name})"] = [f"{100 * ours[s]:.1f}" if s in ours else "—" for s in table5.index]
    return table5


def table5_words(paper: Mapping, two: TwoByTwo) -> str:
    """The paper's interaction of removal and 4-bit weights (Table 5) beside ours, in points."""
    table5 = pd.DataFrame(paper["table5"]["rows"]).set_index("setting")
    removed_row = next(setting for setting in table5.index if setting.endswith("removed"))
    interaction = {column: (table5.loc["remove then quantise", column] - table5.loc[removed_row, column])
                   - (table5.loc["4-bit", column] - table5.loc["baseline", column]) for column in table5.columns}
    ours = two.accuracy["interaction"]
    return ("the paper's interaction (remove then quantise − removed) − (4-bit − baseline), in points: "
            + ", ".join(f"{column} {value:+.1f}" for column, value in interaction.items())
            + f"; ours {100 * ours.estimate:+.1f} [{100 * ours.low:+.1f}, {100 * ours.high:+.1f}]")


# ---------------------------------------------------------------- 8. verdicts


def figure_claims(claims: Sequence[Claim], study: Study, tasks: TaskAccuracy, two: TwoByTwo, *, ppl_margin: float,
                  model_name: str):
    """One panel per claim family: BI against each ranking (perplexity ratio; pooled accuracy),
    the dense model and BI per task beside the rules, and the 2 × 2 contrasts."""
    k, metric = study.table_k, study.metric
    fig, (ax_rank, ax_acc, ax_task, ax_q) = plt.subplots(1, 4, figsize=(21, 4.4))
    draw_ratio_claims(ax_rank, {ranking_label(c.against): c.interval for c in claims
                                if c.against and c.unit == "blocks" and c.k == k}, ppl_margin)
    ax_rank.set(ylabel="BI's perplexity ÷ theirs (95 %)", title=f"claim 2: rankings at k = {k}, perplexity")
    scored = [r for r in study.choices if study.record(r, k)["correct"]]
    accuracies = [wilson_interval(int(c.sum()), c.size) for c in (study.pooled(study.record(r, k)) for r in scored)]
    _interval_points(ax_acc, range(len(scored)), accuracies, color="tab:red")
    ax_acc.axhline(tasks.dense.mean(), color="black", lw=0.8, label="dense")
    ax_acc.axhline(tasks.rule.mean(), color="tab:olive", ls=":", label="strongest rule without a model")
    ax_acc.set_xticks(range(len(scored)), [ranking_label(r) for r in scored], rotation=30, ha="right")
    ax_acc.set(xlabel="ranking", ylabel=f"pooled {metric} (Wilson 95 %)", title=f"claim 2: rankings at k = {k}, benchmarks")
    ax_acc.legend(fontsize=8)
    for i, (_, row) in enumerate(tasks.table.iterrows()):
        for offset, column, color in ((-0.15, "dense", "black"), (0.15, f"BI −{k}", "tab:red")):
            _interval_points(ax_task, [i + offset], [row[column]], color=color, label=column if i == 0 else None)
        ax_task.hlines(row["chance"], i - 0.3, i + 0.3, color="grey", ls="--", label="chance" if i == 0 else None)
        strongest = row[row["strongest rule"]]  # this task's strongest rule that needs no model
        ax_task.hlines(getattr(strongest, "estimate", strongest), i - 0.3, i + 0.3, color="tab:olive", ls=":",
                       label="strongest rule without a model" if i == 0 else None)
    ax_task.set_xticks(range(len(tasks.table)), tasks.table.index)
    ax_task.set(xlabel="task", ylabel=f"{metric} (Wilson 95 %)", title=f"claim 3: per task, dense vs BI −{k}")
    ax_task.legend(fontsize=8)
    contrasts = list(two.nats)
    _interval_points(ax_q, range(len(contrasts)), [two.nats[n] for n in contrasts])
    ax_q.axhline(0, color="black", lw=0.8)
    ax_q.axhspan(-two.nll_margin, two.nll_margin, color="tab:green", alpha=0.15, label="composes: |interaction| within the margin")
    ax_q.set_xticks(range(len(contrasts)), contrasts, rotation=30, ha="right")
    ax_q.set(xlabel="contrast", ylabel="Δ NLL (nats / token, 95 %)", title="claim 4: removal × quantised weights")
    ax_q.legend(fontsize=8)
    fig.suptitle(f"{model_name}: the claims with 95 % intervals")
    fig.tight_layout()
    return fig


def _interval_points(ax, x, intervals: Sequence[Interval], **style) -> None:
    x = list(x)
    ax.errorbar(x, [i.estimate for i in intervals], yerr=[[i.estimate - i.low for i in intervals],
                [i.high - i.estimate for i in intervals]], fmt="o", capsize=3, **style)


def findings(claims: Sequence[Claim], random: RandomRemoval, healing_findings: Sequence[Finding], *, paper: Mapping,
             study: Study, tasks: TaskAccuracy, rankings: pd.DataFrame, provenance, model_name: str, num_layers: int,
             bits: int, share: float, share_margin: float, eval_seq_len: int) -> str:
    """The closing "What this run found": every claim's verdict in words, random removal as one
    family over k, healing, and where this run departs from the paper."""
    metric, k = study.metric, study.table_k
    found = [c.finding() for c in claims if c not in random.claims] + list(healing_findings)
    outcomes = set(random.family.holm.values())
    found.append(Finding(f"BI beats random removal at every k ({', '.join(map(str, study.plan.ks))}; "
                         f"{study.plan.random_draws} draws each)",
                         SUPPORTED if outcomes == {SUPPORTED} else CONTRADICTED if CONTRADICTED in outcomes else CANNOT_TELL,
                         practical=f"with more than {share + share_margin:.0%} of the draws worse than BI",
                         detail="read as a family of verdicts over k: " + random.family.summary()))
    llama = {row["method"]: row for row in paper["table2"]["rows"] if row["model"] == "Llama-2-7B"}
    removed = paper["removed_layers"]["Llama-2-7B"]
    ours = sorted(study.choices["block_influence"][k])
    departures = [
        f"The paper's Llama-2-7B keeps {llama['ShortGPT']['retained']:.3f} of its dense average with "
        f"{len(removed['layers'])} of {removed['of']} layers removed; this run keeps "
        + (f"{tasks.retained} of its dense {metric} with {k} of {num_layers} removed, and {tasks.retained_above_rule} of "
           "what it scores above the strongest rule that needs no model" if tasks.retained is not None
           else "no share that can be judged"),
        f"the paper's removed layers sit at relative depth {relative_span(removed['layers'], removed['of'])}; this run's at "
        f"{relative_span(ours, num_layers)}",
    ]
    if "reverse_order" in rankings.index and rankings.loc["reverse_order"].get("BI − ranking", "—") != "—":
        reverse, bi = rankings.loc["reverse_order"], rankings.loc["block_influence"]
        departures.append(f"reverse-order removal scores {reverse[f'pooled {metric}']} pooled {metric} against BI's "
                          f"{bi[f'pooled {metric}']} while its perplexity ratio to dense is {reverse['perplexity ÷ dense']}: "
                          "the paper reports reverse order as poor on perplexity but good on MMLU, and Lu et al. (2024) "
                          f"find it best after healing; here BI's pooled {metric} minus reverse order's is "
                          f"{reverse['BI − ranking']}")
    cells = paper["table2"].get("cells_llama2_7b", {})
    for task in study.tasks:  # the benchmarks the paper and this run both report
        name = next((key for key in cells if key.lower() == task.lower()), None)
        if name is not None and task in tasks.table.index:
            (before, after), row = cells[name], tasks.table.loc[task]
            departures.append(f"on {name}, which both report, the paper's Llama-2-7B goes from {before} to {after} "
                              f"({after / before:.3f} retained; {cells['source']}); this run's {metric} goes from "
                              f"{row['dense']} to {row[f'BI −{k}']}")
    if provenance.quantised:
        departures.append(f"the 'dense' model here was quantised before this run ({provenance.weight_format}), so the "
                          f"{bits}-bit arm of the 2 × 2 design rounds its weights a second time; the paper quantises "
                          "full-precision weights")
    central = next((c.finding() for c in tasks.claims if c.claim.startswith("removing ")), None)
    return findings_markdown(
        "What this run found", found, departures, headline=central if central in found else None,
        setting=f"{provenance.checkpoint} ({num_layers} layers; {provenance.weight_format}); {study.plan.eval_blocks} x "
                f"{eval_seq_len} held-out tokens, {len(tasks.dense):,} questions of {', '.join(study.tasks)}, "
                f"{study.plan.random_draws} random draws per k")


def results_folder(results_dir, model_name: str, fast: bool) -> Path | None:
    """Where the notebook reads stored measurements: ``results_dir``, else the repository's
    ``results/shortgpt/<model>`` (None, memory only, for a FAST run)."""
    from shortlab.shortgpt_evidence import default_results_dir

    return Path(results_dir) if results_dir else None if fast else default_results_dir(model_name)
