"""Where a result is made: the code's git revision (flagged when the tree has uncommitted changes
outside ``figures/`` and ``results/``), the package versions, the command line and the hardware
(``run_record``). The evidence stores keep one beside every result, and ``describe_runs(records)``
says in one sentence where a store's results came from; ``weights_fingerprint`` names the weights
they were computed with. (Where a model's weights come from is ``shortlab.provenance``.)
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path


def weights_fingerprint(named_parameters, sample: int = 4096) -> str:
    """A sha256 hex digest of ``named_parameters`` ((name, tensor) pairs, in order): each one's
    name, shape, dtype and ``sample`` evenly spaced entries. Another checkpoint, a LoRA merged in,
    another quantisation or another order of layers changes it, at the cost of reading a few
    thousand numbers per tensor rather than the whole model."""
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in named_parameters:
            flat = parameter.detach().reshape(-1)
            count = min(sample, flat.numel())
            # integer spacing: float positions round past the end for tensors of more than 2^24 entries
            index = torch.arange(count) * (flat.numel() - 1) // max(count - 1, 1)
            digest.update(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}".encode())
            digest.update(flat[index.to(flat.device)].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict:
    """The machine a result is computed on: processor, cores, torch threads, memory, GPUs."""
    import torch

    pages, page_size = (os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")) if hasattr(os, "sysconf") else (0, 0)
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return {"processor": _processor(), "machine": platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "memory_gib": round(pages * page_size / 2**30, 1),
            "gpus": gpus}


def run_record(command: str | None = None) -> dict:
    """Where a result is being made: ``git_revision`` (``-dirty`` when tracked files outside
    ``figures/``, ``results/`` and ``bench/results/`` differ from the commit; None outside a
    checkout), ``clean``, package ``versions``, the ``command`` (default: this process's command line), ``hardware``
    and the UTC time."""
    from shortlab.plotting import git_revision, package_versions

    revision = git_revision(outputs=("figures", "results", "bench/results"))  # what the runs themselves write
    return {"git_revision": revision, "clean": revision is not None and not revision.endswith("-dirty"),
            "versions": package_versions(), "command": command or shlex.join([sys.executable, *sys.argv]),
            "hardware": hardware(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def describe_runs(records: Iterable[Mapping | None], what: str = "results") -> str:
    """One sentence on where stored ``records`` (``run_record`` dicts; None for results stored
    before stores kept them) came from: revisions, clean or not, machines, torch versions."""
    records = list(records)
    known = [r for r in records if r]
    if not records:
        return f"No {what} stored."
    parts = []
    if known:
        revisions = Counter((r.get("git_revision") or "no checkout")[:12] + ("" if r.get("clean") else " (dirty)")
                            for r in known)
        machines = Counter(f"{r['hardware']['processor']} ({r['hardware']['torch_threads']} threads"
                           + (f", {', '.join(r['hardware']['gpus'])}" if r["hardware"].get("gpus") else "") + ")"
                           for r in known)
        torches = sorted({str(r["versions"].get("torch")) for r in known})
        dirty = sum(not r.get("clean") for r in known)
        parts.append(
            (f"all {len(records)} {what} record where they were made: " if len(known) == len(records) > 1
             else f"{len(known)} of {len(records)} {what} record where they were made: ")
            + f"{len(revisions)} git revision{'s' if len(revisions) > 1 else ''} "
            f"({', '.join(f'{rev}: {n}' for rev, n in revisions.most_common())}), "
            + ("every one from a clean tree" if not dirty else f"{dirty} from a tree with uncommitted changes")
            + f"; made on {'; '.join(f'{m}: {n}' for m, n in machines.most_common())}; torch {', '.join(torches)}")
    if not known:
        return (f"none of the {len(records)} {what} records where it was made: all were stored before stores "
                f"recorded this (their fingerprints still tie them to these weights and data).")
    if len(known) < len(records):
        older = len(records) - len(known)
        parts.append(f"{older} {'was' if older == 1 else 'were'} stored before stores recorded this "
                     f"(their fingerprints still tie them to these weights and data)")
    return "; ".join(parts) + "."
