"""The generated scene-VQA task: deterministic, disjoint splits, every answer derivable from the
scene (through the question's text, not only through the program it was drawn with)."""

from collections import Counter

import numpy as np
import pytest

from shortlab.llava_mini import scenes as S


def _fresh(split, index):
    S.make_scene.cache_clear()
    return S.make_scene(split, index)


def test_same_split_and_index_give_the_same_scene_questions_and_pixels():
    first = _fresh("train", 7)
    image = np.asarray(S.render(first))
    questions = S.scene_questions(first)
    second = _fresh("train", 7)
    assert first == second and first is not second
    assert np.array_equal(image, np.asarray(S.render(second)))
    assert S.scene_questions(second) == questions


def test_splits_draw_from_disjoint_seeds_and_share_no_scene():
    names = {split: {S.scene_seed(split, i) for i in range(300)} for split in S.SPLITS}
    assert not (names["train"] & names["validation"] or names["train"] & names["test"]
                or names["validation"] & names["test"])
    layouts = {split: {S.make_scene(split, i).objects for i in range(300)} for split in S.SPLITS}
    assert not (layouts["train"] & layouts["test"] or layouts["validation"] & layouts["test"]
                or layouts["train"] & layouts["validation"])


def test_bad_split_or_index_is_refused_by_name():
    with pytest.raises(ValueError, match="split must be one of"):
        S.make_scene("dev", 0)
    with pytest.raises(ValueError, match="index must be >= 0"):
        S.scene_seed("test", -1)
    with pytest.raises(ValueError, match="not a scene question"):
        S.parse_question("What is the meaning of life?")


@pytest.mark.parametrize("split", S.SPLITS)
def test_every_answer_follows_from_the_question_text_and_the_scene(split):
    for index in range(60):
        scene = S.make_scene(split, index)
        for item in S.scene_questions(scene):
            program = S.parse_question(item.question)
            assert program == item.program
            assert S.question_text(program) == item.question
            assert S.answer(scene, program) == item.answer
            assert item.answer in S.ANSWERS and item.image_id == index


def test_answers_hand_checked_on_a_constructed_scene():
    objects = (S.SceneObject("circle", "red", "small", 30, 100), S.SceneObject("square", "blue", "large", 150, 60),
               S.SceneObject("circle", "blue", "small", 190, 180))
    scene = S.Scene("test", 0, objects)
    assert S.answer(scene, ("existence", "red", "circle", None)) == "yes"
    assert S.answer(scene, ("existence", "red", "square", None)) == "no"
    assert S.answer(scene, ("existence", "blue", None, "large")) == "yes"
    assert S.answer(scene, ("counting", None, "circle")) == "2"
    assert S.answer(scene, ("counting", "blue", None)) == "2"
    assert S.answer(scene, ("counting", None, None)) == "3"
    assert S.answer(scene, ("attribute", "colour", "leftmost")) == "red"
    assert S.answer(scene, ("attribute", "shape", "topmost")) == "square"
    assert S.answer(scene, ("attribute", "size", "bottommost")) == "small"
    assert S.answer(scene, ("relation", ("red", "circle"), "left of", ("blue", "square"))) == "yes"
    assert S.answer(scene, ("relation", ("blue", "square"), "below", ("red", "circle"))) == "no"
    assert S.answer(scene, ("comparison", "shape", "circle", "square")) == "yes"
    assert S.answer(scene, ("comparison", "colour", "red", "blue")) == "no"
    with pytest.raises(ValueError, match="ambiguous"):  # two blue circles would make it ambiguous
        S.answer(S.Scene("test", 0, objects + (S.SceneObject("circle", "blue", "large", 100, 200),)),
                 ("relation", ("red", "circle"), "left of", ("blue", "circle")))


def test_objects_stay_visible_and_the_pixels_show_their_colours():
    for index in range(40):
        scene = S.make_scene("test", index)
        assert S.MIN_OBJECTS <= len(scene.objects) <= S.MAX_OBJECTS
        assert min(scene.visible_fractions()) >= S.MIN_VISIBLE
        image = np.asarray(S.render(scene)).astype(int)
        fine = np.full((2 * S.IMAGE_SIZE,) * 2, -1)
        for k, obj in enumerate(scene.objects):
            fine[obj.mask(S.IMAGE_SIZE, 2)] = k
        blocks = fine.reshape(S.IMAGE_SIZE, 2, S.IMAGE_SIZE, 2).transpose(0, 2, 1, 3).reshape(S.IMAGE_SIZE, S.IMAGE_SIZE, 4)
        labels = scene.labels()
        for k, obj in enumerate(scene.objects):
            # a pixel all of whose sub-pixels show object k has exactly its colour
            pure = (blocks == k).all(-1)
            assert pure.sum() >= 0.5 * (labels == k).sum()
            assert (image[pure] == S.COLOURS[obj.colour]).all()
        assert (image[(blocks == -1).all(-1)] == S.BACKGROUND).all()
    assert np.asarray(S.blank_scene_image()).std() == 0


def test_yes_no_families_are_balanced_and_every_family_is_asked():
    items = S.scene_vqa_questions("validation", 300)
    families = Counter(item.family for item in items)
    assert set(families) == set(S.FAMILIES)
    assert min(families.values()) >= 0.85 * 300 * S.QUESTIONS_PER_FAMILY
    for family in ("existence", "relation", "comparison"):
        answers = Counter(item.answer for item in items if item.family == family)
        assert set(answers) == {"yes", "no"}
        assert abs(answers["yes"] / sum(answers.values()) - 0.5) < 0.06
    counts = Counter(item.answer for item in items if item.family == "counting")
    assert len(counts) >= 7  # counts spread over the range, not one dominant number


def test_family_chance_matches_the_answer_sets():
    items = S.scene_vqa_questions("validation", 20)
    by_family = {item.family: S.family_chance(item) for item in items if item.family != "attribute"}
    assert by_family == {"existence": 0.5, "relation": 0.5, "comparison": 0.5, "counting": 1 / 9}
    colour = next(i for i in items if i.family == "attribute" and i.program[1] == "colour")
    assert S.family_chance(colour) == 1 / len(S.COLOURS)


def test_every_answer_is_among_its_questions_candidates():
    for item in S.scene_vqa_questions("test", 80, 1):
        assert item.answer in S.candidate_answers(item.question)
    assert S.candidate_answers("What size is the leftmost object?") == ("small", "large")
