"""Notebook 02's result sentences follow the verdicts they are built from: each outcome reads
differently, and nothing in them is fixed text where a number belongs."""

import numpy as np
import pandas as pd
import pytest

from shortlab.llava_mini import words
from shortlab.llava_mini.evidence import judge
from shortlab.stats import CONTRADICTED, EQUIVALENT, SUPPORTED, Interval


def interval(estimate, low, high):
    return Interval(estimate, low, high, 0.95, "toy")


@pytest.mark.parametrize("layers, expected", [([3, 4, 5, 9], "3–5, 9"), ([0], "0"), ([], "none"), ([7, 1, 2], "1–2, 7")])
def test_layer_ranges(layers, expected):
    assert words.layer_ranges(layers) == expected


def test_layer_contribution_words_name_zero_layers_and_the_verdict():
    visual = np.array([1e-2, 1e-3, 1e-4, 0.0])
    text = np.array([1e-1, 1e-4, 1e-2, 1e-3])
    supported = judge(interval(0.3, 0.2, 0.4), margin=0.1)
    sentence = words.layer_contribution_words(visual, text, supported, [2, 3])
    assert "in 3 of 4 layers" in sentence and "holds" in sentence
    assert "layer 3 is exactly 0: in the last layer" in sentence
    assert "layers 2–3: 2 of them in the second half" in sentence
    failed = words.layer_contribution_words(visual, text, judge(interval(-0.3, -0.4, -0.2), margin=0.1), [0])
    assert "fails" in failed and "second half" in failed


def test_baseline_and_curve_words_change_with_the_outcome():
    dense, blank, prior = interval(0.87, 0.85, 0.89), interval(0.45, 0.43, 0.47), interval(0.5, 0.48, 0.52)
    uses = words.baseline_words(dense, blank, prior, judge(interval(0.37, 0.34, 0.4), margin=0.01), "question prior",
                                "all 5 supported.", ceiling=False)
    assert "uses the image" in uses and "off the ceiling" in uses
    blind = words.baseline_words(dense, blank, prior, judge(interval(0.0, -0.005, 0.005), margin=0.01), "prior",
                                 "", ceiling=True)
    assert "does no better" in blind and "at the accuracy ceiling" in blind
    loss = judge(interval(0.05, 0.03, 0.07), margin=0.01)
    curve = words.frozen_curve_words({6: SUPPORTED, 12: SUPPORTED, 24: CONTRADICTED}, 0.01, 6, 18, 30, 0.01, 18,
                                     loss)
    assert "supported at N = 6, 12; contradicted at N = 24" in curve
    assert "up to N = 6 of 30" in curve and "from N = 18 on" in curve and "fails" not in curve.split("At ShortV")[0]
    none_kept = words.frozen_curve_words({6: EQUIVALENT}, 0.01, None, None, 30, 0.01, 6, loss)
    assert "At no N is the loss" in none_kept and "the same within ±0.01 at N = 6" in none_kept


def test_other_section_words():
    judgement = judge(interval(0.4, 0.3, 0.5), margin=0.01)
    assert "the text tokens: 0.400 [0.300, 0.500] (supported)" in words.token_words({"text": judgement}, 0.01)
    assert "holds" in words.frontier_words(judgement, {"N=18 R=50%": CONTRADICTED}, 0.01)
    assert "fails" in words.frontier_words(None, {"x": CONTRADICTED}, 0.01)
    assert "No FastV" in words.frontier_words(None, {}, 0.01)
    assert "is a tie" in words.stability_words(12, 3, 0.8, "12 the same.", EQUIVALENT, 0.01)
    speed = pd.DataFrame({"measured_speedup": [1.0, 1.2, 1.5], "predicted_speedup": [1.0, 1.25, 2.0]}, index=[0, 6, 12])
    speed["measured_over_predicted"] = speed.measured_speedup / speed.predicted_speedup
    sentence = words.speed_words(speed, 12)
    assert "1.50× faster against 2.00×" in sentence and "from 75% to 96%" in sentence
    assert "no claim" in words.type_loss_words({}, None, 18)
    assert "counting questions lose more than existence" in words.type_loss_words({"counting": judgement}, "existence", 18)


def test_sample_sizes_are_rounded_to_what_they_can_claim():
    from shortlab.llava_mini.evidence import significant

    assert [significant(n) for n in (42744, 7, 95, 1234, 0)] == ["43,000", "7", "95", "1,200", "0"]
