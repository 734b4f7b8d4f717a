r"""Multiple-choice examples, and each task's prompt as the lm-evaluation-harness builds it.

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
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
MMLU_LETTERS = ("A", "B", "C", "D")


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
