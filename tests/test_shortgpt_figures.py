import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from shortlab.shortgpt_figures import draw_bi_atlas, low_band, relative_depth  # noqa: E402


def test_low_band_is_the_lowest_fraction_at_relative_depth():
    influence = np.array([0.9, 0.5, 0.02, 0.01, 0.03, 0.4, 0.2, 0.8, 0.6])  # 9 layers, the low ones 2-4
    band = low_band(influence, 0.34)  # round(3.06) = 3 layers
    assert band["layers"] == [2, 3, 4]
    assert (band["from"], band["to"]) == (0.25, 0.5) and band["centre"] == pytest.approx(0.375)
    assert low_band(influence, 0.01)["layers"] == [3]  # at least one layer
    assert list(relative_depth([0, 8], 9)) == [0.0, 1.0]


def test_atlas_draws_one_row_per_model_and_published_removal():
    fig, (left, right) = plt.subplots(1, 2)
    profiles = {"a": np.linspace(1, 0.1, 10), "b": np.linspace(0.1, 1, 6)}
    draw_bi_atlas(left, right, profiles, 0.25, published={"Llama-2-7B": ([27, 26, 25], 32)})
    assert [t.get_text() for t in right.get_yticklabels()] == ["a", "b", "Llama-2-7B (paper)"]
    assert len(left.get_lines()) == 2 and left.get_yscale() == "log"
    filled = right.collections[1].get_offsets()  # model a's lowest-BI quarter: its last 2 (round 2.5) layers
    assert sorted(np.round(filled[:, 0], 3)) == [round(8 / 9, 3), 1.0]
    plt.close(fig)


def test_healing_figure_draws_before_and_after_per_criterion():
    from shortlab.shortgpt_figures import draw_healing
    from shortlab.stats import Interval

    def i(x):
        return Interval(x, x * 0.9, x * 1.1, 0.95, "test")

    rows = [{"criterion": "block_influence", "perplexity ÷ dense, pruned": i(2.0), "perplexity ÷ dense, healed": i(1.3),
             "pooled acc, pruned": i(0.5), "pooled acc, healed": i(0.6)},
            {"criterion": "dense", "perplexity ÷ dense, healed": i(0.95), "pooled acc, healed": i(0.7)}]
    fig, (left, right) = plt.subplots(1, 2)
    draw_healing(left, right, rows)
    assert [t.get_text() for t in left.get_xticklabels()] == ["block_influence", "dense"]
    assert left.get_yscale() == "log" and right.get_ylabel() == "pooled acc"
    assert len(left.containers) == 2 and len(right.containers) == 2  # before and after
    plt.close(fig)
