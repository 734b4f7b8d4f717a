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
