"""easy-VQA (the ``easy-vqa`` wheel: simple shapes and colours, 13 one-word answers): its
questions, answers and images, and the chat prompt llava-mini is asked them with."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from shortlab.wheels import WheelFile

EASY_VQA = WheelFile("easy-vqa", "easy_vqa", "data/answers.txt")
ANSWER_INSTRUCTION = "Answer with one word."


@dataclass(frozen=True)
class VQAItem:
    question: str
    answer: str
    image_id: int


def easy_vqa_root() -> Path:
    """The ``data`` folder of the installed ``easy-vqa`` wheel (found without importing it)."""
    return EASY_VQA.locate().parent


def easy_vqa_answers() -> list[str]:
    return [a.strip() for a in (easy_vqa_root() / "answers.txt").read_text().split("\n") if a.strip()]


def easy_vqa_questions(split: str) -> list[VQAItem]:
    """All questions of ``split`` ("train": 38,575 over 4,000 images; "test": 9,673 over 1,000)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rows = json.loads((easy_vqa_root() / split / "questions.json").read_text())
    return [VQAItem(question=q, answer=a, image_id=int(i)) for q, a, i in rows]


def easy_vqa_image(split: str, image_id: int):
    from PIL import Image

    with Image.open(easy_vqa_root() / split / "images" / f"{image_id}.png") as image:
        return image.convert("RGB")


def user_prompt(question: str) -> str:
    """The user turn's text after the image: easy-VQA questions are lower-case without a capital."""
    question = question.strip()
    return f"{question[:1].upper()}{question[1:]} {ANSWER_INSTRUCTION}"


def chat_text(processor, question: str) -> str:
    """The full prompt for one question: chat template, image first, generation prompt added."""
    messages = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": user_prompt(question)},
    ]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def fixed_test_questions(n: int = 40, seed: int = 0, split: str = "test") -> list[VQAItem]:
    """``n`` seeded questions drawn from few images (all questions of random images, in order),
    cheap to evaluate with packing."""
    by_image: dict[int, list[VQAItem]] = defaultdict(list)
    for item in easy_vqa_questions(split):
        by_image[item.image_id].append(item)
    image_ids = sorted(by_image)
    random.Random(seed).shuffle(image_ids)
    chosen: list[VQAItem] = []
    for image_id in image_ids:
        chosen.extend(by_image[image_id][: n - len(chosen)])
        if len(chosen) >= n:
            break
    return chosen


def majority_answer(items: list[VQAItem]) -> tuple[str, float]:
    """The most frequent answer of ``items`` and its share."""
    counts: dict[str, int] = defaultdict(int)
    for item in items:
        counts[item.answer] += 1
    answer = max(sorted(counts), key=counts.__getitem__)
    return answer, counts[answer] / len(items)


# ---------------------------------------------------------------- baselines and intervals

SHAPE_ANSWERS = ("circle", "rectangle", "triangle")
QUESTION_TYPES = ("yes/no", "shape", "colour")


def question_type(item: VQAItem) -> str:
    """easy-VQA's three kinds of question, told apart by their answer set."""
    if item.answer in ("yes", "no"):
        return "yes/no"
    return "shape" if item.answer in SHAPE_ANSWERS else "colour"


class QuestionPrior:
    """The answer a model that never looks at the image would give: for each question text, its
    most frequent answer in ``train_items`` (ties: alphabetical); unseen texts get the overall
    majority answer. This is the floor an image-using model must clear."""

    def __init__(self, train_items: list[VQAItem]):
        if not train_items:
            raise ValueError("QuestionPrior needs at least one training question")
        counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for item in train_items:
            counts[item.question][item.answer] += 1
        self.by_question = {q: max(sorted(c), key=c.__getitem__) for q, c in counts.items()}
        self.fallback = majority_answer(train_items)[0]

    def predict(self, question: str) -> str:
        return self.by_question.get(question, self.fallback)


def blank_image(size: int = 64, colour: tuple[int, int, int] = (255, 255, 255)):
    """A uniform image the size of easy-VQA's: shown instead of the real one, it tells how much of
    a model's accuracy comes from the question alone."""
    from PIL import Image

    return Image.new("RGB", (size, size), colour)


def type_chance(item: VQAItem, answers: list[str]) -> float:
    """The expected score of guessing uniformly among the answers of ``item``'s question type
    (``answers``: easy-VQA's answer set): 1/2 for yes/no, 1/3 for a shape, 1/(colours) else."""
    kind = question_type(item)
    return 1.0 / sum(question_type(VQAItem("", answer, 0)) == kind for answer in answers)


def no_model_rules(items: list[VQAItem], train_items: list[VQAItem], blank_predictions: list[str] | None = None,
                   answers: list[str] | None = None, chance=None) -> dict[str, list[float]]:
    """Per-item scores of the rules that need no model, on ``items``: "chance" (a uniform guess
    within the question's type: ``chance(item)``, by default easy-VQA's ``type_chance`` over
    ``answers``; a task's ``chance`` otherwise), "majority" (the training split's most frequent
    answer), "question prior" (``QuestionPrior``) and, given the model's answers with a blank
    image, "blank image". An accuracy is judged against the strongest of these
    (``stats.strongest_rule``), not against chance alone."""
    if chance is None:
        answers = answers if answers is not None else easy_vqa_answers()

        def chance(item):
            return type_chance(item, answers)
    prior, (majority, _) = QuestionPrior(train_items), majority_answer(train_items)
    rules = {"chance": [chance(item) for item in items],
             "majority": [float(item.answer == majority) for item in items],
             "question prior": [float(prior.predict(item.question) == item.answer) for item in items]}
    if blank_predictions is not None:
        if len(blank_predictions) != len(items):
            raise ValueError(f"need one blank-image answer per item: {len(items)} items, {len(blank_predictions)}")
        rules["blank image"] = [float(p == item.answer) for item, p in zip(items, blank_predictions)]
    return rules


def accuracy_report(items: list[VQAItem], predicted: list[str], *, n_resamples: int = 4000,
                    seed: int = 0, question_type=question_type, types=QUESTION_TYPES) -> dict:
    """Accuracy of ``predicted`` answers (aligned with ``items``), overall and per question type
    (``question_type(item)`` among ``types``: easy-VQA's by default, a task's own otherwise), each
    with a 95 % bootstrap interval clustered by image (questions about one image share it, so
    they are not independent). Returns {"all" | type: {"accuracy", "low", "high", "n", "images"}}
    and "correct": the per-item 0/1 list, for paired comparisons."""
    from shortlab.stats import bootstrap_interval

    if len(items) != len(predicted) or not items:
        raise ValueError(f"need one prediction per item and at least one item: {len(items)} items, "
                         f"{len(predicted)} predictions")
    correct = [float(p == item.answer) for item, p in zip(items, predicted)]
    report: dict = {"correct": correct}
    groups = {"all": list(range(len(items)))}
    kinds = [question_type(item) for item in items]
    for kind in types:
        groups[kind] = [i for i, found in enumerate(kinds) if found == kind]
    for name, index in groups.items():
        if not index:
            continue
        interval = bootstrap_interval([correct[i] for i in index], [items[i].image_id for i in index],
                                      n_resamples=n_resamples, seed=seed)
        report[name] = {"accuracy": interval.estimate, "low": interval.low, "high": interval.high,
                        "n": len(index), "images": len({items[i].image_id for i in index})}
    return report
