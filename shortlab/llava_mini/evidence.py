"""The evidence notebook 02 judges ShortV with: which settings it evaluates, the calibration data
behind every layer choice, and the statistics that turn per-question answers into verdicts.

The sweep (dense, blank image, ShortV's N sweep for three layer choices with ``>= 10`` seeded
random draws, FastV's R sweep, ShortV + FastV, other frozen token groups, and the layer sets that
smaller or narrower calibration sets would choose) is too slow for the notebook's default run, so
``scripts/shortv_evidence.py`` computes it into ``results/shortv/`` and the notebook reads it,
computing only what is missing. Both build the same plan from the same ``EvidenceConfig`` and
the same stored calibration (``Calibration``), so they agree on every setting.

Calibration: Layer Contribution is computed once *per question* (a [questions, layers] table)
for four pools of easy-VQA training questions (mixed, and one per question type); the LC of any
calibration subset is then the mean of its rows, with no extra model pass. The main ranking is
the mean over the first ``n_calib`` questions of the mixed pool.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from shortlab.files import write_json_atomically
from shortlab.runs import run_record
from shortlab.findings import Finding, significant
from shortlab.flops import fastv_ratio_matching_flops, prefill_flops
from shortlab.llava_mini.easy_vqa import VQAItem, chat_text
from shortlab.llava_mini.sweep import PredictionStore, Setting, evaluate_setting, prefix_reach
from shortlab.prefix import PrefixCache, best_depth
from shortlab.llava_mini.tasks import EASY_VQA_TASK, VQATask, task as find_task
from shortlab.stats import (
    CANNOT_TELL,
    CONTRADICTED,
    EQUIVALENT,
    SUPPORTED,
    FamilyVerdicts,
    Interval,
    at_ceiling,
    bootstrap_interval,
    crossed_bootstrap_interval,
    describe,
    family_outcome,
    family_verdicts,
    paired_interval,
    sample_size_to_tell,
    strongest_rule,
    verdict,
)

EVIDENCE_DIR = Path(__file__).resolve().parents[2] / "results" / "shortv"
POOLS = ("mixed", *EASY_VQA_TASK.question_types)  # easy-VQA's; a task's own: pools_of(task)
LAYER_CHOICES = ("layer_contribution", "visual_cosine", "random")


@dataclasses.dataclass(frozen=True)
class EvidenceConfig:
    """What the sweep evaluates. Layer counts larger than the model's depth are clipped to it.

    ``task``: the VQA task ("easy-vqa" or "scenes", ``shortlab.llava_mini.tasks``): its test
    split is evaluated (``n_eval`` questions; scenes: whole images, up to the split's size) and
    its calibration split (never the test split) calibrates every layer choice.

    ``frozen_counts``: N for all three layer choices (LC, visual cosine, ``random_seeds`` random
    draws); ``lc_counts``: extra N for the LC curve only (the "how many layers" question);
    ``shortv_n``: the ShortV setting of the token-group, FastV and stability comparisons;
    ``fastv_ratios``: FastV's R sweep at ``fastv_k``; ``combined_ratios``: ShortV (``shortv_n``)
    + FastV; ``other_token_groups``: groups frozen instead of the visual tokens at ``shortv_n``;
    ``n_calib``: questions of the main LC ranking and of the visual-cosine ranking;
    ``pool_size``: questions per calibration pool; ``stability_sizes`` × ``stability_seeds``:
    the calibration subsets of the stability study (one subset when the size is the whole pool).
    """

    n_eval: int = 1000
    task: str = "easy-vqa"
    eval_seed: int = 0
    frozen_counts: tuple[int, ...] = (6, 12, 18, 24)
    lc_counts: tuple[int, ...] = (3, 9, 15, 21, 27)
    random_seeds: tuple[int, ...] = tuple(range(10))
    shortv_n: int = 18
    fastv_k: int = 2
    fastv_ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)
    combined_ratios: tuple[float, ...] = (0.5,)
    other_token_groups: tuple[str, ...] = ("text", "all", "random")
    n_calib: int = 40
    pool_size: int = 80
    stability_sizes: tuple[int, ...] = (10, 20, 40, 80)
    stability_seeds: tuple[int, ...] = (0, 1, 2)
    calib_seed: int = 0

    def __post_init__(self):
        find_task(self.task)  # an unknown task is refused by name
        if self.n_eval < 1 or self.pool_size < 1:
            raise ValueError(f"n_eval and pool_size must be positive, got {self.n_eval}, {self.pool_size}")
        if not 1 <= self.n_calib <= self.pool_size:
            raise ValueError(f"n_calib must be in 1..pool_size ({self.pool_size}), got {self.n_calib}")
        too_big = [s for s in self.stability_sizes if not 1 <= s <= self.pool_size]
        if too_big:
            raise ValueError(f"stability_sizes {too_big} are not in 1..pool_size ({self.pool_size})")
        if len(self.random_seeds) != len(set(self.random_seeds)):
            raise ValueError(f"random_seeds must be distinct, got {self.random_seeds}")



def default_config(task: str = "easy-vqa") -> EvidenceConfig:
    """The sweep of notebook 02's default run on ``task``: easy-VQA's 1,000 questions, or the
    whole test split of the scenes."""
    if task == "easy-vqa":
        return EvidenceConfig()
    return EvidenceConfig(task=task, n_eval=len(find_task(task).questions("test")))


def fast_config(task: str = "easy-vqa") -> EvidenceConfig:
    """The whole sweep at a size that runs in about a minute on a tiny model (notebook 02's FAST
    mode and the script's ``--smoke``)."""
    return EvidenceConfig(n_eval=12, task=task, frozen_counts=(1, 2), lc_counts=(3,), random_seeds=(0, 1),
                          shortv_n=2, fastv_ratios=(0.5,), combined_ratios=(0.5,), n_calib=2, pool_size=3,
                          stability_sizes=(1, 3), stability_seeds=(0, 1), fastv_k=1)


# ---------------------------------------------------------------- fingerprints

def model_fingerprint(model, sample: int = 4096) -> str:
    """A short hash of ``model``'s parameters (``runs.weights_fingerprint``): retraining, or merging
    a LoRA delta, changes every weight matrix, so it changes this hash."""
    from shortlab.runs import weights_fingerprint

    return weights_fingerprint(model.named_parameters(), sample)[:16]


def store_path(model_name: str, kind: str, directory: str | Path = EVIDENCE_DIR, task: str = "easy-vqa") -> Path:
    """Where the sweep of ``model_name`` on ``task`` keeps ``kind`` ("predictions" or
    "calibration"); easy-VQA's stores carry no task in their name."""
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in model_name)
    return Path(directory) / (f"{safe}_{kind}.json" if task == "easy-vqa" else f"{safe}_{task}_{kind}.json")


def pools_of(task: str | VQATask = "easy-vqa") -> tuple[str, ...]:
    """The calibration pools of ``task``: "mixed" and one per question type."""
    return ("mixed", *find_task(task).question_types)


def evaluation_items(config: EvidenceConfig) -> list[VQAItem]:
    """The test questions the sweep evaluates: easy-VQA's ``n_eval`` seeded questions from few
    images (``fixed_test_questions``); for another task, the test split image by image, whole
    images only, until ``n_eval`` questions (the whole split when it has fewer)."""
    from shortlab.llava_mini.easy_vqa import fixed_test_questions

    if config.task == "easy-vqa":
        return fixed_test_questions(config.n_eval, seed=config.eval_seed)
    chosen: list[VQAItem] = []
    for item in find_task(config.task).questions("test"):
        if len(chosen) >= config.n_eval and item.image_id != chosen[-1].image_id:
            break
        chosen.append(item)
    return chosen


# ---------------------------------------------------------------- calibration

def calibration_pools(pool_size: int = 80, seed: int = 0, task: str | VQATask = "easy-vqa") -> dict[str, list[VQAItem]]:
    """``pool_size`` seeded questions of ``task``'s calibration split per pool: "mixed" (any type)
    and one pool per question type."""
    vqa_task = find_task(task)
    source = vqa_task.questions(vqa_task.calibration_split)
    pools = {"mixed": random.Random(seed).sample(source, pool_size)}
    for kind in vqa_task.question_types:
        of_kind = [item for item in source if vqa_task.question_type(item) == kind]
        if len(of_kind) < pool_size:
            raise ValueError(f"{vqa_task.name}'s {vqa_task.calibration_split} split has {len(of_kind)} {kind} "
                             f"questions, fewer than pool_size {pool_size}")
        pools[kind] = random.Random(seed).sample(of_kind, pool_size)
    return pools


def question_layer_contributions(model, processor, items: list[VQAItem], group: str = "visual",
                                 split: str | None = None, progress: Callable[[int], None] | None = None,
                                 task: str | VQATask = "easy-vqa") -> np.ndarray:
    """Visual (or text) Layer Contribution of every layer for each question on its own:
    [len(items), layers] in nats (``contribution.layer_contribution`` at the answer position).
    ``items`` come from ``split`` of ``task`` (default: its calibration split)."""
    vqa_task = find_task(task)
    split = split or vqa_task.calibration_split
    from shortlab.contribution import layer_contribution, token_groups
    from shortlab.evaluate import input_device

    device = input_device(model)
    rows = []
    for done, item in enumerate(items):
        batch = processor(images=vqa_task.image(split, item.image_id), text=chat_text(processor, item.question),
                          return_tensors="pt")
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        mask = token_groups(model, batch["input_ids"])[group]
        values = layer_contribution(model, batch, mask)
        rows.append([values[layer] for layer in range(len(values))])
        if progress is not None:
            progress(done + 1)
    return np.array(rows)


def visual_cosine_scores(model, processor, items: list[VQAItem], split: str | None = None,
                         batch_size: int = 8, task: str | VQATask = "easy-vqa") -> np.ndarray:
    """ShortGPT's Block Influence restricted to the visual tokens, per layer [layers]: the
    paper's "cosine similarity" layer choice freezes the layers with the lowest. ``items`` come
    from ``split`` of ``task`` (default: its calibration split)."""
    vqa_task = find_task(task)
    split = split or vqa_task.calibration_split
    from shortlab.contribution import token_groups
    from shortlab.evaluate import input_device
    from shortlab.metrics import block_influence

    device = input_device(model)

    def batches():
        for start in range(0, len(items), batch_size):
            chunk = items[start: start + batch_size]
            batch = processor(images=[vqa_task.image(split, it.image_id) for it in chunk],
                              text=[chat_text(processor, it.question) for it in chunk], padding=True,
                              return_tensors="pt")
            yield {name: tensor.to(device) for name, tensor in batch.items()}

    values = block_influence(model, batches(), token_mask=lambda batch: token_groups(
        model, batch["input_ids"], batch.get("attention_mask"))["visual"])
    return np.array([values[layer] for layer in range(len(values))])


@dataclasses.dataclass
class Calibration:
    """Per-question LC tables and the visual-cosine scores every layer choice is made from.

    ``visual_lc[pool]``: [rows, layers], rows = pool_size once complete; ``text_lc``: [n_calib, layers] (the mixed pool's
    first ``n_calib`` questions); ``visual_cosine``: [layers], over the same questions."""

    visual_lc: dict[str, np.ndarray]
    text_lc: np.ndarray
    visual_cosine: np.ndarray

    def complete_pools(self, pool_size: int) -> list[str]:
        """The pools whose LC table has all ``pool_size`` rows (the others were interrupted)."""
        return [name for name, rows in self.visual_lc.items() if len(rows) == pool_size]

    def to_json(self) -> dict:
        return {"visual_lc": {k: v.tolist() for k, v in self.visual_lc.items()},
                "text_lc": self.text_lc.tolist(), "visual_cosine": self.visual_cosine.tolist()}

    @classmethod
    def from_json(cls, saved: dict) -> Calibration:
        return cls({k: np.array(v) for k, v in saved["visual_lc"].items()}, np.array(saved["text_lc"]),
                   np.array(saved["visual_cosine"]))


def calibration(model, processor, config: EvidenceConfig, path: str | Path | None, fingerprint: dict,
                log: Callable[[str], None] = print, *, main_only: bool = False,
                deadline: float | None = None, measure: bool = True) -> tuple[Calibration, bool]:
    """The ``Calibration`` stored at ``path``, its missing rows computed first (and the file
    rewritten atomically after every question, so an interrupted run loses at most one).

    Order: the mixed pool's first ``n_calib`` visual LC rows, their text LC rows and the visual
    cosine (everything the main layer choices need), then the rest of the pools (only the
    stability study needs them). ``main_only`` stops after the main part; ``deadline`` (a
    ``time.monotonic()`` value) stops between questions; ``measure=False`` computes nothing and
    raises ``RuntimeError`` naming what is missing. A stored calibration made for another
    fingerprint or config is discarded. Returns it (pools may be incomplete: see
    ``Calibration.complete_pools``) and whether anything was computed."""
    fingerprint = {**fingerprint, "pool_size": config.pool_size, "n_calib": config.n_calib,
                   "calib_seed": config.calib_seed}
    if config.task != "easy-vqa":  # easy-VQA's stored calibration predates tasks: its fingerprint stays as it was
        fingerprint["task"] = config.task
    path = None if path is None else Path(path)
    where = "memory (no results folder)" if path is None else path  # for the errors of measure=False
    saved = {"visual_lc": {}, "text_lc": [], "visual_cosine": None}
    runs: list[dict] = []  # where each process that added to it ran (runs.run_record)
    if path is not None and path.is_file():
        stored = json.loads(path.read_text())
        if stored["fingerprint"] == fingerprint:
            saved = stored["calibration"]
            runs = stored.get("provenance", [])
        else:
            log(f"{path.name}: stored for {stored['fingerprint']}, recomputing")
    pools = calibration_pools(config.pool_size, config.calib_seed, config.task)
    main = pools["mixed"][: config.n_calib]
    computed = False

    this_run = run_record()

    def save():
        if path is not None:
            if this_run not in runs:
                runs.append(this_run)
            write_json_atomically(path, {"fingerprint": fingerprint, "calibration": saved, "provenance": runs})

    def fill(rows: list, items: list[VQAItem], group: str, label: str) -> bool:
        """Append the missing LC rows of ``items``; False when the deadline stopped it."""
        nonlocal computed
        if not measure and len(rows) < len(items):
            raise RuntimeError(f"{label} pool: {len(rows)} of {len(items)} {group} LC rows stored in {where}; run "
                               "scripts/shortv_evidence.py with this model and dtype, or measure them here")
        start = time.perf_counter()
        for item in items[len(rows):]:
            if deadline is not None and time.monotonic() > deadline:
                return False
            rows.extend(question_layer_contributions(model, processor, [item], group=group, task=config.task).tolist())
            computed = True
            save()
        if time.perf_counter() - start > 1:
            log(f"{group} LC of {len(rows)} {label} questions: {time.perf_counter() - start:.0f} s")
        return True

    visual = saved["visual_lc"]
    done = fill(visual.setdefault("mixed", []), main, "visual", "mixed") and \
        fill(saved["text_lc"], main, "text", "mixed")
    if done and saved["visual_cosine"] is None:
        if not measure:
            raise RuntimeError(f"the visual cosine scores are not stored in {where}; run scripts/shortv_evidence.py "
                               "with this model and dtype, or measure them here")
        saved["visual_cosine"] = visual_cosine_scores(model, processor, main, task=config.task).tolist()
        computed = True
        save()
    if done and not main_only:
        for name in pools_of(config.task):
            if not fill(visual.setdefault(name, []), pools[name], "visual", name):
                break
    if saved["visual_cosine"] is None:
        raise TimeoutError("the deadline passed before the main calibration (LC and visual cosine of "
                           f"{config.n_calib} questions) was complete; run again to continue")
    result = Calibration({name: np.array(rows) for name, rows in visual.items() if rows},
                         np.array(saved["text_lc"]), np.array(saved["visual_cosine"]))
    return result, computed


# ---------------------------------------------------------------- layer choices and the plan

def lowest(scores: np.ndarray, n: int) -> tuple[int, ...]:
    """The ``n`` layers with the lowest ``scores`` [layers], sorted by index."""
    from shortlab.pruning import lowest_layers

    return tuple(sorted(lowest_layers(list(scores), n)))


def random_layers(num_layers: int, n: int, seed: int) -> tuple[int, ...]:
    """``n`` of ``num_layers`` layers drawn with ``seed`` (``pruning.random_layers``, every
    layer allowed), sorted."""
    from shortlab.pruning import random_layers as draw

    return tuple(sorted(draw(num_layers, n, seed, allow_all=True)))


def main_lc(calib: Calibration, config: EvidenceConfig) -> np.ndarray:
    """The main visual LC per layer [layers]: the mean over the mixed pool's first ``n_calib``."""
    return calib.visual_lc["mixed"][: config.n_calib].mean(0)


def stability_subsets(config: EvidenceConfig) -> list[dict]:
    """The calibration subsets of the stability study: {"pool", "size", "seed", "rows"} (row
    indices into that pool's LC table); a size equal to the pool gives one subset."""
    subsets = []
    for pool in pools_of(config.task):
        for size in config.stability_sizes:
            seeds = config.stability_seeds[:1] if size == config.pool_size else config.stability_seeds
            for seed in seeds:
                rows = sorted(random.Random(f"{pool}/{size}/{seed}").sample(range(config.pool_size), size))
                subsets.append({"pool": pool, "size": size, "seed": seed, "rows": rows})
    return subsets


def _counts(counts, num_layers: int) -> list[int]:
    return sorted({min(n, num_layers) for n in counts if n > 0})


def evidence_plan(config: EvidenceConfig, calib: Calibration, num_layers: int,
                  matched_fastv_ratio: float | None = None) -> list[dict]:
    """Every evaluation of the sweep, as {"family", "choice", "N", "seed", "ratio", "pool",
    "size", "setting"} rows (unused fields None). Families: "dense", "blank", "shortv"
    (choices ``LAYER_CHOICES``), "tokens" (choice = the frozen group), "fastv" (choice
    "matched" for ``matched_fastv_ratio``, FastV at ShortV's FLOPs, when given), "shortv+fastv",
    "stability" (choice "pool/size/seed"). Rows may share a ``Setting`` (e.g. a stability subset
    choosing the main LC layers); the store evaluates it once."""
    lc = main_lc(calib, config)
    n_main = min(config.shortv_n, num_layers)
    k = min(config.fastv_k, num_layers - 1)
    empty = {"choice": None, "N": None, "seed": None, "ratio": None, "pool": None, "size": None}
    plan = [{**empty, "family": "dense", "setting": Setting()},
            {**empty, "family": "blank", "setting": Setting(blank_image=True)}]
    frozen_counts = _counts(config.frozen_counts, num_layers)
    for n in _counts([*config.frozen_counts, *config.lc_counts, n_main], num_layers):
        plan.append({**empty, "family": "shortv", "choice": "layer_contribution", "N": n,
                     "setting": Setting(frozen_layers=lowest(lc, n))})
    for n in frozen_counts:
        plan.append({**empty, "family": "shortv", "choice": "visual_cosine", "N": n,
                     "setting": Setting(frozen_layers=lowest(calib.visual_cosine, n))})
    main_layers = lowest(lc, n_main)
    for group in config.other_token_groups:
        plan.append({**empty, "family": "tokens", "choice": group, "N": n_main,
                     "setting": Setting(frozen_layers=main_layers, frozen_tokens=group, seed=config.eval_seed)})
    for ratio in config.fastv_ratios:
        plan.append({**empty, "family": "fastv", "ratio": ratio, "setting": Setting(fastv_k=k, fastv_ratio=ratio)})
    if matched_fastv_ratio:
        plan.append({**empty, "family": "fastv", "choice": "matched", "N": n_main, "ratio": matched_fastv_ratio,
                     "setting": Setting(fastv_k=k, fastv_ratio=matched_fastv_ratio)})
    for ratio in config.combined_ratios:
        plan.append({**empty, "family": "shortv+fastv", "N": n_main, "ratio": ratio,
                     "setting": Setting(frozen_layers=main_layers, fastv_k=k, fastv_ratio=ratio)})
    # the random draws last but for the stability choices: an interrupted sweep has every curve's other points
    for n in frozen_counts:
        for seed in config.random_seeds:
            plan.append({**empty, "family": "shortv", "choice": "random", "N": n, "seed": seed,
                         "setting": Setting(frozen_layers=random_layers(num_layers, n, seed))})
    complete = calib.complete_pools(config.pool_size)
    for subset in [subset for subset in stability_subsets(config) if subset["pool"] in complete]:
        scores = calib.visual_lc[subset["pool"]][subset["rows"]].mean(0)
        plan.append({**empty, "family": "stability", "choice": f"{subset['pool']}/{subset['size']}/{subset['seed']}",
                     "N": n_main, "seed": subset["seed"], "pool": subset["pool"], "size": subset["size"],
                     "setting": Setting(frozen_layers=lowest(scores, n_main))})
    return plan


# the plan's tiers, evaluated in this order so that an interrupted sweep has whole curves first
_TIERS = {"random": 1, "stability": 2}


def run_plan(model, processor, items: list[VQAItem], plan: list[dict], store: PredictionStore, *,
             features=None, batch_size: int = 1, deadline: float | None = None,
             log: Callable[[str], None] = print, task: str | VQATask = "easy-vqa",
             share_prefix: bool = True) -> int:
    """Evaluate every setting of ``plan`` that ``store`` lacks (each distinct setting once) until
    ``deadline`` (a ``time.monotonic()`` value; None: no limit). Returns how many settings are
    still missing. Settings go in the plan's tiers (every curve's points, then the random draws,
    then the stability choices), so that an interrupted sweep has whole curves first. With
    ``share_prefix``, the first layers that most of the missing settings leave as the dense model
    has them (``prefix_reach``, ``prefix.best_depth``) are computed once per batch and reused (a
    ``PrefixCache``; the same predictions, fewer layer passes); within a tier the settings sharing
    them go first, and their stored outputs are freed after the last of them."""
    from shortlab.arch import model_parts

    tier = {}
    for row in plan:
        tier.setdefault(row["setting"], _TIERS.get(row["family"] if row["family"] != "shortv" else row["choice"], 0))
    pending = list(dict.fromkeys(row["setting"] for row in plan if row["setting"] not in store))
    num_layers = model_parts(model).num_layers
    depth = best_depth([prefix_reach(setting, num_layers) for setting in pending]) if share_prefix else 0
    prefix = PrefixCache(depth) if depth else None

    def shares(setting: Setting) -> bool:
        return prefix is not None and prefix_reach(setting, num_layers) >= depth

    pending.sort(key=lambda setting: (tier[setting], not shares(setting)))  # stable: plan order within
    last_sharing = max((i for i, setting in enumerate(pending) if shares(setting)), default=-1)
    if prefix is not None:
        log(f"{sum(map(shares, pending))} of the {len(pending)} settings to evaluate share the dense model's first "
            f"{depth} layers: computed once per batch")
    for done, setting in enumerate(pending):
        if deadline is not None and time.monotonic() > deadline:
            log(f"time is up: {len(pending) - done} settings left for the next run")
            return len(pending) - done
        start = time.perf_counter()
        predicted = evaluate_setting(model, processor, items, setting, store, features=features,
                                     batch_size=batch_size, task=task, prefix=prefix if shares(setting) else None)
        accuracy = np.mean([p == item.answer for p, item in zip(predicted, items)])
        log(f"[{done + 1}/{len(pending)}] {time.perf_counter() - start:.0f} s accuracy {accuracy:.3f} {setting.key}")
        if prefix is not None and done == last_sharing:
            log(f"shared first layers: {prefix.misses} batches computed, {prefix.hits} reused, "
                f"{prefix.stored_bytes / 2**20:.0f} MiB held; freed")
            prefix = None  # the last setting sharing them is done
    return 0


# ---------------------------------------------------------------- statistics

def eval_features(model, processor, items: list[VQAItem], split: str = "test",
                  task: str | VQATask = "easy-vqa") -> dict[int, torch.Tensor] | None:
    """The vision features of every image of ``items`` ({image id: [patches, width]}), computed
    once since no setting changes the vision tower; None for LLaVA-NeXT, whose anyres features
    are computed from the images themselves."""
    from shortlab.arch import model_parts
    from shortlab.evaluate import input_device
    from shortlab.llava_mini.scoring import vision_features

    if model_parts(model).family == "llava_next":
        return None
    device = input_device(model)
    vqa_task = find_task(task)
    with torch.inference_mode():
        return {image_id: vision_features(model, processor.image_processor(
            [vqa_task.image(split, image_id)], return_tensors="pt")["pixel_values"].to(device))[0]
            for image_id in dict.fromkeys(item.image_id for item in items)}


def prompt_token_counts(processor, items: list[VQAItem], image_token_id: int) -> tuple[int, int]:
    """(text, visual) tokens of one question's prompt with its image, the sequence the FLOPs
    formulas count: the median text length over ``items`` and the visual tokens of one image."""
    from shortlab.llava_mini.packing import prompt_tokens

    tokens = prompt_tokens(processor)
    n_visual = tokens.prefix.count(image_token_id)
    n_text = int(np.median([len(tokens.prefix) - n_visual + len(tokens.block(item.question)) for item in items]))
    return n_text, n_visual


@dataclasses.dataclass
class Evidence:
    """What ``prepare_evidence`` sets up: the test ``items``, the ``calibration``, the ``plan``,
    its prediction ``store`` and the vision ``features`` of the test images."""

    items: list[VQAItem]
    calibration: Calibration
    plan: list[dict]
    store: PredictionStore
    features: dict[int, torch.Tensor] | None

    def missing(self) -> int:
        return len({row["setting"] for row in self.plan if row["setting"] not in self.store})


def prepare_evidence(model, processor, model_name: str, dtype: str, config: EvidenceConfig,
                     directory: str | Path | None = EVIDENCE_DIR, log: Callable[[str], None] = print, *,
                     main_only: bool = False, deadline: float | None = None, measure: bool = True) -> Evidence:
    """Load (or compute) the calibration, build the plan and open the prediction store of
    ``model_name`` under ``directory`` (None: in memory only). Stores made for other weights,
    dtype or questions are recomputed, not mixed in. ``main_only`` / ``deadline`` / ``measure``:
    see ``calibration``; the plan then holds the stability choices of the complete pools only.
    ``measure=False`` does not check the prediction store: ``Evidence.missing`` counts its gaps."""
    from shortlab.arch import model_parts
    from shortlab.llava_mini.sweep import items_fingerprint

    items = evaluation_items(config)
    fingerprint = {"model": model_name, "weights": model_fingerprint(model), "dtype": dtype}
    calib_path = None if directory is None else store_path(model_name, "calibration", directory, config.task)
    calib, _ = calibration(model, processor, config, calib_path, fingerprint, log=log, main_only=main_only,
                           deadline=deadline, measure=measure)
    parts = model_parts(model)
    n_text, n_visual = prompt_token_counts(processor, items, model.config.image_token_id)
    k = min(config.fastv_k, parts.num_layers - 1)
    shortv_flops = prefill_flops(parts.text_config, n_text, n_visual,
                                 frozen_layers=lowest(main_lc(calib, config), min(config.shortv_n, parts.num_layers)))
    matched = fastv_ratio_matching_flops(parts.text_config, n_text, n_visual, shortv_flops, k)
    plan = evidence_plan(config, calib, parts.num_layers, matched_fastv_ratio=matched)
    predictions_path = None if directory is None else store_path(model_name, "predictions", directory, config.task)
    store = PredictionStore(predictions_path, {**fingerprint, "items": items_fingerprint(items)}, stale="recompute")
    if store.stale:
        log(f"{predictions_path.name} holds another model's, dtype's or question set's predictions: recomputing")
    return Evidence(items, calib, plan, store, eval_features(model, processor, items, task=config.task))


def second_task_evidence(model, processor, model_name: str, dtype: str, config: EvidenceConfig, task: str,
                         directory: str | Path | None = EVIDENCE_DIR, *, measure: bool = True, fast: bool = False,
                         log: Callable[[str], None] = print) -> Evidence:
    """The N sweep of ``config`` (its counts, draws and calibration sizes) on another ``task``
    answered by ``model``: that task's whole default test set (``fast``: ``fast_config``), its own
    calibration, the stored answers of the dense model and of every layer choice (computed where
    missing when ``measure``, else a ``RuntimeError`` naming the script that computes them)."""
    second = fast_config(task) if fast else dataclasses.replace(config, task=task, n_eval=default_config(task).n_eval)
    ev = prepare_evidence(model, processor, model_name, dtype, second, directory, log=log, measure=measure)
    needed = [row for row in ev.plan if row["family"] in ("dense", "shortv")]
    missing = len({row["setting"] for row in needed if row["setting"] not in ev.store})
    if missing and not measure:
        raise RuntimeError(f"{missing} settings of {model_name} on {task} are not stored in {directory}; run "
                           f"scripts/shortv_evidence.py --model {model_name} --task {task} --dtype {dtype}")
    if missing:
        run_plan(model, processor, ev.items, needed, ev.store, features=ev.features, log=log, task=task)
    return ev


def layer_choice_correct(ev: Evidence) -> dict[str, dict[int, np.ndarray]]:
    """The N sweep's stored answers scored: {choice: {N: correct [items]}} for the layer choices
    "layer_contribution" and "visual_cosine", and {N: correct [draws, items]} (draws in seed
    order) for "random". A setting missing from the store raises ``KeyError`` naming it."""
    curves: dict[str, dict[int, list | np.ndarray]] = {choice: {} for choice in LAYER_CHOICES}
    for row in ev.plan:
        if row["family"] != "shortv":
            continue
        if row["setting"].key not in ev.store.results:
            raise KeyError(f"no stored answers for {row['choice']} at N = {row['N']} ({row['setting'].key})")
        scores = correct(ev.items, ev.store.results[row["setting"].key])
        if row["choice"] == "random":
            curves["random"].setdefault(row["N"], []).append((row["seed"], scores))
        else:
            curves[row["choice"]][row["N"]] = scores
    curves["random"] = {n: np.stack([scores for _, scores in sorted(draws, key=lambda d: d[0])])
                        for n, draws in curves["random"].items()}
    return curves


def choice_comparisons(curves: dict[str, dict[int, np.ndarray]], clusters, *, margin: float,
                       seed: int = 0) -> list[dict]:
    """At every N of ``curves`` (``layer_choice_correct``), the claims "LC > visual cosine" (paired
    on the same questions), "LC > random" and "visual cosine > random" (minus each random draw,
    draws and images both resampled), each judged by more than ``margin`` with a tie at the
    ceiling named: rows {"N", "comparison", "judgement"}. ``clusters``: one image id per question."""
    lc, cosine, random_draws = (curves[choice] for choice in LAYER_CHOICES)
    rows = []
    for n in sorted(set(cosine) & set(random_draws)):
        lc_accuracy = bootstrap_interval(lc[n], clusters, seed=seed)
        cosine_accuracy = bootstrap_interval(cosine[n], clusters, seed=seed)
        random_accuracy = crossed_bootstrap_interval(random_draws[n], clusters, seed=seed)
        rows.append({"N": n, "comparison": "LC − visual cosine", "judgement": judge(
            paired_interval(lc[n], cosine[n], clusters, seed=seed), margin=margin,
            accuracies=(lc_accuracy, cosine_accuracy))})
        rows.append({"N": n, "comparison": "LC − random", "judgement": judge(
            crossed_bootstrap_interval(lc[n][None, :] - random_draws[n], clusters, seed=seed), margin=margin,
            accuracies=(lc_accuracy, random_accuracy))})
        rows.append({"N": n, "comparison": "visual cosine − random", "judgement": judge(
            crossed_bootstrap_interval(cosine[n][None, :] - random_draws[n], clusters, seed=seed), margin=margin,
            accuracies=(cosine_accuracy, random_accuracy))})
    return rows


def layer_choice_curve(curves: dict[str, dict[int, np.ndarray]], clusters, seed: int = 0) -> list[dict]:
    """Accuracy with its 95 % interval (clustered by image) for every layer choice and N of
    ``curves`` (``layer_choice_correct``): rows {"choice", "N", "estimate", "low", "high"}; the
    random choice's interval resamples draws and images, and its rows add the spread of the
    draws' own accuracies ("draw_min", "draw_max", "draw_sd")."""
    rows = []
    for choice in LAYER_CHOICES:
        for n, values in sorted(curves[choice].items()):
            values = np.asarray(values)
            if choice == "random":
                found = crossed_bootstrap_interval(values, clusters, seed=seed)
                per_draw = values.mean(1)
                spread = {"draw_min": per_draw.min(), "draw_max": per_draw.max(),
                          "draw_sd": per_draw.std(ddof=1) if len(per_draw) > 1 else float("nan")}
            else:
                found, spread = bootstrap_interval(values, clusters, seed=seed), {}
            rows.append({"choice": choice, "N": n, "estimate": found.estimate, "low": found.low, "high": found.high,
                         **spread})
    return rows


def chain_verdicts(comparisons: list[dict]) -> dict[int, str]:
    """The verdict on the ordering "LC > visual cosine > random" at each N, from the rows of
    ``choice_comparisons`` (both links judged; ``ordered_verdict``)."""
    links: dict[int, dict[str, str]] = {}
    for row in comparisons:
        links.setdefault(row["N"], {})[row["comparison"]] = row["judgement"].outcome
    return {n: ordered_verdict([found["LC − visual cosine"], found["visual cosine − random"]])
            for n, found in sorted(links.items())}


def correct(items: list[VQAItem], predicted: list[str]) -> np.ndarray:
    """1.0 where ``predicted[i]`` is ``items[i]``'s answer, else 0.0: [len(items)]."""
    if len(items) != len(predicted):
        raise ValueError(f"need one prediction per item: {len(items)} items, {len(predicted)} predictions")
    return np.array([float(p == item.answer) for item, p in zip(items, predicted)])


# "loses at most the tolerance" is the mirror of "loses more than the tolerance": judging the
# latter with ``stats.verdict`` gives the equivalence band for free (a loss inside ± tolerance is
# a tie with the reference, which is what "keeps the accuracy" means)
_KEEPS = {SUPPORTED: CONTRADICTED, CONTRADICTED: SUPPORTED, EQUIVALENT: EQUIVALENT, CANNOT_TELL: CANNOT_TELL}


def loss_verdict(interval: Interval, tolerance: float = 0.01) -> str:
    """Verdict on "freezing loses at most ``tolerance`` accuracy" (the practical size) from the
    interval of the paired reference-minus-frozen difference: ``EQUIVALENT`` (the same within
    ± ``tolerance``: the accuracy is kept) when the whole interval lies inside ± ``tolerance``;
    ``SUPPORTED`` when it lies below ``tolerance`` but reaches below − ``tolerance`` (no loss that
    matters, perhaps a gain); ``CONTRADICTED`` when the whole interval lies above ``tolerance``;
    otherwise ``CANNOT_TELL``."""
    return _KEEPS[verdict(interval, 0.0, claim="above", margin=tolerance)]


def loss_family(intervals: dict[str, Interval], tolerance: float = 0.01) -> FamilyVerdicts:
    """``loss_verdict`` for a family of loss intervals ({setting: reference − frozen}), each and
    after Holm's adjustment across the family (``stats.family_verdicts``), in the same words."""
    family = family_verdicts(intervals, 0.0, claim="above", margin=tolerance)
    return FamilyVerdicts({k: _KEEPS[v] for k, v in family.per_setting.items()},
                          {k: _KEEPS[v] for k, v in family.holm.items()}, family.expected_by_chance, family.level)


def max_frozen_within(dense: np.ndarray, frozen: dict[int, np.ndarray], clusters, tolerance: float = 0.01,
                      seed: int = 0) -> tuple[list[dict], int | None, int | None]:
    """For each N of ``frozen`` ({N: correct [items]}), the paired interval of ``dense − frozen``
    (clustered by ``clusters``) and its ``loss_verdict``. Returns the rows {"N", "loss", "low",
    "high", "verdict"}, the largest N whose loss is established to be at most ``tolerance``
    (supported or the same within it; None if none) and the smallest N whose verdict is
    contradicted (None if none)."""
    rows = []
    for n in sorted(frozen):
        interval = paired_interval(dense, frozen[n], clusters, seed=seed)
        rows.append({"N": n, "loss": interval.estimate, "low": interval.low, "high": interval.high,
                     "verdict": loss_verdict(interval, tolerance)})
    kept = [row["N"] for row in rows if row["verdict"] in (SUPPORTED, EQUIVALENT)]
    contradicted = [row["N"] for row in rows if row["verdict"] == CONTRADICTED]
    return rows, max(kept, default=None), min(contradicted, default=None)


def ordered_verdict(verdicts: list[str]) -> str:
    """The verdict on a chain of claims ("a > b > c") from the verdicts of its links: contradicted
    when any link is, the same within the margin when a link is a tie (which denies "better"),
    supported when every link is, otherwise cannot tell."""
    return family_outcome(verdicts, tie_holds=False)


@dataclasses.dataclass(frozen=True)
class Judgement:
    """A verdict with what it was judged from and against: the ``interval``, the ``outcome``
    (``shortlab.stats``), the practical size ``margin`` and whether every accuracy compared sits
    at the ``ceiling`` (then a tie says nothing about a harder task)."""

    interval: Interval
    outcome: str
    margin: float
    ceiling: bool = False

    def words(self) -> str:
        text = describe(self.outcome, self.margin)
        if self.ceiling:
            text += ", both at the accuracy ceiling (only a harder task can separate them)"
        return text

    def __str__(self) -> str:
        return f"{self.interval} -> {self.words()} (practical size {self.margin:g})"


def judge(interval: Interval, threshold: float = 0.0, *, margin: float, claim: str = "above",
          accuracies: tuple[Interval, ...] = (), ceiling: float = 1.0) -> Judgement:
    """``stats.verdict`` of the claim "``claim`` ``threshold`` by more than ``margin``", with the
    ceiling named when the claim is not supported and every one of ``accuracies`` (the settings
    compared) lies within ``margin`` of ``ceiling`` (``stats.at_ceiling``)."""
    outcome = verdict(interval, threshold, claim=claim, margin=margin)
    topped = bool(accuracies) and outcome != SUPPORTED and at_ceiling(*accuracies, ceiling=ceiling,
                                                                       margin=max(margin, 1e-9))
    return Judgement(interval, outcome, margin, topped)


def to_tell(judgement: Judgement, n: int, threshold: float = 0.0, *, claim: str = "above",
            unit: str = "questions") -> str:
    """What would decide an undecided ``judgement`` made from ``n`` items, in words: a harder
    task for a tie at the ceiling, else roughly how many items (``stats.sample_size_to_tell``)."""
    if judgement.ceiling:
        return "both settings sit at the accuracy ceiling: only a harder task can separate them"
    if judgement.outcome != CANNOT_TELL:
        return ""
    needed = sample_size_to_tell(judgement.interval, n, threshold, margin=judgement.margin, claim=claim)
    if needed is None:
        return "the estimate sits on the practical edge: no sample size decides it"
    return f"about {significant(needed)} {unit} would decide it (this run has {n:,})"


def finding(claim: str, judgement: Judgement, n: int, *, practical: str | None = None, paper: str = "",
            unit: str = "in accuracy") -> Finding:
    """A ``findings.Finding`` from a ``Judgement`` made on ``n`` items: the practical size in
    words (``practical``, default "by more than <margin> <unit>"; a tie at the ceiling says that
    only a harder task could separate the settings) and, for an undecided one, what would tell."""
    words = practical if practical is not None else f"by more than {judgement.margin:g} {unit}"
    if judgement.ceiling:
        words += "; both at the accuracy ceiling, so only a harder task can separate them"
    return Finding(claim, judgement.outcome, judgement.interval, words, judgement.margin, paper, to_tell(judgement, n))


def question_masks(items: list[VQAItem], task: str | VQATask = "easy-vqa") -> dict[str, np.ndarray]:
    """{"all": every item, question type: its items} as boolean masks [len(items)] (types present only)."""
    vqa_task = find_task(task)
    masks = {"all": np.ones(len(items), dtype=bool)}
    kinds = [vqa_task.question_type(item) for item in items]
    for kind in vqa_task.question_types:
        mask = np.array([found == kind for found in kinds], dtype=bool)
        if mask.any():
            masks[kind] = mask
    return masks


def family_losses(dense: np.ndarray, frozen: dict[int, np.ndarray], items: list[VQAItem], clusters, *,
                  task: str | VQATask = "easy-vqa", tolerance: float = 0.01, seed: int = 0) -> list[dict]:
    """The accuracy each question type loses when the visual tokens are frozen: for every N of
    ``frozen`` ({N: correct [items]}) and every type of ``task`` present in ``items``, the paired
    interval of dense − frozen on that type's questions (clustered by image) and its
    ``loss_verdict``. Rows {"N", "type", "questions", "loss" (an Interval), "verdict"}."""
    vqa_task = find_task(task)
    kinds = np.array([vqa_task.question_type(item) for item in items])
    clusters = np.asarray(clusters)
    rows = []
    for n in sorted(frozen):
        for kind in vqa_task.question_types:
            mask = kinds == kind
            if not mask.any():
                continue
            loss = paired_interval(np.asarray(dense)[mask], np.asarray(frozen[n])[mask], clusters[mask], seed=seed)
            rows.append({"N": n, "type": kind, "questions": int(mask.sum()), "loss": loss,
                         "verdict": loss_verdict(loss, tolerance)})
    return rows


def loses_more(dense: np.ndarray, frozen: np.ndarray, items: list[VQAItem], clusters, detailed: str, coarse: str, *,
               task: str | VQATask = "easy-vqa", margin: float = 0.01, seed: int = 0) -> Judgement:
    """Judge "questions of type ``detailed`` lose more accuracy than those of type ``coarse`` when
    the visual tokens are frozen, by more than ``margin``": the interval of the difference of the
    two types' mean losses (dense − frozen per question), resampling images, so that two
    questions about one image stay together (``stats.group_difference_interval``)."""
    from shortlab.stats import group_difference_interval

    vqa_task = find_task(task)
    kinds = [vqa_task.question_type(item) for item in items]
    loss = np.asarray(dense, dtype=np.float64) - np.asarray(frozen, dtype=np.float64)
    difference = group_difference_interval(loss, kinds, detailed, coarse, clusters, seed=seed)
    return judge(difference, margin=margin)


def interpolate_at_flops(points: dict[float, np.ndarray], target: float) -> tuple[np.ndarray, str]:
    """Per-question scores of a method at FLOPs fraction ``target``, linearly interpolated
    between the two settings of its sweep ({FLOPs fraction: correct [items]}) that bracket it (a
    setting at exactly ``target`` is returned as is). Interpolating each question's score keeps
    the comparison paired with a setting scored on the same questions. Returns the scores and
    how they were made, in words."""
    if not points:
        raise ValueError("no sweep points to interpolate")
    flops = sorted(points)
    if not flops[0] - 1e-9 <= target <= flops[-1] + 1e-9:
        raise ValueError(f"FLOPs fraction {target:.3f} lies outside the sweep [{flops[0]:.3f}, {flops[-1]:.3f}]")
    for x in flops:
        if abs(x - target) <= 1e-9:
            return np.asarray(points[x], dtype=np.float64), f"the setting at {x:.0%} FLOPs"
    upper = min(x for x in flops if x > target)
    lower = max(x for x in flops if x < target)
    weight = (target - lower) / (upper - lower)  # on the upper point
    scores = weight * np.asarray(points[upper], dtype=np.float64) + (1 - weight) * np.asarray(points[lower], dtype=np.float64)
    return scores, f"interpolated between {lower:.0%} and {upper:.0%} FLOPs"


def combination_verdicts(combined: np.ndarray, flops: float, alone: dict[str, dict[float, np.ndarray]],
                         clusters, *, margin: float, seed: int = 0) -> tuple[dict[str, dict], str]:
    """Judge "the combination beats each method alone at equal FLOPs": for every method of
    ``alone`` ({name: {FLOPs fraction: correct [items]}}), its scores at ``flops`` (the
    combination's, ``interpolate_at_flops``) and the paired interval of ``combined − alone``
    clustered by ``clusters``, judged against ``margin``. Returns ({name: {"judgement", "how"}}
    (judgement None where the method's sweep does not reach those FLOPs) and the verdict on the
    whole claim (``ordered_verdict``: every method must be beaten)."""
    rows = {}
    for name, points in alone.items():
        if not min(points) - 1e-9 <= flops <= max(points) + 1e-9:  # no setting of equal FLOPs to compare with
            rows[name] = {"judgement": None, "how": f"its sweep does not reach {flops:.0%} FLOPs"}
            continue
        scores, how = interpolate_at_flops(points, flops)
        difference = paired_interval(combined, scores, clusters, seed=seed)
        rows[name] = {"judgement": judge(difference, margin=margin), "how": how}
    outcomes = [CANNOT_TELL if row["judgement"] is None else row["judgement"].outcome for row in rows.values()]
    return rows, ordered_verdict(outcomes)


def rule_family(settings: dict[str, np.ndarray], rules: dict[str, np.ndarray], clusters, *, margin: float,
                seed: int = 0) -> tuple[str, float, dict[str, Interval], FamilyVerdicts]:
    """Judge every accuracy of ``settings`` ({name: correct [items], or [draws, items] for
    random draws}) against the strongest rule that needs no model among ``rules`` ({name:
    per-item score [items]}; ``stats.strongest_rule``), claim "above it by more than ``margin``",
    paired over the same items and clustered by ``clusters`` (draws crossed with the clusters).
    Returns the rule's name, its mean score, the difference intervals and their family verdicts
    (each, and Holm-adjusted)."""
    name, rule = strongest_rule(rules)
    intervals = {}
    for setting, values in settings.items():
        values = np.asarray(values, dtype=np.float64)
        if values.ndim == 2:
            intervals[setting] = crossed_bootstrap_interval(values - rule[None, :], clusters, seed=seed)
        else:
            intervals[setting] = paired_interval(values, rule, clusters, seed=seed)
    return name, float(rule.mean()), intervals, family_verdicts(intervals, 0.0, margin=margin)


def against_rules_by_group(correct: np.ndarray, rules: dict[str, np.ndarray], masks: dict[str, np.ndarray],
                           clusters, *, margin: float, seed: int = 0) -> tuple[list[dict], FamilyVerdicts]:
    """``correct`` [items] judged against the strongest no-model rule of each group of questions
    (``masks``: {group: boolean mask [items]}, e.g. ``question_masks``; the strongest rule may
    differ between groups), as one family. Returns rows {"questions", "strongest rule", "rule
    accuracy", "minus rule"} and the ``FamilyVerdicts`` keyed by group."""
    clusters = np.asarray(clusters)
    rows, intervals = [], {}
    for group, mask in masks.items():
        mask = np.asarray(mask, dtype=bool)
        name, score, found, _ = rule_family({group: np.asarray(correct, dtype=np.float64)[mask]},
                                            {r: np.asarray(v, dtype=np.float64)[mask] for r, v in rules.items()},
                                            clusters[mask], margin=margin, seed=seed)
        intervals[group] = found[group]
        rows.append({"questions": group, "strongest rule": name, "rule accuracy": score, "minus rule": found[group]})
    return rows, family_verdicts(intervals, 0.0, margin=margin)


def jaccard(a, b) -> float:
    """|a ∩ b| / |a ∪ b| of two layer sets (1.0 for two empty sets)."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0

