"""Notebook 02's answer explorer (shortlab.llava_mini.explorer) on the tiny random LLaVA."""

import matplotlib
import pytest
import torch

from shortlab.arch import model_parts
from shortlab.hooks import keep_tokens_unchanged
from shortlab.llava_mini import easy_vqa_answers, easy_vqa_image, fixed_test_questions, score_answers
from shortlab.llava_mini import explorer
from shortlab.models import load_model

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def tiny_llava(one_thread):
    return load_model("tiny-llava")


@pytest.fixture(scope="module")
def items():
    """Two questions about each of two test images."""
    questions = fixed_test_questions(30, seed=0)
    images = list(dict.fromkeys(item.image_id for item in questions))[:2]
    return [item for image_id in images for item in [q for q in questions if q.image_id == image_id][:2]]


def _softmax(scores: dict) -> dict:
    values = torch.softmax(torch.tensor(list(scores.values()), dtype=torch.float64), 0)
    return dict(zip(scores, values.tolist()))


def test_probabilities_are_the_closed_set_softmax_of_the_scores(tiny_llava, items):
    model, processor = tiny_llava
    image = easy_vqa_image("test", items[0].image_id)
    questions = [item.question for item in items if item.image_id == items[0].image_id]
    distributions = explorer.answer_probabilities(model, processor, image, questions)
    scores = score_answers(model, processor, [image], [questions])[0]
    assert len(distributions) == len(questions)
    for distribution, (answer_scores, _) in zip(distributions, scores):
        assert list(distribution) == easy_vqa_answers()
        assert sum(distribution.values()) == pytest.approx(1.0, abs=1e-12)
        assert all(p >= 0 for p in distribution.values())
        assert max(distribution, key=distribution.get) == max(answer_scores, key=answer_scores.get)


def test_frozen_distribution_is_the_zeroed_update_reference_and_leaves_the_model_as_it_was(tiny_llava, items):
    model, processor = tiny_llava
    parts = model_parts(model)
    image = easy_vqa_image("test", items[0].image_id)
    layers = [0, parts.num_layers - 1]
    dense_before = explorer.answer_probabilities(model, processor, image, [items[0].question])[0]
    frozen = explorer.answer_probabilities(model, processor, image, [items[0].question], layers)[0]

    def zeroed_update(input_ids, question_ends):
        return keep_tokens_unchanged(model, layers, input_ids == model.config.image_token_id)

    reference = _softmax(score_answers(model, processor, [image], [[items[0].question]],
                                       intervention=zeroed_update)[0][0][0])
    assert max(abs(frozen[a] - reference[a]) for a in reference) < 1e-5
    assert max(abs(frozen[a] - dense_before[a]) for a in reference) > 1e-6, "freezing changed nothing"
    dense_after = explorer.answer_probabilities(model, processor, image, [items[0].question])[0]
    assert dense_after == dense_before
    for layer in parts.layers:
        assert "forward" not in vars(layer) and not layer._forward_hooks and not layer._forward_pre_hooks


def test_bad_questions_and_layers_are_refused_before_any_model_pass(tiny_llava, items):
    model, processor = tiny_llava
    image = easy_vqa_image("test", items[0].image_id)
    with pytest.raises(ValueError, match="non-empty list"):
        explorer.answer_probabilities(model, processor, image, [])
    with pytest.raises(ValueError, match="non-empty list"):
        explorer.answer_probabilities(model, processor, image, "what shape is it?")
    with pytest.raises(IndexError):
        explorer.answer_probabilities(model, processor, image, [items[0].question], [model_parts(model).num_layers])


def test_layer_presets():
    lc, cosine = [3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0]
    presets = explorer.layer_presets(lc, cosine, 2, seed=5)
    assert list(presets) == list(explorer.PRESETS)
    assert presets["none"] == () and presets["LC"] == (1, 3) and presets["visual cosine"] == (0, 1)
    assert len(presets["random"]) == 2 and list(presets["random"]) == sorted(set(presets["random"]))
    assert presets["random"] == explorer.layer_presets(lc, cosine, 2, seed=5)["random"]
    assert all(layers == () for layers in explorer.layer_presets(lc, cosine, 0).values())
    with pytest.raises(ValueError, match="n must be in 0..4"):
        explorer.layer_presets(lc, cosine, 5)
    with pytest.raises(ValueError, match="visual_cosine 3"):
        explorer.layer_presets(lc, cosine[:3], 2)


def test_view_table_and_figure(tiny_llava, items):
    model, processor = tiny_llava
    dense_only = explorer.answer_view(model, processor, items[0], [])
    assert dense_only.frozen == dense_only.dense and dense_only.frozen_layers == ()
    view = explorer.answer_view(model, processor, items[0], [-1], dense=dense_only.dense)
    assert view.frozen_layers == (model_parts(model).num_layers - 1,) and view.dense == dense_only.dense
    table = view.table()
    assert len(table) == 2 * len(easy_vqa_answers()) and set(table.model) == {"dense", "frozen"}
    fig = explorer.draw_answer_view(view)
    bars = [patch for patch in fig.axes[1].patches if patch.get_height() > 0]
    assert len(bars) == len(table)
    bold = [label.get_text() for label in fig.axes[1].get_xticklabels() if label.get_fontweight() == "bold"]
    assert bold == [items[0].answer]
    matplotlib.pyplot.close(fig)


def test_explorer_controls_redraw_on_every_change(tiny_llava, items, monkeypatch):
    model, processor = tiny_llava
    presets = explorer.layer_presets([0.0] * model_parts(model).num_layers,
                                     [0.0] * model_parts(model).num_layers, 1)
    drawn = []
    real_view = explorer.answer_view

    def counting_view(*args, **kwargs):
        view = real_view(*args, **kwargs)
        drawn.append(view)
        return view

    monkeypatch.setattr(explorer, "answer_view", counting_view)
    initial = real_view(model, processor, items[0], presets["LC"])
    box = explorer.answer_explorer(model, processor, items, presets, initial=initial)
    assert not drawn, "the initial view is shown without another model pass"
    image, question = box.children[0].children
    layers, buttons = box.children[1].children
    assert layers.value == presets["LC"]
    next(button for button in buttons.children if button.description == "none").click()
    assert layers.value == () and drawn[-1].frozen_layers == () and drawn[-1].item == items[0]
    other_image = next(item for item in items if item.image_id != items[0].image_id)
    image.value = other_image.image_id
    assert len(drawn) == 2 and drawn[-1].item == other_image
    assert [label for label, _ in question.options] == [it.question for it in items if it.image_id == other_image.image_id]
    with pytest.raises(ValueError, match="unknown preset"):
        explorer.answer_explorer(model, processor, items, presets, default="best")


def test_view_of_a_scene_question_scores_its_own_candidates_on_its_own_image(tiny_llava):
    """On the scene task the explorer shows the scene (not an easy-VQA image of the same id) and
    spreads the probability over the question's own candidates (yes/no for an existence question)."""
    import numpy as np

    from shortlab.llava_mini.tasks import task

    model, processor = tiny_llava
    scenes = task("scenes")
    item = next(it for it in scenes.questions("test") if scenes.question_type(it) == "existence")
    view = explorer.answer_view(model, processor, item, [0], task="scenes")
    assert set(view.dense) == set(scenes.candidates(item.question)) == set(view.frozen)
    assert sum(view.dense.values()) == pytest.approx(1.0)
    fig = explorer.draw_answer_view(view, task="scenes")
    shown = fig.axes[0].images[0].get_array()
    assert np.array_equal(np.asarray(shown), np.asarray(scenes.image("test", item.image_id)))
    matplotlib.pyplot.close(fig)
