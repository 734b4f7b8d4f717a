"""Fine-tune a pretrained Llama-family model with another RoPE base, then measure what the base
changed: perplexity by position and passkey retrieval by distance (issue 12; Men et al., 2024,
arXiv 2405.14591, §5: Llama-2-7B fine-tuned with a base below the bound of its context keeps a
low perplexity while retrieval beyond the bound L_θ collapses).

* ``with_rope_base``: a copy of a model whose RoPE base is another (config and the rotary
  embeddings' ``inv_freq`` buffers); the model passed in is not touched;
* ``default_text``, ``tokenize_text``, ``split_stream``: the fine-tuning text as one token stream,
  its tail held out for evaluation;
* ``finetune_batches``: training rows cut from the stream, optionally mixed with synthetic
  passkey rows whose answer tokens weigh more (``task_fraction``, default 0: plain text, as the
  paper fine-tunes);
* ``fine_tune``: AdamW, linear warm-up then cosine decay, bf16 autocast, optional gradient
  checkpointing; trains the model passed in;
* ``perplexity_by_position``: binned perplexity with bootstrap intervals over held-out rows;
* ``distance_grid``, ``bound_verdicts``: the passkey distances dense around each bound, and the
  issue's verdict (retrieval beyond L_θ worse, perplexity comparable to the control).

``scripts/rope_finetune.py`` runs all of it and writes ``results/rope_finetune/<model>.json``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from shortlab.arch import model_parts
from shortlab.rope.conventions import _check_base
from shortlab.rope_experiment.measurements import (
    VERDICT_RULE,
    binned_perplexity,
    describe_half_accuracy,
    fails_beyond_verdict,
    gated_verdict,
    half_accuracy_summary,
    halfway_level,
    interval_json,
    passkey_chance,
    per_position_nll,
    retrieval_gate,
)
from shortlab.rope_experiment.passkey import min_passkey_distance, passkey_length, passkey_prompt
from shortlab.stats import (
    CANNOT_TELL, CONTRADICTED, SUPPORTED, Interval, paired_interval, paired_perplexity_ratio,
    perplexity_interval, verdict, wilson_interval,
)

TEXT_SEPARATOR = "\n\n"  # between documents in the fine-tuning text


# ---------------------------------------------------------------- the RoPE base


def rope_base(model) -> float:
    """The RoPE base of a model with plain ("default") RoPE, from its text config's
    ``rope_parameters["rope_theta"]`` (transformers 5)."""
    return float(_rope_parameters(model_parts(model).text_config)["rope_theta"])


def _rope_parameters(config) -> dict:
    parameters = getattr(config, "rope_parameters", None)
    if not isinstance(parameters, dict) or not isinstance(parameters.get("rope_theta"), (int, float)):
        raise ValueError(f"{type(config).__name__} has no single rope_parameters['rope_theta'] "
                         f"(got {parameters!r}); per-layer-type RoPE is not supported here")
    if parameters.get("rope_type", "default") != "default":
        raise ValueError(f"only plain RoPE can change base here; this model's rope_type is "
                         f"{parameters['rope_type']!r} (its frequencies are not base^(-2i/d))")
    return parameters


def with_rope_base(model, base: float):
    """A deep copy of ``model`` whose RoPE base is ``base``; ``model`` itself is not modified.

    Both places transformers 5 keeps the base change: the text config's
    ``rope_parameters["rope_theta"]`` and every rotary embedding's ``inv_freq`` and
    ``original_inv_freq`` buffers (frequencies [d/2] = base^(−2i/d), computed as transformers
    computes them, in float32). Only plain RoPE (rope_type "default") is accepted.
    """
    base = _check_base(base)
    _rope_parameters(model_parts(model).text_config)  # fail before copying
    copied = copy.deepcopy(model)
    config = model_parts(copied).text_config
    config.rope_parameters = dict(config.rope_parameters, rope_theta=base)
    rotary = [module for module in copied.modules()
              if isinstance(getattr(module, "inv_freq", None), torch.Tensor)]
    if not rotary:
        raise ValueError(f"{type(model).__name__} has no rotary embedding with an inv_freq buffer")
    for module in rotary:
        # module.config is the copy's config (deepcopy keeps shared objects shared); set it
        # anyway in case a module holds a config of its own.
        if getattr(module, "config", None) is not None and module.config is not config:
            module.config.rope_parameters = dict(module.config.rope_parameters, rope_theta=base)
        dim = 2 * module.inv_freq.numel()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        module.inv_freq = inv_freq.to(module.inv_freq.device)
        if isinstance(getattr(module, "original_inv_freq", None), torch.Tensor):
            module.original_inv_freq = inv_freq.clone().to(module.original_inv_freq.device)
    return copied


# ---------------------------------------------------------------- text


def default_text() -> str:
    """The embedded Wikipedia lead paragraphs (``shortlab.data``, source "wiki") as one string:
    the calibration split first, then the eval split, documents separated by a blank line. With
    ``split_stream``'s default eval fraction the held-out tail is (almost exactly) the eval
    split; ``scripts/rope_finetune.py --export-text`` writes this string to a file."""
    from shortlab.data import load_documents

    return TEXT_SEPARATOR.join(load_documents("wiki", "calib") + load_documents("wiki", "eval"))


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` without special tokens: LongTensor [n]."""
    if not text.strip():
        raise ValueError("empty text: there is nothing to fine-tune or evaluate on")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def split_stream(ids: torch.Tensor, eval_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(training part, held-out tail) of a token stream [n]: the last ``eval_fraction`` of it
    is held out, so no evaluation token was trained on."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    cut = int(round(ids.numel() * (1 - eval_fraction)))
    return ids[:cut], ids[cut:]


def eval_rows(ids: torch.Tensor, context: int, n_rows: int) -> torch.Tensor:
    """The first ``n_rows`` non-overlapping rows of ``context`` tokens of ``ids``: [n_rows, context]."""
    if ids.numel() < context * n_rows:
        raise ValueError(f"the held-out text has {ids.numel()} tokens, fewer than {n_rows} rows "
                         f"of {context}")
    return ids[: context * n_rows].view(n_rows, context)


# ---------------------------------------------------------------- training


def finetune_batches(train_ids: torch.Tensor, context: int, batch_size: int, *, seed: int = 0,
                     tokenizer=None, task_fraction: float = 0.0, answer_weight: float = 5.0,
                     digits: int = 5) -> Iterator[dict[str, torch.Tensor]]:
    """Endless training batches: {"input_ids": LongTensor [batch_size, context],
    "loss_weight": float [batch_size, context]} (the weight of predicting each token).

    Text rows are the stream's non-overlapping ``context``-token blocks in a seeded order,
    reshuffled each epoch, weight 1 everywhere. With ``task_fraction`` > 0 (needs
    ``tokenizer``) each row is, with that probability, a synthetic passkey prompt
    (``passkey_prompt`` at a uniform random distance, real text from the training stream before
    it to fill the row) whose answer tokens weigh ``answer_weight``.

    Default 0: the paper fine-tunes on plain text, and the question is whether the base alone
    limits the retrieval that language modelling teaches; training on the test's own format
    would measure the task learnt instead (set it to study that).
    """
    if context < 2 or batch_size < 1:
        raise ValueError(f"context must be >= 2 and batch_size >= 1, got {context}, {batch_size}")
    if not 0 <= task_fraction <= 1:
        raise ValueError(f"task_fraction must be in [0, 1], got {task_fraction}")
    if task_fraction and tokenizer is None:
        raise ValueError("task_fraction > 0 needs the tokenizer to build passkey rows")
    n_blocks = train_ids.numel() // context
    if n_blocks < 1:
        raise ValueError(f"the training text has {train_ids.numel()} tokens, fewer than one row "
                         f"of {context}")
    blocks = train_ids[: n_blocks * context].view(n_blocks, context)
    if task_fraction:
        shortest = min_passkey_distance(tokenizer, digits)
        longest = context - passkey_length(tokenizer, 0, digits)  # the prompt must fit the row
        if longest < shortest:
            raise ValueError(f"context {context} is too short for a passkey row")
    generator = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(n_blocks, generator=generator), 0
    while True:
        rows, weights = [], []
        for _ in range(batch_size):
            if cursor == n_blocks:
                order, cursor = torch.randperm(n_blocks, generator=generator), 0
            block = blocks[order[cursor]]
            cursor += 1
            weight = torch.ones(context)
            if task_fraction and torch.rand((), generator=generator) < task_fraction:
                distance = int(torch.randint(shortest, longest + 1, (), generator=generator))
                key = str(int(torch.randint(10 ** (digits - 1), 10 ** digits, (), generator=generator)))
                # filler from the block's tail: disjoint from the text kept before the prompt
                prompt = passkey_prompt(tokenizer, block[context - distance:].tolist(), distance, key)
                if prompt.input_ids.numel() > context:  # a passkey that tokenises longer
                    rows.append(block)
                    weights.append(weight)
                    continue
                start = context - prompt.input_ids.numel()  # text before the prompt fills the row
                block = torch.cat((block[:start], prompt.input_ids))
                weight[start + prompt.answer_positions] = answer_weight
            rows.append(block)
            weights.append(weight)
        yield {"input_ids": torch.stack(rows), "loss_weight": torch.stack(weights)}


def warmup_cosine(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to
    ``floor`` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or nothing when dtype is None or
    float32 (weights stay float32 either way: AdamW updates need their precision)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def weighted_lm_loss(model, input_ids: torch.Tensor, loss_weight: torch.Tensor) -> torch.Tensor:
    """Σ weight × next-token cross-entropy / Σ weight over predicted tokens (weights of
    positions 1 …), in float32; inputs [N, T] go to the model's device."""
    device = model.get_input_embeddings().weight.device
    input_ids, loss_weight = input_ids.to(device), loss_weight.to(device)
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten(),
                                               reduction="none")
    weight = loss_weight[:, 1:].flatten().float()
    return (losses * weight).sum() / weight.sum()


def fine_tune(model, batches: Iterator[dict[str, torch.Tensor]], steps: int, *, lr: float = 2e-4,
              warmup: int | None = None, weight_decay: float = 0.0, clip: float = 1.0,
              autocast_dtype: torch.dtype | None = None, gradient_checkpointing: bool = False,
              progress: Callable[[int, float], None] | None = None) -> dict:
    """Train ``model`` in place (its weights change; take a copy with ``with_rope_base`` first)
    on ``finetune_batches``: AdamW (β = 0.9, 0.95), ``warmup_cosine`` schedule (warm-up default:
    a tenth of the steps), gradient clipping, ``autocast_dtype`` autocast (e.g. bfloat16 on a
    GPU), optional gradient checkpointing (switched off again on every exit).

    ``progress(step, loss)`` is called after each step. Leaves the model in eval mode. Returns
    {"loss": [per-step weighted loss], "tokens": tokens seen, "seconds": wall time}.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    warmup = max(1, steps // 10) if warmup is None else warmup
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1, got {warmup}")
    device = model.get_input_embeddings().weight.device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                                  betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, warmup))
    losses, tokens, start = [], 0, time.perf_counter()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        for step in range(steps):
            batch = next(batches)
            with autocast(device, autocast_dtype):
                loss = weighted_lm_loss(model, batch["input_ids"], batch["loss_weight"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            tokens += batch["input_ids"].numel()
            if progress is not None:
                progress(step, losses[-1])
    finally:
        if gradient_checkpointing:
            model.gradient_checkpointing_disable()
        model.eval()
    return {"loss": losses, "tokens": tokens, "seconds": time.perf_counter() - start}


def thin_curve(values: Sequence[float], max_points: int = 100) -> dict[str, list]:
    """A loss curve in at most ``max_points`` windows of equal length: {"step": last step of
    each window (1-based), "loss": the window's mean}."""
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    window = max(1, math.ceil(len(values) / max_points))
    steps, means = [], []
    for start in range(0, len(values), window):
        chunk = values[start: start + window]
        steps.append(start + len(chunk))
        means.append(float(np.mean(chunk)))
    return {"step": steps, "loss": means}


# ---------------------------------------------------------------- evaluation


def position_edges(context: int) -> list[int]:
    """Bin edges for perplexity by position over a ``context``-token row: finer at the start,
    where the loss falls fastest. Position 0 predicts nothing, so the first bin starts at 1."""
    fractions = (1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1)
    return sorted({1} | {max(2, round(context * f)) for f in fractions})


def perplexity_by_position(model, rows: torch.Tensor, edges: Sequence[int], *,
                           autocast_dtype: torch.dtype | None = None) -> dict:
    """Perplexity of ``model`` on held-out rows [N, T] in position bins [edges[j], edges[j+1]).

    Each row is scored alone (``per_position_nll``), so every bin's interval resamples rows
    (``perplexity_interval``: the tokens of one row are not independent). Returns {"edges",
    "bins": [{start, end, tokens, perplexity, low, high}], "overall": {perplexity, low, high},
    "rows": {"nll_sum": [N][bins], "count": [N][bins]}} — the per-row sums let two models scored
    on the same rows be compared pairwise (``paired_perplexity_ratio``).
    """
    edges = [int(e) for e in edges]
    if edges[-1] > rows.shape[1]:
        raise ValueError(f"the last edge {edges[-1]} lies beyond the rows' length {rows.shape[1]}")
    device = model.get_input_embeddings().weight.device
    sums, counts = [], []
    for row in rows:
        with autocast(device, autocast_dtype):
            nll_sum, count = per_position_nll(model, row[None])
        sums.append([nll_sum[lo:hi].sum() for lo, hi in zip(edges[:-1], edges[1:])])
        counts.append([count[lo:hi].sum() for lo, hi in zip(edges[:-1], edges[1:])])
    sums, counts = np.array(sums), np.array(counts)
    # binned_perplexity sees bin j as one position holding the bin's total, i.e. Σ NLL / Σ tokens
    estimates = binned_perplexity(sums.sum(0), counts.sum(0), np.arange(len(edges)))
    bins = []
    for j, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        interval = perplexity_interval(sums[:, j], counts[:, j])
        bins.append(dict(start=low, end=high, tokens=int(counts[:, j].sum()),
                         perplexity=float(estimates[j]), low=interval.low, high=interval.high))
    overall = perplexity_interval(sums.sum(1), counts.sum(1))
    return {"edges": edges, "bins": bins,
            "overall": dict(perplexity=overall.estimate, low=overall.low, high=overall.high),
            "rows": {"nll_sum": sums.tolist(), "count": counts.tolist()}}


def distance_grid(bounds: Sequence[int], max_distance: int, min_distance: int = 16,
                  uniform_points: int = 8) -> list[int]:
    """Passkey distances: dense around every bound below ``max_distance`` (0.5, 0.75, 0.9, 1,
    1.1, 1.25, 1.5 and 2 times it), ``uniform_points`` evenly spaced from ``min_distance`` to
    ``max_distance``, and ``max_distance`` itself (the context's reach); clipped, sorted."""
    if not 0 < min_distance <= max_distance:
        raise ValueError(f"need 0 < min_distance <= max_distance, got {min_distance}, {max_distance}")
    grid = set(np.linspace(min_distance, max_distance, uniform_points).round().astype(int).tolist())
    grid.add(max_distance)
    for bound in bounds:
        if bound < max_distance:
            grid |= {round(bound * f) for f in (0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0)}
    return sorted(d for d in grid if min_distance <= d <= max_distance)


def difference_of_rates(a_correct: int, a_n: int, b_correct: int, b_n: int,
                        level: float = 0.95) -> Interval:
    """Rate a − rate b of two independent samples, with Newcombe's hybrid score interval (his
    method 10, 1998), built from the two Wilson intervals."""
    a, b = wilson_interval(a_correct, a_n, level), wilson_interval(b_correct, b_n, level)
    difference = a.estimate - b.estimate
    low = difference - math.hypot(a.estimate - a.low, b.high - b.estimate)
    high = difference + math.hypot(a.high - a.estimate, b.estimate - b.low)
    return Interval(difference, low, high, level, "Newcombe hybrid score")


def _pooled_rate(rows: Sequence[dict]) -> Interval:
    return wilson_interval(sum(r["correct"] for r in rows), sum(r["n"] for r in rows))


def bound_verdicts(run: dict, control: dict, context: int, ppl_tolerance: float = 1.1,
                   accuracy_margin: float = 0.05) -> dict:
    """The bound's claims for one fine-tuned ``run`` against the ``control`` (same steps, own
    base), both result dicts as ``scripts/rope_finetune.py`` writes them ("bound", "passkey",
    "perplexity"), each with its interval, its practical size and ``verdict``:

    * ``fails_beyond``: the run's passkey rate at distances in (bound, context] lies below the
      halfway level from perfect to chance, and it retrieves at distances ≤ its bound
      (``fails_beyond_verdict``, Wilson intervals; trials independent);
    * ``within_minus_beyond``: its rate within the bound minus beyond it exceeds
      ``accuracy_margin`` (Newcombe interval);
    * ``control_minus_run_beyond``: at the distances beyond the run's bound, the control's rate
      minus the run's exceeds ``accuracy_margin`` (the same prompts: paired over trials) — it
      does not confound the bound with distance;
    * ``perplexity_ratio``: the run's perplexity over the control's on the same held-out rows
      (paired bootstrap) is below ``ppl_tolerance``.

    The retrieval claims cannot be supported when the run does not retrieve within its bound,
    nor the control claim when the control does not retrieve beyond the run's bound ("reason").
    ``overall`` (over fails_beyond, control_minus_run_beyond, perplexity_ratio) is supported when
    all three are, contradicted when any is, else cannot tell. Without distances on both sides of
    the bound the retrieval claims are None (and so is ``overall``). ``rule`` names the rule.
    """
    bound = run["bound"]
    within = [row for row in run["passkey"] if row["distance"] <= bound]
    beyond = [row for row in run["passkey"] if bound < row["distance"] <= context]
    out = {"bound": bound, "context": context, "ppl_tolerance": ppl_tolerance,
           "accuracy_margin": accuracy_margin, "rule": VERDICT_RULE}
    run_rows, control_rows = run["perplexity"]["rows"], control["perplexity"]["rows"]
    ratio = paired_perplexity_ratio(np.sum(run_rows["nll_sum"], 1), np.sum(control_rows["nll_sum"], 1),
                                    np.sum(run_rows["count"], 1))
    out["perplexity_ratio"] = dict(interval_json(ratio),
                                   verdict=verdict(ratio, ppl_tolerance, claim="below"))
    if not within or not beyond:
        out["fails_beyond"] = out["within_minus_beyond"] = out["control_minus_run_beyond"] = out["overall"] = None
        return out
    chance = passkey_chance()
    within_rate, beyond_rate = _pooled_rate(within), _pooled_rate(beyond)
    out["fails_beyond"] = fails_beyond_verdict(within_rate, beyond_rate, chance)
    not_retrieving = retrieval_gate(within_rate, halfway_level(chance))
    gap = difference_of_rates(sum(r["correct"] for r in within), sum(r["n"] for r in within),
                              sum(r["correct"] for r in beyond), sum(r["n"] for r in beyond))
    out["within_minus_beyond"] = gated_verdict(gap, 0.0, claim="above", margin=accuracy_margin,
                                               reason=not_retrieving)
    control_by_distance = {row["distance"]: row["found"] for row in control["passkey"]}
    missing = [row["distance"] for row in beyond if row["distance"] not in control_by_distance]
    if missing:
        raise ValueError(f"the control was not tested at distances {missing}")
    run_found = np.concatenate([row["found"] for row in beyond])
    control_found = np.concatenate([control_by_distance[row["distance"]] for row in beyond])
    control_rate = wilson_interval(int(np.sum(control_found)), control_found.size)
    control_gate = None if control_rate.low > halfway_level(chance) else (
        f"the control does not retrieve beyond this bound either (found {control_rate.estimate:.2f} "
        f"[{control_rate.low:.2f}, {control_rate.high:.2f}]), so the run cannot be told to fall short of it")
    paired = paired_interval(control_found, run_found)
    out["control_minus_run_beyond"] = gated_verdict(paired, 0.0, claim="above", margin=accuracy_margin,
                                                    reason=not_retrieving or control_gate)
    verdicts = [out["fails_beyond"]["verdict"], out["control_minus_run_beyond"]["verdict"],
                out["perplexity_ratio"]["verdict"]]
    out["overall"] = (SUPPORTED if all(v == SUPPORTED for v in verdicts)
                      else CONTRADICTED if CONTRADICTED in verdicts else CANNOT_TELL)
    return out


# ---------------------------------------------------------------- reading the results file

RESULTS_SCHEMA = 1  # the version of scripts/rope_finetune.py's JSON that finetune_summary reads
CONTROL_LABEL = "own"  # the run that keeps the model's own base


def _passkey_rows_from_trials(rows: Sequence[dict], where: str, problems: list[str]) -> list[dict]:
    """Passkey rows {depth, distance, n, correct, rate, low, high, found} rebuilt from each row's
    per-trial ``found`` (0/1); a stored count or interval that disagrees is noted in ``problems``."""
    rebuilt = []
    for row in rows:
        found = np.asarray(row["found"], dtype=int)
        if found.size == 0 or not np.isin(found, (0, 1)).all():
            raise ValueError(f"{where}: distance {row['distance']} needs 'found' as a non-empty "
                             f"list of 0/1, got {row['found']!r}")
        interval = wilson_interval(int(found.sum()), found.size)
        fresh = dict(depth=int(row.get("depth", 0)), distance=int(row["distance"]), n=int(found.size),
                     correct=int(found.sum()),
                     rate=interval.estimate, low=interval.low, high=interval.high,
                     found=found.tolist())
        for key in ("n", "correct", "rate", "low", "high"):
            if not math.isclose(row[key], fresh[key], rel_tol=1e-9, abs_tol=1e-12):
                problems.append(f"{where}: distance {fresh['distance']}: stored {key} {row[key]} "
                                f"but its trials give {fresh[key]}")
        rebuilt.append(fresh)
    return rebuilt


def _perplexity_from_rows(perplexity: dict, where: str, problems: list[str]) -> dict:
    """Perplexity by position {edges, bins, overall, rows} recomputed from the per-row NLL sums
    and token counts ([rows][bins]); stored values that disagree are noted in ``problems``."""
    sums = np.asarray(perplexity["rows"]["nll_sum"], dtype=float)
    counts = np.asarray(perplexity["rows"]["count"], dtype=float)
    edges = [int(e) for e in perplexity["edges"]]
    if sums.ndim != 2 or sums.shape != counts.shape or sums.shape[1] != len(edges) - 1:
        raise ValueError(f"{where}: perplexity rows must be [rows][{len(edges) - 1} bins] for "
                         f"nll_sum and count alike, got {sums.shape} and {counts.shape}")
    bins = []
    for j, (start, end) in enumerate(zip(edges[:-1], edges[1:])):
        interval = perplexity_interval(sums[:, j], counts[:, j])
        bins.append(dict(start=start, end=end, tokens=int(counts[:, j].sum()),
                         perplexity=interval.estimate, low=interval.low, high=interval.high))
    overall = perplexity_interval(sums.sum(1), counts.sum(1))
    fresh = {"edges": edges, "bins": bins,
             "overall": dict(perplexity=overall.estimate, low=overall.low, high=overall.high),
             "rows": perplexity["rows"]}
    for stored, new in zip(perplexity["bins"] + [perplexity["overall"]], bins + [fresh["overall"]]):
        for key in ("perplexity", "low", "high"):
            if not math.isclose(stored[key], new[key], rel_tol=1e-6):
                problems.append(f"{where}: perplexity {stored.get('start', 'overall')}–"
                                f"{stored.get('end', '')}: stored {key} {stored[key]} but the "
                                f"rows give {new[key]}")
    return fresh


def _same_rule(stored: dict, fresh: dict) -> bool:
    """Whether a stored verdict was made under the rule and practical sizes of ``fresh``."""
    return all(stored.get(key) == fresh.get(key) for key in ("rule", "ppl_tolerance", "accuracy_margin"))


def _compare_verdicts(stored: dict | None, fresh: dict | None, where: str, problems: list[str]) -> bool:
    """Note in ``problems`` every claim whose stored estimate differs from ``fresh``, and, when
    the stored verdicts were made under the same rule and practical sizes (``_same_rule``),
    every verdict that differs. Returns whether the verdicts were compared (False: an older
    rule, whose verdicts may differ by design; their estimates are still checked)."""
    if stored is None or fresh is None:
        if (stored is None) != (fresh is None):
            problems.append(f"{where}: stored verdict {stored!r} but recomputed {fresh!r}")
        return False
    same_rule = _same_rule(stored, fresh)
    if same_rule and stored.get("overall") != fresh["overall"]:
        problems.append(f"{where}: stored overall verdict {stored.get('overall')!r}, "
                        f"recomputed {fresh['overall']!r}")
    for claim in ("perplexity_ratio", "within_minus_beyond", "control_minus_run_beyond"):
        old, new = stored.get(claim), fresh[claim]
        if (old is None) != (new is None):
            problems.append(f"{where}: {claim} stored {old!r}, recomputed {new!r}")
        elif old is not None and not math.isclose(old["estimate"], new["estimate"], rel_tol=1e-9, abs_tol=1e-12):
            problems.append(f"{where}: {claim} stored estimate {old['estimate']}, recomputed {new['estimate']}")
        elif old is not None and same_rule and old["verdict"] != new["verdict"]:
            problems.append(f"{where}: {claim} stored {old['verdict']!r}, recomputed {new['verdict']!r}")
    return same_rule


def shipped_bound_verdict(passkey: Sequence[dict], bound: int, accuracy_margin: float = 0.05) -> dict | None:
    """The untouched model's passkey around its own ``bound``: "fails beyond the bound"
    (``fails_beyond_verdict``: the rate beyond it below halfway, only for a model that retrieves
    within it) and its rate within minus beyond (Newcombe interval; trials independent; claimed
    above ``accuracy_margin``, and only for a model that retrieves within its bound), or None when
    the rows do not reach both sides. Rows {distance, n, correct}. Returns {within: {correct, n},
    beyond: {correct, n}, fails_beyond, within_minus_beyond: {estimate, low, high, method,
    verdict, margin, reason}, rule}."""
    within = [row for row in passkey if row["distance"] <= bound]
    beyond = [row for row in passkey if row["distance"] > bound]
    if not within or not beyond:
        return None
    counts = {name: dict(correct=sum(r["correct"] for r in rows), n=sum(r["n"] for r in rows))
              for name, rows in (("within", within), ("beyond", beyond))}
    gap = difference_of_rates(counts["within"]["correct"], counts["within"]["n"],
                              counts["beyond"]["correct"], counts["beyond"]["n"])
    chance = passkey_chance()
    within_rate = _pooled_rate(within)
    return dict(counts, fails_beyond=fails_beyond_verdict(within_rate, _pooled_rate(beyond), chance),
                within_minus_beyond=gated_verdict(gap, 0.0, claim="above", margin=accuracy_margin,
                                                  reason=retrieval_gate(within_rate, halfway_level(chance))),
                rule=VERDICT_RULE)


def _passkey_half_accuracy(passkey: Sequence[dict], bound: int, ratio_margin: float = 0.1) -> dict | None:
    """``half_accuracy_summary`` of passkey rows (chance 0: a five-digit key is not guessed), or
    None when the distances have different numbers of trials."""
    found = [row["found"] for row in passkey]
    if not found or len({len(trials) for trials in found}) != 1:
        return None
    return half_accuracy_summary([row["distance"] for row in passkey], np.asarray(found, dtype=np.float64)[None],
                                 passkey_chance(), bound, ratio_margin)


def finetune_summary(results: dict, *, ppl_tolerance: float | None = None, accuracy_margin: float = 0.05,
                     ratio_margin: float = 0.1) -> dict:
    """What notebook 03 shows of ``scripts/rope_finetune.py``'s results (schema 1), recomputed
    from the raw measurements the file keeps rather than taken from its summaries:

    * each run's passkey rows from the per-trial ``found`` lists (Wilson intervals) and its
      perplexity by position from the per-row NLL sums and token counts (bootstrap over rows);
    * where each run's passkey rate falls to half (``half_accuracy_summary``, bootstrap over
      trials), also in units of its bound;
    * each run's verdicts with ``bound_verdicts`` against the control (label "own"), at the
      file's context and at the practical sizes given here (``ppl_tolerance`` None: the file's);
      the shipped model's verdicts around its own bound (``shipped_bound_verdict``).

    Stored estimates are always checked; stored verdicts only when they were made under the same
    rule and practical sizes ("verdicts_compared" counts those, "older_rule" the others).

    Returns {"complete", "model", "environment", "text", "parameters", "context",
    "ppl_tolerance", "wall_seconds_last_call" (None until the script finishes), "runs": [each
    stored run with "passkey", "perplexity" and "verdict" replaced by the recomputed ones, plus
    "half_accuracy", "control" (bool) and "stored_verdict" (None for the control or before the script wrote
    verdicts)], "shipped": None or {base, head_dim, bound, seconds, passkey, verdict},
    "problems": [every stored number or verdict that the recomputation does not reproduce]}.
    An empty ``problems`` means the file is self-consistent. A file of another schema, or
    without a control when there are other runs, raises ``ValueError``; ``results`` itself is
    not modified.
    """
    if results.get("schema") != RESULTS_SCHEMA:
        raise ValueError(f"expected the results of scripts/rope_finetune.py with schema "
                         f"{RESULTS_SCHEMA}, got schema {results.get('schema')!r}")
    missing = [key for key in ("parameters", "environment", "model", "text", "runs") if key not in results]
    if missing:
        raise ValueError(f"the results file lacks {missing}")
    parameters = results["parameters"]
    context = int(parameters["context"])
    tolerance = float(parameters["ppl_tolerance"] if ppl_tolerance is None else ppl_tolerance)
    problems: list[str] = []
    runs = []
    for stored in results["runs"]:
        where = f"run {stored['label']}"
        runs.append(dict(stored, control=stored["label"] == CONTROL_LABEL,
                         passkey=_passkey_rows_from_trials(stored["passkey"], where, problems),
                         perplexity=_perplexity_from_rows(stored["perplexity"], where, problems),
                         stored_verdict=stored.get("verdict")))
    control = next((run for run in runs if run["control"]), None)
    if control is None and runs:
        raise ValueError(f"no control run (label {CONTROL_LABEL!r}) among "
                         f"{[run['label'] for run in runs]}: the verdicts compare every base with it")
    for run in runs:
        run["half_accuracy"] = _passkey_half_accuracy(run["passkey"], run["bound"], ratio_margin)
    control_half = control["half_accuracy"] if control is not None else None
    if control_half is not None and control_half["below_at_shortest"]:
        for run in runs:  # a failure is not the bound's when the task was never learnt
            if run["half_accuracy"] is not None and run["half_accuracy"].pop("verdict", None) is not None:
                run["half_accuracy"]["unjudged"] = "the control itself does not retrieve at the shortest distance"
    compared = older = 0
    for run, stored in zip(runs, results["runs"]):
        run["verdict"] = None if run["control"] else bound_verdicts(run, control, context, tolerance, accuracy_margin)
        if stored.get("verdict") is not None:  # the script writes verdicts once every base is done
            if _compare_verdicts(stored["verdict"], run["verdict"], f"run {run['label']}", problems):
                compared += 1
            else:
                older += 1
    shipped = None
    if results.get("shipped_passkey") is not None:
        stored = results["shipped_passkey"]
        passkey = _passkey_rows_from_trials(stored["passkey"], "shipped model", problems)
        shipped = dict(stored, passkey=passkey, verdict=shipped_bound_verdict(passkey, stored["bound"], accuracy_margin))
    return {"complete": bool(results.get("complete")), "model": results["model"],
            "environment": results["environment"], "text": results["text"],
            "parameters": parameters, "context": context, "ppl_tolerance": tolerance,
            "accuracy_margin": accuracy_margin, "ratio_margin": ratio_margin,
            "verdicts_compared": compared, "older_rule": older,
            "wall_seconds_last_call": results.get("wall_seconds_last_call"),
            "runs": runs, "shipped": shipped, "problems": problems}


def _claim_text(claim: dict | None, spec: str = "+.2f") -> str:
    if claim is None:
        return "— (no distances on both sides of the bound)"
    text = f"{claim['estimate']:{spec}} [{claim['low']:{spec}}, {claim['high']:{spec}}] → {claim['verdict']}"
    return text + (f" ({claim['reason']})" if claim.get("reason") else "")


def describe_fails_beyond(claim: dict | None) -> str:
    """A ``fails_beyond_verdict`` in words: both rates beside the halfway level, the verdict and why."""
    if claim is None:
        return "— (no distances on both sides of the bound)"
    within, beyond = claim["within"], claim["beyond"]
    text = (f"found within {within['estimate']:.2f} [{within['low']:.2f}, {within['high']:.2f}], beyond "
            f"{beyond['estimate']:.2f} [{beyond['low']:.2f}, {beyond['high']:.2f}] against halfway "
            f"{claim['halfway_level']:.2f} → {claim['verdict']}")
    return text + (f" ({claim['reason']})" if claim.get("reason") else "")


def describe_finetune(summary: dict) -> str:
    """``finetune_summary``'s result as text for the notebook: what was run where (device,
    versions, model, text, sizes, steps, tokens, seconds), each run's loss and perplexity, and
    every recomputed verdict with its 95 % interval."""
    env, model, text, parameters = (summary["environment"], summary["model"], summary["text"],
                                    summary["parameters"])
    lines = [
        ("" if summary["complete"] else "INCOMPLETE (the script has not finished every stage). ")
        + f"Run on {env['device_name']} ({env['device']}, {env['torch_threads']} torch threads), "
        f"shortlab {env['shortlab']} at git {env['git_revision']}, "
        + ", ".join(f"{name} {version}" for name, version in env["versions"].items()) + ".",
        f"Model {model['label']}: {model['layers']} layers, head dim {model['head_dim']}, own base "
        f"{model['own_base']:g} (bound L_θ = {model['own_bound']:,}), {model['max_positions']:,} positions.",
        f"Text: {text['source']}, {text['tokens']:,} tokens ({text['train_tokens']:,} for training, "
        f"{text['eval_tokens']:,} held out). Fine-tuning context {summary['context']:,} tokens, batch "
        f"{parameters['batch_size']}, learning rate {parameters['lr']:g}, synthetic passkey rows "
        f"{parameters['task_fraction']:.0%} of the batches, {parameters['trials']} passkey trials per "
        f"distance, seed {parameters['seed']}.",
    ]
    for run in summary["runs"]:
        overall = run["perplexity"]["overall"]
        lines.append(f"  {'control, own base' if run['control'] else 'base'} {run['base']:g}: bound "
                     f"{run['bound']:,}; {run['steps']} steps, {run['tokens_seen']:,} tokens in "
                     f"{run['train_seconds']:.0f} s, evaluated in {run['eval_seconds']:.0f} s on "
                     f"{run['device']}; final loss {run['final_loss']:.3f}; held-out perplexity "
                     f"{overall['perplexity']:.2f} [{overall['low']:.2f}, {overall['high']:.2f}]")
    if summary["shipped"] is not None:
        lines.append(f"  the shipped model's passkey grid: {summary['shipped']['seconds']:.0f} s")
    if summary["wall_seconds_last_call"] is not None:
        lines.append(f"  the script's last call: {summary['wall_seconds_last_call'] / 60:.1f} min")
    lines.append(f"Verdicts recomputed from the per-trial outcomes and per-row NLLs (95 % intervals; practical "
                 f"sizes: perplexity tolerance {summary['ppl_tolerance']:g} × the control's, passkey rate differences "
                 f"beyond {summary['accuracy_margin']:g}, retrieval broken below halfway from perfect to chance "
                 f"{passkey_chance():.1e}, the strongest rule that needs no model):")
    for run in summary["runs"]:
        if run["control"]:
            continue
        claims = run["verdict"]
        lines.append(f"  base {run['base']:g} (L_θ = {run['bound']:,}): fails beyond the bound: "
                     f"{describe_fails_beyond(claims['fails_beyond'])}; within − beyond "
                     f"{_claim_text(claims['within_minus_beyond'])}; control − run beyond "
                     f"{_claim_text(claims['control_minus_run_beyond'])}; perplexity ratio "
                     f"{_claim_text(claims['perplexity_ratio'], '.3f')}; all three: "
                     f"{claims['overall'] or 'no verdict (retrieval not tested on both sides)'}")
    shipped = summary["shipped"]
    if shipped is not None:
        claim = shipped["verdict"]
        lines.append(f"  shipped model (base {shipped['base']:g}, L_θ = {shipped['bound']:,}): " + (
            "no distances on both sides of its bound" if claim is None else
            f"found within its bound {claim['within']['correct']}/{claim['within']['n']}, beyond "
            f"{claim['beyond']['correct']}/{claim['beyond']['n']}; fails beyond the bound: "
            f"{describe_fails_beyond(claim['fails_beyond'])}; within − beyond "
            f"{_claim_text(claim['within_minus_beyond'])}"))
    lines.append("Where the passkey rate falls to half (interpolated; 95 % bootstrap over trials):")
    for run in summary["runs"]:
        lines.append(f"  {'control, own base' if run['control'] else 'base'} {run['base']:g} (L_θ = {run['bound']:,}): "
                     + describe_half_accuracy(run["half_accuracy"], [row["distance"] for row in run["passkey"]]))
    older = (f"; {summary['older_rule']} stored verdicts were made under an earlier rule, so only their estimates "
             "were checked" if summary.get("older_rule") else "")
    lines.append(f"Stored values the recomputation does not reproduce: "
                 f"{'; '.join(summary['problems']) or 'none'} ({summary.get('verdicts_compared', 0)} stored verdicts "
                 f"checked{older}).")
    return "\n".join(lines)
