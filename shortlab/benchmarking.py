"""Side-by-side timing for bench/: candidates alternate within one run, medians are compared.

The machine is shared and noisy, so absolute seconds mean little; ratios of medians measured
in interleaved repetitions are what bench/ scripts print, as ``name: value`` lines.

CUDA runs kernels asynchronously: a call returns once its work is queued. Every timed call is
therefore bracketed by synchronising the CUDA devices it uses, so that its seconds hold its own
GPU work, not the previous call's nor only the queueing of its own.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn


def cuda_devices(*modules: nn.Module) -> list[torch.device]:
    """The CUDA devices holding the modules' parameters and buffers (several under a
    ``device_map``), in index order; empty for modules on the CPU."""
    found = {tensor.device for module in modules
             for tensor in itertools.chain(module.parameters(), module.buffers())
             if tensor.device.type == "cuda"}
    return sorted(found, key=lambda device: device.index or 0)


def synchronize_cuda(devices: Iterable[torch.device | str | int] | None = None) -> None:
    """Wait for the queued work of ``devices`` (non-CUDA ones are skipped; None: the current CUDA
    device). Nothing happens while CUDA is unused in this process (``is_initialized`` is False
    until the first CUDA tensor or call)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    if devices is None:
        torch.cuda.synchronize()
        return
    for device in devices:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def time_side_by_side(candidates: dict[str, Callable[[], object]], repeats: int = 5,
                      warmup: int = 1, clock: Callable[[], float] = time.perf_counter,
                      devices: Iterable[torch.device | str | int] | None = None
                      ) -> dict[str, list[float]]:
    """Run each candidate ``warmup`` times, then ``repeats`` rounds in which every candidate runs
    once, the order rotating each round so no candidate always runs first. Returns the seconds of
    each timed run per candidate, each measured between two ``synchronize_cuda(devices)`` calls
    (``devices``: the CUDA devices the candidates run on, e.g. ``cuda_devices(model)``; None:
    the current one)."""
    if not candidates:
        raise ValueError("no candidates to time")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = list(candidates)
    devices = None if devices is None else list(devices)  # iterated before and after every run
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize_cuda(devices)
            start = clock()
            candidates[name]()
            synchronize_cuda(devices)
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


def add_device_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--device`` (default cpu) and ``--dtype`` (default float32) for a bench/ script that loads
    a model; both go to ``models.load_model``."""
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    return parser
