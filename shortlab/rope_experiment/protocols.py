"""What separates two passkey measurements of one model: the filler text, whether trials share it,
and the precision, from the store ``scripts/passkey_protocols.py`` writes.

Each setup was run in each precision on identical prompts, so the precision's effect is a paired
difference over trials; setups differ in their text, so the filler's effect compares independent
trials. Every rate is split at the model's RoPE bound L_θ (within: distances ≤ L_θ).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from shortlab.stats import Interval, paired_interval, verdict, wilson_interval


def _found(run: Mapping, bound: int, side: str) -> np.ndarray:
    """0/1 per trial [trials over the distances on ``side`` of ``bound``], distance-major."""
    keep = [row for row in run["rows"] if (row["distance"] <= bound) == (side == "within")]
    return np.array([found for row in keep for found in row["found"]], dtype=np.float64)


def protocol_rates(stored: Mapping, bound: int) -> list[dict]:
    """One row per (setup, dtype) of ``stored`` (``scripts/passkey_protocols.py``'s file): the
    passkey rate within and beyond ``bound`` with Wilson intervals (None where no distance lies
    on that side)."""
    rows = []
    for run in stored["runs"].values():
        row = {"setup": run["setup"], "dtype": run["dtype"]}
        for side in ("within", "beyond"):
            found = _found(run, bound, side)
            row[side] = wilson_interval(int(found.sum()), found.size) if found.size else None
        rows.append(row)
    return rows


def precision_effects(stored: Mapping, bound: int, *, margin: float, seed: int = 0,
                      first: str = "float32", second: str = "bfloat16") -> dict[str, dict]:
    """Per setup run in both precisions: the rate within ``bound`` in ``first`` minus in
    ``second`` over the same prompts (paired; bootstrap over trials) and the verdict on "the
    first precision retrieves more often, by more than ``margin``" (``verdict`` against 0: the
    same within ± ``margin`` is the answer that the precision does not matter)."""
    runs = {(run["setup"], run["dtype"]): run for run in stored["runs"].values()}
    effects = {}
    for setup in dict.fromkeys(run["setup"] for run in stored["runs"].values()):
        if (setup, first) in runs and (setup, second) in runs:
            a, b = _found(runs[setup, first], bound, "within"), _found(runs[setup, second], bound, "within")
            if a.size and a.size == b.size:
                difference = paired_interval(a, b, seed=seed)
                effects[setup] = {"difference": difference, "verdict": verdict(difference, 0.0, margin=margin)}
    return effects


def filler_effect(stored: Mapping, bound: int, setup: str, reference: str, dtype: str = "float32", *,
                  margin: float, seed: int = 0) -> dict | None:
    """The rate within ``bound`` of ``setup`` minus that of ``reference`` in one ``dtype``, with
    the verdict on "``setup`` retrieves more often than ``reference``, by more than ``margin``"
    (the same within ± ``margin``: the filler does not matter; contradicted: it retrieves less
    often, or not more): independent trials, so each side is resampled on its own. None when
    either run is missing."""
    runs = {(run["setup"], run["dtype"]): run for run in stored["runs"].values()}
    if (setup, dtype) not in runs or (reference, dtype) not in runs:
        return None
    a, b = _found(runs[setup, dtype], bound, "within"), _found(runs[reference, dtype], bound, "within")
    if not a.size or not b.size:
        return None
    rng = np.random.default_rng(seed)
    draws = np.array([a[rng.integers(0, a.size, a.size)].mean() - b[rng.integers(0, b.size, b.size)].mean()
                      for _ in range(4000)])
    low, high = np.quantile(draws, [0.025, 0.975])
    difference = Interval(float(a.mean() - b.mean()), float(low), float(high), 0.95,
                          f"bootstrap of {a.size} and {b.size} independent trials")
    return {"difference": difference, "verdict": verdict(difference, 0.0, margin=margin)}

