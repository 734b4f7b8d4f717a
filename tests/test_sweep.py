import json

import pytest
import torch

from shortlab import llava_mini as lm
from shortlab.llava_mini.sweep import (
    PredictionStore, Setting, evaluate_setting, items_fingerprint, prefix_reach, setting_intervention, token_mask,
)
from shortlab.models import load_model
from shortlab.prefix import PrefixCache
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


def test_prefix_reach_stops_before_the_first_changed_layer():
    assert prefix_reach(Setting(), 8) == 7  # the dense model: all but the last layer
    assert prefix_reach(Setting(blank_image=True), 8) == 0  # other inputs
    assert prefix_reach(Setting(frozen_layers=(3, 5)), 8) == 3
    assert prefix_reach(Setting(fastv_k=3, fastv_ratio=0.5), 8) == 2  # layer k - 1 ranks the tokens
    assert prefix_reach(Setting(frozen_layers=(5,), fastv_k=3, fastv_ratio=0.5), 8) == 2
    assert prefix_reach(Setting(frozen_layers=(0, 1)), 8) == 0
    assert prefix_reach(Setting(fastv_k=1, fastv_ratio=0.5), 8) == 0


def _scores(model, processor, items, setting, prefix=None):
    by_image = {}
    for item in items:
        by_image.setdefault(item.image_id, []).append(item.question)
    features = lm.evidence.eval_features(model, processor, items)
    return lm.score_answers(model, processor, None, list(by_image.values()), batch_size=2,
                            features=[features[i] for i in by_image],
                            intervention=setting_intervention(model, setting, prefix))


def test_shared_first_layers_change_no_score(tiny):
    """Every setting that leaves the first two layers as they are gets the same log-likelihoods
    through one PrefixCache as computed in full, and the later settings compute no first layer."""
    model, processor, items = tiny
    settings = [Setting(), Setting(frozen_layers=(2, 3)), Setting(frozen_layers=(2,), frozen_tokens="random", seed=3),
                Setting(fastv_k=3, fastv_ratio=0.5), Setting(frozen_layers=(3,), fastv_k=3, fastv_ratio=0.75)]
    prefix = PrefixCache(2)
    for setting in settings:
        full = _scores(model, processor, items, setting)
        shared = _scores(model, processor, items, setting, prefix)
        for image_full, image_shared in zip(full, shared):
            for (scores, greedy), (scores_shared, greedy_shared) in zip(image_full, image_shared):
                assert greedy == greedy_shared
                assert scores_shared == pytest.approx(scores, abs=1e-6)
    batches = prefix.misses
    assert batches == len({item.image_id for item in items}) // 2 + len({item.image_id for item in items}) % 2
    assert prefix.hits == batches * (len(settings) - 1)
    assert len(model_parts_layers(model)) == 4 and not any(type(layer).__name__ == "_Layer"
                                                          for layer in model_parts_layers(model))


def model_parts_layers(model):
    from shortlab.arch import model_parts
    return list(model_parts(model).layers)


def test_a_prefix_deeper_than_the_setting_allows_is_refused(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="only its first 1 layers .* cannot share the first 2"):
        setting_intervention(model, Setting(frozen_layers=(1, 3)), PrefixCache(2))
    with pytest.raises(ValueError, match="cannot share the first 3"):
        setting_intervention(model, Setting(fastv_k=3, fastv_ratio=0.5), PrefixCache(3))
    with pytest.raises(ValueError, match="only its first 0 layers"):
        setting_intervention(model, Setting(blank_image=True), PrefixCache(1))
