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
    assert [t.get_text() for t in left.get_xticklabels()] == ["BI", "dense (the control)"]
    assert left.get_yscale() == "log" and right.get_ylabel() == "pooled acc"
    assert len(left.containers) == 2 and len(right.containers) == 2  # before and after
    plt.close(fig)


def test_random_removal_rankings_and_clipped_ratio_claims():
    import matplotlib.pyplot as plt

    from shortlab.plotting import figure_problems
    from shortlab.shortgpt_figures import draw_random_removal, draw_rankings_at_k, draw_ratio_claims
    from shortlab.stats import Interval

    def iv(estimate, low, high):
        return Interval(estimate, low, high, 0.95, "toy")

    fig, (ax_random, ax_at_k, ax_claims) = plt.subplots(1, 3, figsize=(15, 4))
    draws = {4: np.geomspace(1.2, 3.0, 20), 8: np.geomspace(2.0, 40.0, 20)}
    draw_random_removal(ax_random, draws, {4: 1.1, 8: 1.5})
    ends = [y for line in ax_random.lines if len(line.get_ydata()) == 2 for y in line.get_ydata()]
    for values in draws.values():  # the whiskers are the draws' interpolated 2.5 and 97.5 % quantiles
        assert all(np.isclose(ends, q).any() for q in np.quantile(values, [0.025, 0.975]))
    draw_rankings_at_k(ax_at_k, {"block_influence": iv(1.5, 1.4, 1.6), "reverse_order": iv(9e7, 8e7, 1e8)})
    draw_ratio_claims(ax_claims, {"reverse_order": iv(6e-8, 5e-8, 7e-8), "iterative": iv(1.27, 1.25, 1.3),
                                  "relative_magnitude": iv(1.08, 1.07, 1.1)}, margin=0.05)
    low, high = ax_claims.get_ylim()
    assert low > 0.2 and high < 5  # the 1.08 and 1.27 ratios stay readable
    assert [text.get_text() for text in ax_claims.texts] == ["6e-08"]  # the off-axis one is written out
    fig.canvas.draw()
    inside = ax_claims.get_window_extent()
    written = ax_claims.texts[0].get_window_extent()
    assert inside.y0 <= written.y0 and written.y1 <= inside.y1  # inside the axes, clear of the tick labels
    assert [label.get_text() for label in ax_claims.get_xticklabels()] == ["reverse order", "iterative", "relative magnitude"]
    assert figure_problems(fig) == []
    plt.close(fig)


@pytest.mark.parametrize("limits, minor_labels", [((0.2, 4.6), 4), ((0.99, 1.03), 4), ((1.0, 1e8), 0)])
def test_plain_log_ticks_label_narrow_axes_without_repeating(limits, minor_labels):
    import matplotlib.pyplot as plt

    from shortlab.plotting import figure_problems
    from shortlab.shortgpt_figures import plain_log_ticks

    fig, ax = plt.subplots()
    ax.plot([0, 1], limits)
    ax.set(yscale="log", ylim=limits, xlabel="x", ylabel="y")
    plain_log_ticks(ax)
    fig.canvas.draw()
    low, high = limits
    shown = [(tick, label.get_text()) for tick, label in zip(ax.get_yticks(minor=True), ax.get_yticklabels(minor=True))
             if low <= tick <= high and label.get_text()]
    assert len(shown) >= minor_labels and len({text for _, text in shown}) == len(shown)
    assert all("10^" not in label.get_text() and "$" not in label.get_text() for label in ax.get_yticklabels())
    assert figure_problems(fig) == []
    plt.close(fig)
