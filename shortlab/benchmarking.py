"""Side-by-side timing for bench/: candidates alternate within one run, medians are compared.

The machine is shared and noisy, so absolute seconds mean little; ratios of medians measured
in interleaved repetitions are what bench/ scripts print, as ``name: value`` lines.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def time_side_by_side(candidates: dict[str, Callable[[], object]], repeats: int = 5,
                      warmup: int = 1, clock: Callable[[], float] = time.perf_counter
                      ) -> dict[str, list[float]]:
    """Run each candidate ``warmup`` times, then ``repeats`` rounds in which every candidate runs
    once, the order rotating each round so no candidate always runs first. Returns the seconds of
    each timed run per candidate."""
    if not candidates:
        raise ValueError("no candidates to time")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = clock()
            candidates[name]()
            seconds[name].append(clock() - start)
    return seconds


def median_ratio(seconds: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """median(numerator) / median(denominator): above 1 means the numerator is slower."""
    return statistics.median(seconds[numerator]) / statistics.median(seconds[denominator])


def report(name: str, value: float, stream=None) -> str:
    """Print one ``name: value`` line (the format every bench/ script emits) and return it."""
    line = f"{name}: {value:.4g}"
    print(line, file=stream, flush=True)
    return line
