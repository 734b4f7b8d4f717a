"""Multiple-choice evaluation: each choice's summed log-probability, acc and acc_norm.

Each choice is the continuation ``" " + choice`` after its context. ``acc`` picks the choice
with the largest summed log-probability of its continuation tokens; ``acc_norm`` divides that
by the choice's length in characters (the harness's normalisation; for winogrande every option
has the same continuation, so acc_norm equals acc).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from shortlab.evaluate.examples import MCExample
from shortlab.evaluate.likelihood import encode_pair, loglikelihoods
from shortlab.evaluate.tasks import TASKS, load_task


def encode_examples(tokenizer, examples: Sequence[MCExample]) -> list[tuple[list[int], list[int]]]:
    """One (context ids, continuation ids) request per choice, examples in order."""
    return [
        encode_pair(tokenizer, context, continuation)
        for example in examples
        for context, continuation in zip(example.contexts, example.continuations, strict=True)
    ]


def item_correct(examples: Sequence[MCExample], logliks: Sequence[float]) -> dict[str, np.ndarray]:
    """Per-item correctness: ``{"acc": bool[n], "acc_norm": bool[n]}``, examples in order.

    ``logliks`` holds one summed log-likelihood per choice, examples in order; ``acc`` picks the
    largest, ``acc_norm`` the largest after dividing by the choice's length in characters (ties
    go to the first choice).
    """
    n_choices = sum(len(example.choices) for example in examples)
    if n_choices != len(logliks):
        raise ValueError(f"{len(logliks)} log-likelihoods for {n_choices} choices")
    correct = np.zeros(len(examples), dtype=bool)
    correct_norm = np.zeros(len(examples), dtype=bool)
    position = 0
    for index, example in enumerate(examples):
        scores = [float(s) for s in logliks[position : position + len(example.choices)]]
        position += len(example.choices)
        normed = [
            score / max(len(choice), 1)
            for score, choice in zip(scores, example.choices, strict=True)
        ]
        correct[index] = max(range(len(scores)), key=scores.__getitem__) == example.gold
        correct_norm[index] = max(range(len(normed)), key=normed.__getitem__) == example.gold
    return {"acc": correct, "acc_norm": correct_norm}


def score_examples(examples: Sequence[MCExample], logliks: Sequence[float]) -> dict[str, float]:
    """acc, acc_norm (log-likelihood / choice length in characters), their standard errors, n.

    ``logliks`` holds one summed log-likelihood per choice, examples in order.
    """
    per_item = item_correct(examples, logliks)
    n = len(examples)
    acc, acc_norm = float(per_item["acc"].mean()), float(per_item["acc_norm"].mean())
    return {
        "acc": acc,
        "acc_stderr": _mean_stderr(acc, n),
        "acc_norm": acc_norm,
        "acc_norm_stderr": _mean_stderr(acc_norm, n),
        "n": n,
    }


def _mean_stderr(p: float, n: int) -> float:
    """Standard error of a mean of n 0/1 values (the harness's sample formula)."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def evaluate_mc(
    model,
    tokenizer,
    task_names: str | Sequence[str],
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Score ``model`` on each task.

    Returns ``{task: {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n"}}``.

    ``limit``/``seed`` pick a seeded subset per task; ``num_fewshot`` applies to every task
    (only mmlu supports > 0). The model's weights and training flags are left as they were;
    inputs go to ``device`` (default: the device of the model's input embeddings).
    """
    names = [task_names] if isinstance(task_names, str) else list(task_names)
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks: {', '.join(TASKS)}")
    results = {}
    for name in names:
        examples = load_task(name, limit=limit, seed=seed, num_fewshot=num_fewshot)
        requests = encode_examples(tokenizer, examples)
        logliks = loglikelihoods(model, requests, batch_size, device, progress, desc=name)
        results[name] = score_examples(examples, logliks.tolist())
    return results


def score_items(model, tokenizer, task_name: str, limit: int | None = None, batch_size: int = 8,
                seed: int = 0, device: torch.device | str | None = None,
                progress: bool = False) -> tuple[list[MCExample], dict[str, np.ndarray]]:
    """The questions of one task (``load_task(task_name, limit, seed)``) and which of them
    ``model`` gets right: ``(examples, {"acc": bool[n], "acc_norm": bool[n]})``, in order, for
    paired comparisons with another model or with a rule that needs no model."""
    if task_name not in TASKS:
        raise ValueError(f"unknown task {task_name!r}; known tasks: {', '.join(TASKS)}")
    examples = load_task(task_name, limit=limit, seed=seed)
    logliks = loglikelihoods(model, encode_examples(tokenizer, examples), batch_size, device, progress, desc=task_name)
    return examples, item_correct(examples, logliks.tolist())
