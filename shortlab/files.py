"""Atomic file writes: results, stores and figures are written through a temporary file in the
same folder and renamed into place, so an interrupted write leaves the previous file whole."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)``, then rename the temporary file to ``path`` (folders are
    created). The file is readable by everyone, like a plainly written one (``mkstemp`` would
    leave it private). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json_atomically(path: str | os.PathLike, content, indent: int | None = None) -> Path:
    """Write ``content`` as JSON to ``path`` atomically (see ``write_atomically``)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(content, handle, indent=indent)
            handle.write("\n")

    return write_atomically(path, write)
