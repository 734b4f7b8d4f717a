"""``pruning.lowest_layers``: the one lowest-k selection the notebooks and rankings share."""

import numpy as np
import pytest

from shortlab.pruning import lowest_layers


def test_lowest_first_with_ties_broken_by_index():
    scores = [0.5, 0.1, 0.3, 0.1, 0.9]
    assert lowest_layers(scores, 3) == [1, 3, 2]
    assert lowest_layers(scores, len(scores)) == [1, 3, 2, 0, 4]
    assert lowest_layers(scores, 0) == []


def test_mappings_arrays_and_lists_agree():
    values = np.array([0.2, 0.05, 0.4, 0.05, 0.0])
    as_mapping = {layer: float(value) for layer, value in enumerate(values)}
    assert lowest_layers(values, 3) == lowest_layers(list(values), 3) == lowest_layers(as_mapping, 3)
    assert lowest_layers(values, 3) == [4, 1, 3]


def test_mapping_keys_are_the_layer_indices():
    # a mapping need not cover 0..n-1 nor be ordered: its keys are what is returned
    assert lowest_layers({7: 1.0, 2: 3.0, 5: 1.0}, 2) == [5, 7]


def test_agrees_with_sorting_by_score_then_index():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 40).astype(float)  # many ties
    expected = sorted(range(40), key=lambda i: (scores[i], i))
    for k in (1, 7, 40):
        assert lowest_layers(scores, k) == expected[:k]


@pytest.mark.parametrize("k", [-1, 4, 1.0, True, None])
def test_a_k_outside_the_layers_is_named(k):
    with pytest.raises(ValueError, match=r"k must be an int in 0\.\.3"):
        lowest_layers([0.1, 0.2, 0.3], k)


def test_nan_scores_are_rejected():
    with pytest.raises(ValueError, match=r"layers \[1\] are NaN"):
        lowest_layers([0.1, float("nan"), 0.3], 1)
