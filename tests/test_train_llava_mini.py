"""The training script on the scene task at toy sizes: a run stopped at a checkpoint resumes where
it stopped, and the finished run writes weights that build and a card that describes them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shortlab import llava_mini as lm
from shortlab.llava_mini.tasks import SCENES_TASK, task

REPOSITORY = Path(__file__).resolve().parent.parent


def _train(out: Path, *extra: str) -> str:
    command = [sys.executable, str(REPOSITORY / "scripts" / "train_llava_mini.py"), "--task", "scenes",
               "--stage", "2", "--init-projector", str(lm.WEIGHTS_DIR), "--lora-rank", "2", "--lora-alpha", "4",
               "--steps", "2", "--warmup", "1", "--batch-images", "1", "--lr", "1e-4", "--out", str(out),
               "--checkpoint-dir", str(out / "state"), "--checkpoint-every", "1", "--eval-images", "2",
               "--val-every", "1", "--val-images", "1", *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_scene_adapter_trains_resumes_and_writes_a_card(tmp_path):
    first = _train(tmp_path, "--max-minutes", "0")
    assert "stopping at step 1" in first and not (tmp_path / lm.CARD_FILE).exists()
    second = _train(tmp_path, "--compute-dtype", "float32")  # a machine without AMX finishes the run
    assert "resumed from" in second and "at step 1" in second
    card = json.loads((tmp_path / lm.CARD_FILE).read_text())
    stage = card["stages"][-1]
    assert stage["precision"] == ("frozen LLM in bfloat16 for steps 1-1, float32 for steps 2-2, "
                                  "projector/LoRA and loss in float32")
    assert card["data"]["task"] == "scenes" and stage["steps"] == 2 and "init" in stage
    assert [v["step"] for v in stage["validation"]] == [1, 2]  # the first chunk's curve survives the resume
    test = stage["evaluation"]["test_224px"]
    assert set(test["model"]) >= {"all"} and "blank_image" in test and "question_prior" in test
    assert len(test["prediction_counts"]) >= 1 and set(test["prediction_counts"]) <= set(SCENES_TASK.answers)
    model, _ = lm.build_llava_mini(trained=True, weights_dir=tmp_path)
    assert model is not None


def test_tasks_are_found_by_name_and_bad_names_are_refused():
    assert task("scenes") is SCENES_TASK and task(SCENES_TASK) is SCENES_TASK
    assert "yes" in task("easy-vqa").answers and len(task("easy-vqa").answers) == 13
    with pytest.raises(ValueError, match="unknown VQA task 'clevr'"):
        task("clevr")
    with pytest.raises(ValueError, match="splits"):
        SCENES_TASK.questions("dev")
    test = SCENES_TASK.questions("test")
    assert len(test) >= 2000 and len({item.image_id for item in test}) >= 400
    assert {SCENES_TASK.question_type(item) for item in test} == set(SCENES_TASK.question_types)


def test_accuracy_report_groups_by_the_tasks_own_question_types():
    items = SCENES_TASK.questions("validation")[:60]
    report = lm.accuracy_report(items, [item.answer for item in items], question_type=SCENES_TASK.question_type,
                                types=SCENES_TASK.question_types, n_resamples=200)
    assert report["all"]["accuracy"] == 1.0
    assert set(report) - {"all", "correct"} == set(SCENES_TASK.question_types)
    assert sum(report[kind]["n"] for kind in SCENES_TASK.question_types) == len(items)


def test_no_model_rules_on_scenes_use_the_family_chance_and_the_training_prior():
    items = SCENES_TASK.questions("test")[:200]
    train = SCENES_TASK.questions("train")[:3000]
    rules = lm.no_model_rules(items, train, chance=SCENES_TASK.chance)
    assert rules["chance"] == [SCENES_TASK.chance(item) for item in items]
    yes_no = [r for r, item in zip(rules["question prior"], items) if item.family in ("existence", "relation")]
    assert 0.3 < sum(yes_no) / len(yes_no) < 0.75  # balanced yes/no: the prior is near one half
