"""Side-by-side timing for bench/: candidates alternate within one run, medians are compared.

The machine is shared and noisy, so absolute seconds mean little; ratios of medians measured
in interleaved repetitions are what bench/ scripts print, as ``name: value`` lines (``report``),
and what ``save_results`` keeps in ``bench/results/<script>.json`` with where they were measured
(``runs.run_record``); ``results_table`` renders those files for the README.

CUDA runs kernels asynchronously: a call returns once its work is queued. Every timed call is
therefore bracketed by synchronising the CUDA devices it uses, so that its seconds hold its own
GPU work, not the previous call's nor only the queueing of its own.
"""

from __future__ import annotations

import argparse
import itertools
import re
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

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


_REPORTED: dict[str, float] = {}  # this process's reported values, for save_results


def report(name: str, value: float, stream=None) -> str:
    """Print one ``name: value`` line (the format every bench/ script emits), remember it for
    ``save_results`` and return it."""
    line = f"{name}: {value:.4g}"
    _REPORTED[name] = float(value)
    print(line, file=stream, flush=True)
    return line


def _summary(script: Path) -> str:
    """The first paragraph of a script's module docstring, on one line."""
    import ast

    try:
        docstring = ast.get_docstring(ast.parse(script.read_text())) or ""
    except (OSError, SyntaxError):
        return ""
    return " ".join(docstring.split("\n\n", 1)[0].split())


def save_results(script: str, directory=None) -> Path:
    """Write every value this process reported to ``<directory>/<script stem>.json`` (default
    ``bench/results/`` of the checkout), atomically, with the script's first docstring line and
    where the values were measured (``runs.run_record``: revision, versions, command, hardware)."""
    from shortlab.files import write_json_atomically
    from shortlab.plotting import repository_root
    from shortlab.runs import run_record

    path = Path(script)
    folder = Path(directory) if directory is not None else (repository_root() or Path.cwd()) / "bench" / "results"
    target = folder / f"{path.stem}.json"
    write_json_atomically(target, {"script": path.name, "summary": _summary(path), "values": dict(_REPORTED),
                                   "provenance": run_record()}, indent=2)
    return target


def results_table(directory) -> str:
    """A Markdown table of every ``*.json`` that ``save_results`` wrote under ``directory``:
    script, what it measures, its values, and where and when they were measured."""
    import json

    rows = ["| script | measures | values | measured |", "|---|---|---|---|"]
    for path in sorted(Path(directory).glob("*.json")):
        saved = json.loads(path.read_text())
        where = saved.get("provenance") or {}
        hardware = where.get("hardware") or {}
        gpus = ", ".join(hardware.get("gpus") or [])
        measured = (f"{(where.get('created') or '')[:10]}, {hardware.get('processor', '?')}, "
                    f"{hardware.get('torch_threads', '?')} threads{', ' + gpus if gpus else ''}, "
                    f"revision {where.get('git_revision')}; `{where.get('command', '')}`")
        values = "; ".join(f"`{name}` {value:.4g}" for name, value in saved["values"].items())
        rows.append(f"| `{saved['script']}` | {saved['summary']} | {values} | {measured} |")
    return "\n".join(rows) + "\n"


RESULTS_MARKERS = ("<!-- bench results: generated by bench/run_all.py from bench/results/ -->", "<!-- /bench results -->")


def results_block(document: str) -> str | None:
    """The text between ``RESULTS_MARKERS`` in ``document`` (None when it has no such block)."""
    start, end = (re.escape(marker) for marker in RESULTS_MARKERS)
    match = re.search(start + r"\n(.*?)" + end, document, flags=re.S)
    return None if match is None else match.group(1)


def update_results_document(path, directory) -> bool:
    """Replace the block between ``RESULTS_MARKERS`` in the Markdown file ``path`` with
    ``results_table(directory)`` (atomically); returns whether it changed. A file without the
    markers is an error: the table has nowhere to go."""
    from shortlab.files import write_atomically

    path = Path(path)
    document = path.read_text()
    if results_block(document) is None:
        raise ValueError(f"{path} has no benchmark results block ({RESULTS_MARKERS[0]} … {RESULTS_MARKERS[1]})")
    table = results_table(directory)
    if results_block(document) == table:
        return False
    start, end = RESULTS_MARKERS
    updated = re.sub(re.escape(start) + r"\n.*?" + re.escape(end), lambda _: f"{start}\n{table}{end}", document,
                     count=1, flags=re.S)
    write_atomically(path, lambda tmp: Path(tmp).write_text(updated))
    return True


def add_device_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--device`` (default cpu) and ``--dtype`` (default float32) for a bench/ script that loads
    a model; both go to ``models.load_model``."""
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    return parser
