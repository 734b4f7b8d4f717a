import pytest

from shortlab import llava_mini as lm
from shortlab.llava_mini import QuestionPrior, VQAItem, accuracy_report, blank_image, question_type
from shortlab.models import load_model


def test_question_types_cover_the_answer_set():
    answers = lm.easy_vqa_answers()
    kinds = {answer: question_type(VQAItem("q", answer, 0)) for answer in answers}
    assert sorted(a for a, k in kinds.items() if k == "yes/no") == ["no", "yes"]
    assert sorted(a for a, k in kinds.items() if k == "shape") == ["circle", "rectangle", "triangle"]
    assert len([a for a, k in kinds.items() if k == "colour"]) == len(answers) - 5


def test_question_prior_takes_the_most_frequent_answer_per_question():
    train = [VQAItem("what shape?", "circle", 0), VQAItem("what shape?", "circle", 1),
             VQAItem("what shape?", "triangle", 2), VQAItem("is it red?", "no", 3),
             VQAItem("is it red?", "yes", 4), VQAItem("is it blue?", "yes", 5)]
    prior = QuestionPrior(train)
    assert prior.predict("what shape?") == "circle"
    assert prior.predict("is it red?") == "no"  # tie: alphabetical
    assert prior.predict("never asked?") == "circle"  # the overall majority (3 circles)
    with pytest.raises(ValueError, match="at least one"):
        QuestionPrior([])


def test_question_prior_on_the_real_splits_beats_the_majority_answer():
    train, test = lm.easy_vqa_questions("train"), lm.easy_vqa_questions("test")
    prior = QuestionPrior(train)
    accuracy = sum(prior.predict(it.question) == it.answer for it in test) / len(test)
    majority = sum(it.answer == lm.majority_answer(train)[0] for it in test) / len(test)
    # 0.6694 measured when the baseline was added (ties alphabetical; first-seen ties give 0.6700)
    assert accuracy == pytest.approx(0.6694, abs=5e-4)
    assert accuracy > majority + 0.25


def test_accuracy_report_clusters_by_image_and_splits_by_type():
    items = [VQAItem("q", a, image) for image in range(20) for a in ("yes", "circle", "red")]
    predicted = [it.answer if it.image_id % 2 == 0 else "no" for it in items]
    report = accuracy_report(items, predicted)
    assert report["all"]["accuracy"] == pytest.approx(0.5)
    assert report["all"]["images"] == 20 and report["all"]["n"] == 60
    for kind in ("yes/no", "shape", "colour"):
        assert report[kind]["n"] == 20 and report[kind]["accuracy"] == pytest.approx(0.5)
    # every image is all right or all wrong: the interval is that of 20 coin flips, not 60
    assert report["all"]["high"] - report["all"]["low"] > 0.3
    assert report["correct"][:3] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="one prediction per item"):
        accuracy_report(items, predicted[:-1])


def test_blank_image_is_shown_with_every_question():
    model, processor = load_model("tiny-llava")
    items = lm.fixed_test_questions(6, seed=3)
    blank = blank_image()
    assert blank.size == (64, 64) and blank.getpixel((10, 10)) == (255, 255, 255)
    with_blank = lm.evaluate_items(model, processor, items, image=blank)
    # the same blank image under every question gives what scoring one image per question gives
    by_hand = lm.score_answers(model, processor, [blank] * len(items), [[it.question] for it in items])
    expected = [max(scores, key=scores.__getitem__) for ((scores, _),) in by_hand]
    assert [p for _, p, _ in with_blank["predictions"]] == expected
    with pytest.raises(ValueError, match="not both"):
        lm.evaluate_items(model, processor, items, image=blank, features={})


def test_the_strongest_no_model_rule_on_the_real_questions_is_the_question_prior():
    from shortlab.stats import strongest_rule

    items = lm.fixed_test_questions(1000)
    rules = lm.no_model_rules(items, lm.easy_vqa_questions("train"))
    assert set(rules) == {"chance", "majority", "question prior"}
    assert all(len(scores) == len(items) for scores in rules.values())
    name, scores = strongest_rule(rules)
    # a uniform guess within the question's type already beats the majority answer ("yes")
    assert name == "question prior" and scores.mean() > sum(rules["chance"]) / len(items) > sum(rules["majority"]) / len(items)
