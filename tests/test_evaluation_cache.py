"""``evaluate.EvaluationCache``: one evaluation per distinct set of removed layers."""

import pytest

from shortlab.evaluate import EvaluationCache


class Recorder:
    """An evaluation that records what it was asked and returns a fresh object each time."""

    def __init__(self):
        self.calls = []

    def __call__(self, removed):
        self.calls.append(removed)
        return {"removed": removed}


def test_each_distinct_set_is_evaluated_once_in_any_order():
    evaluate = Recorder()
    cache = EvaluationCache(evaluate)
    first = cache([3, 1])
    assert cache((1, 3)) is first and cache({3, 1}) is first
    dense = cache(())
    assert cache([]) is dense
    assert evaluate.calls == [(1, 3), ()]  # the evaluation sees the sorted tuple
    assert (cache.hits, cache.misses, cache.lookups, len(cache)) == (3, 2, 5, 2)


def test_reading_does_not_evaluate_or_count():
    evaluate = Recorder()
    cache = EvaluationCache(evaluate)
    cache([2])
    assert cache[(2,)] == {"removed": (2,)} and [2] in cache and [1] not in cache
    with pytest.raises(KeyError, match=r"layers \[1\] removed: not evaluated"):
        cache[[1]]
    assert (cache.hits, cache.misses, evaluate.calls) == (0, 1, [(2,)])


def test_a_failed_evaluation_is_neither_stored_nor_counted():
    def failing(removed):
        raise RuntimeError("out of memory")

    cache = EvaluationCache(failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        cache([0])
    assert (len(cache), cache.hits, cache.misses) == (0, 0, 0)


def test_caches_are_independent():
    a, b = EvaluationCache(Recorder()), EvaluationCache(Recorder())
    a([1])
    a([1])
    assert (a.hits, b.hits, len(b)) == (1, 0, 0)


@pytest.mark.parametrize("removed, match", [
    ([1, 1], "repeat an index"),
    ([-1], "non-negative ints"),
    ([1.0], "non-negative ints"),
    ([True], "non-negative ints"),
])
def test_bad_layer_sets_are_named(removed, match):
    cache = EvaluationCache(Recorder())
    with pytest.raises(ValueError, match=match):
        cache(removed)


def test_the_evaluation_must_be_callable():
    with pytest.raises(TypeError, match="evaluate must be callable"):
        EvaluationCache({"not": "callable"})
