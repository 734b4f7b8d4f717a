"""The settings notebook 02 compares, as interventions on packed easy-VQA scoring, and a resumable
store of each setting's per-question answers.

A ``Setting`` names what changes in the model: the layers in which a token group is frozen
(ShortV; the group is visual, text, all tokens, or as many random tokens as there are visual
ones), FastV's layer and ratio, or both. ``setting_intervention`` turns it into the
``intervention(input_ids, question_ends)`` that ``evaluate_items`` wraps around each packed
forward (``prefix_reach`` says how many of the dense model's first layers a setting leaves as
they are, which a ``PrefixCache`` then computes once per batch for all settings). A sweep over many settings (layer choices × frozen counts × random seeds, FastV ratios)
is the slow part of the notebook, so ``PredictionStore`` keeps each setting's predicted answers in
a JSON file, written atomically after every setting: an interrupted sweep resumes where it
stopped, and a notebook can read a sweep a script ran. The file records what the predictions
depend on (model, questions, dtype, …); a store opened with a different fingerprint refuses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from shortlab.arch import model_parts
from shortlab.files import write_json_atomically
from shortlab.llava_mini.easy_vqa import VQAItem
from shortlab.prefix import PrefixCache
from shortlab.runs import describe_runs, run_record

TOKEN_GROUPS = ("visual", "text", "all", "random")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One configuration of the model under evaluation (the default is the dense model).

    ``frozen_layers``: layers in which ``frozen_tokens`` keep their hidden state (ShortV);
    ``frozen_tokens``: "visual", "text", "all", or "random" (as many tokens as there are visual
    ones per row, at positions drawn with ``seed``); ``fastv_k``/``fastv_ratio``: FastV drops that
    share of the visual tokens from layer ``fastv_k`` on; ``blank_image``: every question is asked
    about the task's blank image instead of its own (the blank-image baseline).
    """

    frozen_layers: tuple[int, ...] = ()
    frozen_tokens: str = "visual"
    fastv_k: int | None = None
    fastv_ratio: float = 0.0
    seed: int = 0
    blank_image: bool = False

    def __post_init__(self):
        if self.frozen_tokens not in TOKEN_GROUPS:
            raise ValueError(f"frozen_tokens must be one of {TOKEN_GROUPS}, got {self.frozen_tokens!r}")
        if list(self.frozen_layers) != sorted(set(self.frozen_layers)):
            raise ValueError(f"frozen_layers must be sorted and distinct, got {self.frozen_layers}")
        if (self.fastv_k is None) != (self.fastv_ratio == 0.0):
            raise ValueError("give fastv_k and a non-zero fastv_ratio together, or neither")

    @property
    def key(self) -> str:
        """A stable text key (the store's index)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def token_mask(input_ids: torch.Tensor, image_token_id: int, group: str, seed: int = 0) -> torch.Tensor:
    """Bool [batch, seq]: the tokens of ``group`` in ``input_ids`` [batch, seq] (see ``Setting``)."""
    visual = input_ids == image_token_id
    if group == "visual":
        return visual
    if group == "text":
        return ~visual
    if group == "all":
        return torch.ones_like(visual)
    if group != "random":
        raise ValueError(f"unknown token group {group!r}; known: {TOKEN_GROUPS}")
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros_like(visual)
    for row, count in enumerate(visual.sum(1).tolist()):
        mask[row, torch.randperm(input_ids.shape[1], generator=generator)[:count].to(mask.device)] = True
    return mask


def prefix_reach(setting: Setting, num_layers: int) -> int:
    """How many first decoder layers ``setting`` computes exactly as the dense model does, on the
    same inputs: those before its first frozen layer and before FastV's ranking layer ``k − 1``
    (which must run to rank the tokens), and at least one layer left to compute; 0 for the blank
    image, whose inputs are another image's."""
    if setting.blank_image:
        return 0
    changed = [*setting.frozen_layers, *([setting.fastv_k - 1] if setting.fastv_k is not None else [])]
    return min(min(changed, default=num_layers - 1), num_layers - 1)


def setting_intervention(model, setting: Setting, prefix: PrefixCache | None = None):
    """The ``evaluate_items`` intervention for ``setting`` (None for the dense model without
    ``prefix``). ``prefix``: a ``PrefixCache`` no deeper than ``prefix_reach(setting)``, through
    which the first layers run (each batch's stored output is reused, or computed and stored)."""
    from shortlab.shortv import fastv, freeze_visual_tokens

    reach = prefix_reach(setting, model_parts(model).num_layers)
    if prefix is not None and prefix.depth > reach:
        raise ValueError(f"{setting.key} computes only its first {reach} layers as the dense model does; "
                         f"it cannot share the first {prefix.depth}")
    if not setting.frozen_layers and setting.fastv_k is None and prefix is None:
        return None
    image_token_id = model.config.image_token_id

    def intervention(input_ids, question_ends):
        stack = contextlib.ExitStack()
        visual = input_ids == image_token_id
        if setting.fastv_k is not None:
            stack.enter_context(fastv(model, setting.fastv_k, setting.fastv_ratio, token_mask=visual,
                                      query_mask=question_ends))
        if setting.frozen_layers:
            frozen = token_mask(input_ids, image_token_id, setting.frozen_tokens, setting.seed)
            stack.enter_context(freeze_visual_tokens(model, list(setting.frozen_layers), token_mask=frozen))
        if prefix is not None:  # last: the ShortV/FastV engine patches the layers themselves, not wrappers
            stack.enter_context(prefix.attached(model))
        return stack

    return intervention


def items_fingerprint(items: list[VQAItem]) -> str:
    """A short hash of the questions, answers and images, in order."""
    text = json.dumps([[it.question, it.answer, it.image_id] for it in items])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class PredictionStore:
    """Per-setting predicted answers, kept in memory and, with a ``path``, in a JSON file.

    ``fingerprint``: what the predictions depend on (model weights, dtype, question fingerprint …);
    an existing file with another fingerprint raises instead of mixing results, or, with
    ``stale="recompute"``, is ignored (``self.stale`` is then True) and replaced at the first
    write. Every setting computed here is stored with where it was computed
    (``runs.run_record``: git revision, versions, command line, hardware).
    """

    def __init__(self, path: str | Path | None, fingerprint: dict, *, stale: str = "raise"):
        if stale not in ("raise", "recompute"):
            raise ValueError(f"stale must be 'raise' or 'recompute', got {stale!r}")
        self.path = None if path is None else Path(path)
        self.fingerprint = dict(fingerprint)
        self.results: dict[str, list[str]] = {}
        self.provenance: dict[str, dict] = {}  # setting key -> where it was computed (run_record)
        self.computed = 0  # settings computed (not read back) by this store
        self.stale = False
        if self.path is not None and self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved["fingerprint"] == self.fingerprint:
                self.results = saved["results"]
                self.provenance = saved.get("provenance", {})
            elif stale == "raise":
                raise ValueError(f"{self.path} holds predictions for {saved['fingerprint']}, not "
                                 f"{self.fingerprint}; use another file or delete it to recompute")
            else:
                self.stale = True

    def __contains__(self, setting: Setting) -> bool:
        return setting.key in self.results

    def predictions(self, setting: Setting, compute: Callable[[], list[str]]) -> list[str]:
        """``setting``'s predictions: stored ones, or ``compute()``'s, stored (atomically) first."""
        if setting.key not in self.results:
            self.results[setting.key] = list(compute())
            self.provenance[setting.key] = run_record()
            self.computed += 1
            self._write()
        return self.results[setting.key]

    def describe_provenance(self) -> str:
        """Where the stored settings were computed, in one sentence (``runs.describe_runs``)."""
        return describe_runs((self.provenance.get(key) for key in self.results), what="settings")

    def _write(self) -> None:
        if self.path is not None:
            write_json_atomically(self.path, {"fingerprint": self.fingerprint, "results": self.results,
                                              "provenance": self.provenance})


def evaluate_setting(model, processor, items: list[VQAItem], setting: Setting,
                     store: PredictionStore | None = None, *, features=None, batch_size: int = 1,
                     split: str = "test", task="easy-vqa", prefix: PrefixCache | None = None) -> list[str]:
    """The closed-set answer ``model`` predicts for each of ``items`` (in order, questions of
    ``split`` of ``task``) under ``setting``, through ``store`` when given; its first layers through
    ``prefix`` when given (see ``setting_intervention``)."""
    from shortlab.llava_mini.scoring import evaluate_items
    from shortlab.llava_mini.tasks import task as find_task

    def compute() -> list[str]:
        source = {"image": find_task(task).blank_image()} if setting.blank_image else {"features": features}
        result = evaluate_items(model, processor, items, split=split, batch_size=batch_size,
                                intervention=setting_intervention(model, setting, prefix), task=task, **source)
        by_item = {id(item): predicted for item, predicted, _ in result["predictions"]}
        return [by_item[id(item)] for item in items]

    return compute() if store is None else store.predictions(setting, compute)
