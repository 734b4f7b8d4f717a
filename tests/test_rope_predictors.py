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
