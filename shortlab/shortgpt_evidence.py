"""Per-item evidence for notebook 01 (ShortGPT): every setting's held-out block NLLs and per-question
correctness, stored so that the statistics can be recomputed without the model.

A *setting* is a model variant — the dense model, or one with some layers removed, each
optionally with group-wise round-to-nearest weights or healed afterwards by a short recovery
training (``shortlab.healing``) — plus what is measured on it: the NLL of
the first ``n_blocks`` held-out blocks, and optionally every benchmark question. ``plan_settings``
turns the layer choices of the rankings into the notebook's settings (every ranking at every
removal count; ``random_draws`` seeded random sets per count; the 2 × 2 design dense/pruned ×
full/quantised weights), sharing one measurement between settings that remove the same layers.

``EvidenceStore`` keeps one JSON file per measurement under a folder (e.g.
``results/shortgpt/smollm2-135m/``), written atomically, holding a fingerprint of the model's
weights, the held-out tokens, the questions and the measurement; a file whose fingerprint does
not match is stale and is measured again. ``scripts/shortgpt_evidence.py`` fills the store ahead
of time; the notebook reads it, or measures what is missing.

Record schema (one file, ``<measurement name>.json``)::

    {"fingerprint": str, "measurement": {"removed": [int], "bits": int|null,
     "group_size": int|null, "n_blocks": int, "tasks": bool},
     "nll": [float; n_blocks], "tokens": [float; n_blocks],     # nats summed per block, tokens predicted
     "correct": {task: {"acc": [0|1; n_items], "acc_norm": [0|1; n_items]}},   # {} without tasks
     "seconds": float, "device": str, "dtype": str,
     "healing": {...},                                          # healed variants: heal()'s record
     "provenance": {"git_revision", "clean", "versions", "command", "hardware", "created"}}
    # provenance: where the record was made (runs.run_record); absent in records stored
    # before the stores kept it (``store_provenance`` counts them)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shortlab.arch import model_parts
from shortlab.evaluate.examples import MCExample
from shortlab.evaluate.likelihood import block_nll, loglikelihoods
from shortlab.evaluate.scoring import encode_examples, item_correct
from shortlab.healing import HealingConfig, heal
from shortlab.files import write_json_atomically
from shortlab.prefix import PrefixCache, best_depth
from shortlab.runs import describe_runs, run_record
from shortlab.pruning import random_layers, remove_layers
from shortlab.quantize import quantize_weights
from shortlab.stats import (
    CANNOT_TELL,
    CONTRADICTED,
    EQUIVALENT,
    SUPPORTED,
    Interval,
    above_strongest_rule,
    bootstrap_interval,
    crossed_bootstrap_interval,
    family_outcome,
    paired_perplexity_ratio,
    perplexity_interval,
    NothingToRecover,
    ratio_interval,
    recovered_share_interval,
    verdict,
    wilson_interval,
)


def removal_counts(num_layers: int, max_remove: int, step: int, table_fraction: float) -> tuple[list[int], int]:
    """The removal counts k = step, 2·step, … ≤ max_remove (clipped to num_layers − 1), plus the
    table's k = round(table_fraction · num_layers); returns (sorted counts, table k)."""
    if num_layers < 2:
        raise ValueError(f"need at least 2 decoder layers to remove one, got {num_layers}")
    if step < 1:
        raise ValueError(f"step must be at least 1, got {step}")
    if not 0 < table_fraction < 1:
        raise ValueError(f"table_fraction must be in (0, 1), got {table_fraction}")
    max_remove = min(max_remove, num_layers - 1)
    table_k = min(max(1, round(table_fraction * num_layers)), num_layers - 1)
    return sorted(set(range(step, max_remove + 1, step)) | {table_k}), table_k


@dataclass(frozen=True)
class Measurement:
    """What is measured on which model variant: the model without the ``removed`` layers (sorted),
    with ``bits``-bit group-wise weights (None: the model's own) or healed as ``healing`` says
    after the removal (None: not trained), NLL of the first ``n_blocks`` held-out blocks, and every
    benchmark question when ``tasks``."""

    removed: tuple[int, ...]
    bits: int | None
    group_size: int | None
    n_blocks: int
    tasks: bool
    healing: HealingConfig | None = None

    def __post_init__(self):
        if self.healing is not None and self.bits is not None:
            raise ValueError("a measurement is healed or quantised, not both")

    @property
    def name(self) -> str:
        """A readable, unique file stem: removed layers, weights, healing, what is measured."""
        layers = "dense" if not self.removed else "removed-" + "-".join(map(str, self.removed))
        weights = "w-model" if self.bits is None else f"w{self.bits}g{self.group_size or 'channel'}"
        healed = f"__healed-{self.healing.label}" if self.healing is not None else ""
        return f"{layers}__{weights}{healed}__blocks{self.n_blocks}{'__tasks' if self.tasks else ''}"


def measurement_dict(measurement: Measurement) -> dict:
    """``measurement`` as JSON-ready fields (what its records store and are fingerprinted by);
    ``healing`` only where it is set, so that records made before healing existed stay current."""
    fields = asdict(measurement)
    if fields["healing"] is None:
        del fields["healing"]
    return fields


@dataclass(frozen=True)
class Setting:
    """One row of the notebook: ``ranking`` ("dense", a ``RANKINGS`` name, or "random" with its
    ``draw``) at ``k`` layers removed, with ``bits``-bit weights or the model's own, measured as
    ``measurement`` says."""

    ranking: str
    k: int
    measurement: Measurement
    draw: int | None = None

    @property
    def quantised(self) -> bool:
        return self.measurement.bits is not None

    @property
    def healed(self) -> bool:
        return self.measurement.healing is not None


@dataclass(frozen=True)
class EvidencePlan:
    """What the notebook measures: the rankings at ``ks`` (``table_k`` is the paper-style table),
    ``random_draws`` random sets per k on the first ``random_blocks`` blocks, benchmarks on
    ``task_rankings`` at ``table_k`` (and the dense model), the 2 × 2 quantisation design at
    ``table_k`` with ``bits``-bit weights in groups of ``group_size``, and each of ``healing`` (one
    recipe and budget per seed) applied to ``healing_rankings``' removals at ``table_k`` and, as
    the control for what training on the calibration text does by itself, to the dense model."""

    ks: tuple[int, ...]
    table_k: int
    eval_blocks: int
    random_draws: int = 20
    random_blocks: int | None = None  # None: all eval_blocks
    baseline_ks: tuple[int, ...] | None = None  # counts at which the baselines run; None: all ks
    task_rankings: tuple[str, ...] = ("block_influence",)
    bits: int = 4
    group_size: int | None = 32
    seed: int = 0
    healing: tuple[HealingConfig, ...] = ()
    healing_rankings: tuple[str, ...] = ()


def plan_settings(choices: Mapping[str, Mapping[int, Sequence[int]]], plan: EvidencePlan,
                  num_layers: int) -> list[Setting]:
    """Every setting of ``plan``, from ``choices`` = ``{ranking: {k: layers removed}}`` (as
    ``rank_layers_for_counts`` gives; "random" in it is ignored: random sets are drawn here with
    seeds ``plan.seed`` … ``plan.seed + random_draws − 1``). BI ("block_influence") must be
    among the rankings: the 2 × 2 design prunes with it."""
    if "block_influence" not in choices:
        raise ValueError("choices must include 'block_influence': the quantisation design prunes with it")
    if plan.table_k not in plan.ks:
        raise ValueError(f"table_k {plan.table_k} must be one of ks {plan.ks}")
    random_blocks = plan.eval_blocks if plan.random_blocks is None else plan.random_blocks
    if not 1 <= random_blocks <= plan.eval_blocks:
        raise ValueError(f"random_blocks must be in 1..{plan.eval_blocks}, got {random_blocks}")
    baseline_ks = plan.ks if plan.baseline_ks is None else plan.baseline_ks

    def measurement(removed, bits=None, n_blocks=plan.eval_blocks, tasks=False, healing=None):
        return Measurement(tuple(sorted(removed)), bits, plan.group_size if bits else None, n_blocks, tasks, healing)

    dense_tasks = bool(plan.task_rankings)
    settings = [Setting("dense", 0, measurement((), tasks=dense_tasks))]
    for ranking, per_k in choices.items():
        if ranking == "random":
            continue
        for k in plan.ks:
            if ranking != "block_influence" and k not in baseline_ks:
                continue
            if k not in per_k:
                raise ValueError(f"choices[{ranking!r}] has no layer set for k = {k}")
            with_tasks = k == plan.table_k and ranking in plan.task_rankings
            settings.append(Setting(ranking, k, measurement(per_k[k], tasks=with_tasks)))
    for k in plan.ks:
        for draw in range(plan.random_draws):
            removed = random_layers(num_layers, k, seed=plan.seed + draw)
            settings.append(Setting("random", k, measurement(removed, n_blocks=random_blocks), draw))
    bi_table = choices["block_influence"][plan.table_k]
    settings.append(Setting("dense", 0, measurement((), plan.bits, tasks=dense_tasks)))
    settings.append(Setting("block_influence", plan.table_k,
                            measurement(bi_table, plan.bits, tasks="block_influence" in plan.task_rankings)))
    for healing in plan.healing:
        settings.append(Setting("dense", 0, measurement((), tasks=dense_tasks, healing=healing)))
        for ranking in plan.healing_rankings:
            if ranking not in choices:
                raise ValueError(f"healing_rankings names {ranking!r}, which is not among the rankings")
            settings.append(Setting(ranking, plan.table_k, measurement(
                choices[ranking][plan.table_k], tasks=ranking in plan.task_rankings, healing=healing)))
    # a layer set measured with questions on some row needs no second, perplexity-only measurement
    def variant(m: Measurement):
        return m.removed, m.bits, m.n_blocks, m.healing

    with_tasks = {variant(m) for m in (s.measurement for s in settings) if m.tasks}
    return [dataclasses.replace(s, measurement=dataclasses.replace(s.measurement, tasks=True))
            if variant(s.measurement) in with_tasks else s for s in settings]


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def model_fingerprint(model: nn.Module, name: str) -> str:
    """A short hash of ``name``, the class, the number of layers and every parameter's name, shape
    and exact bytes (copied to the CPU, so the same weights give the same fingerprint on any
    device; float sums would differ between devices in their last bits)."""
    digest = hashlib.sha256(json.dumps([name, type(model).__name__, model_parts(model).num_layers]).encode())
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            digest.update(f"{parameter_name}{list(parameter.shape)}{parameter.dtype}".encode())
            digest.update(parameter.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def data_fingerprint(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     task_examples: Mapping[str, Sequence[MCExample]]) -> str:
    """A short hash of the held-out blocks and of every question (contexts, choices, gold)."""
    blocks = hashlib.sha256(input_ids.cpu().numpy().tobytes() + attention_mask.cpu().numpy().tobytes()).hexdigest()
    questions = {task: [[list(e.contexts), list(e.choices), e.gold] for e in examples]
                 for task, examples in task_examples.items()}
    return _digest([blocks, questions])


class EvidenceStore:
    """Measurements on disk, one JSON file each under ``directory`` (None: memory only), valid
    for one model (``model_fp``) and one set of held-out blocks and questions (``data_fp``).

    ``store.get(measurement)`` returns the stored record or None (missing or stale: its
    fingerprint differs); ``store.put(measurement, record)`` writes it atomically, with where it
    was made (``runs.run_record``) unless the record brings its own. Counters
    ``read`` and ``written`` say how many records came from disk and how many were measured.
    """

    def __init__(self, directory: str | Path | None, model_fp: str, data_fp: str):
        self.directory = None if directory is None else Path(directory)
        self.model_fp, self.data_fp = model_fp, data_fp
        self._memory: dict[Measurement, dict] = {}
        self.read = 0
        self.written = 0

    def fingerprint(self, measurement: Measurement) -> str:
        return _digest([self.model_fp, self.data_fp, measurement_dict(measurement)])

    def path(self, measurement: Measurement) -> Path | None:
        return None if self.directory is None else self.directory / f"{measurement.name}.json"

    def healing_checkpoint(self, measurement: Measurement) -> Path | None:
        """Where an unfinished healing of ``measurement``'s variant keeps its progress (None in
        memory): beside its record, deleted once the record is written."""
        return None if self.directory is None else self.directory / f"{measurement.name}.healing.pt"

    def get(self, measurement: Measurement) -> dict | None:
        if measurement in self._memory:
            return self._memory[measurement]
        path = self.path(measurement)
        if path is None or not path.is_file():
            return None
        record = json.loads(path.read_text())
        if record.get("fingerprint") != self.fingerprint(measurement):
            return None
        self._memory[measurement] = record
        self.read += 1
        return record

    def put(self, measurement: Measurement, record: dict) -> dict:
        # kept in memory exactly as it reads back from disk (tuples become lists)
        record = json.loads(json.dumps({"provenance": run_record(), **record,
                                        "fingerprint": self.fingerprint(measurement),
                                        "measurement": measurement_dict(measurement)}))
        path = self.path(measurement)
        if path is not None:
            write_json_atomically(path, record)
        self._memory[measurement] = record
        self.written += 1
        return record


def store_provenance(records: Iterable[Mapping]) -> str:
    """Where the stored ``records`` were made, in one sentence (``runs.describe_runs``)."""
    return describe_runs((record.get("provenance") for record in records), what="measurements")


def model_variant(model: nn.Module, removed: Iterable[int], bits: int | None,
                  group_size: int | None) -> nn.Module:
    """The model without the ``removed`` layers, with ``bits``-bit group-wise weights when given;
    ``model`` itself when nothing changes, otherwise a copy (``model`` is never modified)."""
    removed = list(removed)
    variant = remove_layers(model, removed) if removed else model
    if bits is not None:
        variant = quantize_weights(variant, bits, group_size, inplace=variant is not model)
    return variant


def measure(model: nn.Module, tokenizer, measurement: Measurement, held_out: Mapping[str, torch.Tensor],
            task_examples: Mapping[str, Sequence[MCExample]], batch_size: int = 8,
            known_nll: Mapping | None = None, shared_context: bool = True,
            prefix: PrefixCache | None = None, healing_checkpoint: str | Path | None = None,
            deadline: float | None = None, log: Callable[[str], None] | None = None) -> dict | None:
    """Measure one setting: per-block NLL of ``held_out`` rows [:n_blocks] (``input_ids``,
    ``attention_mask``: LongTensor[N, T]) and, with ``measurement.tasks``, per-question
    correctness on every task in ``task_examples``. Returns a record (see the module docstring)
    without its fingerprint. ``model`` is left unchanged. ``known_nll``: a stored record of the
    same layers and weights without questions, whose "nll" and "tokens" are taken instead of
    measuring them again (a deterministic forward pass would only repeat them).
    ``shared_context``: score each question's context once for all its choices
    (``loglikelihoods``); False scores every choice as its own sequence, for comparison.
    ``prefix``: a ``PrefixCache`` of the dense model's first layers, used when the measurement
    leaves them as they are (``reuses_prefix``): what they compute is taken from it, or stored
    in it for the next measurement. A healed variant is trained first (``healing.heal``, on a
    copy), its progress kept in ``healing_checkpoint`` when given; past ``deadline`` (a
    ``time.monotonic()`` value) the healing stops there and None is returned (measure again to
    continue). ``log``: where the healing reports its steps (None: silent)."""
    n_available = held_out["input_ids"].shape[0]
    if measurement.n_blocks > n_available:
        raise ValueError(f"the measurement needs {measurement.n_blocks} held-out blocks; only {n_available} given")
    if measurement.healing is not None and known_nll is not None:
        raise ValueError("a healed variant is trained here: no stored NLL of it can be known")
    start = time.perf_counter()
    variant = model_variant(model, measurement.removed, measurement.bits, measurement.group_size)
    healing = None
    if measurement.healing is not None:
        variant = variant if variant is not model else copy.deepcopy(model)  # never train the caller's model
        healing = heal(variant, tokenizer, measurement.healing, checkpoint=healing_checkpoint,
                       deadline=deadline if healing_checkpoint is not None else None, log=log)
        if not healing["complete"]:
            return None
    rows = slice(0, measurement.n_blocks)
    sharing = (prefix.attached(variant) if prefix is not None and reuses_prefix(measurement, prefix.depth)
               else contextlib.nullcontext())
    with sharing:
        nll, tokens, correct = _measure_variant(variant, tokenizer, measurement, held_out, task_examples, rows,
                                                batch_size, known_nll, shared_context)
    parameter = next(model.parameters())
    record = {"nll": nll.tolist(), "tokens": tokens.tolist(), "correct": correct,
              "seconds": time.perf_counter() - start, "device": str(parameter.device), "dtype": str(parameter.dtype)}
    return record if healing is None else {**record, "healing": healing}


def _measure_variant(variant, tokenizer, measurement, held_out, task_examples, rows, batch_size, known_nll,
                     shared_context):
    if known_nll is not None:
        if len(known_nll["nll"]) != measurement.n_blocks:
            raise ValueError(f"known_nll has {len(known_nll['nll'])} blocks; the measurement needs {measurement.n_blocks}")
        nll, tokens = np.asarray(known_nll["nll"]), np.asarray(known_nll["tokens"])
    else:
        nll, tokens = block_nll(variant, held_out["input_ids"][rows], held_out["attention_mask"][rows], batch_size)
    correct = {}
    if measurement.tasks:
        for task, examples in task_examples.items():
            logliks = loglikelihoods(variant, encode_examples(tokenizer, examples), batch_size,
                                     shared_context=shared_context)
            correct[task] = {metric: values.astype(int).tolist()
                             for metric, values in item_correct(examples, logliks.tolist()).items()}
    return nll, tokens, correct


def reuses_prefix(measurement: Measurement, depth: int) -> bool:
    """Whether ``measurement``'s model computes the dense model's first ``depth`` layers: its own
    weights (not quantised, not healed) and no layer removed below ``depth``."""
    return (measurement.bits is None and measurement.healing is None
            and all(layer >= depth for layer in measurement.removed))


def shared_prefix_depth(measurements: Sequence[Measurement], num_layers: int) -> int:
    """The number of first layers whose outputs, computed once, spare the most layer passes over
    ``measurements``: ``d × (measurements that reuse d layers − 1)`` at its largest (the first
    computes them), 0 when no two measurements share a layer. A measurement must keep at least
    one layer after the shared ones."""
    def reach(m: Measurement) -> int:
        if m.bits is not None or m.healing is not None:
            return 0
        return min(min(m.removed, default=num_layers), num_layers - len(m.removed) - 1)

    return best_depth([reach(m) for m in measurements])


def collect(model: nn.Module, tokenizer, settings: Sequence[Setting], store: EvidenceStore,
            held_out: Mapping[str, torch.Tensor], task_examples: Mapping[str, Sequence[MCExample]],
            batch_size: int = 8, log=print, share_prefix: bool = True,
            deadline: float | None = None) -> dict[Measurement, dict]:
    """The record of every distinct measurement of ``settings``: read from ``store`` where it is
    there and current, otherwise measured and stored at once (so an interrupted run resumes
    from the last finished measurement). ``log`` (None: silent) reports each measurement.
    After ``deadline`` (a ``time.monotonic()`` value) nothing new is measured (stored records are
    still read), and a healing in progress stops with its progress beside the store: the records
    returned are those finished; the settings of the others are missing from it.

    With ``share_prefix``, the measurements still to make that leave the dense model's first
    layers as they are compute those layers once per batch (``PrefixCache`` at
    ``shared_prefix_depth``; the same numbers, fewer layer passes), at the cost of holding their
    output for every held-out and question batch in memory."""
    distinct = list(dict.fromkeys(setting.measurement for setting in settings))
    missing = [m for m in distinct if store.get(m) is None]
    depth = shared_prefix_depth(missing, model_parts(model).num_layers) if share_prefix else 0
    prefix = PrefixCache(depth) if depth else None
    if prefix is not None and log is not None:
        log(f"{sum(reuses_prefix(m, depth) for m in missing)} of the {len(missing)} measurements to make share "
            f"the dense model's first {depth} layers: computed once per batch")
    # the measurements that share the prefix first, so that it is filled and freed early
    if prefix is not None:
        distinct = sorted(distinct, key=lambda m: not reuses_prefix(m, depth))
    records, left = {}, 0
    for index, measurement in enumerate(distinct, 1):
        record = store.get(measurement)
        if record is None and (left or (deadline is not None and time.monotonic() > deadline)):
            left += 1  # time is up: only stored records are read from here on
            continue
        if record is None:
            # a layer set first measured without questions keeps its block NLLs: only the questions are new
            known = (store.get(dataclasses.replace(measurement, tasks=False))
                     if measurement.tasks and measurement.healing is None else None)
            checkpoint = store.healing_checkpoint(measurement) if measurement.healing is not None else None
            measured = measure(model, tokenizer, measurement, held_out, task_examples, batch_size, known_nll=known,
                               prefix=prefix, healing_checkpoint=checkpoint, deadline=deadline, log=log)
            if measured is None:
                if log is not None:
                    log(f"time is up while healing {measurement.name}: its progress is in {checkpoint}")
                left += 1
                continue
            record = store.put(measurement, measured)
            if checkpoint is not None:
                checkpoint.unlink(missing_ok=True)
            if log is not None:
                ppl = math.exp(sum(record["nll"]) / sum(record["tokens"]))
                log(f"[{index}/{len(distinct)}] {measurement.name}: perplexity {ppl:.4g} "
                    f"({record['seconds']:.0f} s)")
        records[measurement] = record
    if left and log is not None:
        log(f"time is up: {left} measurements are left for the next run")
    return records


def nll_arrays(record: Mapping, n_blocks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(NLL per block [n], tokens per block [n]) of a record, its first ``n_blocks`` if given."""
    nll, tokens = np.asarray(record["nll"], dtype=np.float64), np.asarray(record["tokens"], dtype=np.float64)
    if n_blocks is not None:
        if n_blocks > nll.size:
            raise ValueError(f"the record holds {nll.size} blocks, {n_blocks} asked for")
        nll, tokens = nll[:n_blocks], tokens[:n_blocks]
    return nll, tokens


def pooled_correct(record: Mapping, tasks: Sequence[str], metric: str = "acc") -> np.ndarray:
    """Per-question correctness [Σ items] of ``tasks`` concatenated in order (for a pooled
    accuracy and for paired differences between two settings on the same questions)."""
    missing = [task for task in tasks if task not in record["correct"]]
    if missing:
        raise ValueError(f"the record has no questions of {missing}; it was measured without tasks")
    return np.concatenate([np.asarray(record["correct"][task][metric], dtype=np.float64) for task in tasks])


def perplexity_with_ratio(record: Mapping, dense_record: Mapping, n_blocks: int | None = None,
                          seed: int = 0) -> tuple[Interval, Interval]:
    """(perplexity, perplexity ÷ the dense model's) of a setting on its held-out blocks (or the
    first ``n_blocks``), each with a 95 % interval from a bootstrap over blocks; the ratio is
    paired (the dense model's NLL on the same blocks), above 1 meaning worse than dense."""
    nll, tokens = nll_arrays(record, n_blocks)
    dense_nll, dense_tokens = nll_arrays(dense_record, nll.size)
    if not np.array_equal(tokens, dense_tokens):
        raise ValueError("the setting and the dense model were not measured on the same blocks")
    return (perplexity_interval(nll, tokens, seed=seed),
            paired_perplexity_ratio(nll, dense_nll, tokens, seed=seed))


def random_versus(reference_nll: np.ndarray, random_records: Sequence[Mapping], tokens: np.ndarray
                  ) -> dict[str, float | Interval]:
    """How a ranking's removal (block NLLs ``reference_nll`` [n] on ``tokens`` [n]) compares with
    seeded random removals of the same number of layers on the same blocks: the random
    perplexities' median and 2.5–97.5 % range over draws, and the share of draws with a higher
    perplexity than the reference, with its Wilson interval (above 0.5: the ranking beats a
    random choice more often than not)."""
    if not random_records:
        raise ValueError("no random draw given")
    reference = math.exp(reference_nll.sum() / tokens.sum())
    perplexities = np.array([math.exp(nll_arrays(r, tokens.size)[0].sum() / tokens.sum())
                             for r in random_records])
    worse = int((perplexities > reference).sum())
    return {"reference": reference, "median": float(np.median(perplexities)),
            "low": float(np.quantile(perplexities, 0.025)), "high": float(np.quantile(perplexities, 0.975)),
            "draws": len(perplexities), "share_worse": wilson_interval(worse, len(perplexities))}


def quantisation_interaction(dense: Mapping, dense_q: Mapping, pruned: Mapping, pruned_q: Mapping,
                             seed: int = 0) -> dict[str, Interval]:
    """The 2 × 2 design on held-out NLL (nats per token, bootstrap over blocks resampled jointly
    for all four cells): the cost of quantising the dense model, of quantising the pruned one,
    of removing the layers, of both together, and the interaction (cost of quantising the pruned
    model − cost of quantising the dense one; 0 when the two compressions add exactly)."""
    cells = [nll_arrays(record) for record in (dense, dense_q, pruned, pruned_q)]
    tokens = cells[0][1]
    if any(not np.array_equal(t, tokens) for _, t in cells):
        raise ValueError("the four cells were not measured on the same blocks")
    d, dq, p, pq = (nll for nll, _ in cells)
    contrasts = {"quantise dense": dq - d, "quantise pruned": pq - p, "remove layers": p - d,
                 "remove and quantise": pq - d, "interaction": (pq - p) - (dq - d)}
    return {name: ratio_interval(values, tokens, seed=seed, method=f"paired bootstrap over {tokens.size} blocks")
            for name, values in contrasts.items()}


def accuracy_interaction(dense: np.ndarray, dense_q: np.ndarray, pruned: np.ndarray, pruned_q: np.ndarray,
                         seed: int = 0) -> dict[str, Interval]:
    """The 2 × 2 design on per-question correctness [n] (the same questions in all four cells):
    accuracy changes with paired bootstrap intervals, and the interaction
    (change from quantising the pruned model − change from quantising the dense one)."""
    contrasts = {"quantise dense": dense_q - dense, "quantise pruned": pruned_q - pruned,
                 "remove layers": pruned - dense, "remove and quantise": pruned_q - dense,
                 "interaction": (pruned_q - pruned) - (dense_q - dense)}
    return {name: bootstrap_interval(values, seed=seed) for name, values in contrasts.items()}


def model_free_baselines(examples: Sequence[MCExample]) -> dict[str, np.ndarray]:
    """What a rule that never runs a model scores on each question [n], beside a model's accuracy:
    "chance" (1 / number of choices, the expected score of a uniform guess), "shortest answer"
    and "longest answer" (the choice with the fewest / most characters; a tie scores the share of
    tied choices that is gold). Log-likelihood scoring without length normalisation leans
    towards short answers, so "shortest answer" is the prior it could be mistaken for."""
    if not examples:
        raise ValueError("no questions given")

    def pick(example: MCExample, best: int) -> float:
        lengths = [len(choice) for choice in example.choices]
        tied = [i for i, length in enumerate(lengths) if length == best(lengths)]
        return float(example.gold in tied) / len(tied)

    return {"chance": np.array([1 / len(e.choices) for e in examples]),
            "shortest answer": np.array([pick(e, min) for e in examples]),
            "longest answer": np.array([pick(e, max) for e in examples])}


def accuracy_beside_rules(correct: Sequence[float] | np.ndarray, examples: Sequence[MCExample], *, margin: float,
                          seed: int = 0) -> dict:
    """A model's per-question correctness [n] on ``examples`` judged against the strongest rule
    that needs no model (``model_free_baselines``): {"accuracy": Wilson interval, "rules": {name:
    mean score}, "rule": the strongest, "rule_score", "difference": paired interval of model −
    rule, "verdict": "above the strongest rule by more than ``margin``"}."""
    correct = np.asarray(correct, dtype=np.float64)
    if correct.shape != (len(examples),):
        raise ValueError(f"one correctness value per question: {correct.shape} vs {len(examples)} questions")
    rules = model_free_baselines(examples)
    judged = above_strongest_rule(correct, rules, margin=margin, seed=seed)
    return {"accuracy": wilson_interval(int(correct.sum()), correct.size),
            "rules": {name: float(values.mean()) for name, values in rules.items()}, **judged}


def ranking_after_healing(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray], *, margin: float,
                          seed: int = 0) -> dict:
    """Does the criterion whose removal scored best before healing still score best after it?

    ``before``: {criterion: per-item scores [n]} (higher is better: per-question correctness, or a
    block's mean log-likelihood per token), ``after``: {criterion: [healing seeds, n]} on the same
    items. Returns {"best_before", "best_after" (by mean), "against": {other criterion: the
    crossed-bootstrap interval (seeds and items) of best-before's healed score minus the other's},
    "before_against": {other: the same difference before healing (paired over items), which says
    whether best-before led clearly in the first place},
    "verdicts": {other: "better by more than ``margin``"}, "outcome"}: supported when it beats
    every other healed criterion by more than the margin, contradicted when the claimed margin is
    ruled out against any, the same within the margin where healing ties them."""
    if set(before) != set(after) or len(before) < 2:
        raise ValueError(f"the same two or more criteria before and after healing, got {sorted(before)} and "
                         f"{sorted(after)}")
    best_before = max(before, key=lambda name: float(np.mean(before[name])))
    best_after = max(after, key=lambda name: float(np.mean(after[name])))
    against, verdicts, before_against = {}, {}, {}
    for name in after:
        if name == best_before:
            continue
        before_against[name] = crossed_bootstrap_interval(
            np.atleast_2d(np.asarray(before[best_before], dtype=np.float64) - np.asarray(before[name], dtype=np.float64)),
            seed=seed)
        ours, theirs = np.atleast_2d(after[best_before]), np.atleast_2d(after[name])
        if ours.shape[1] != theirs.shape[1]:
            raise ValueError(f"{best_before} and {name} were healed and scored on different items")
        seeds = min(ours.shape[0], theirs.shape[0])  # independent healings, paired by seed index
        against[name] = crossed_bootstrap_interval(ours[:seeds] - theirs[:seeds], seed=seed)
        verdicts[name] = verdict(against[name], 0.0, margin=margin)
    return {"best_before": best_before, "best_after": best_after, "against": against,
            "before_against": before_against, "verdicts": verdicts,
            "outcome": family_outcome(verdicts.values(), tie_holds=False)}


def healed_records(settings: Sequence[Setting], evidence: Mapping[Measurement, Mapping]) -> dict[str, dict[int, Mapping]]:
    """{ranking: {healing seed: record}} of the healed settings ("dense": the healed control)
    whose records ``evidence`` holds."""
    rows: dict[str, dict[int, Mapping]] = {}
    for setting in settings:
        healing = setting.measurement.healing
        if healing is not None and setting.measurement in evidence:
            rows.setdefault(setting.ranking, {})[healing.seed] = evidence[setting.measurement]
    return rows


def one_healing_per_removal(after: Mapping[str, Mapping[int, Mapping]], removed: Mapping[str, Sequence[int]]
                            ) -> tuple[dict[str, Mapping[int, Mapping]], dict[str, str]]:
    """Criteria that remove the same layers share one healing (the store measures a removal
    once), and comparing them would set a removal against itself: keep the first criterion of
    each removal in ``after``'s order (``healed_records``; "dense", the control, always).
    ``removed``: {criterion: the layers it removes}. Returns (the kept part of ``after``,
    {each dropped criterion: the kept criterion with the same layers})."""
    kept: dict[str, Mapping[int, Mapping]] = {}
    twins: dict[str, str] = {}
    for criterion, by_seed in after.items():
        twin = next((other for other in kept if other != "dense" and criterion != "dense"
                     and sorted(removed[other]) == sorted(removed[criterion])), None)
        if twin is None:
            kept[criterion] = by_seed
        else:
            twins[criterion] = twin
    return kept, twins


def healing_comparison(before: Mapping[str, Mapping], after: Mapping[str, Mapping[int, Mapping]], dense: Mapping,
                       tasks: Sequence[str], metric: str = "acc", rule: np.ndarray | None = None, *,
                       acc_margin: float, nll_margin: float, seed: int = 0) -> dict:
    """What healing changed, per criterion, from records: ``before`` {criterion: the pruned
    record}, ``after`` {criterion: {healing seed: its healed record}} (``healed_records``; only
    the seeds every criterion has are used, so that the criteria pair seed by seed, each seed the
    same data order), the ``dense`` record, and
    per-question scores of the strongest rule that needs no model (``rule``, pooled over ``tasks``).

    Returns {"rows": one dict per criterion (perplexity ÷ dense before and after healing, pooled
    accuracy before and after, the share of the loss recovered in accuracy above the rule and in
    held-out log-likelihood per token, and the latter against the healed dense control's, which
    the same training improves too), "accuracy" and "perplexity": ``ranking_after_healing`` of
    the criteria on pooled accuracy (margin ``acc_margin``) and on each block's mean
    log-likelihood per token (margin ``nll_margin`` nats)}. The healed dense model, when in
    ``after`` as "dense", is the control: its row says what training on the calibration text
    does by itself."""
    dense_nll, tokens = nll_arrays(dense)
    dense_acc = pooled_correct(dense, tasks, metric) if tasks else None
    seeds = sorted(set.intersection(*(set(by_seed) for by_seed in after.values()))) if after else []
    if after and not seeds:
        raise ValueError(f"no healing seed is common to every criterion: {({c: sorted(s) for c, s in after.items()})}")
    rows, acc_before, acc_after, ll_before, ll_after = [], {}, {}, {}, {}
    # the healed control: training on the calibration text alone also lowers the dense model's
    # perplexity, so a share of the gap to it says what healing repairs beyond that
    control_nll = (np.stack([nll_arrays(after["dense"][seed], tokens.size)[0] for seed in seeds]).mean(0)
                   if "dense" in after else None)
    for criterion, by_seed in after.items():
        healed = [by_seed[seed] for seed in seeds]
        healed_nll = np.stack([nll_arrays(record, tokens.size)[0] for record in healed])
        row = {"criterion": criterion, "seeds": seeds,
               "perplexity ÷ dense, healed": paired_perplexity_ratio(healed_nll.mean(0), dense_nll, tokens, seed=seed)}
        if criterion in before:
            pruned_nll = nll_arrays(before[criterion], tokens.size)[0]
            row["perplexity ÷ dense, pruned"] = paired_perplexity_ratio(pruned_nll, dense_nll, tokens, seed=seed)
            row["log-likelihood recovered"] = _recovered_or_none(-dense_nll, -pruned_nll, -healed_nll, None, tokens, seed)
            if control_nll is not None:
                row["log-likelihood recovered, against the healed dense"] = _recovered_or_none(
                    -control_nll, -pruned_nll, -healed_nll, None, tokens, seed)
            ll_before[criterion], ll_after[criterion] = -pruned_nll / tokens, -healed_nll / tokens
        if tasks:
            healed_acc = np.stack([pooled_correct(record, tasks, metric) for record in healed])
            row[f"pooled {metric}, healed"] = crossed_bootstrap_interval(healed_acc, seed=seed)
            if criterion in before:
                pruned_acc = pooled_correct(before[criterion], tasks, metric)
                row[f"pooled {metric}, pruned"] = wilson_interval(int(pruned_acc.sum()), pruned_acc.size)
                row[f"{metric} recovered above the rule"] = _recovered_or_none(dense_acc, pruned_acc, healed_acc, rule,
                                                                               None, seed)
                acc_before[criterion], acc_after[criterion] = pruned_acc, healed_acc
        rows.append(row)
    judged = {}
    for name, (pre, post, margin) in {"accuracy": (acc_before, acc_after, acc_margin),
                                      "perplexity": (ll_before, ll_after, nll_margin)}.items():
        if len(pre) >= 2:
            judged[name] = ranking_after_healing(pre, post, margin=margin, seed=seed)
    return {"rows": rows, **judged}


def _recovered_or_none(dense, pruned, healed, floor, counts, seed) -> Interval | None:
    try:
        return recovered_share_interval(dense, pruned, healed, floor, counts, seed=seed)
    except NothingToRecover:  # nothing was lost: no share to recover
        return None


CONCLUSION_OPENINGS = {SUPPORTED: "Supported", CONTRADICTED: "Contradicted", EQUIVALENT: "The same within the margin",
                       CANNOT_TELL: "Cannot tell at this sample size"}


def conclusion(claim: str, verdict: str, interval: Interval | str) -> str:
    """One sentence for the closing summary, written from a verdict of ``shortlab.stats``
    (``verdict`` / ``equivalence_verdict``) and the interval it was judged from, e.g.
    "Supported: BI beats random removal at k = 8 (95 % interval 0.95 [0.76, 0.99])."."""
    if verdict not in CONCLUSION_OPENINGS:
        raise ValueError(f"unknown verdict {verdict!r}; expected one of {sorted(CONCLUSION_OPENINGS)}")
    return f"{CONCLUSION_OPENINGS[verdict]}: {claim} (95 % interval {interval})."


@dataclass(frozen=True)
class EvidenceConfig:
    """Everything the evidence depends on besides the model: calibration text (BI and the
    rankings), held-out text (perplexity), removal counts, random draws, benchmark questions and
    the quantisation scheme. The script and the notebook build their settings from one of these
    (``prepare``), so they agree on what each stored record is."""

    calib_source: str = "wiki"
    n_calib: int = 16
    calib_seq_len: int = 256
    eval_source: str = "wiki"
    eval_blocks: int = 160
    eval_seq_len: int = 512
    dense_blocks: int | None = 256  # the dense perplexity alone; its first eval_blocks are the paired ones
    rankings: tuple[str, ...] = ("block_influence", "iterative_block_influence", "reverse_order",
                                 "relative_magnitude", "angular_distance")
    max_remove: int = 12
    remove_step: int = 4
    table_fraction: float = 0.25
    baselines_at_table_only: bool = True
    random_draws: int = 20
    random_blocks: int = 8
    tasks: tuple[str, ...] = ("arc_easy", "piqa", "sciq")
    task_limit: int | None = 500
    task_rankings: tuple[str, ...] | None = None  # rankings scored on the tasks at the table's k; None: all
    bits: int = 4
    group_size: int | None = 32
    batch_size: int = 8
    seed: int = 0
    healing: tuple[HealingConfig, ...] = ()  # one recipe per healing seed; () heals nothing
    healing_rankings: tuple[str, ...] = ("block_influence", "reverse_order", "angular_distance", "relative_magnitude")


def healing_configs(seeds: Sequence[int], **recipe) -> tuple[HealingConfig, ...]:
    """One ``HealingConfig`` per seed with the same ``recipe`` (method, steps, …): the
    ``EvidenceConfig.healing`` of a study with several healing seeds."""
    return tuple(HealingConfig(**recipe, seed=seed) for seed in seeds)


@dataclass
class Prepared:
    """What ``prepare`` builds: calibration batches, held-out blocks, questions, the rankings'
    layer choices, the plan and its settings."""

    calibration: list[dict[str, torch.Tensor]]
    held_out: dict[str, torch.Tensor]
    task_examples: dict[str, list[MCExample]]
    choices: dict[str, dict[int, list[int]]]
    plan: EvidencePlan
    settings: list[Setting]


def ranked_choices(model: nn.Module, calibration: Sequence[Mapping[str, torch.Tensor]], rankings: Sequence[str],
                   ks: Sequence[int], seed: int = 0, path: str | Path | None = None,
                   log=lambda line: None) -> dict[str, dict[int, list[int]]]:
    """``{ranking: {k: layers}}`` from ``pruning.rank_layers_for_counts`` on ``calibration``.
    With ``path``, each ranking's choice is read from that JSON file when it was made for the
    same weights, calibration tokens, counts and seed, and written to it (atomically) as soon as
    it is made: iterative BI on a 0.5B model takes minutes on a CPU thread, and a resumed run
    should not repeat it."""
    from shortlab.pruning import rank_layers_for_counts

    key, cached = None, {}
    if path is not None:  # hashing every weight is only worth it when there is a file to match
        path = Path(path)
        tokens = hashlib.sha256(b"".join(batch["input_ids"].cpu().numpy().tobytes()
                                         + batch["attention_mask"].cpu().numpy().tobytes() for batch in calibration))
        key = _digest([model_fingerprint(model, "rankings"), tokens.hexdigest(), sorted(ks), seed])
        stored = json.loads(path.read_text()) if path.is_file() else {}
        cached = stored.get("choices", {}) if stored.get("fingerprint") == key else {}
    choices = {}
    for ranking in rankings:
        if ranking in cached:
            choices[ranking] = {int(k): list(layers) for k, layers in cached[ranking].items()}
            continue
        start = time.perf_counter()
        choices[ranking] = rank_layers_for_counts(ranking, model, calibration, ks, seed=seed)
        log(f"{ranking}: ranked in {time.perf_counter() - start:.0f} s")
        if path is not None:
            cached[ranking] = {str(k): layers for k, layers in choices[ranking].items()}
            write_json_atomically(path, {"fingerprint": key, "choices": cached})
    return choices


def prepare(model: nn.Module, tokenizer, config: EvidenceConfig, rankings_file: str | Path | None = None,
            log=lambda line: None) -> Prepared:
    """Calibration and held-out blocks, questions, every ranking's layers at every removal count,
    and the settings to measure (``plan_settings``). Runs the rankings (BI, iterative BI, …) on
    the calibration blocks, which takes a few forward passes per layer removed for iterative BI;
    ``rankings_file``: keep them there (``ranked_choices``)."""
    from shortlab.data import calibration_batch, iter_batches
    from shortlab.evaluate.likelihood import input_device
    from shortlab.evaluate.tasks import load_task
    from shortlab.pruning import RANKINGS

    unknown = [r for r in config.rankings if r not in RANKINGS or r == "random"]
    if unknown:
        raise ValueError(f"rankings {unknown} are not deterministic rankings of {sorted(RANKINGS)} "
                         "(random draws are planned separately)")
    num_layers = model_parts(model).num_layers
    ks, table_k = removal_counts(num_layers, config.max_remove, config.remove_step, config.table_fraction)
    device = input_device(model)
    blocks = calibration_batch(tokenizer, config.calib_source, config.n_calib, config.calib_seq_len,
                               split="calib", seed=config.seed)
    calibration = [{name: tensor.to(device) for name, tensor in batch.items()}
                   for batch in iter_batches(blocks, config.batch_size)]
    held_out = calibration_batch(tokenizer, config.eval_source, config.eval_blocks, config.eval_seq_len,
                                 split="eval", seed=config.seed)
    task_examples = {task: load_task(task, limit=config.task_limit, seed=config.seed) for task in config.tasks}
    choices = ranked_choices(model, calibration, config.rankings, ks, config.seed, rankings_file, log)
    plan = EvidencePlan(ks=tuple(ks), table_k=table_k, eval_blocks=config.eval_blocks,
                        random_draws=config.random_draws, random_blocks=min(config.random_blocks, config.eval_blocks),
                        baseline_ks=(table_k,) if config.baselines_at_table_only else None,
                        task_rankings=(config.rankings if config.task_rankings is None else config.task_rankings)
                        if config.tasks else (),
                        bits=config.bits, group_size=config.group_size, seed=config.seed,
                        healing=config.healing,
                        healing_rankings=tuple(r for r in config.healing_rankings if r in config.rankings)
                        if config.healing else ())
    return Prepared(calibration, held_out, task_examples, choices, plan,
                    plan_settings(choices, plan, num_layers))


def open_store(directory: str | Path | None, model: nn.Module, model_name: str, prepared: Prepared,
               dtype: str) -> EvidenceStore:
    """The store for ``model`` (named ``model_name``, computing in ``dtype``) and ``prepared``'s
    held-out blocks and questions."""
    return EvidenceStore(directory, model_fingerprint(model, f"{model_name}/{dtype}"),
                         data_fingerprint(prepared.held_out["input_ids"], prepared.held_out["attention_mask"],
                                          prepared.task_examples))


def dense_precision(model: nn.Module, tokenizer, config: EvidenceConfig, store: EvidenceStore,
                    log=lambda line: None) -> dict:
    """The dense model's record on ``config.dense_blocks`` held-out blocks (None: ``eval_blocks``),
    for its own perplexity's interval. Every comparison is paired on the first ``eval_blocks``
    blocks, where a ratio's interval is narrow; the absolute perplexity varies more from block
    to block and needs more of them (±3 % at the defaults). The blocks beyond ``eval_blocks``
    continue the same held-out text (``token_blocks`` packs in one order). Read from or written
    to ``store``'s folder under its own data fingerprint, for ``store``'s model."""
    from shortlab.data import calibration_batch

    n_blocks = config.eval_blocks if config.dense_blocks is None else config.dense_blocks
    if n_blocks < config.eval_blocks:
        raise ValueError(f"dense_blocks = {n_blocks} must be at least eval_blocks = {config.eval_blocks}: "
                         "the paired comparisons use the first eval_blocks of them")
    held_out = calibration_batch(tokenizer, config.eval_source, n_blocks, config.eval_seq_len, split="eval",
                                 seed=config.seed)
    wider = EvidenceStore(store.directory, store.model_fp,
                          data_fingerprint(held_out["input_ids"], held_out["attention_mask"], {}))
    records = collect(model, tokenizer, [Setting("dense", 0, Measurement((), None, None, n_blocks, False))], wider,
                      held_out, {}, config.batch_size, log)
    return next(iter(records.values()))


def default_results_dir(model_name: str, root: str | Path | None = None) -> Path:
    """``<repository>/results/shortgpt/<model name with / replaced by __>`` (``root``: another
    results folder)."""
    if root is None:
        root = Path(__file__).resolve().parent.parent / "results"
    return Path(root) / "shortgpt" / model_name.replace("/", "__")
