"""Notebook 02's figures drawn from toy rows: every axis labelled, nothing unreadable
(``plotting.figure_problems``), and what each figure promises actually drawn."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from shortlab.llava_mini import figures  # noqa: E402
from shortlab.plotting import figure_problems  # noqa: E402
from shortlab.stats import Interval  # noqa: E402


def span(estimate, half=0.02):
    return Interval(estimate, estimate - half, estimate + half, 0.95, "toy")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_accuracy_limits_keep_points_off_the_frame_and_do_not_flatten():
    fig, ax = plt.subplots()
    figures.accuracy_limits(ax, [0.97, 1.0], references=[0.9])
    low, high = ax.get_ylim()
    assert high > 1.0 and high <= 1.02 and 0.8 < low < 0.9
    figures.accuracy_limits(ax, [np.nan, None])
    assert ax.get_ylim() == (0, 1.02)


def test_layer_contribution_shows_exact_zeros_on_the_log_axis():
    fig, ax = plt.subplots(figsize=(10, 4))
    visual = np.array([1e-3, 2e-4, 5e-5, 0.0])
    text = np.array([1e-1, 3e-2, 1e-2, 4e-3])
    figures.draw_layer_contribution(ax, visual, text, [2, 3], title="t")
    labels = ax.get_legend_handles_labels()[1]
    assert "visual tokens: exactly 0" in labels and "text tokens: exactly 0" not in labels
    assert ax.get_yscale() == "log" and ax.get_ylim()[0] < 5e-5
    assert figure_problems(fig) == []


def test_frozen_curves_and_random_draws():
    fig, (ax, ax_draws) = plt.subplots(1, 2, figsize=(12, 4))
    curve = pd.DataFrame([{"choice": c, "N": n, "estimate": e, "low": e - 0.03, "high": e + 0.03}
                          for c, base in [("layer_contribution", 0.85), ("visual_cosine", 0.8), ("random", 0.6)]
                          for n, e in [(6, base), (12, base - 0.1)]])
    figures.draw_frozen_curves(ax, curve, span(0.87), span(0.42), span(0.45), draws=10)
    assert len(ax.lines) >= 5 and ax.get_ylim()[0] > 0.3  # three curves, two reference lines; not a 0-1 axis
    figures.draw_random_draws(ax_draws, {6: np.array([0.5, 0.6, 0.7]), 12: np.array([0.4, 0.45, 0.5])},
                              {"LC": {6: span(0.85), 12: span(0.75)}, "visual cosine": {6: span(0.8), 12: span(0.7)}})
    assert [t.get_text() for t in ax_draws.get_xticklabels()] == ["6", "12"]
    assert figure_problems(fig) == []


def test_frontier_labels_of_close_points_do_not_overlap_and_published_points():
    fig, (ax, ax_paper) = plt.subplots(1, 2, figsize=(12, 4))
    frontier = pd.DataFrame([
        {"method": "dense", "label": "", "flops_fraction": 1.0, "estimate": 0.87, "low": 0.85, "high": 0.89},
        *[{"method": "ShortV (LC)", "label": f"N={n}", "flops_fraction": 1 - n / 40, "estimate": 0.87 - n / 100,
           "low": 0.85 - n / 100, "high": 0.89 - n / 100} for n in (6, 12)],
        *[{"method": "FastV K=2", "label": f"R={r:.0%}", "flops_fraction": 1 - 6 / 40 - r / 50, "estimate": 0.81 + r / 100,
           "low": 0.79, "high": 0.83} for r in (0.25, 0.5)]])  # beside ShortV's N=6
    figures.draw_frontier(ax, frontier, span(0.4), span(0.45))
    assert sorted(text.get_text() for text in ax.texts) == ["N=12", "N=6", "R=25%", "R=50%"]
    renderer = fig.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in ax.texts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    figures.draw_published_frontier(ax_paper, {"MMB": [(1.0, 64.3, "vanilla"), (0.5, 64.6, "ShortV")]})
    assert len(ax_paper.texts) == 2
    assert figure_problems(fig) == []


def test_stability_baselines_tokens_speed_heatmaps_and_photos():
    fig, axes = plt.subplots(3, 2, figsize=(12, 12))
    stability = pd.DataFrame([{"pool": pool, "size": size, "seed": seed, "jaccard": 0.5 + seed / 10,
                               "accuracy": 0.8, "low": 0.78, "high": 0.82}
                              for pool in ("mixed", "counting") for size in (10, 40) for seed in (0, 1)])
    figures.draw_stability(axes[0, 0], axes[0, 1], stability, span(0.8), span(0.87), span(0.4), span(0.45), 18)
    assert "mixed" not in [t.get_text() for t in axes[0, 1].get_legend().get_texts()]  # the pools are named on the left only
    report = {g: {"accuracy": 0.8, "low": 0.75, "high": 0.85, "n": 10} for g in ("all", "counting")}
    figures.draw_baselines(axes[1, 0], {"dense": report, "blank image": report}, ["all", "counting"], title="t")
    figures.draw_token_choice(axes[1, 1], {"dense": span(0.87), "visual": span(0.8), "text": span(0.1)},
                              span(0.4), span(0.45))
    speed = pd.DataFrame({"measured_speedup": [1.0, 1.2], "predicted_speedup": [1.0, 1.3]}, index=[0, 6])
    figures.draw_speedup(axes[2, 0], speed, title="t")
    figures.draw_photo_lc(axes[2, 1], np.array([1e-2, 1e-3, 0.0]), {"astronaut": np.array([2e-2, 1e-3, 0.0])}, [1, 2],
                          "task mean")
    assert figure_problems(fig) == []
    fig, (ax_lc, ax_chosen) = plt.subplots(2, 1, figsize=(10, 6))
    pool_lc = pd.DataFrame([[1e-2, 1e-3, 0.0], [2e-2, 1e-3, 0.0]], index=["mixed (80)", "counting (80)"])
    chosen = pd.DataFrame([[0, 1, 1], [1, 0, 1]], index=["main", "mixed 10/0"])
    figures.draw_lc_heatmaps(ax_lc, ax_chosen, pool_lc, chosen, 2)
    assert figure_problems(fig) == []
