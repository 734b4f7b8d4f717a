"""Notebook 02's sections as functions, so that each notebook cell reads in one glance.

Every section reads the stored sweep through a ``Sweep`` (the test questions, their images as
bootstrap clusters, the plan as a table, the practical sizes) and returns a small record of what
it shows: tables (pandas), verdicts (``evidence.Judgement``) and its finding in words
(``words``). The figures that go with them are built by the ``figure_*`` functions from those
records with ``shortlab.llava_mini.figures``' drawing functions; ``findings`` turns the records
into the notebook's closing "What this run found".

The statistics live in ``evidence`` and ``shortlab.stats``; this module only puts them together
the way the notebook reports them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import statistics
from collections.abc import Iterator, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from shortlab.arch import model_parts
from shortlab.findings import Finding, findings_markdown
from shortlab.flops import counted_layer_flops, flops_ratio, prefill_flops
from shortlab.llava_mini import evidence, figures, words
from shortlab.llava_mini.easy_vqa import (
    QuestionPrior, VQAItem, accuracy_report, chat_text, majority_answer, no_model_rules,
)
from shortlab.llava_mini.scoring import image_token_features, input_embeddings
from shortlab.llava_mini.sweep import Setting
from shortlab.llava_mini.tasks import VQATask
from shortlab.pruning import lowest_layers
from shortlab.stats import (
    CONTRADICTED, Interval, at_ceiling, bootstrap_interval, describe, family_verdicts, paired_interval,
)


def notebook_config(task: str, shortv_n: int, options: dict, *, seed: int = 0, fast: bool = False,
                    model: str = "", dtype: str = "float32") -> tuple[evidence.EvidenceConfig, dict, int]:
    """The ``EvidenceConfig`` of notebook 02's parameters, the ``options`` it runs with and the
    ShortV setting N. ``fast``: the tests' tiny sizes (``evidence.fast_config``), one photo, two
    timed repeats, the speed measured on the model itself and the second task answered by it."""
    options = dict(options)
    if fast:
        config = evidence.fast_config(task)
        options.update(n_eval=config.n_eval, n_calib=config.n_calib, speed_model=None, speed_repeats=2,
                       photos=options["photos"][:1], second_model=model, second_dtype=dtype)
        return config, options, config.shortv_n
    config = evidence.EvidenceConfig(
        task=task, n_eval=options["n_eval"] or evidence.default_config(task).n_eval, eval_seed=seed,
        frozen_counts=tuple(options["frozen_counts"]), lc_counts=tuple(options["lc_counts"]),
        random_seeds=tuple(range(options["random_draws"])), shortv_n=shortv_n, fastv_k=options["fastv_k"],
        fastv_ratios=tuple(options["fastv_ratios"]), combined_ratios=tuple(options["combined_ratios"]),
        n_calib=options["n_calib"], stability_sizes=tuple(options["stability_sizes"]),
        stability_seeds=tuple(range(options["stability_seeds"])), calib_seed=seed)
    return config, options, shortv_n


@contextlib.contextmanager
def exact_copy(model) -> Iterator[torch.nn.Module]:
    """The model in float32, where rounding cannot hide a difference between two computations:
    the model itself when it already is, else a float32 copy that is freed on exit (the model
    passed in is not changed). The copy needs four bytes per parameter while it lives."""
    if all(parameter.dtype == torch.float32 for parameter in model.parameters()):
        yield model
        return
    exact = copy.deepcopy(model).float()
    try:
        yield exact
    finally:
        del exact
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def model_card(name: str, model, dtype: str) -> str:
    """What the notebook says about the model it loaded: its class, depth, width and size, where
    its weights come from (``provenance.model_provenance``) and, for a model trained in this
    repository, its trained files."""
    from shortlab.llava_mini.build import trained_weights_provenance
    from shortlab.provenance import model_provenance

    parts = model_parts(model)
    lines = [f"{name} ({type(model).__name__}): {parts.num_layers} decoder layers, hidden {parts.text_config.hidden_size}, "
             f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters", str(model_provenance(name, dtype))]
    trained = getattr(model.config, "shortlab", {})
    if trained.get("trained"):
        lines += trained_weights_provenance(trained["weights_dir"])
    return "\n".join(lines)


def question_batch(processor, task: VQATask, items: Sequence[VQAItem], split: str, device) -> dict:
    """The processor's inputs for ``items`` (one image and question each, padded) on ``device``."""
    batch = processor(images=[task.image(split, item.image_id) for item in items],
                      text=[chat_text(processor, item.question) for item in items], padding=True, return_tensors="pt")
    return {name: tensor.to(device) for name, tensor in batch.items()}


def visual_layer_contribution(model, batch: dict, layers: Sequence[int]) -> list[float]:
    """The package's Layer Contribution of the visual tokens (``contribution.layer_contribution``)
    at ``layers`` [nats], in that order, for one question's ``batch``."""
    from shortlab.contribution import layer_contribution, token_groups

    found = layer_contribution(model, batch, token_groups(model, batch["input_ids"])["visual"], layers=list(layers))
    return [found[layer] for layer in layers]


def plain_vs_package(plain: np.ndarray, package: np.ndarray, layers: Sequence[int]) -> pd.DataFrame:
    """The plain and the package's Layer Contribution side by side: ``plain``, ``package``
    [questions, layers] in nats; one row per (question, layer)."""
    plain, package = np.asarray(plain), np.asarray(package)
    return pd.DataFrame({"question": np.repeat(np.arange(len(plain)), len(layers)), "layer": list(layers) * len(plain),
                         "plain": plain.ravel(), "package": package.ravel(),
                         "|difference|": np.abs(plain - package).ravel()}).set_index(["question", "layer"])


class Sweep:
    """The stored sweep as the notebook reads it: ``ev`` (``evidence.prepare_evidence``), its test
    items (``items``) with their images as bootstrap ``clusters`` (questions about one image are
    not independent), the ``plan`` as a table, and the practical sizes ``margin`` (accuracy
    differences) and ``tolerance`` (a loss)."""

    def __init__(self, ev: evidence.Evidence, task: VQATask, *, margin: float, tolerance: float, seed: int = 0,
                 n_text: int = 0, n_visual: int = 0):
        self.ev, self.task, self.margin, self.tolerance, self.seed = ev, task, margin, tolerance, seed
        self.n_text, self.n_visual = n_text, n_visual  # one prompt's (median) text and visual tokens
        self.items = ev.items
        self.clusters = np.array([item.image_id for item in self.items])
        self.plan = pd.DataFrame(ev.plan, dtype=object)  # keeps N, seed and ratio as Python ints/floats

    def describe(self, results_dir, n: int, num_layers: int) -> str:
        """Where the stores are, what they hold, and the prompts' token counts."""
        from shortlab.plotting import repository_relative

        return (f"stores: {repository_relative(results_dir) or 'in memory'}; {len(set(self.plan.setting))} distinct settings; "
                f"computed: {self.ev.store.describe_provenance()}\n"
                f"{len(self.items):,} test questions on {len(set(self.clusters)):,} images; {self.n_visual} visual and "
                f"(median) {self.n_text} text tokens per question; ShortV setting N = {n} ({n / num_layers:.0%} of the layers)")

    def answers(self, setting: Setting) -> list[str]:
        return self.ev.store.results[setting.key]

    def correct(self, setting: Setting) -> np.ndarray:
        """1/0 per test question [items]."""
        return evidence.correct(self.items, self.answers(setting))

    def interval(self, values) -> Interval:
        """Accuracy (mean of 1/0 values [items]) with its 95 % interval, bootstrapped over images."""
        return bootstrap_interval(values, self.clusters, seed=self.seed)

    def paired(self, a, b) -> Interval:
        """mean(a − b) over the same questions, 95 % interval bootstrapped over images."""
        return paired_interval(a, b, self.clusters, seed=self.seed)

    def judged(self, difference: Interval, *accuracies: Interval, margin: float | None = None) -> evidence.Judgement:
        """The verdict on "beats by more than the practical size", naming a tie at the ceiling."""
        return evidence.judge(difference, margin=self.margin if margin is None else margin, accuracies=accuracies)

    def rows(self, family: str, **where) -> pd.DataFrame:
        """The plan's rows of one ``family`` (and column values ``where``)."""
        selected = self.plan[self.plan.family == family]
        for column, value in where.items():
            selected = selected[selected[column] == value]
        return selected

    def setting(self, family: str, **where) -> Setting:
        return self.rows(family, **where).iloc[0].setting


def load_sweep(model, processor, model_name: str, dtype: str, config: evidence.EvidenceConfig, results_dir, *,
               measure: bool, margin: float, tolerance: float, seed: int = 0) -> Sweep:
    """``evidence.prepare_evidence``, then every setting the stores lack computed now
    (``measure``) or a ``RuntimeError`` naming the script that computes them."""
    from shortlab.llava_mini.tasks import task as find_task

    ev = evidence.prepare_evidence(model, processor, model_name, dtype, config, results_dir, measure=measure)
    if ev.missing() and not measure:
        raise RuntimeError(f"{ev.missing()} settings are not stored in {results_dir}; run scripts/shortv_evidence.py "
                           f"--model {model_name} --task {config.task} --dtype {dtype}, or set OPTIONS['measure_missing'] = True")
    if ev.missing():
        print(f"computing the {ev.missing()} missing settings (scripts/shortv_evidence.py computes them outside the notebook)")
        evidence.run_plan(model, processor, ev.items, ev.plan, ev.store, features=ev.features, task=config.task)
    n_text, n_visual = evidence.prompt_token_counts(processor, ev.items, model.config.image_token_id)
    return Sweep(ev, find_task(config.task), margin=margin, tolerance=tolerance, seed=seed, n_text=n_text, n_visual=n_visual)


# ---------------------------------------------------------------- 1. Layer Contribution


@dataclasses.dataclass
class LayerContributions:
    """Section 1: mean ``visual`` and ``text`` LC per layer [layers], the layers in order of
    visual LC (``order``), ShortV's ``layers`` (the ``n`` lowest, sorted), the judgement of
    "text contributes more than visual" (per question, layer mean, clustered by image), ``words``."""

    visual: np.ndarray
    text: np.ndarray
    order: list[int]
    layers: list[int]
    judgement: evidence.Judgement
    calibration_items: list[VQAItem]
    words: str


def layer_contributions(sweep: Sweep, config: evidence.EvidenceConfig, n: int, margin: float) -> LayerContributions:
    calibration = sweep.ev.calibration
    visual, text = evidence.main_lc(calibration, config), calibration.text_lc.mean(0)
    order = lowest_layers(visual, len(visual))
    layers = sorted(order[:n])
    items = evidence.calibration_pools(config.pool_size, config.calib_seed, config.task)["mixed"][: config.n_calib]
    per_question = calibration.text_lc.mean(1) - calibration.visual_lc["mixed"][: config.n_calib].mean(1)  # [n_calib]
    judgement = evidence.judge(bootstrap_interval(per_question, [item.image_id for item in items], seed=sweep.seed),
                               margin=margin)
    return LayerContributions(visual, text, order, layers, judgement, items,
                              words.layer_contribution_words(visual, text, judgement, layers))


def figure_layer_contribution(lc: LayerContributions, title: str):
    fig, ax = plt.subplots(figsize=(12, 4.5))
    figures.draw_layer_contribution(ax, lc.visual, lc.text, lc.layers, title=title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 2. baselines


@dataclasses.dataclass
class Baselines:
    """Section 2: the answers of the dense model, the blank image and the rules that need no
    image (``predictions``), their accuracy ``reports`` per question type (``groups``), the
    ``dense``/``blank``/``prior`` 1/0 scores and accuracy intervals, the no-model ``rules``, the
    question-type ``masks``, the dense model against the strongest rule per type (``rule_rows``,
    ``by_type``) and overall (``dense_vs_rule``), and the three pairwise ``claims``."""

    predictions: dict[str, list[str]]
    reports: dict[str, dict]
    groups: list[str]
    dense: np.ndarray
    blank: np.ndarray
    prior: np.ndarray
    accuracy: dict[str, Interval]
    rules: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    rule_rows: list[dict]
    by_type: object
    dense_vs_rule: evidence.Judgement
    claims: dict[str, evidence.Judgement]

    def table(self) -> pd.DataFrame:
        """Accuracy [95 % interval] per rule (columns) and question group (rows)."""
        return pd.DataFrame({name: {f"{g} ({report[g]['n']:,} q, {report[g]['images']:,} images)":
                                    f"{report[g]['accuracy']:.3f} [{report[g]['low']:.3f}, {report[g]['high']:.3f}]"
                                    for g in self.groups} for name, report in self.reports.items()}).rename_axis("questions")

    def rule_table(self, margin: float) -> pd.DataFrame:
        return pd.DataFrame([{"questions": row["questions"], "strongest rule": row["strongest rule"],
                              "rule accuracy": round(row["rule accuracy"], 3), "dense minus rule": str(row["minus rule"]),
                              "verdict": describe(self.by_type.per_setting[row["questions"]], margin),
                              "after Holm": describe(self.by_type.holm[row["questions"]], margin)}
                             for row in self.rule_rows]).set_index("questions")

    def words(self, margin: float) -> str:
        dense = self.accuracy["dense"]
        return words.baseline_words(dense, self.accuracy["blank image"], self.accuracy["question prior"],
                                    self.dense_vs_rule, self.rule_rows[0]["strongest rule"],
                                    self.by_type.summary(margin), at_ceiling(dense, margin=margin))


def baselines(sweep: Sweep) -> Baselines:
    task, items = sweep.task, sweep.items
    train_items = task.questions("train")
    prior_rule = QuestionPrior(train_items)
    majority, _ = majority_answer(train_items)
    dense_setting, blank_setting = Setting(), Setting(blank_image=True)
    predictions = {"dense": sweep.answers(dense_setting), "blank image": sweep.answers(blank_setting),
                   "question prior": [prior_rule.predict(item.question) for item in items],
                   f"majority ({majority!r})": [majority] * len(items)}
    reports = {name: accuracy_report(items, predicted, seed=sweep.seed, question_type=task.question_type,
                                     types=task.question_types) for name, predicted in predictions.items()}
    groups = ["all", *[kind for kind in task.question_types if kind in reports["dense"]]]
    dense, blank = sweep.correct(dense_setting), sweep.correct(blank_setting)
    prior = np.array(reports["question prior"]["correct"])
    accuracy = {"dense": sweep.interval(dense), "blank image": sweep.interval(blank), "question prior": sweep.interval(prior)}
    claims = {"the dense model beats the blank image": sweep.judged(sweep.paired(dense, blank)),
              "the dense model beats the question prior": sweep.judged(sweep.paired(dense, prior)),
              "a blank image does better than the question prior": sweep.judged(sweep.paired(blank, prior))}
    # every accuracy is judged against the strongest rule that needs no model, per question type as one family
    rules = no_model_rules(items, train_items, predictions["blank image"], chance=task.chance)
    masks = evidence.question_masks(items, task)
    rule_rows, by_type = evidence.against_rules_by_group(dense, rules, masks, sweep.clusters, margin=sweep.margin,
                                                         seed=sweep.seed)
    return Baselines(predictions, reports, groups, dense, blank, prior, accuracy, rules, masks, rule_rows, by_type,
                     sweep.judged(rule_rows[0]["minus rule"]), claims)


def figure_baselines(base: Baselines, title: str):
    fig, ax = plt.subplots(figsize=(10, 4.2))
    figures.draw_baselines(ax, base.reports, base.groups, title=title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 3. layer choices and losses


@dataclasses.dataclass
class LayerChoices:
    """Section 3: the 1/0 scores of each layer choice at each N (``correct``: {choice: {N:
    [items]}}, random draws [draws, items]), the ``counts`` every choice has, the accuracy
    ``curve`` (one row per choice and N), the paired ``comparisons`` between choices, the chain
    verdicts "LC > visual cosine > random" per N (``chains``) and LC against each single draw as
    a family (``draw_family``)."""

    correct: dict[str, dict[int, np.ndarray]]
    counts: list[int]
    curve: pd.DataFrame
    comparisons: list[dict]
    chains: dict[int, str]
    draw_family: object

    @property
    def lc(self) -> dict[int, np.ndarray]:
        return self.correct["layer_contribution"]

    def judgements(self) -> dict[int, dict[str, evidence.Judgement]]:
        """{N: {comparison: Judgement}}."""
        return {n: {row["comparison"]: row["judgement"] for row in self.comparisons if row["N"] == n} for n in self.counts}

    def curve_table(self) -> pd.DataFrame:
        return (self.curve.assign(accuracy=[f"{row.estimate:.3f} [{row.low:.3f}, {row.high:.3f}]"
                                            for row in self.curve.itertuples()])
                .pivot(index="N", columns="choice", values="accuracy").fillna("not in the plan"))

    def draw_spread(self) -> str:
        spread = self.curve[self.curve.choice == "random"].set_index("N")
        return "random draws' own accuracies, min to max: " + "; ".join(
            f"N = {n}: {row.draw_min:.3f} to {row.draw_max:.3f}" for n, row in spread.iterrows())


def comparisons_table(comparisons: dict[str, list[dict]]) -> pd.DataFrame:
    """One row per task, N and claim ("a > b"): the paired difference and its verdict."""
    return pd.DataFrame([{"task": title, "N": row["N"], "claim": row["comparison"].replace(" − ", " > "),
                          "difference": str(row["judgement"].interval), "verdict": row["judgement"].words()}
                         for title, rows in comparisons.items() for row in rows]).set_index(["task", "N", "claim"])


def choice_comparisons(ev: evidence.Evidence, margin: float, seed: int = 0) -> list[dict]:
    """The paired comparisons between the layer choices of a sweep (``evidence.choice_comparisons``)."""
    clusters = np.array([item.image_id for item in ev.items])
    return evidence.choice_comparisons(evidence.layer_choice_correct(ev), clusters, margin=margin, seed=seed)


def layer_choices(sweep: Sweep, random_seeds: Sequence[int]) -> LayerChoices:
    curves = evidence.layer_choice_correct(sweep.ev)
    counts = sorted(curves["random"])
    curve = pd.DataFrame(evidence.layer_choice_curve(curves, sweep.clusters, seed=sweep.seed))
    rows = evidence.choice_comparisons(curves, sweep.clusters, margin=sweep.margin, seed=sweep.seed)
    draws = family_verdicts({f"N={n} draw {seed}": sweep.paired(curves["layer_contribution"][n], curves["random"][n][k])
                             for n in counts for k, seed in enumerate(random_seeds)}, 0.0, margin=sweep.margin)
    return LayerChoices(curves, counts, curve, rows, evidence.chain_verdicts(rows), draws)


def figure_frozen_layers(sweep: Sweep, choices: LayerChoices, base: Baselines, title: str):
    fig, (ax, ax_draws) = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [1.5, 1]})
    accuracy = base.accuracy
    figures.draw_frozen_curves(ax, choices.curve, accuracy["dense"], accuracy["blank image"], accuracy["question prior"],
                               draws=len(next(iter(choices.correct["random"].values()))))
    ax.set_title(title)
    figures.draw_random_draws(ax_draws, {n: choices.correct["random"][n].mean(1) for n in choices.counts},
                              {"LC": {n: sweep.interval(choices.lc[n]) for n in choices.counts},
                               "visual cosine": {n: sweep.interval(choices.correct["visual_cosine"][n]) for n in choices.counts}})
    ax_draws.set_title("each random layer set, beside LC's and cosine's choice")
    fig.tight_layout()
    return fig


@dataclasses.dataclass
class Losses:
    """Section 3's losses: dense − LC at every N (``table``), the largest N whose loss is within
    the tolerance (``max_supported``) and the smallest where it is not (``min_contradicted``), the
    loss at ShortV's N (``judgement``) and per question type as a family (``by_type``)."""

    table: pd.DataFrame
    max_supported: int | None
    min_contradicted: int | None
    judgement: evidence.Judgement
    by_type_intervals: dict[str, Interval]
    by_type: object

    def type_table(self, n: int, tolerance: float) -> pd.DataFrame:
        return pd.DataFrame([{"question type": kind, f"loss at N = {n}": str(loss),
                              "verdict": describe(self.by_type.per_setting[kind], tolerance),
                              "after Holm": describe(self.by_type.holm[kind], tolerance)}
                             for kind, loss in self.by_type_intervals.items()]).set_index("question type")


def losses(sweep: Sweep, choices: LayerChoices, base: Baselines, n: int) -> Losses:
    tolerance = sweep.tolerance
    rows, max_supported, min_contradicted = evidence.max_frozen_within(base.dense, choices.lc, sweep.clusters, tolerance,
                                                                      seed=sweep.seed)
    table = pd.DataFrame(rows).set_index("N")
    table["verdict"] = [describe(v, tolerance) for v in table.verdict]
    loss = sweep.paired(base.dense, choices.lc[n])
    by_type = {kind: paired_interval(base.dense[m], choices.lc[n][m], sweep.clusters[m], seed=sweep.seed)
               for kind, m in base.masks.items() if kind != "all"}
    return Losses(table.round(3).replace(-0.0, 0.0), max_supported, min_contradicted,
                  evidence.Judgement(loss, evidence.loss_verdict(loss, tolerance), tolerance), by_type,
                  evidence.loss_family(by_type, tolerance))


def paper_share_words(references: dict, n: int, num_layers: int) -> str:
    """ShortV's N here as a share of the layers, beside the paper's on LLaVA-1.5-7B."""
    paper_n = len(references["frozen_layers"]["LLaVA-1.5-7B"])
    paper_layers = references["frozen_layers"]["decoder_layers"]["LLaVA-1.5-7B"]
    return (f"ShortV's N here: {n} of {num_layers} layers ({n / num_layers:.0%}); the paper froze {paper_n} of "
            f"{paper_layers} ({paper_n / paper_layers:.0%}) on LLaVA-1.5-7B")


@dataclasses.dataclass
class TypeLosses:
    """Which questions lose first: the loss per question type at every N (``rows``) and "the
    detailed type loses more than the coarse one" at ShortV's N (``hurts_first``)."""

    rows: list[dict]
    hurts_first: dict[str, evidence.Judgement]
    coarse: str | None
    n: int

    def words(self) -> str:
        return words.type_loss_words(self.hurts_first, self.coarse, self.n)


def type_losses(sweep: Sweep, choices: LayerChoices, base: Baselines, n: int) -> TypeLosses:
    task = sweep.task
    rows = evidence.family_losses(base.dense, choices.lc, sweep.items, sweep.clusters, task=task,
                                  tolerance=sweep.tolerance, seed=sweep.seed)
    hurts = {kind: evidence.loses_more(base.dense, choices.lc[n], sweep.items, sweep.clusters, kind, task.coarse_type,
                                       task=task, margin=sweep.margin, seed=sweep.seed)
             for kind in task.detailed_types if kind in base.masks and task.coarse_type in base.masks}
    return TypeLosses(rows, hurts, task.coarse_type, n)


def figure_type_losses(types: TypeLosses, tolerance: float, title: str):
    fig, ax = plt.subplots(figsize=(10, 4.2))
    figures.draw_type_losses(ax, types.rows, tolerance, title=title)
    fig.tight_layout()
    return fig


def figure_choices_by_task(comparisons: dict[str, list[dict]], margin: float):
    fig, axes = plt.subplots(1, len(comparisons), figsize=(7 * len(comparisons), 4.2), sharey=True, squeeze=False)
    for ax, (title, rows) in zip(axes[0], comparisons.items()):
        figures.draw_choice_comparisons(ax, rows, margin, title=f"{title}: one layer choice minus another")
    fig.tight_layout()
    return fig


def task_chain_words(comparisons: dict[str, list[dict]], margin: float) -> str:
    return " ".join(f"On {title}, \"LC > visual cosine > random\": "
                    f"{words.by_outcome(evidence.chain_verdicts(rows), margin)}." for title, rows in comparisons.items())


# ---------------------------------------------------------------- 4. which tokens


@dataclasses.dataclass
class TokenChoice:
    """Section 4: 1/0 scores with each token group frozen in ShortV's layers (``correct``, the
    visual tokens first) and "visual beats this group" per other group (``judgements``)."""

    correct: dict[str, np.ndarray]
    judgements: dict[str, evidence.Judgement]

    def table(self, sweep: Sweep) -> pd.DataFrame:
        return pd.DataFrame([{"frozen tokens": name, "accuracy": str(sweep.interval(values)),
                              "visual minus this": str(self.judgements[name].interval) if name in self.judgements else "",
                              f"visual better by > {sweep.margin}": self.judgements[name].words() if name in self.judgements else ""}
                             for name, values in self.correct.items()]).set_index("frozen tokens")


def token_ablation_words(references: dict) -> str:
    ablation = references["layer_choice_ablation"]
    return (f"published ({ablation['source']}): MMBench {ablation['layer contribution']['MMB']} with the visual tokens "
            f"frozen, {ablation['text tokens frozen instead']['MMB']} with the text tokens frozen instead")


def token_choice(sweep: Sweep, choices: LayerChoices, n: int) -> TokenChoice:
    correct = {"visual": choices.lc[n], **{row.choice: sweep.correct(row.setting) for row in sweep.rows("tokens").itertuples()}}
    judgements = {name: sweep.judged(sweep.paired(correct["visual"], values)) for name, values in correct.items()
                  if name != "visual"}
    return TokenChoice(correct, judgements)


def figure_token_choice(sweep: Sweep, tokens: TokenChoice, base: Baselines, title: str):
    fig, ax = plt.subplots(figsize=(8, 4))
    accuracy = base.accuracy
    figures.draw_token_choice(ax, {"dense": accuracy["dense"], **{name: sweep.interval(v) for name, v in tokens.correct.items()}},
                              accuracy["blank image"], accuracy["question prior"], title=title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 5. FLOPs frontier


@dataclasses.dataclass
class Frontier:
    """Section 5: every ShortV, FastV and combined setting with its prefill FLOPs fraction and
    accuracy (``points``), ShortV against FastV at ShortV's FLOPs (``shortv_vs_fastv``, None
    when the plan has no matched FastV) and each ShortV + FastV setting against each method alone
    at its FLOPs (``combinations``: {label: (per method, outcome)})."""

    points: pd.DataFrame
    shortv_vs_fastv: evidence.Judgement | None
    combinations: dict[str, tuple[dict, str]]

    def table(self) -> pd.DataFrame:
        return self.points.drop(columns=["setting", "correct"]).round(3).set_index(["method", "label"])

    def combination_table(self) -> pd.DataFrame:
        return pd.DataFrame([{"ShortV + FastV": label, "minus": method, "how": found["how"],
                              "difference": str(found["judgement"].interval) if found["judgement"] else "not judged",
                              "verdict": found["judgement"].words() if found["judgement"] else ""}
                             for label, (per_method, _) in self.combinations.items() for method, found in per_method.items()])

    def words(self, margin: float) -> str:
        return words.frontier_words(self.shortv_vs_fastv, {label: outcome for label, (_, outcome) in self.combinations.items()},
                                    margin)


def frontier(sweep: Sweep, text_config, fastv_k: int, n: int, dense: np.ndarray) -> Frontier:
    """The accuracy–FLOPs points of section 5 (the FLOPs of one prompt of the sweep's median
    token counts, ``flops.flops_ratio``)."""
    def fraction(setting):
        return flops_ratio(text_config, sweep.n_text, sweep.n_visual, setting.frozen_layers, setting.fastv_k,
                           setting.fastv_ratio)

    points = [{"method": "dense", "label": "", "setting": Setting()}]
    points += [{"method": "ShortV (LC)", "label": f"N={row.N}", "setting": row.setting}
               for row in sweep.rows("shortv", choice="layer_contribution").sort_values("N").itertuples()]
    points += [{"method": f"FastV K={fastv_k}", "label": f"{row.ratio:.0%} pruned", "setting": row.setting}
               for row in sweep.rows("fastv").sort_values("ratio").itertuples() if row.choice is None]
    points += [{"method": "FastV at ShortV's FLOPs", "label": f"{row.ratio:.0%} pruned", "setting": row.setting}
               for row in sweep.rows("fastv", choice="matched").itertuples()]
    points += [{"method": "ShortV + FastV", "label": f"N={row.N}, {row.ratio:.0%} pruned", "setting": row.setting}
               for row in sweep.rows("shortv+fastv").itertuples()]
    for point in points:
        point.update(flops_fraction=fraction(point["setting"]), correct=sweep.correct(point["setting"]))
        found = sweep.interval(point["correct"])
        point.update(estimate=found.estimate, low=found.low, high=found.high)
    points = pd.DataFrame(points)
    shortv, matched = sweep.correct(sweep.setting("shortv", choice="layer_contribution", N=n)), sweep.rows("fastv", choice="matched")
    shortv_vs_fastv = None
    if len(matched):
        fastv = sweep.correct(matched.iloc[0].setting)
        shortv_vs_fastv = sweep.judged(sweep.paired(shortv, fastv), sweep.interval(shortv), sweep.interval(fastv))
    # ShortV + FastV against each method alone at the same FLOPs (each sweep interpolated per question, dense at 100 %)
    alone = {method: {1.0: dense, **dict(zip(rows.flops_fraction, rows.correct))}
             for method, rows in [("ShortV alone", points[points.method == "ShortV (LC)"]),
                                  ("FastV alone", points[points.method.str.startswith("FastV")])]}
    combinations = {row.label: evidence.combination_verdicts(row.correct, row.flops_fraction, alone, sweep.clusters,
                                                             margin=sweep.margin, seed=sweep.seed)
                    for row in points[points.method == "ShortV + FastV"].itertuples()}
    return Frontier(points, shortv_vs_fastv, combinations)


def figure_frontier(front: Frontier, base: Baselines, references: dict, title: str):
    """Left: this run's accuracy against FLOPs; right: the paper's LLaVA-1.5-7B points
    (``references``: ``shortlab/references/shortv.json``) on the same relative FLOPs."""
    published = [row for row in references["table1"]["rows"] if row["model"] == "LLaVA-1.5-7B"]
    benchmarks, combined = references["table1"]["benchmarks"], references["shortv_plus_fastv"]
    paper_points = {benchmark: [(row["flops_ratio"], row["scores"][benchmarks.index(benchmark)], row["method"])
                                for row in published] + [(combined["flops_ratio"], combined[benchmark], "ShortV + FastV")]
                    for benchmark in ("MMB", "GQA")}
    fig, (ax, ax_paper) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1.6, 1]})
    figures.draw_frontier(ax, front.points, base.accuracy["blank image"], base.accuracy["question prior"])
    ax.set_title(title)
    figures.draw_published_frontier(ax_paper, paper_points)
    ax_paper.set_title("LLaVA-1.5-7B, published (arXiv 2504.00502)")
    fig.tight_layout()
    return fig


@dataclasses.dataclass
class AgainstRule:
    """Every setting of sections 3–5 against the strongest rule that needs no model, as one family."""

    rule: str
    score: float
    intervals: dict[str, Interval]
    verdicts: object

    def table(self, margin: float) -> pd.DataFrame:
        return pd.DataFrame([{"setting": name, "minus rule": str(found),
                              "verdict": describe(self.verdicts.per_setting[name], margin),
                              "after Holm": describe(self.verdicts.holm[name], margin)}
                             for name, found in self.intervals.items()]).set_index("setting")


def against_rule(sweep: Sweep, base: Baselines, choices: LayerChoices, tokens: TokenChoice, front: Frontier) -> AgainstRule:
    accuracies = {f"{row.method} {row.label}".strip(): row.correct for row in front.points.itertuples()}
    accuracies.update({f"visual cosine N={n}": choices.correct["visual_cosine"][n] for n in choices.counts})
    accuracies.update({f"random N={n}": choices.correct["random"][n] for n in choices.counts})
    accuracies.update({f"{name} tokens frozen": values for name, values in tokens.correct.items() if name != "visual"})
    return AgainstRule(*evidence.rule_family(accuracies, base.rules, sweep.clusters, margin=sweep.margin, seed=sweep.seed))


# ---------------------------------------------------------------- 6. stability


@dataclasses.dataclass
class Stability:
    """Section 6: each calibration subset's layer choice with its overlap with the main one and
    its accuracy (``table``), the loss against the main choice judged per subset and as a family
    (``family``), and the main choice's accuracy (``main``)."""

    table: pd.DataFrame
    family: object
    main: Interval

    @property
    def distinct(self) -> int:
        return len({tuple(layers) for layers in self.table.layers})

    def words(self, tolerance: float) -> str:
        return words.stability_words(len(self.table), self.distinct, self.table.jaccard.median(),
                                     self.family.summary(tolerance),
                                     evidence.family_outcome(self.family.holm.values(), tie_holds=True), tolerance)

    def chosen(self, main_layers: Sequence[int], num_layers: int) -> pd.DataFrame:
        """1/0 per calibration choice (rows, the main one first) and layer (columns)."""
        rows = [[int(layer in layers) for layer in range(num_layers)] for layers in [main_layers, *self.table.layers]]
        index = ["main", *[f"{row.pool} {row.size}/{row.seed}" for row in self.table.itertuples()]]
        return pd.DataFrame(rows, index=index)


def stability(sweep: Sweep, main: Setting) -> Stability:
    main_correct = sweep.correct(main)
    rows, losses_ = [], {}
    for row in sweep.rows("stability").itertuples():
        values = sweep.correct(row.setting)
        loss = losses_[f"{row.pool}/{row.size}/{row.seed}"] = sweep.paired(main_correct, values)
        accuracy = sweep.interval(values)
        rows.append({"pool": row.pool, "size": row.size, "seed": row.seed, "layers": list(row.setting.frozen_layers),
                     "jaccard": evidence.jaccard(row.setting.frozen_layers, main.frozen_layers),
                     "accuracy": accuracy.estimate, "low": accuracy.low, "high": accuracy.high,
                     "loss vs main": loss.estimate,
                     "verdict": describe(evidence.loss_verdict(loss, sweep.tolerance), sweep.tolerance)})
    table, family = pd.DataFrame(rows), evidence.loss_family(losses_, sweep.tolerance)
    table["after Holm"] = [describe(v, sweep.tolerance) for v in family.holm.values()]
    return Stability(table, family, sweep.interval(main_correct))


def figure_stability(found: Stability, base: Baselines, n: int, model_name: str):
    fig, (ax_overlap, ax_accuracy) = plt.subplots(1, 2, figsize=(15, 4.8), gridspec_kw={"width_ratios": [1, 1.3]})
    accuracy = base.accuracy
    figures.draw_stability(ax_overlap, ax_accuracy, found.table, found.main, accuracy["dense"], accuracy["blank image"],
                           accuracy["question prior"], n)
    ax_overlap.set_title("LC's layer choice across calibration sets")
    ax_accuracy.set_title(f"{model_name}: ShortV N={n} with each calibration set's layers")
    fig.tight_layout()
    return fig


def figure_lc_heatmaps(sweep: Sweep, chosen: pd.DataFrame, n: int, title: str):
    pool_lc = pd.DataFrame({f"{pool} ({len(rows)})": rows.mean(0)
                            for pool, rows in sweep.ev.calibration.visual_lc.items()}).T  # [pools, layers]
    fig, (ax_lc, ax_chosen) = plt.subplots(2, 1, figsize=(12, 3 + 0.18 * len(chosen)),
                                           gridspec_kw={"height_ratios": [len(pool_lc) + 2, len(chosen)]})
    figures.draw_lc_heatmaps(ax_lc, ax_chosen, pool_lc, chosen, n)
    ax_lc.set_title(title)
    fig.tight_layout()
    return fig


def chosen_words(chosen: pd.DataFrame) -> str:
    always = [layer for layer in chosen.columns if chosen[layer].all()]
    sometimes = [layer for layer in chosen.columns if 0 < chosen[layer].sum() < len(chosen)]
    return (f"Every calibration subset freezes layers {words.layer_ranges(always)}; each of layers "
            f"{words.layer_ranges(sometimes)} is frozen by some subsets but not all.")


# ---------------------------------------------------------------- 7. speed


@dataclasses.dataclass
class Speed:
    """Section 7: the prompt's ``text`` and ``visual`` token counts, the FLOPs formula against
    PyTorch's FLOP counter per N (``flop_check``: (N, formula, counted)) and the timed prefills
    (``table``: median ms, measured and predicted speed-up per N)."""

    text: int
    visual: int
    flop_check: list[tuple[int, float, float]]
    table: pd.DataFrame

    def flop_lines(self) -> str:
        return "\n".join(f"N = {n:2d}: formula {predicted / 1e9:8.2f} GFLOPs, flop counter {counted / 1e9:8.2f} GFLOPs "
                         f"(ratio {counted / predicted:.4f})" for n, predicted, counted in self.flop_check)


def prefill_speed(model, processor, task: VQATask, item: VQAItem, layers_by_n: dict[int, list[int]], *,
                  repeats: int = 5) -> Speed:
    """Time one question's decoder prefill (the prompt embeddings through the decoder layers:
    what ShortV changes) with the visual tokens frozen in each of ``layers_by_n`` ({N: layers};
    N = 0 is the dense baseline), interleaved (``benchmarking.time_side_by_side``), after checking
    the FLOPs formula against ``torch.utils.flop_counter`` at the smallest and largest N."""
    from shortlab.benchmarking import time_side_by_side
    from shortlab.evaluate import input_device
    from shortlab.shortv import freeze_visual_tokens

    image_token_id = model.config.image_token_id
    batch = processor(images=task.image("test", item.image_id), text=chat_text(processor, item.question), return_tensors="pt")
    batch = {name: tensor.to(input_device(model)) for name, tensor in batch.items()}
    visual_mask = batch["input_ids"] == image_token_id
    n_visual = int(visual_mask.sum())
    n_text = batch["input_ids"].shape[1] - n_visual
    with torch.inference_mode():
        embeds = input_embeddings(model, batch["input_ids"],
                                  image_token_features(model, batch["pixel_values"], batch.get("image_sizes")))
    parts = model_parts(model)

    def prefill(layers):
        def run():
            with torch.inference_mode(), freeze_visual_tokens(model, layers, token_mask=visual_mask):
                parts.decoder(inputs_embeds=embeds, use_cache=False)
        return run

    ends = sorted({min(layers_by_n), max(layers_by_n)})
    flop_check = [(n, prefill_flops(parts.text_config, n_text, n_visual, frozen_layers=layers_by_n[n]),
                   sum(counted_layer_flops(model, prefill(layers_by_n[n])).values())) for n in ends]
    seconds = time_side_by_side({n: prefill(layers) for n, layers in layers_by_n.items()}, repeats=repeats)
    base = statistics.median(seconds[min(layers_by_n)])
    table = pd.DataFrame([{"N": n, "median_ms": 1e3 * statistics.median(seconds[n]),
                           "measured_speedup": base / statistics.median(seconds[n]),
                           "flops_fraction": flops_ratio(parts.text_config, n_text, n_visual, layers)}
                          for n, layers in layers_by_n.items()]).set_index("N")
    table["predicted_speedup"] = 1 / table.flops_fraction
    table["measured_over_predicted"] = table.measured_speedup / table.predicted_speedup
    return Speed(n_text, n_visual, flop_check, table)


def published_speed_words(references: dict) -> str:
    published = references["speedups"]
    return f"published ({published['source']}): LLaVA-1.5-7B " + ", ".join(
        f"{speedup:.2f}x at N = {n}" for n, speedup in zip(published["N"], published["LLaVA-1.5-7B"]))


def figure_speedup(speed: Speed, title: str):
    fig, ax = plt.subplots(figsize=(8, 4.2))
    figures.draw_speedup(ax, speed.table, title=title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 8. photographs


@dataclasses.dataclass
class Photos:
    """Section 8: per photograph its visual LC per layer (``lc``), and the answers of the dense
    and the frozen model with the rank correlation of its LC with the task's (``table``)."""

    images: dict[str, np.ndarray]
    lc: dict[str, np.ndarray]
    table: pd.DataFrame
    frozen_label: str

    def words(self) -> str:
        correlations = self.table["rank correlation with the task's LC"]
        same = int((self.table["dense"] == self.table[self.frozen_label]).sum())
        return (f"The photographs' visual LC ranks the layers with Spearman correlations from {correlations.min():.2f} to "
                f"{correlations.max():.2f} against the task's ranking, and the frozen model gives the dense model's "
                f"answer for {same} of {len(self.table)} photographs.")


def photographs(model, processor, names: Sequence[str], question: str, task_lc: np.ndarray, frozen: Sequence[int]) -> Photos:
    """scikit-image's bundled photographs ``names``: each one's visual LC per layer and the
    greedy answer to ``question`` of the dense model and of the model with the visual tokens
    frozen in ``frozen``."""
    from skimage import data as skimage_data

    from shortlab.contribution import layer_contribution, token_groups
    from shortlab.evaluate import input_device
    from shortlab.shortv import freeze_visual_tokens

    frozen_label = f"ShortV N={len(frozen)}"
    images, lc, rows = {}, {}, []
    for name in names:
        image = images[name] = getattr(skimage_data, name)()
        rgb = np.stack([image] * 3, axis=-1) if image.ndim == 2 else image
        batch = processor(images=rgb, text=chat_text(processor, question), return_tensors="pt")
        batch = {key: tensor.to(input_device(model)) for key, tensor in batch.items()}
        values = layer_contribution(model, batch, token_groups(model, batch["input_ids"])["visual"])
        lc[name] = np.array([values[layer] for layer in range(len(values))])
        answers = {}
        for label, layers in [("dense", []), (frozen_label, list(frozen))]:
            with torch.inference_mode(), freeze_visual_tokens(model, layers):
                output = model.generate(**batch, max_new_tokens=6, do_sample=False)
            answers[label] = processor.tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        rows.append({"photo": name, **answers, "rank correlation with the task's LC":
                     pd.Series(lc[name]).corr(pd.Series(np.asarray(task_lc)), method="spearman")})
    return Photos(images, lc, pd.DataFrame(rows).set_index("photo"), frozen_label)


def figure_photos(photos: Photos, task_lc: np.ndarray, frozen: Sequence[int], task_label: str, title: str):
    """The photographs (small: they are context, not data) above their visual LC per layer."""
    names = list(photos.images)
    fig = plt.figure(figsize=(max(9, 3 * len(names)), 6))
    grid = fig.add_gridspec(2, len(names), height_ratios=[1, 1.3])
    for column, name in enumerate(names):
        ax = fig.add_subplot(grid[0, column])
        ax.imshow(photos.images[name], cmap="gray")
        ax.set_title(f"{name}: dense {photos.table.loc[name, 'dense']!r}\n"
                     f"frozen {photos.table.loc[name, photos.frozen_label]!r}", fontsize=9)
        ax.axis("off")
    figures.draw_photo_lc(fig.add_subplot(grid[1, :]), task_lc, photos.lc, list(frozen), task_label)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 9. explorer


def explorer_items(sweep: Sweep, dense_answers: list[str], frozen_answers: list[str], images: int) -> list[VQAItem]:
    """The explorer's questions: those about the first ``images`` test images, starting with the
    first question the dense model answers right and the frozen one wrong (by the stored sweep;
    the first test question when there is none)."""
    changed = [item for item, dense, frozen in zip(sweep.items, dense_answers, frozen_answers)
               if dense == item.answer != frozen]
    first = changed[0] if changed else sweep.items[0]
    chosen = list(dict.fromkeys([first.image_id, *sweep.clusters.tolist()]))[:images]
    items = sorted((item for item in sweep.items if item.image_id in chosen), key=lambda item: chosen.index(item.image_id))
    items.insert(0, items.pop(items.index(first)))
    return items


def explorer_words(view, preset: str, stored_dense: str) -> str:
    top = {label: max(distribution, key=distribution.get) for label, distribution in
           [("dense", view.dense), ("frozen", view.frozen)]}
    return (f"{view.item.question!r} (true answer {view.item.answer!r}): dense {top['dense']!r} "
            f"(p = {view.dense[top['dense']]:.2f}; the stored sweep's dense answer: {stored_dense!r}), visual tokens frozen "
            f"in the {preset} preset's {len(view.frozen_layers)} layers: {top['frozen']!r} (p = {view.frozen[top['frozen']]:.2f})")


# ---------------------------------------------------------------- checks


def frozen_vs_reference(model, batch: dict, layers: Sequence[int], mask: torch.Tensor) -> tuple[float, float, float]:
    """ShortV inference (``freeze_visual_tokens``: the frozen tokens' work skipped) against the
    zeroed-update reference (``hooks.keep_tokens_unchanged``) on ``batch``: max |logit
    difference| between the two, max |logit difference| of frozen against dense (the effect the
    first must be small beside), and the reference's largest |logit|; over real tokens only."""
    from shortlab.hooks import keep_tokens_unchanged
    from shortlab.shortv import freeze_visual_tokens

    real = batch["attention_mask"].bool()
    with torch.inference_mode():
        with freeze_visual_tokens(model, layers, token_mask=mask):
            frozen = model(**batch).logits.float()
        with keep_tokens_unchanged(model, layers, mask):
            reference = model(**batch).logits.float()
        dense = model(**batch).logits.float()
    return ((frozen - reference)[real].abs().max().item(), (frozen - dense)[real].abs().max().item(),
            reference[real].abs().max().item())


# ---------------------------------------------------------------- findings


def nearest_share(counts: Sequence[int], num_layers: int, share: float) -> int:
    """The count of frozen layers whose share of ``num_layers`` is nearest ``share`` (the paper's
    19 of 32, say): where a run with other counts and another depth meets the paper."""
    return min(counts, key=lambda k: abs(k / num_layers - share))


def _failing_subsets(holm: dict) -> str:
    """Per calibration pool, how many of its subsets ("pool/size/seed") lose more than the
    tolerance ("" when none does)."""
    pools: dict[str, list[bool]] = {}
    for name, outcome in holm.items():
        pools.setdefault(str(name).split("/")[0], []).append(outcome == CONTRADICTED)
    failing = [f"{pool} {sum(lost)} of {len(lost)}" for pool, lost in pools.items() if any(lost)]
    return f"subsets that lose more, per calibration pool: {'; '.join(failing)}" if failing else ""


def findings(*, sweep: Sweep, model_name: str, num_layers: int, n: int, lc: LayerContributions, base: Baselines,
             choices: LayerChoices, loss: Losses, types: TypeLosses, tokens: TokenChoice, front: Frontier,
             stable: Stability, comparisons: dict[str, list[dict]], second_model: str | None, references: dict,
             lc_margin: float, speed: Speed | None = None) -> str:
    """The notebook's closing "What this run found": every claim's verdict in words, beside the
    paper's numbers (``references``: ``shortlab/references/shortv.json``), and how this run
    departs from the paper."""
    margin, tolerance, items = sweep.margin, sweep.tolerance, len(sweep.items)
    published = [row for row in references["table1"]["rows"] if row["model"] == "LLaVA-1.5-7B"]
    by_method = {row["method"].split()[0]: row for row in published}
    vanilla, fastv, shortv = by_method["vanilla"], by_method["FastV"], by_method["ShortV"]
    mmb = references["table1"]["benchmarks"].index("MMB")
    ablation, combined = references["layer_choice_ablation"], references["shortv_plus_fastv"]
    paper_n = len(references["frozen_layers"]["LLaVA-1.5-7B"])
    paper_layers = references["frozen_layers"]["decoder_layers"]["LLaVA-1.5-7B"]
    practical = f"by more than {margin} in accuracy"
    judgements = choices.judgements()
    paper_like_n = nearest_share(judgements, num_layers, paper_n / paper_layers)  # where the paper's ablation is quoted
    gqa = references["table1"]["benchmarks"].index("GQA")
    central = evidence.finding(
        f"Freezing the visual tokens in the {n} of {num_layers} lowest-LC layers keeps the accuracy (loss: dense - ShortV)",
        loss.judgement, items, practical=f"within a loss of {tolerance}",
        paper=f"The paper freezes {paper_n} of {paper_layers} layers of LLaVA-1.5-7B: MMBench {shortv['scores'][mmb]} against "
              f"{vanilla['scores'][mmb]} dense, GQA {shortv['scores'][gqa]} against {vanilla['scores'][gqa]}; here freezing "
              f"{n} of {num_layers} loses {loss.judgement.interval} in accuracy, and the largest N whose loss is "
              f"established within {tolerance} is {loss.max_supported}")
    found = [
        evidence.finding("Text tokens contribute more than visual tokens (layer-mean LC per question)", lc.judgement,
                         len(lc.calibration_items), unit="nats of LC"),
        evidence.finding(f"The dense model beats the strongest rule that needs no model ({base.rule_rows[0]['strongest rule']})",
                         base.dense_vs_rule, items),
        central,
        Finding(f"Freezing the visual tokens in the {n} lowest-LC layers keeps the accuracy in every question type",
                evidence.family_outcome(loss.by_type.holm.values(), tie_holds=True),
                practical=f"within a loss of {tolerance} (judged after Holm's adjustment; "
                          f"{loss.by_type.summary(tolerance).rstrip('.')})"),
        *[evidence.finding(f"LC chooses better layers than visual cosine at N = {k}", j["LC − visual cosine"], items,
                           paper=f"The paper's LC beats cosine by "
                                 f"{ablation['layer contribution']['MMB'] - ablation['cosine similarity']['MMB']:.1f} "
                                 f"MMBench points at N = {paper_n}; here LC − cosine is "
                                 f"{j['LC − visual cosine'].interval} in accuracy at N = {k}"
                           if k == paper_like_n else "")
          for k, j in judgements.items()],
        Finding("LC chooses better layers than the random draws, pooled over the draws, at every N",
                evidence.ordered_verdict([j["LC − random"].outcome for j in judgements.values()]),
                practical=f"{practical} (LC against each draw: {choices.draw_family.summary(margin).rstrip('.')})"),
        Finding("Freezing the visual tokens beats freezing the text, all or random tokens in the same layers",
                evidence.ordered_verdict([j.outcome for j in tokens.judgements.values()]), practical=practical,
                paper=f"The paper scores MMBench {ablation['layer contribution']['MMB']} with the visual tokens frozen "
                      f"and {ablation['text tokens frozen instead']['MMB']} with the text tokens frozen instead; here "
                      + "; ".join(f"visual minus {other}: {j.interval}" for other, j in tokens.judgements.items())),
        Finding(f"LC's layer choice is stable: all {len(stable.table)} calibration subsets' layers keep the main choice's "
                "accuracy", evidence.family_outcome(stable.family.holm.values(), tie_holds=True),
                practical=f"within a loss of {tolerance} (judged after Holm's adjustment; "
                          f"{stable.family.summary(tolerance).rstrip('.')})",
                detail=_failing_subsets(stable.family.holm)),
        *[evidence.finding(f"At N = {n}, {kind} questions lose more accuracy than {types.coarse} questions", judgement,
                           items, unit="in accuracy lost") for kind, judgement in types.hurts_first.items()],
    ]
    for title, rows in list(comparisons.items())[1:]:  # the same claims on the second task, one per N
        for comparison, other in (("LC − visual cosine", "visual cosine"), ("LC − random", "random draws")):
            for row in [row for row in rows if row["comparison"] == comparison]:
                judged = row["judgement"]
                ceiling = "; both at the accuracy ceiling, so only a harder task can separate them" if judged.ceiling else ""
                found.append(Finding(f"On {title} ({second_model}), LC chooses better layers than {other} at N = {row['N']}",
                                     judged.outcome, judged.interval, practical + ceiling, judged.margin))
    if front.shortv_vs_fastv is not None:
        found.append(evidence.finding("ShortV beats FastV at the same FLOPs", front.shortv_vs_fastv, items,
                                      paper=f"The paper: ShortV MMBench {shortv['scores'][mmb]} at {shortv['flops_ratio']:.0%} "
                                            f"FLOPs, FastV {fastv['scores'][mmb]} at {fastv['flops_ratio']:.0%}; here "
                                            f"ShortV − FastV is {front.shortv_vs_fastv.interval} in accuracy at equal FLOPs"))
    for label, (per_method, outcome) in front.combinations.items():
        judged = {m: f["judgement"] for m, f in per_method.items() if f["judgement"]}
        found.append(Finding(
            f"ShortV + FastV ({label}) beats ShortV alone and FastV alone at its FLOPs", outcome,
            practical=f"{practical} (" + "; ".join(f"minus {m}, {per_method[m]['how']}: {j}" for m, j in judged.items()) + ")",
            paper=f"The paper's ShortV + FastV keeps MMBench {combined['MMB']} at {combined['flops_ratio']:.0%} FLOPs "
                  f"(vanilla {vanilla['scores'][mmb]}); the paper reports neither method alone at those FLOPs",
            to_tell="; ".join(filter(None, (evidence.to_tell(j, items) for j in judged.values())))))
    departures = [f"The paper measures 7B models on VQAv2, GQA, MMBench and others; this run measures {model_name}, "
                  f"{num_layers} layers, on {sweep.task.description}"]
    if speed is not None and n in speed.table.index:
        speedups = references["speedups"]
        nearest = nearest_share(speedups["N"], paper_layers, n / num_layers)  # the paper's N nearest ours
        row = speed.table.loc[n]
        departures.append(
            f"Measured prefill speed-up with {n} of {num_layers} layers frozen: {row['measured_speedup']:.2f}x "
            f"(the FLOPs predict {row['predicted_speedup']:.2f}x; one prompt of {speed.text} text and {speed.visual} "
            f"visual tokens on this machine); the paper measures "
            f"{speedups['LLaVA-1.5-7B'][speedups['N'].index(nearest)]:.2f}x at N = {nearest} ({speedups['source']})")
    dense = base.accuracy["dense"]
    if at_ceiling(dense, margin=margin):
        departures.append(f"The dense model scores {dense} on {sweep.task.title}, at the ceiling: settings that keep it are "
                          "ties that more questions cannot break, and only a harder task could separate them")
    return findings_markdown(
        "What this run found", found, departures, headline=central,
        setting=f"this run: {model_name} ({num_layers} decoder layers; section 0 prints where its weights come from), "
                f"{items:,} {sweep.task.title} test questions on {len(set(sweep.clusters)):,} images; "
                f"practical sizes: {margin} in accuracy, {tolerance} for a loss, {lc_margin} nats of LC")
