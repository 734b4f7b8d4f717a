"""RoPE base-bound table (Men et al., 2024; d = 128): fast search vs the naive full scan.

The fast method computes the paper's whole table (1K … 1M). The naive one evaluates every m of
every grid base with no early exit, which is far too slow for the whole table, so the two are
compared side by side on the contexts 1K … 8K (k = 1024), on the same grids and the same base
range; there the fast method also refines and re-checks its bases, which the naive one does not.
"""

import statistics

from shortlab.benchmarking import median_ratio, report, save_results, time_side_by_side
from shortlab.rope import PAPER_CONTEXTS, bound_table, min_base, naive_min_base

HEAD_DIM = 128
REDUCED_CONTEXTS = ("1K", "2K", "4K", "8K")
BASE_RANGE = {"base_min": 100.0, "base_max": 1e6}


def fast_reduced() -> list[tuple[float, float | None]]:
    bounds = [min_base(label, HEAD_DIM, **BASE_RANGE) for label in REDUCED_CONTEXTS]
    return [(bound.grid_smallest, bound.grid_stable) for bound in bounds]


def naive_reduced() -> list[tuple[float, float | None]]:
    return [naive_min_base(label, HEAD_DIM, **BASE_RANGE) for label in REDUCED_CONTEXTS]


def main(repeats: int = 3) -> None:
    if fast_reduced() != naive_reduced():
        raise SystemExit("fast and naive searches disagree on the reduced table")

    full = time_side_by_side({"fast": lambda: bound_table(PAPER_CONTEXTS, HEAD_DIM)},
                             repeats=repeats, warmup=0)
    report("rope_table_1K_to_1M_fast_median_s", statistics.median(full["fast"]))

    reduced = time_side_by_side({"fast": fast_reduced, "naive": naive_reduced},
                                repeats=repeats, warmup=0)
    report("rope_table_1K_to_8K_fast_median_s", statistics.median(reduced["fast"]))
    report("rope_table_1K_to_8K_naive_median_s", statistics.median(reduced["naive"]))
    report("rope_table_1K_to_8K_speedup_fast_vs_naive", median_ratio(reduced, "naive", "fast"))


if __name__ == "__main__":
    main()
    save_results(__file__)
