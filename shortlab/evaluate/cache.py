"""A cache of evaluations keyed by the set of removed layers, so each distinct set runs once.

Comparing layer rankings evaluates the same layer sets again and again (every ranking's k = 0
is the dense model; different rankings often pick the same layers). ``EvaluationCache`` wraps
the expensive evaluation and counts how often it was spared.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

Result = TypeVar("Result")


class EvaluationCache(Generic[Result]):
    """Results of ``evaluate(removed)``, computed once per distinct set of removed layers.

    ``removed`` is any iterable of distinct non-negative layer indices; the key is their sorted
    tuple, so ``[3, 1]`` and ``(1, 3)`` share one entry and ``()`` is the unpruned model.
    ``evaluate`` receives that sorted tuple. ``cache(removed)`` returns the stored result or
    computes and stores it; ``cache[removed]`` only reads (KeyError if never evaluated).

    Counters, as attributes: ``hits`` (calls answered from the cache), ``misses`` (calls that
    ran ``evaluate`` to completion) and ``lookups`` (their sum). A call whose ``evaluate``
    raises stores nothing and counts as neither.
    """

    def __init__(self, evaluate: Callable[[tuple[int, ...]], Result]):
        if not callable(evaluate):
            raise TypeError(f"evaluate must be callable, got {type(evaluate).__name__}")
        self._evaluate = evaluate
        self._results: dict[tuple[int, ...], Result] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(removed: Iterable[int]) -> tuple[int, ...]:
        """The sorted tuple of removed layer indices; rejects non-integers, negatives, repeats."""
        layers = list(removed)
        bad = [layer for layer in layers if isinstance(layer, bool) or not isinstance(layer, int)
               or layer < 0]
        if bad:
            raise ValueError(f"removed layers must be non-negative ints, got {bad} in {layers}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"removed layers repeat an index: {layers}")
        return tuple(sorted(layers))

    @property
    def lookups(self) -> int:
        return self.hits + self.misses

    def __call__(self, removed: Iterable[int]) -> Result:
        key = self.key(removed)
        if key in self._results:
            self.hits += 1
            return self._results[key]
        result = self._evaluate(key)
        self._results[key] = result
        self.misses += 1
        return result

    def __getitem__(self, removed: Iterable[int]) -> Result:
        key = self.key(removed)
        if key not in self._results:
            raise KeyError(f"layers {list(key)} removed: not evaluated yet (call the cache first)")
        return self._results[key]

    def __contains__(self, removed: Iterable[int]) -> bool:
        return self.key(removed) in self._results

    def __len__(self) -> int:
        return len(self._results)

    def __repr__(self) -> str:
        return (f"EvaluationCache({len(self)} layer sets, {self.hits} hits of "
                f"{self.lookups} lookups)")
