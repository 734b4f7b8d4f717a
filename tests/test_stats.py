import numpy as np
import pytest

from shortlab.stats import (
    CANNOT_TELL, CONTRADICTED, SUPPORTED, Interval, bootstrap_interval, paired_interval,
    paired_perplexity_ratio, perplexity_interval, ratio_interval, verdict, wilson_interval,
)


@pytest.mark.parametrize("successes, n, low, high", [
    (0, 10, 0.0, 0.2775),   # published Wilson values (Newcombe 1998, method 3)
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
    (81, 263, 0.2553, 0.3662),
])
def test_wilson_matches_published_values(successes, n, low, high):
    interval = wilson_interval(successes, n)
    assert interval.estimate == successes / n
    assert interval.low == pytest.approx(low, abs=1e-4) and interval.high == pytest.approx(high, abs=1e-4)


def test_wilson_contains_its_estimate_even_at_zero_and_one():
    # rounding once put 1.0 a last bit above the upper end (n = 40, 300): error bars then fail
    for n in range(1, 400):
        for successes in (0, n // 2, n):
            interval = wilson_interval(successes, n)
            assert interval.low <= interval.estimate <= interval.high
        assert wilson_interval(n, n).high == 1.0 and wilson_interval(0, n).low == 0.0


def test_wilson_narrows_with_n_and_widens_with_level():
    assert wilson_interval(500, 1000).half_width < wilson_interval(50, 100).half_width
    assert wilson_interval(50, 100, level=0.99).half_width > wilson_interval(50, 100).half_width


@pytest.mark.parametrize("successes, n", [(-1, 10), (11, 10), (0, 0)])
def test_wilson_rejects_impossible_counts(successes, n):
    with pytest.raises(ValueError):
        wilson_interval(successes, n)


def test_bootstrap_is_seeded_and_brackets_the_mean():
    values = np.random.default_rng(1).normal(size=400)
    first, again = bootstrap_interval(values), bootstrap_interval(values)
    assert first == again
    assert first.low < values.mean() < first.high
    # the percentile interval of a mean is close to mean ± 1.96 SE for a normal sample
    se = values.std(ddof=1) / np.sqrt(values.size)
    assert first.half_width == pytest.approx(1.96 * se, rel=0.1)


def test_clusters_of_identical_items_widen_the_interval_to_the_cluster_count():
    # 40 clusters of 10 identical answers carry the information of 40 answers, not 400
    per_cluster = np.random.default_rng(2).integers(0, 2, size=40).astype(float)
    values = np.repeat(per_cluster, 10)
    clusters = np.repeat(np.arange(40), 10)
    naive = bootstrap_interval(values)
    clustered = bootstrap_interval(values, clusters)
    reference = bootstrap_interval(per_cluster)
    assert clustered.half_width > 2.5 * naive.half_width
    assert clustered.half_width == pytest.approx(reference.half_width, rel=0.15)
    assert "40 clusters" in clustered.method


def test_clustered_mean_weighs_clusters_by_their_size():
    values = [1.0, 1.0, 1.0, 0.0]
    interval = bootstrap_interval(values, clusters=["a", "a", "a", "b"])
    assert interval.estimate == 0.75  # the item mean, not the mean of cluster means (0.5)


def test_paired_interval_is_tighter_than_separate_ones():
    rng = np.random.default_rng(3)
    difficulty = rng.normal(size=300)
    a = difficulty + 0.3 + 0.1 * rng.normal(size=300)
    b = difficulty + 0.1 * rng.normal(size=300)
    paired = paired_interval(a, b)
    assert paired.estimate == pytest.approx((a - b).mean())
    assert paired.half_width < bootstrap_interval(a).half_width / 3
    assert verdict(paired) == SUPPORTED


@pytest.mark.parametrize("call, match", [
    (lambda: bootstrap_interval([]), "non-empty"),
    (lambda: bootstrap_interval([1.0, float("nan")]), "NaN"),
    (lambda: bootstrap_interval([1.0, 2.0], clusters=[0]), "one label per value"),
    (lambda: bootstrap_interval([1.0, 2.0], level=1.5), "level"),
    (lambda: bootstrap_interval([1.0, 2.0], n_resamples=10), "n_resamples"),
    (lambda: paired_interval([1.0, 2.0], [1.0]), "aligned"),
    (lambda: verdict(Interval(0, -1, 1, 0.95, "x"), claim="sideways"), "claim"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("low, high, threshold, claim, expected", [
    (0.1, 0.3, 0.0, "above", SUPPORTED),
    (-0.3, -0.1, 0.0, "above", CONTRADICTED),
    (-0.1, 0.2, 0.0, "above", CANNOT_TELL),
    (-0.3, -0.1, 0.0, "below", SUPPORTED),
    (0.1, 0.3, 0.0, "below", CONTRADICTED),
    (-0.005, 0.02, -0.01, "above", SUPPORTED),  # non-inferiority: loss smaller than 1 point
])
def test_verdicts(low, high, threshold, claim, expected):
    assert verdict(Interval((low + high) / 2, low, high, 0.95, "test"), threshold, claim=claim) == expected


def test_perplexity_interval_resamples_blocks():
    rng = np.random.default_rng(4)
    counts = np.full(64, 255.0)
    nll = counts * rng.normal(3.0, 0.2, size=64)  # blocks of mean NLL around 3 nats
    interval = perplexity_interval(nll, counts)
    assert interval.estimate == pytest.approx(np.exp(nll.sum() / counts.sum()))
    assert interval.low < interval.estimate < interval.high
    log_se = (nll / counts).std(ddof=1) / np.sqrt(64)
    assert np.log(interval.high / interval.low) / 2 == pytest.approx(1.96 * log_se, rel=0.15)
    assert "64 blocks" in interval.method


def test_paired_perplexity_ratio_sees_a_small_shift_that_separate_intervals_miss():
    rng = np.random.default_rng(5)
    counts = np.full(40, 255.0)
    base = counts * rng.normal(3.0, 0.3, size=40)
    worse = base + counts * (0.02 + 0.002 * rng.normal(size=40))  # 2 % worse on every block
    ratio = paired_perplexity_ratio(worse, base, counts)
    assert ratio.estimate == pytest.approx(np.exp(0.02), rel=2e-3) and ratio.low > 1
    separate_a, separate_b = perplexity_interval(worse, counts), perplexity_interval(base, counts)
    assert separate_a.low < separate_b.high  # the unpaired intervals overlap
    with pytest.raises(ValueError, match="same blocks"):
        paired_perplexity_ratio(worse[:-1], base, counts)


def test_ratio_interval_needs_positive_counts():
    with pytest.raises(ValueError, match="positive count"):
        ratio_interval([1.0, 2.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="aligned"):
        ratio_interval([1.0, 2.0], [1.0])


def test_interval_text_has_three_decimals_and_no_negative_zero():
    assert str(Interval(0.0124, -0.0004, 0.0251, 0.95, "bootstrap")) == "0.012 [0.000, 0.025]"
    assert str(Interval(-0.0004, -0.0123, 0.01, 0.95, "bootstrap")) == "0.000 [-0.012, 0.010]"
    assert str(Interval(2e-6, 1e-6, 3e-6, 0.95, "bootstrap")) == "2e-06 [1e-06, 3e-06]"
