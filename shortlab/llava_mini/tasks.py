"""The visual question-answering tasks llava-mini is trained and judged on, behind one interface:
their questions per split, images, closed answer set, question types, the chance score of a
question, the blank image, and the weights trained for them.

* ``easy-vqa``: one coloured shape on a 64-pixel image (the ``easy-vqa`` wheel); llava-mini
  answers it almost perfectly, which leaves nothing for layer choices to differ on;
* ``scenes``: the generated CLEVR-like scenes of ``shortlab.llava_mini.scenes``: several objects,
  counts and relations, so an answer needs the image's detail.

Each task has its own trained weights (projector and LoRA delta): ``build_llava_mini(weights_dir=
task.weights_dir)``. The scene adapter is a second adapter, not joint training, so the easy-VQA
weights stay exactly as they were.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from shortlab.llava_mini import easy_vqa, scenes
from shortlab.llava_mini.build import WEIGHTS_DIR
from shortlab.llava_mini.easy_vqa import VQAItem


@dataclass(frozen=True)
class VQATask:
    name: str
    title: str  # the name in prose and on axes
    description: str
    splits: tuple[str, ...]
    answers: tuple[str, ...]  # every answer the task has
    candidates: Callable[[str], tuple[str, ...]]  # a question's text -> the answers it is scored over
    question_types: tuple[str, ...]
    questions: Callable[[str], list[VQAItem]]  # split -> its questions, image by image
    image: Callable[[str, int], object]  # (split, image id) -> RGB PIL image
    question_type: Callable[[VQAItem], str]
    chance: Callable[[VQAItem], float]  # a uniform guess among the answers of the question's type
    blank_image: Callable[[], object]
    weights_dir: Path
    calibration_split: str  # where layer rankings are computed (never the split they are judged on)
    # question types that need the image's detail, and the type that needs least of it: frozen
    # visual tokens should hurt the detailed ones first (empty when the task has no such order)
    detailed_types: tuple[str, ...] = ()
    coarse_type: str | None = None
    # a question that makes sense of any image, asked of photographs far from the task's images
    photo_question: str = "What is in the image?"

    def check_split(self, split: str) -> str:
        if split not in self.splits:
            raise ValueError(f"{self.name} has splits {self.splits}, not {split!r}")
        return split


# Images per split of the scene task: the test split's 420 images with one question per family
# give about 2,100 test questions, clustered by image. Training asks four questions of each family
# per image: the image prefix dominates the cost of a step, and more questions about it cost little.
SCENE_IMAGES = {"train": 6000, "validation": 300, "test": 420}
SCENE_QUESTIONS_PER_FAMILY = {"train": 4, "validation": 1, "test": 1}


def _scene_questions(split: str) -> list[VQAItem]:
    if split not in SCENE_IMAGES:
        raise ValueError(f"scenes has splits {tuple(SCENE_IMAGES)}, not {split!r}")
    return list(scenes.scene_vqa_questions(split, SCENE_IMAGES[split], SCENE_QUESTIONS_PER_FAMILY[split]))


def _easy_vqa_chance(item: VQAItem) -> float:
    return easy_vqa.type_chance(item, easy_vqa.easy_vqa_answers())


EASY_VQA_TASK = VQATask(
    name="easy-vqa",
    title="easy-VQA",
    description="easy-VQA (PyPI easy-vqa 1.0): one shape on a 64x64 image, 13 answers",
    splits=("train", "test"),
    answers=(),  # filled from the wheel on first use: see task()
    candidates=lambda question: tuple(easy_vqa.easy_vqa_answers()),  # all 13 (task() reads them once)
    question_types=easy_vqa.QUESTION_TYPES,
    questions=easy_vqa.easy_vqa_questions,
    image=easy_vqa.easy_vqa_image,
    question_type=easy_vqa.question_type,
    chance=_easy_vqa_chance,
    blank_image=easy_vqa.blank_image,
    weights_dir=WEIGHTS_DIR,
    calibration_split="train",
    photo_question="what shape is in the image?",
)

SCENES_TASK = VQATask(
    name="scenes",
    title="scene-VQA",
    description=(f"generated CLEVR-like scenes ({scenes.IMAGE_SIZE} px, {scenes.MIN_OBJECTS}-{scenes.MAX_OBJECTS} "
                 f"objects; questions: {', '.join(scenes.FAMILIES)}), {len(scenes.ANSWERS)} answers"),
    splits=scenes.SPLITS,
    answers=scenes.ANSWERS,
    candidates=scenes.candidate_answers,
    question_types=scenes.FAMILIES,
    questions=_scene_questions,
    image=scenes.scene_image,
    question_type=scenes.scene_question_family,
    chance=scenes.family_chance,
    blank_image=scenes.blank_scene_image,
    weights_dir=WEIGHTS_DIR / "scenes",
    calibration_split="validation",
    # counting needs every object and relations need two objects' positions; existence needs one
    # object's colour and shape anywhere in the image
    detailed_types=("counting", "relation"),
    coarse_type="existence",
    photo_question="How many objects are there?",
)

TASKS = {"easy-vqa": EASY_VQA_TASK, "scenes": SCENES_TASK}


def task(name: str | VQATask) -> VQATask:
    """The task called ``name`` ("easy-vqa" or "scenes"), with its answer set resolved."""
    if isinstance(name, VQATask):
        return name
    if name not in TASKS:
        raise ValueError(f"unknown VQA task {name!r}; tasks: {sorted(TASKS)}")
    return _resolved(name)


@cache
def _resolved(name: str) -> VQATask:
    """``TASKS[name]`` with an answer set read from its wheel read once: candidates and chance,
    called for every question, use that set instead of reading the file again."""
    found = TASKS[name]
    if found.answers:
        return found
    answers = tuple(easy_vqa.easy_vqa_answers())
    return replace(found, answers=answers, candidates=lambda question: answers,
                   chance=lambda item: easy_vqa.type_chance(item, list(answers)))
