"""The command line, ``python -m shortlab <command>``:

* ``prune MODEL --remove N`` (or ``--layers 3,12,13``): rank the decoder layers on calibration
  text, delete them and save a checkpoint that plain ``transformers`` loads, with what was
  removed and why recorded in its config (``shortlab_pruning``) and model card (README.md);
* ``heal MODEL --output DIR``: a short recovery training of a (pruned) model on calibration text
  (a LoRA adapter merged into the weights, or the last layers and the LM head), saved so that
  plain ``transformers`` loads it, with the healing recorded beside the removal record
  (``shortlab_healing``, model card);
* ``rope-bound``: the RoPE bound of Men et al. (2024), the smallest base for a context, the
  longest context for a base, or every RoPE variant of a model's config;
* ``shortv-layers MODEL --frozen N``: the N layers of a LLaVA model in which ShortV freezes the
  visual tokens (lowest mean visual-token Layer Contribution on easy-VQA questions).

``main(argv)`` returns the exit status: 0 on success, 2 with a one-line message on stderr for
bad input (unknown metric, layer index out of range, output folder in the way, ...), 3 when
``heal`` stopped at ``--max-minutes`` with its progress saved (run it again to continue).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

USAGE_ERROR = 2  # argparse's exit status for bad command-line input
STOPPED_EARLY = 3  # heal saved its progress at --max-minutes; the same command continues it
MANUAL = "manual"  # the metric recorded when --layers names the layers

# What each ranking's score means and why the removed layers were chosen (model card, summary).
METRIC_NOTES = {
    "block_influence": (
        "Block Influence (ShortGPT, Men et al. 2024): 1 − mean cosine similarity between a "
        "layer's input and output hidden states over the calibration tokens. The layers with "
        "the lowest score change their input least and were removed."
    ),
    "iterative_block_influence": (
        "Block Influence recomputed after each removal: the layer with the lowest BI was "
        "removed, BI was measured again on the pruned model, and so on. A layer's score is "
        "its BI at the step it was removed."
    ),
    "relative_magnitude": (
        "Relative magnitude (ShortGPT's ablation): mean over tokens of ‖f(x)‖ / ‖x + f(x)‖, "
        "f(x) the layer's update. The layers with the lowest score were removed."
    ),
    "angular_distance": (
        "Angular distance (Gromov et al. 2024): arccos(cos(x_l, x_l+n)) / π at each sequence's "
        "last token, between the input of layer l and the output of layer l + n − 1. The block "
        "of n consecutive layers with the smallest distance was removed; the scores are per "
        "block start l."
    ),
    "reverse_order": "Reverse order (ShortGPT's baseline): the deepest layers were removed. No score.",
    "random": "A seeded uniformly random choice (a baseline). No score.",
    MANUAL: "The layers were named by the user (--layers).",
}
SCORE_METRICS = ("block_influence", "relative_magnitude")  # one score per layer, no choice made


class UsageError(Exception):
    """Bad command-line input; ``main`` prints its message on one line and returns 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage and exit itself
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------- shared helpers


def shortlab_version() -> str:
    from shortlab import __version__

    return __version__


def _load(name: str, dtype: str | None, device: str | None, trust_remote_code: bool):
    from shortlab.models import load_model

    return load_model(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def _tokenizer_of(tokenizer_or_processor):
    return getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _progress(total: int, description: str, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit=unit, file=sys.stderr, leave=False)


class ProgressBatches(Sequence):
    """A re-iterable sequence of batches that advances a progress bar by one per batch yielded,
    so a ranking's forward passes show up as they happen."""

    def __init__(self, batches: Sequence[Mapping[str, torch.Tensor]], bar):
        self._batches = batches
        self._bar = bar

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, index):
        return self._batches[index]

    def __iter__(self) -> Iterator[Mapping[str, torch.Tensor]]:
        return advancing(self._batches, self._bar)


def advancing(batches: Iterable[Mapping[str, torch.Tensor]], bar
              ) -> Iterator[Mapping[str, torch.Tensor]]:
    """Yield ``batches``, advancing ``bar`` by one after each has been used."""
    for batch in batches:
        yield batch
        bar.update(1)


# ---------------------------------------------------------------- prune: choosing layers


@dataclass(frozen=True)
class LayerChoice:
    """Which decoder layers a metric removes and the scores behind the choice.

    ``removed``: original layer indices in the order the metric picked them. ``scores``: the
    metric's value per layer (per block start for angular distance; for iterative BI, each
    removed layer's BI when it was removed; empty for metrics without a score)."""

    metric: str
    removed: list[int]
    scores: dict[int, float]


def calibration_passes(metric: str, n_remove: int) -> int:
    """How many times ``choose_layers`` runs the calibration batches through the model."""
    if metric in ("reverse_order", "random", MANUAL):
        return 0
    return n_remove if metric == "iterative_block_influence" else 1


def score_layers(model: nn.Module, batches, metric: str) -> dict[int, float]:
    """Block Influence or relative magnitude of every layer: {layer: score}."""
    from shortlab.metrics import block_influence
    from shortlab.pruning import relative_magnitude

    if metric == "block_influence":
        return block_influence(model, batches)
    if metric == "relative_magnitude":
        return relative_magnitude(model, batches)
    raise ValueError(f"metric {metric!r} gives no per-layer score; scoring metrics: "
                     f"{', '.join(SCORE_METRICS)}")


def choose_layers(model: nn.Module, batches, metric: str, n_remove: int, seed: int = 0
                  ) -> LayerChoice:
    """The ``n_remove`` layers ``pruning.rank_layers(metric, ...)`` removes, with the scores
    behind the choice. ``batches``: a re-iterable sequence of calibration inputs (ignored by
    reverse_order and random). The model is not modified."""
    from shortlab.pruning import (
        RANKINGS, _check_n_remove, angular_distances, iterative_block_influence, lowest_layers,
        rank_layers,
    )

    if metric not in RANKINGS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(sorted(RANKINGS))}")
    _check_n_remove(model, n_remove)
    if metric in SCORE_METRICS:
        scores = score_layers(model, batches, metric)
        return LayerChoice(metric, lowest_layers(scores, n_remove), scores)
    if metric == "iterative_block_influence":
        return LayerChoice(metric, *iterative_block_influence(model, batches, n_remove))
    if metric == "angular_distance":
        distances = angular_distances(model, batches, n_remove)
        (start,) = lowest_layers(distances, 1)
        return LayerChoice(metric, list(range(start, start + n_remove)), distances)
    return LayerChoice(metric, rank_layers(metric, model, batches, n_remove, seed), {})


# ---------------------------------------------------------------- prune: writing the checkpoint


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder unless ``overwrite``."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"output {str(path)!r} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"output folder {str(path)!r} exists and is not empty; pass --overwrite "
                         f"to replace it")


def write_directory_atomically(final: Path, write: Callable[[Path], None],
                               overwrite: bool = False) -> Path:
    """Run ``write(tmp)`` on a fresh folder beside ``final``, then rename it to ``final``.

    A reader never sees a half-written ``final``; if ``write`` fails, ``final`` (if any) is
    untouched and the temporary folder removed. An existing non-empty ``final`` is replaced only
    with ``overwrite`` (moved aside, then deleted once the new folder is in place)."""
    final = Path(final)
    check_output_dir(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()  # not mkdtemp: its 0o700 mode would end up on the published folder
    try:
        write(tmp)
        check_output_dir(final, overwrite)  # something may have appeared while writing
        if final.is_dir() and any(final.iterdir()):
            aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, aside / final.name)
            try:
                os.replace(tmp, final)
            except OSError:
                os.replace(aside / final.name, final)
                raise
            finally:
                shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)  # POSIX replaces an empty folder atomically
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def pruning_record(source: str, num_layers: int, choice: LayerChoice,
                   calibration: dict[str, Any] | None, seed: int, dtype: torch.dtype
                   ) -> dict[str, Any]:
    """The ``shortlab_pruning`` entry of the saved config (JSON-ready; layer keys as strings)."""
    removed = set(choice.removed)
    return {
        "shortlab_version": shortlab_version(),
        "source_model": source,
        "source_num_layers": num_layers,
        "metric": choice.metric,
        "metric_note": METRIC_NOTES[choice.metric],
        "removed_layers": list(choice.removed),
        "removed_scores": [choice.scores.get(i) for i in choice.removed]
        if choice.metric != "angular_distance" else None,
        "kept_layers": [i for i in range(num_layers) if i not in removed],
        "scores": {str(key): value for key, value in sorted(choice.scores.items())},
        "calibration": calibration,
        "seed": seed,
        "dtype": str(dtype).removeprefix("torch."),
    }


def healing_card_lines(healing: Mapping[str, Any]) -> list[str]:
    """The "Healing" section of a model card: what was trained, on what, for how long."""
    if healing["method"] == "lora":
        what = (f"a LoRA adapter (rank {healing['lora_rank']}, alpha {healing['lora_alpha']:g}) on every linear "
                f"layer of the decoder layers, then merged into the weights")
    else:
        what = (f"the last {healing['last_layers']} decoder layers, the final norm and the LM head, everything "
                f"else frozen" + (" (the LM head was untied from the input embeddings first)"
                                   if healing["untied_lm_head"] else ""))
    curve = healing["losses"][::max(1, len(healing["losses"]) // 10)]
    return [
        "## Healing",
        "",
        (f"Healed by `python -m shortlab heal` (shortlab {healing['shortlab_version']}): {what}. "
         f"{healing['steps']} steps of {healing['batch_size']} blocks of {healing['block_size']} tokens "
         f"({healing['tokens']:,} tokens) from the calibration split of the `{healing['source']}` text source, "
         f"seed {healing['seed']}; AdamW at {healing['lr']:g} ({healing['warmup']} warm-up steps, cosine decay), "
         f"{healing['compute_dtype']} passes; "
         f"{healing['trainable_parameters']:,} trainable parameters; {healing['seconds']:.0f} s."),
        "",
        f"Training loss: {healing['first_loss']:.4f} at the first step, {healing['final_loss']:.4f} over the "
        f"last ten (every tenth step: {', '.join(f'{x:.3f}' for x in curve)}). "
        "The full record is `config.shortlab_healing`.",
    ]


def model_card(record: Mapping[str, Any], load_path: str, auto_class: str,
               healing: Mapping[str, Any] | None = None) -> str:
    """README.md of a pruned checkpoint: what was removed, why, how to load it, the scores, and
    how it was healed afterwards (``healing``, the ``shortlab.healing.heal`` record)."""
    removed = sorted(record["removed_layers"])
    kept = len(record["kept_layers"])
    calibration = record["calibration"]
    if calibration is None:
        calibration_line = "No calibration data was used."
    else:
        calibration_line = (
            f"Calibration: {calibration['blocks']} blocks of {calibration['block_size']} tokens "
            f"from the `{calibration['source']}` text source (split `{calibration['split']}`, "
            f"seed {calibration['seed']}), {calibration['batch_size']} blocks per forward pass."
        )
    lines = [
        "---",
        "library_name: transformers",
        "tags: [shortlab, layer-pruning]",
        "---",
        "",
        (f"# `{record['source_model']}` with {len(removed)} of {record['source_num_layers']} "
         f"decoder layers removed"),
        "",
        (f"Pruned by `python -m shortlab prune` (shortlab {record['shortlab_version']}). "
         f"Decoder layers **{', '.join(map(str, removed))}** (original 0-based indices) were "
         f"deleted; {kept} layers remain" + ("; the pruned model was then healed (below)." if healing else
                                              ", no weights were changed and nothing was fine-tuned.")),
        "",
        "## Why these layers",
        "",
        f"Metric `{record['metric']}`: {record['metric_note']}",
        "",
        calibration_line,
        "",
        "## Load",
        "",
        "```python",
        f"from transformers import {auto_class}, AutoTokenizer",
        "",
        f'model = {auto_class}.from_pretrained("{load_path}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{load_path}")',
        'print(model.config.shortlab_pruning["removed_layers"])  # this record, in config.json',
        "```",
        "",
        "Layer i of this model is original layer `kept_layers[i]` of `config.shortlab_pruning`.",
    ]
    if record["scores"]:
        label = "block start" if record["metric"] == "angular_distance" else "layer"
        if record["metric"] == "angular_distance":
            chosen = {str(removed[0])}
        else:
            chosen = {str(i) for i in removed}
        lines += ["", "## Scores", "", f"| {label} | score | removed |", "|---:|---:|:---:|"]
        lines += [f"| {key} | {value:.6g} | {'yes' if key in chosen else ''} |"
                  for key, value in record["scores"].items()]
    if healing:
        lines += ["", *healing_card_lines(healing)]
    return "\n".join(lines) + "\n"


def healed_model_card(healing: Mapping[str, Any], source: str, load_path: str, auto_class: str) -> str:
    """README.md of a healed checkpoint that had no layers removed by shortlab."""
    lines = ["---", "library_name: transformers", "tags: [shortlab, healing]", "---", "",
             f"# `{source}`, healed", "", *healing_card_lines(healing), "", "## Load", "", "```python",
             f"from transformers import {auto_class}, AutoTokenizer", "",
             f'model = {auto_class}.from_pretrained("{load_path}")',
             f'tokenizer = AutoTokenizer.from_pretrained("{load_path}")', "```"]
    return "\n".join(lines) + "\n"


def save_pruned(model: nn.Module, tokenizer, output: Path, record: Mapping[str, Any] | None,
                overwrite: bool = False, healing: Mapping[str, Any] | None = None,
                source: str = "") -> Path:
    """Set ``model.config.shortlab_pruning = record`` (and ``shortlab_healing = healing``, less
    its per-step losses, which the card summarises) and save the model, its tokenizer (or
    processor) and a model card atomically into ``output`` (``write_directory_atomically``).
    ``record`` None: a healed model shortlab did not prune (``source`` names it in the card)."""
    from shortlab.models import _is_multimodal

    auto_class = ("AutoModelForImageTextToText" if _is_multimodal(model.config)
                  else "AutoModelForCausalLM")
    if record is not None:
        model.config.shortlab_pruning = dict(record)
        card = model_card(record, str(output), auto_class, healing)
    else:
        card = healed_model_card(healing, source, str(output), auto_class)
    if healing is not None:
        earlier = getattr(model.config, "shortlab_healing", None)  # a healed model healed again keeps the history
        model.config.shortlab_healing = {**{key: value for key, value in healing.items() if key != "losses"},
                                         **({"previous": earlier} if earlier else {})}

    def write(folder: Path) -> None:
        with _progress(3, "saving", "step") as bar:
            model.save_pretrained(folder)
            bar.update(1)
            tokenizer.save_pretrained(folder)
            bar.update(1)
            (folder / "README.md").write_text(card, encoding="utf-8")
            bar.update(1)

    return write_directory_atomically(output, write, overwrite)


def _parse_layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--layers {text!r}: give comma-separated layer indices, e.g. 3,12,13"
                         ) from None


def _calibration(tokenizer, args) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    from shortlab.data import calibration_batch, iter_batches

    if args.blocks < 1 or args.block_size < 2:
        raise UsageError(f"empty calibration set: --blocks {args.blocks} --block-size "
                         f"{args.block_size} (need at least 1 block of 2 tokens)")
    batch = calibration_batch(tokenizer, args.calibration, args.blocks, args.block_size,
                              seed=args.seed)
    batches = list(iter_batches(batch, args.batch_size))
    settings = {"source": args.calibration, "split": "calib", "blocks": args.blocks,
                "block_size": args.block_size, "batch_size": args.batch_size, "seed": args.seed,
                "mode": "pack"}
    return batches, settings


def run_prune(args) -> int:
    from shortlab.arch import model_parts, validate_layer_indices
    from shortlab.pruning import RANKINGS, remove_layers

    metrics = sorted(RANKINGS)
    metric = args.metric
    if metric is not None and metric not in RANKINGS:
        raise UsageError(f"unknown metric {metric!r}; choose one of {', '.join(metrics)}")
    if args.layers is not None and metric not in (None, *SCORE_METRICS):
        raise UsageError(f"--metric {metric} chooses layers itself; with --layers only a scoring "
                         f"metric ({', '.join(SCORE_METRICS)}) can be given, to record scores")
    if args.remove is not None and args.remove < 1:
        raise UsageError(f"--remove {args.remove}: remove at least one layer")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be at least 1")
    wanted = None if args.layers is None else _parse_layers(args.layers)
    output = Path(args.output)
    check_output_dir(output, args.overwrite)  # before the (slow) work, and again when writing

    model, tokenizer = _load(args.model, args.dtype, args.device, args.trust_remote_code)
    parts = model_parts(model)
    num_layers = parts.num_layers
    if args.remove is not None and args.remove >= num_layers:
        raise UsageError(f"--remove {args.remove}: {args.model} has {num_layers} decoder layers, "
                         f"so at most {num_layers - 1} can be removed")
    if wanted is not None:
        wanted = validate_layer_indices(parts, wanted)
        if len(wanted) == num_layers:
            raise UsageError(f"--layers names all {num_layers} decoder layers; keep at least one")
    choice_metric = MANUAL if wanted is not None else (metric or "block_influence")
    score_metric = metric if wanted is not None else choice_metric
    n_remove = len(wanted) if wanted is not None else args.remove
    passes = 1 if wanted is not None and metric else calibration_passes(choice_metric, n_remove)

    calibration = None
    batches: list[dict[str, torch.Tensor]] = []
    if passes:
        batches, calibration = _calibration(_tokenizer_of(tokenizer), args)
        device = _model_device(model)
        batches = [{name: tensor.to(device) for name, tensor in batch.items()} for batch in batches]
    with _progress(passes * len(batches), "calibration forward passes", "batch") as bar:
        counted = ProgressBatches(batches, bar)
        if wanted is None:
            choice = choose_layers(model, counted, choice_metric, n_remove, args.seed)
        else:
            scores = score_layers(model, counted, score_metric) if metric else {}
            choice = LayerChoice(MANUAL, wanted, scores)
    record = pruning_record(args.model, num_layers, choice, calibration, args.seed, model.dtype)
    if wanted is not None and metric:
        record["score_metric"] = metric
        record["metric_note"] += f" Scores: {METRIC_NOTES[metric]}"
    parameters_before = sum(p.numel() for p in model.parameters())
    remove_layers(model, choice.removed, inplace=True)  # our own copy, loaded above
    parameters_after = sum(p.numel() for p in model.parameters())
    save_pruned(model, tokenizer, output, record, args.overwrite)

    print(f"{args.model}: removed {len(choice.removed)} of {num_layers} decoder layers "
          f"{sorted(choice.removed)} by {choice.metric}"
          + (f" on {calibration['blocks']}×{calibration['block_size']} tokens of "
             f"{calibration['source']}" if calibration else ""))
    if choice.scores:
        removed_scores = ", ".join(f"{i}: {choice.scores[i]:.4g}" for i in choice.removed
                                   if i in choice.scores)
        if removed_scores:
            print(f"scores of the removed layers: {removed_scores}")
    print(f"parameters {parameters_before / 1e6:.1f} M → {parameters_after / 1e6:.1f} M "
          f"({1 - parameters_after / parameters_before:.1%} fewer); saved to {output}")
    return 0


# ---------------------------------------------------------------- heal


def run_heal(args) -> int:
    import time

    from shortlab.healing import HealingConfig, heal

    config = HealingConfig(method=args.method, steps=args.steps, batch_size=args.batch_size,
                           block_size=args.block_size, lr=args.lr, warmup=args.warmup, lora_rank=args.lora_rank,
                           lora_alpha=args.lora_alpha, last_layers=args.last_layers, source=args.calibration,
                           seed=args.seed, compute_dtype=args.compute_dtype)
    if args.max_minutes is not None and args.checkpoint is None:
        raise UsageError("--max-minutes needs --checkpoint (where the progress is kept until the next run)")
    output = Path(args.output)
    check_output_dir(output, args.overwrite)  # before the (slow) work, and again when writing
    model, tokenizer = _load(args.model, args.dtype, args.device, args.trust_remote_code)
    deadline = None if args.max_minutes is None else time.monotonic() + 60 * args.max_minutes
    record = heal(model, _tokenizer_of(tokenizer), config, checkpoint=args.checkpoint, deadline=deadline,
                  log=lambda message: print(message, flush=True))
    if not record["complete"]:
        print(f"stopped after {record['steps_done']} of {config.steps} steps (--max-minutes {args.max_minutes:g}); "
              f"progress saved in {args.checkpoint}: run the same command again to continue")
        return STOPPED_EARLY
    pruning = getattr(model.config, "shortlab_pruning", None)
    save_pruned(model, tokenizer, output, pruning, args.overwrite, healing=record, source=args.model)
    print(f"{args.model}: healed by {config.method} on {config.tokens:,} calibration tokens of {config.source}; "
          f"loss {record['first_loss']:.4f} -> {record['final_loss']:.4f} (mean of the last ten steps) in "
          f"{record['seconds']:.0f} s; saved to {output}")
    return 0


# ---------------------------------------------------------------- rope-bound


def model_rope_config(name: str) -> tuple[Any, str]:
    """RoPE-bearing config of a model and where it came from: a config shipped in
    shortlab/model_configs (the embedded names among them), a tiny/llava-mini model's config, or
    ``AutoConfig`` of a local folder or hub id (offline it reads only the local cache)."""
    from shortlab.models import LLAVA_MINI_MODELS, TINY_MODELS
    from shortlab.rope import shipped_configs

    shipped = shipped_configs()
    if name in shipped:
        return shipped[name], f"shortlab/model_configs/{name}.json ({shipped[name].get('source')})"
    if name in TINY_MODELS or name in LLAVA_MINI_MODELS:
        from shortlab.models import load_model

        return load_model(name)[0].config, f"shortlab model {name}"
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot read the config of {name!r}: not a shipped config "
                         f"({', '.join(shipped)}), a shortlab model, a local folder or a hub id "
                         f"reachable from here ({first_line})") from None
    return config, name


def _read_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except OSError as error:
        raise UsageError(f"--config {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"--config {path}: not valid JSON ({error})") from None


def run_rope_bound(args) -> int:
    from shortlab.rope import context_length, max_context, min_base, rope_report

    modes = [args.context is not None, args.base is not None, args.config is not None,
             args.model is not None]
    if sum(modes) != 1:
        raise UsageError("give exactly one of --context, --base, --config, --model")
    if (args.context is not None or args.base is not None) and args.head_dim is None:
        raise UsageError("--context and --base need --head-dim")
    if (args.config is not None or args.model is not None) and args.head_dim is not None:
        raise UsageError("--head-dim comes from the config with --config / --model; drop it")
    if args.context is not None:
        context = context_length(_int_or_label(args.context), args.k)
        bound = min_base(context, args.head_dim, m_range=args.m_range)
        if args.json:
            print(json.dumps(dataclasses.asdict(bound), indent=2))
            return 0
        below = bound.smallest_bracket[0]
        print(f"context {bound.context} ({bound.m_range}: B(m) >= 0 for every m up to "
              f"{'L' if bound.m_range == 'closed' else 'L - 1'}), head_dim {bound.head_dim}")
        print(f"smallest base: {bound.smallest:.10g}"
              + (f" (fails just below, at {below:.10g})" if below is not None else
                 " (the first base searched)"))
        if bound.stable is None:
            print(f"stable: none (the top of the search, {bound.search_max:.6g}, fails)")
        else:
            print(f"stable from:   {bound.stable:.6g} (every base on the {bound.stable_grid_rtol:g} "
                  f"grid from there up to {bound.search_max:.6g} is valid)")
        print(f"resolution: log grid of relative step {bound.grid_rtol:g} from "
              f"{bound.search_min:g}; islands of valid bases narrower than a step can be missed")
        return 0
    if args.base is not None:
        found = max_context(args.base, args.head_dim, limit=args.limit, m_range=args.m_range)
        if args.json:
            print(json.dumps({"base": args.base, "head_dim": args.head_dim, "m_range": args.m_range,
                              "max_context": found, "limit": args.limit,
                              "at_least": found == args.limit}, indent=2))
            return 0
        bound_text = (f"at least {found} (no negative B(m) up to --limit {args.limit})"
                      if found == args.limit else str(found))
        print(f"base {args.base:g}, head_dim {args.head_dim}: longest context {bound_text} "
              f"({args.m_range})")
        return 0
    if args.config is not None:
        config, origin = _read_config_file(args.config), args.config
    else:
        config, origin = model_rope_config(args.model)
    rows = rope_report({origin: config}, seq_len=args.seq_len, limit=args.limit,
                       m_range=args.m_range)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{origin}: head_dim {rows[0]['head_dim']}, advertised context {rows[0]['advertised']}")
    for row in rows:
        bound = row["bound"]
        bound_text = f">= {bound}" if bound == args.limit else str(bound)
        verdict = "covers" if row["bound_covers_span"] else "does NOT cover"
        print(f"  {row['layer_type']} ({row['num_layers']} layers): base {row['base']:g}, rotary "
              f"dim {row['rotary_dim']}, scaling {row['scaling']}: bound {bound_text}, "
              f"{verdict} its attention span {row['span']}")
    return 0


def _int_or_label(text: str) -> int | str:
    return int(text) if text.isdigit() else text


# ---------------------------------------------------------------- shortv-layers


def vqa_calibration_batches(processor, n_questions: int, batch_size: int, seed: int,
                            device: torch.device | str = "cpu"
                            ) -> Iterator[dict[str, torch.Tensor]]:
    """ShortV's calibration inputs as notebook 02 builds them: ``n_questions`` seeded easy-VQA
    train questions with their images, chat template, ``batch_size`` per padded batch
    (``input_ids`` [batch, seq], ``attention_mask``, ``pixel_values``), built lazily."""
    from shortlab import llava_mini as lm

    items = random.Random(seed).sample(lm.easy_vqa_questions("train"), n_questions)
    for start in range(0, n_questions, batch_size):
        chunk = items[start:start + batch_size]
        images = [lm.easy_vqa_image("train", item.image_id) for item in chunk]
        texts = [lm.chat_text(processor, item.question) for item in chunk]
        batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
        yield {name: tensor.to(device) for name, tensor in batch.items()}


def shortv_layer_choice(model: nn.Module, processor, n_frozen: int, n_questions: int = 40,
                        batch_size: int = 8, seed: int = 0) -> tuple[list[int], dict[int, float]]:
    """ShortV's choice: the ``n_frozen`` layers with the lowest visual-token Layer Contribution
    averaged over ``n_questions`` easy-VQA questions (``mean_layer_contribution``). Returns
    (sorted layer indices, {layer: mean visual LC in nats})."""
    from shortlab.arch import model_parts
    from shortlab.contribution import mean_layer_contribution
    from shortlab.llava_mini import easy_vqa_questions
    from shortlab.pruning import lowest_layers

    num_layers = model_parts(model).num_layers
    if not 1 <= n_frozen <= num_layers:
        raise UsageError(f"--frozen {n_frozen}: the model has {num_layers} decoder layers; choose "
                         f"1..{num_layers}")
    available = len(easy_vqa_questions("train"))
    if not 1 <= n_questions <= available:
        raise UsageError(f"--questions {n_questions}: choose 1..{available} (easy-VQA train)")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be at least 1")
    if getattr(processor, "image_processor", None) is None:
        raise UsageError(f"{type(model).__name__} has no image processor: shortv-layers needs a "
                         f"LLaVA-style vision-language model")
    batches = vqa_calibration_batches(processor, n_questions, batch_size, seed,
                                      _model_device(model))
    n_batches = -(-n_questions // batch_size)
    with _progress(n_batches, "Layer Contribution", "batch") as bar:
        contributions = mean_layer_contribution(model, advancing(batches, bar))
    frozen = sorted(lowest_layers(contributions, n_frozen))
    return frozen, contributions


def run_shortv_layers(args) -> int:
    model, processor = _load(args.model, args.dtype, args.device, args.trust_remote_code)
    frozen, contributions = shortv_layer_choice(model, processor, args.frozen, args.questions,
                                                args.batch_size, args.seed)
    if args.json:
        print(json.dumps({"model": args.model, "questions": args.questions, "seed": args.seed,
                          "frozen_layers": frozen,
                          "visual_layer_contribution": {str(k): v for k, v in
                                                        contributions.items()}}, indent=2))
        return 0
    print(f"{args.model}: mean visual-token Layer Contribution (KL, nats) over {args.questions} "
          f"easy-VQA questions (seed {args.seed})")
    for layer, value in contributions.items():
        print(f"  layer {layer:3d}: {value:.3e}{'  frozen' if layer in frozen else ''}")
    print(f"ShortV freezes the visual tokens in {len(frozen)} layers: {','.join(map(str, frozen))}")
    return 0


# ---------------------------------------------------------------- argument parsing


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default=None,
                        help="float32 (default), bfloat16, float16")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a hub model's own code to run (off unless given)")


def build_parser() -> argparse.ArgumentParser:
    from shortlab.data import SOURCES
    from shortlab.pruning import RANKINGS
    from shortlab.rope import DEFAULT_LIMIT, M_RANGES

    parser = _Parser(prog="python -m shortlab",
                     description="shortlab: prune layers (ShortGPT) and heal the pruned model, choose "
                                 "ShortV's frozen layers, and compute the RoPE base / context bound.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback instead of a one-line error")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    prune = commands.add_parser(
        "prune", help="remove decoder layers and save the smaller model",
        description="Rank the decoder layers on calibration text, delete the chosen ones and save "
                    "a checkpoint that transformers' from_pretrained loads, recording what was "
                    "removed and why (config.json 'shortlab_pruning', README.md).")
    prune.add_argument("model", help="embedded name (smollm2-135m), tiny test model (tiny-llama), "
                                     "local folder or hub id")
    which = prune.add_mutually_exclusive_group(required=True)
    which.add_argument("--remove", type=int, help="number of layers the metric removes")
    which.add_argument("--layers", help="comma-separated original indices to remove, e.g. 3,12,13")
    prune.add_argument("--metric", default=None,
                       help=f"ranking: {', '.join(sorted(RANKINGS))} (default "
                            f"block_influence); with --layers, one of "
                            f"{', '.join(SCORE_METRICS)} only records scores")
    prune.add_argument("--calibration", choices=SOURCES, default="wiki",
                       help="calibration text source (default: wiki)")
    prune.add_argument("--blocks", type=int, default=32, help="calibration blocks (default 32)")
    prune.add_argument("--block-size", type=int, default=256,
                       help="tokens per calibration block (default 256)")
    prune.add_argument("--batch-size", type=int, default=8,
                       help="blocks per forward pass (default 8)")
    prune.add_argument("--seed", type=int, default=0,
                       help="calibration shuffle and the random metric (default 0)")
    _add_model_options(prune)
    prune.add_argument("--output", required=True, help="folder to write the checkpoint to")
    prune.add_argument("--overwrite", action="store_true",
                       help="replace an existing non-empty output folder")
    prune.set_defaults(run=run_prune)

    from shortlab.healing import METHODS, HealingConfig

    defaults = HealingConfig()
    heal = commands.add_parser(
        "heal", help="a short recovery training of a (pruned) model, saved merged",
        description="Train a model (typically one `prune` wrote) briefly on calibration text: a LoRA "
                    "adapter merged into the weights afterwards, or the last layers and the LM head. "
                    "Saves a checkpoint that transformers' from_pretrained loads, with the healing "
                    "recorded beside any removal record (config.json 'shortlab_healing', README.md).")
    heal.add_argument("model", help="a folder `prune` wrote, an embedded name, tiny test model or hub id")
    heal.add_argument("--method", choices=METHODS, default=defaults.method,
                      help="lora: an adapter on every decoder linear layer, merged; last_layers: train the "
                           "last --last-layers layers, the final norm and the LM head")
    heal.add_argument("--steps", type=int, default=defaults.steps, help=f"optimizer steps (default {defaults.steps})")
    heal.add_argument("--batch-size", type=int, default=defaults.batch_size,
                      help=f"blocks per step (default {defaults.batch_size})")
    heal.add_argument("--block-size", type=int, default=defaults.block_size,
                      help=f"tokens per block (default {defaults.block_size})")
    heal.add_argument("--lr", type=float, default=defaults.lr, help=f"peak learning rate (default {defaults.lr:g})")
    heal.add_argument("--warmup", type=int, default=defaults.warmup, help=f"warm-up steps (default {defaults.warmup})")
    heal.add_argument("--lora-rank", type=int, default=defaults.lora_rank, help=f"(default {defaults.lora_rank})")
    heal.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha, help=f"(default {defaults.lora_alpha:g})")
    heal.add_argument("--last-layers", type=int, default=defaults.last_layers,
                      help=f"decoder layers last_layers trains (default {defaults.last_layers})")
    heal.add_argument("--calibration", choices=SOURCES, default=defaults.source,
                      help="text source; its calibration split only (default: wiki)")
    heal.add_argument("--seed", type=int, default=defaults.seed, help="data order and adapter initialisation")
    heal.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default=defaults.compute_dtype,
                      help="bfloat16: forward and backward passes under autocast (fast on GPUs and CPUs with AMX)")
    heal.add_argument("--checkpoint", default=None, help="file keeping the progress, to resume from")
    heal.add_argument("--max-minutes", type=float, default=None,
                      help="stop after this long with the progress in --checkpoint (exit status 3)")
    _add_model_options(heal)
    heal.add_argument("--output", required=True, help="folder to write the healed checkpoint to")
    heal.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    heal.set_defaults(run=run_heal)

    rope = commands.add_parser(
        "rope-bound", help="the RoPE base / context-length bound (Men et al. 2024)",
        description="The smallest RoPE base for a context (--context, --head-dim), the longest "
                    "context for a base (--base, --head-dim), or the bound of every RoPE variant "
                    "of a model against its advertised context (--config or --model).")
    rope.add_argument("--context", help="context length: 32768 or a label like 32K")
    rope.add_argument("--base", type=float, help="RoPE base (rope_theta)")
    rope.add_argument("--config", help="path to a config.json")
    rope.add_argument("--model", help="shipped config name (llama-2-7b, smollm2-135m, ...), "
                                      "shortlab model, local folder or hub id")
    rope.add_argument("--head-dim", type=int, help="attention head dimension (even)")
    rope.add_argument("--m-range", choices=M_RANGES, default="closed",
                      help="closed: m in [0, L] (the paper); half_open: [0, L-1]")
    rope.add_argument("--k", type=int, default=1024, help="what K means in a label (default 1024)")
    rope.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                      help=f"longest context scanned for --base/--config/--model (default "
                           f"{DEFAULT_LIMIT})")
    rope.add_argument("--seq-len", type=int, default=None,
                      help="sequence length for dynamic-NTK scaling (default: advertised)")
    rope.add_argument("--json", action="store_true", help="print the result as JSON")
    rope.set_defaults(run=run_rope_bound)

    shortv = commands.add_parser(
        "shortv-layers", help="ShortV's choice of layers to freeze visual tokens in",
        description="The N decoder layers of a LLaVA-style model with the lowest visual-token "
                    "Layer Contribution averaged over easy-VQA calibration questions.")
    shortv.add_argument("model", help="tiny-llava, llava-mini, a local folder or a hub LLaVA id")
    shortv.add_argument("--frozen", type=int, required=True, help="number of layers to freeze")
    shortv.add_argument("--questions", type=int, default=40,
                        help="calibration questions (default 40, as in the paper)")
    shortv.add_argument("--batch-size", type=int, default=8, help="questions per forward pass")
    shortv.add_argument("--seed", type=int, default=0, help="question sample (default 0)")
    _add_model_options(shortv)
    shortv.add_argument("--json", action="store_true", help="print the result as JSON")
    shortv.set_defaults(run=run_shortv_layers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (2 with a one-line message for bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except (UsageError, ValueError, IndexError, OSError, ImportError) as error:
        if debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"shortlab: error: {message}", file=sys.stderr)
        return USAGE_ERROR
