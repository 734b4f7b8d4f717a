import numpy as np
import pytest

from shortlab.rope.scan import max_context
from shortlab.rope_experiment.predictors import (
    bias_curve, first_below, leave_one_base_out, paired_error_difference, predicted_distances,
)


@pytest.mark.parametrize("base, head_dim", [(10000.0, 128), (500.0, 64), (32.7185, 16)])
def test_first_zero_is_the_papers_bound_plus_one(base, head_dim):
    bound = max_context(base, head_dim, limit=100_000)
    assert first_below(bias_curve(base, head_dim, bound + 10)) == bound + 1


def test_deeper_thresholds_fire_later_or_never():
    table = predicted_distances([50.0, 200.0], 16, [0.0, 0.1, 0.3], limit=2000)
    assert set(table) == {"B first zero", "B < -0.1·B(0)", "B < -0.3·B(0)"}
    for base in (50.0, 200.0):
        fired = [table[name][base] for name in table]
        assert fired[0] is not None and all(b is None or a <= b for a, b in zip(fired, fired[1:]) if a is not None)
    weighted = predicted_distances([50.0], 16, [0.0], limit=2000, weights={50.0: np.ones(8)})
    assert weighted["B_w first zero"][50.0] == table["B first zero"][50.0]  # equal weights: B itself
    with pytest.raises(ValueError, match="depth"):
        first_below(bias_curve(50.0, 16, 10), -0.1)


def test_leave_one_base_out_error_is_zero_for_a_scaled_predictor_and_ranks_predictors():
    predicted = {32.0: 20, 100.0: 60, 300.0: 150, 1000.0: 400}
    exact = {base: [2.0 * d, 2.0 * d] for base, d in predicted.items()}
    assert leave_one_base_out(exact, predicted).estimate == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(0)
    noisy = {base: list(2.0 * d * np.exp(rng.normal(0, 0.05, 3))) for base, d in predicted.items()}
    wrong = {32.0: 60, 100.0: 20, 300.0: 400, 1000.0: 150}  # the same values at the wrong bases
    good, bad = leave_one_base_out(noisy, predicted), leave_one_base_out(noisy, wrong)
    assert good.estimate < 0.1 < bad.estimate and good.low <= good.estimate <= good.high
    difference = paired_error_difference(noisy, predicted, wrong)
    assert difference.high < 0
    assert leave_one_base_out(noisy, {**predicted, 1000.0: None}) is None  # never fires: unusable
    with pytest.raises(ValueError, match="at least 3 bases"):
        leave_one_base_out({1.0: [2.0], 2.0: [3.0]}, {1.0: 1, 2.0: 1})
    with pytest.raises(ValueError, match="at least two independently pretrained"):
        leave_one_base_out({base: [2.0 * d] for base, d in predicted.items()}, predicted)


def synthetic_results(true_depth, scale=3.0, models=(0, 1, 2), noise=0.03, seed=0):
    """A from-scratch results file whose models fail exactly where B(m) first drops below
    −true_depth · B(0), times ``scale`` (a little noise per model), under the default design."""
    from dataclasses import asdict

    from shortlab.rope_experiment import ExperimentConfig
    from shortlab.rope_experiment.from_scratch import SCHEMA, run_key

    config = ExperimentConfig(pretrain_seeds=tuple(models), probe_depths=())
    distances = np.array(config.distances())
    rng = np.random.default_rng(seed)
    runs = {}
    for base in config.finetune_bases():
        fires = first_below(bias_curve(base, config.head_dim, 100 * config.context), true_depth)
        for model in models:
            fails_at = np.inf if fires is None else scale * fires * np.exp(rng.normal(0, noise))
            # accuracy falls smoothly from 1 to 0 around fails_at (on a log scale): its halfway
            # crossing, interpolated between probed distances, lands near fails_at
            accuracy = 1 / (1 + np.exp((np.log(distances) - np.log(fails_at)) / 0.15))
            correct = np.repeat(accuracy[:, None], 8, axis=1)
            runs[run_key(base, model, 0)] = {"base": base, "pretrain_seed": model, "seed": 0,
                                             "correct": correct.tolist(),
                                             "variance_weights": np.ones((1, 2, config.head_dim // 2)).tolist()}
    return {"schema": SCHEMA, "config": asdict(config), "distances": distances.tolist(), "depths": [],
            "bases": [{"base": b, "bound": config.bound(b), "control": b == config.pretrain_base}
                      for b in config.finetune_bases()], "runs": runs, "pretrained": {}}


def test_predictor_comparison_finds_the_threshold_that_operates():
    """Models that fail where B first dips below −0.3·B(0) make that predictor (or its B_w twin,
    equal weights here) the best, and the paper's first zero lose to it; models that fail at the
    first zero make the paper's bound win against every predictor that differs from it (B_w's
    first zero, the same distances here, is not an alternative). A design with too few failing
    bases says why."""
    from shortlab.rope_experiment.predictors import PAPER_PREDICTOR, failure_distances, predictor_comparison
    from shortlab.stats import CONTRADICTED, SUPPORTED

    deep = predictor_comparison(synthetic_results(0.3))
    assert len(deep["measured"]) >= 3
    errors = {row["predictor"]: row["error"] for row in deep["rows"] if row["error"] is not None}
    assert deep["best_alternative"] in ("B < -0.3·B(0)", "B_w < -0.3·B(0)")
    assert errors[deep["best_alternative"]].estimate < 0.05 < errors[PAPER_PREDICTOR].estimate
    assert deep["verdict"] == CONTRADICTED and deep["difference"].low > 0
    at_zero = predictor_comparison(synthetic_results(0.0))
    assert at_zero["verdict"] == SUPPORTED and at_zero["difference"].high < 0
    assert at_zero["best_alternative"] != "B_w first zero"
    one_model = predictor_comparison(synthetic_results(0.0, models=(0,)))
    assert "reason" in one_model and "2 models" in one_model["reason"]
    # a base whose models never fall to halfway within the grid is censored, not measured
    assert all(d <= max(synthetic_results(0.0)["distances"]) for ds in failure_distances(synthetic_results(0.0)).values()
               for d in ds)


def test_predictor_and_depth_figures():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shortlab.plotting import figure_problems
    from shortlab.rope_experiment.figures import draw_depth_grid, draw_predictors
    from shortlab.rope_experiment.predictors import PAPER_PREDICTOR, predictor_comparison

    comparison = predictor_comparison(synthetic_results(0.3))
    fig, (ax_predictors, ax_depth) = plt.subplots(1, 2, figsize=(12, 4))
    draw_predictors(ax_predictors, comparison, [PAPER_PREDICTOR, comparison["best_alternative"]])
    assert len(ax_predictors.get_legend().get_texts()) == 3
    distances = [8, 16, 32, 64, 128]
    by_depth = [{"depth": d, "accuracy": [{"rate": r} for r in (1.0, 0.9, 0.5, 0.2, 0.1)]} for d in (0.0, 0.5, 1.0)]
    image = draw_depth_grid(ax_depth, by_depth, distances, bound=40, title="base 100")
    fig.colorbar(image, ax=ax_depth, label="accuracy")
    dashed = [line for line in ax_depth.lines if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and 2 < dashed[0].get_xdata()[0] < 3  # 40 lies between 32 and 64
    assert figure_problems(fig) == []
    plt.close(fig)
