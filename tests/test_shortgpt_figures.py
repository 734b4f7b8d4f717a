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
