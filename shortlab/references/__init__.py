"""The published numbers the notebooks set beside their own, with the paper and table each comes
from: ``paper_numbers("shortgpt" | "shortv" | "rope_base")`` reads ``<name>.json`` here. Every
section carries a ``source`` naming the paper (arXiv id) and the table or passage."""

from __future__ import annotations

import json
from importlib import resources

PAPERS = ("shortgpt", "shortv", "rope_base")


def paper_numbers(name: str) -> dict:
    """The published numbers of one paper (see ``PAPERS``) as a dict of sections."""
    if name not in PAPERS:
        raise ValueError(f"unknown paper {name!r}; known: {', '.join(PAPERS)}")
    return json.loads(resources.files(__name__).joinpath(f"{name}.json").read_text())
