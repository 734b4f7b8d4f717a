import json

import pytest
import torch

from shortlab import llava_mini as lm
from shortlab.llava_mini.sweep import (
    PredictionStore, Setting, evaluate_setting, items_fingerprint, setting_intervention, token_mask,
)
from shortlab.models import load_model
from shortlab.shortv import freeze_visual_tokens


@pytest.fixture(scope="module")
def tiny():
    model, processor = load_model("tiny-llava")
    return model, processor, lm.fixed_test_questions(6, seed=2)


def test_token_groups_from_the_inputs():
    ids = torch.tensor([[5, 9, 9, 9, 6, 7], [9, 9, 4, 4, 4, 4]])
    visual = token_mask(ids, 9, "visual")
    assert visual.tolist() == [[False, True, True, True, False, False], [True, True, False, False, False, False]]
    assert torch.equal(token_mask(ids, 9, "text"), ~visual)
    assert token_mask(ids, 9, "all").all()
    random = token_mask(ids, 9, "random", seed=1)
    assert random.sum(1).tolist() == [3, 2]  # as many as the visual tokens of each row
    assert torch.equal(random, token_mask(ids, 9, "random", seed=1))
    assert not torch.equal(random, token_mask(ids, 9, "random", seed=2))


@pytest.mark.parametrize("kwargs, match", [
    ({"frozen_tokens": "pixels"}, "frozen_tokens"),
    ({"frozen_layers": (3, 1)}, "sorted"),
    ({"frozen_layers": (1, 1)}, "distinct"),
    ({"fastv_k": 2}, "together"),
    ({"fastv_ratio": 0.5}, "together"),
])
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Setting(**kwargs)


def test_dense_setting_has_no_intervention_and_freezing_matches_the_context_manager(tiny):
    model, processor, items = tiny
    assert setting_intervention(model, Setting()) is None
    dense = evaluate_setting(model, processor, items, Setting())
    assert dense == [p for _, p, _ in sorted(
        lm.evaluate_items(model, processor, items, batch_size=1)["predictions"],
        key=lambda row: items.index(row[0]))]
    layers = [1, 2]
    frozen = evaluate_setting(model, processor, items, Setting(frozen_layers=tuple(layers)))
    by_hand = lm.evaluate_items(
        model, processor, items, batch_size=1,
        intervention=lambda ids, ends: freeze_visual_tokens(model, layers,
                                                            token_mask=ids == model.config.image_token_id))
    expected = {id(item): p for item, p, _ in by_hand["predictions"]}
    assert frozen == [expected[id(item)] for item in items]


def test_store_resumes_and_refuses_another_fingerprint(tiny, tmp_path):
    model, processor, items = tiny
    path = tmp_path / "sweep.json"
    fingerprint = {"model": "tiny-llava", "items": items_fingerprint(items)}
    settings = [Setting(), Setting(frozen_layers=(0, 3), frozen_tokens="random", seed=4),
                Setting(fastv_k=1, fastv_ratio=0.5)]
    first = PredictionStore(path, fingerprint)
    results = [evaluate_setting(model, processor, items, s, first) for s in settings]
    assert first.computed == 3 and all(len(r) == len(items) for r in results)
    assert json.loads(path.read_text())["fingerprint"] == fingerprint

    again = PredictionStore(path, fingerprint)
    assert [evaluate_setting(model, processor, items, s, again) for s in settings] == results
    assert again.computed == 0  # everything read back
    with pytest.raises(ValueError, match="holds predictions for"):
        PredictionStore(path, {**fingerprint, "model": "other"})
    assert not list(tmp_path.glob(".sweep.json.*")), "no temporary file left behind"


def test_a_failed_setting_stores_nothing(tiny, tmp_path):
    path = tmp_path / "sweep.json"
    store = PredictionStore(path, {"model": "x"})

    def fail():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.predictions(Setting(), fail)
    assert store.results == {} and not path.exists()
