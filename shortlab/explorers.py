"""What the notebooks' interactive explorers compute and draw, and their ipywidgets controls;
a headless run shows (and saves) the same figure for the default selection.

Notebook 01 (layer removal): ``model_snapshot`` measures what one model does on the explorer's
inputs (held-out perplexity per block, the top next tokens after a prompt), ``removal_preview``
sets a copy with some decoder layers deleted beside the dense model,
``removal_preview_figure`` draws the two, and ``removal_explorer`` is the widget that redraws
them for any layers and prompt.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shortlab.arch import model_parts, validate_layer_indices
from shortlab.evaluate.likelihood import block_nll, input_device, next_token_logprobs
from shortlab.hooks import eval_mode
from shortlab.plotting import drawable_text
from shortlab.pruning import remove_layers
from shortlab.stats import Interval, paired_perplexity_ratio, perplexity_interval

# --- notebook 01: remove layers, see perplexity and the next-token predictions ---------------


@dataclass(frozen=True)
class NextToken:
    """One candidate next token: its decoded text and the model's probability for it."""

    text: str
    probability: float


@dataclass(frozen=True)
class ModelSnapshot:
    """What one model does on the explorer's inputs.

    ``nll``, ``tokens``: float64 [n_blocks], summed next-token NLL (nats) and predicted tokens of
    each held-out block; ``perplexity``: exp(Σ nll / Σ tokens) with a bootstrap interval over
    blocks; ``next_tokens``: the ``top_k`` most probable tokens after the prompt, most probable
    first.
    """

    num_layers: int
    nll: np.ndarray
    tokens: np.ndarray
    perplexity: Interval
    next_tokens: tuple[NextToken, ...]


@dataclass(frozen=True)
class RemovalPreview:
    """The dense model beside a copy with ``removed`` decoder layers deleted.

    ``ratio``: pruned perplexity ÷ dense perplexity on the same blocks, with a paired bootstrap
    interval over blocks (above 1: the pruned model predicts the held-out text worse).
    """

    prompt: str
    removed: tuple[int, ...]
    dense: ModelSnapshot
    pruned: ModelSnapshot
    ratio: Interval


def _check_blocks(eval_blocks: Mapping[str, torch.Tensor]) -> None:
    if "input_ids" not in eval_blocks:
        raise ValueError(f"eval_blocks needs 'input_ids' [n_blocks, seq]; got keys {sorted(eval_blocks)}")
    if eval_blocks["input_ids"].dim() != 2 or eval_blocks["input_ids"].shape[0] < 2:
        raise ValueError("eval_blocks['input_ids'] must be [n_blocks, seq] with at least 2 blocks for an "
                         f"interval; got shape {tuple(eval_blocks['input_ids'].shape)}")


@torch.inference_mode()
def top_next_tokens(model: nn.Module, tokenizer, prompt: str, top_k: int = 5) -> tuple[NextToken, ...]:
    """The ``top_k`` most probable next tokens after ``prompt`` (tokenized as the tokenizer does by
    default), most probable first, from a float32 softmax over the last position's logits."""
    if not prompt.strip():
        raise ValueError("prompt is empty: the next-token predictions need some text to continue")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(input_device(model))  # [1, T]
    with eval_mode(model):
        logprobs = next_token_logprobs(model, ids, torch.ones_like(ids), n_last=1)[0, -1]  # [V]
    probabilities, token_ids = logprobs.exp().topk(min(top_k, logprobs.numel()))
    return tuple(NextToken(tokenizer.decode([token_id]), probability)
                 for token_id, probability in zip(token_ids.tolist(), probabilities.tolist()))


def model_snapshot(model: nn.Module, tokenizer, prompt: str, eval_blocks: Mapping[str, torch.Tensor],
                   top_k: int = 5, batch_size: int = 8, seed: int = 0) -> ModelSnapshot:
    """Held-out perplexity (per block, and pooled with its interval) and the top next tokens of
    ``model`` on ``eval_blocks`` (``input_ids`` and optional ``attention_mask``, [n_blocks, seq],
    at least 2 blocks) and ``prompt``."""
    _check_blocks(eval_blocks)
    nll, tokens = block_nll(model, eval_blocks["input_ids"], eval_blocks.get("attention_mask"), batch_size)
    return ModelSnapshot(num_layers=model_parts(model).num_layers, nll=nll, tokens=tokens,
                         perplexity=perplexity_interval(nll, tokens, seed=seed),
                         next_tokens=top_next_tokens(model, tokenizer, prompt, top_k))


def removal_preview(model: nn.Module, tokenizer, removed: Iterable[int], prompt: str,
                    eval_blocks: Mapping[str, torch.Tensor], *, dense: ModelSnapshot | None = None,
                    top_k: int = 5, batch_size: int = 8, seed: int = 0) -> RemovalPreview:
    """Delete ``removed`` decoder layers from a copy of ``model`` (``shortlab.pruning.remove_layers``;
    ``model`` itself is not modified) and set what the copy does beside the dense model.

    ``dense``: the dense model's ``model_snapshot`` on the same prompt and blocks, when already
    measured (an explorer measures it once and reuses it on every change); it is checked to
    match ``model`` and the blocks. Removing no layer measures nothing twice: the pruned
    snapshot is the dense one.
    """
    parts = model_parts(model)
    chosen = tuple(sorted(set(validate_layer_indices(parts, removed, allow_empty=True))))
    if len(chosen) == parts.num_layers:
        raise ValueError(f"cannot remove all {parts.num_layers} decoder layers: at least one must stay")
    _check_blocks(eval_blocks)
    if dense is None:
        dense = model_snapshot(model, tokenizer, prompt, eval_blocks, top_k, batch_size, seed)
    elif dense.num_layers != parts.num_layers or dense.nll.shape[0] != eval_blocks["input_ids"].shape[0]:
        raise ValueError(f"the dense snapshot ({dense.num_layers} layers, {dense.nll.shape[0]} blocks) is not of this "
                         f"model and these blocks ({parts.num_layers} layers, "
                         f"{eval_blocks['input_ids'].shape[0]} blocks)")
    if chosen:
        pruned_model = remove_layers(model, chosen)  # a deep copy: the caller's model is untouched
        pruned = model_snapshot(pruned_model, tokenizer, prompt, eval_blocks, top_k, batch_size, seed)
        del pruned_model
    else:
        pruned = dense
    ratio = paired_perplexity_ratio(pruned.nll, dense.nll, dense.tokens, seed=seed)
    return RemovalPreview(prompt=prompt, removed=chosen, dense=dense, pruned=pruned, ratio=ratio)


def removal_preview_figure(preview: RemovalPreview, title: str = ""):
    """Three panels: held-out perplexity of the dense and pruned models (95 % intervals over
    blocks), then each model's top next tokens after the prompt with their probabilities.
    Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_dense, ax_pruned) = plt.subplots(
        1, 3, figsize=(13, 3.6), gridspec_kw={"width_ratios": [0.8, 1, 1]})
    for x, (interval, color) in enumerate(((preview.dense.perplexity, "black"), (preview.pruned.perplexity, "tab:red"))):
        ax_ppl.errorbar(x, interval.estimate, yerr=[[interval.estimate - interval.low], [interval.high - interval.estimate]],
                        fmt="o", color=color, capsize=4)
    ax_ppl.set_xticks([0, 1], ["dense", f"−{len(preview.removed)} layers"])
    ax_ppl.set_xlim(-0.6, 1.6)
    ax_ppl.set_yscale("log")
    ax_ppl.set_xlabel("model")
    ax_ppl.set_ylabel("held-out perplexity (95 %)")
    ax_ppl.set_title(f"÷ dense: {preview.ratio}", fontsize="small")
    for ax, snapshot, color, name in ((ax_dense, preview.dense, "0.4", f"dense ({preview.dense.num_layers} layers)"),
                                      (ax_pruned, preview.pruned, "tab:red",
                                       f"pruned ({preview.pruned.num_layers} layers)")):
        labels = [drawable_text(repr(token.text)) for token in snapshot.next_tokens]
        ax.barh(range(len(labels)), [token.probability for token in snapshot.next_tokens], color=color)
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()  # most probable on top
        ax.set_xlim(0, 1)
        ax.set_xlabel("next-token probability")
        ax.set_ylabel("next token")
        ax.set_title(name, fontsize="small")
    removed = ", ".join(map(str, preview.removed)) or "none"
    fig.suptitle(f"{title + ': ' if title else ''}layers removed: {removed}; "
                 f"prompt {drawable_text(repr(preview.prompt))}",
                 fontsize="medium")
    fig.tight_layout()
    return fig


def removal_explorer(model: nn.Module, tokenizer, influence, initial: RemovalPreview,
                     eval_blocks: Mapping[str, torch.Tensor], *, top_k: int = 5, batch_size: int = 8, seed: int = 0,
                     title: str = ""):
    """The ipywidgets explorer of ``removal_preview``: a multiple choice of decoder layers (each
    labelled with its ``influence`` [layers], e.g. BI) and a prompt box; every change redraws
    ``removal_preview_figure`` for the chosen layers. Opens on ``initial``'s selection and reuses
    its dense snapshot (one per prompt: the dense model never changes). Returns the widget."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    dense = {initial.prompt: initial.dense}
    picker = widgets.SelectMultiple(options=[(f"layer {i}  (BI {value:.3g})", i) for i, value in enumerate(influence)],
                                    value=initial.removed, rows=min(len(influence), 12), description="remove")
    prompt_box = widgets.Text(value=initial.prompt, description="prompt", continuous_update=False)
    output = widgets.Output()

    def redraw(change=None):
        with output:
            output.clear_output(wait=True)
            prompt = prompt_box.value
            if prompt not in dense:
                dense[prompt] = model_snapshot(model, tokenizer, prompt, eval_blocks, top_k, batch_size, seed)
            preview = removal_preview(model, tokenizer, picker.value, prompt, eval_blocks, dense=dense[prompt],
                                      top_k=top_k, batch_size=batch_size, seed=seed)
            removal_preview_figure(preview, title=title)
            plt.show()

    for control in (picker, prompt_box):
        control.observe(redraw, names="value")
    return widgets.VBox([widgets.HBox([picker, prompt_box]), output])


def preview_words(preview: RemovalPreview, blocks: int) -> str:
    """What removing ``preview``'s layers does, in one sentence."""
    dense, pruned = preview.dense.next_tokens[0], preview.pruned.next_tokens[0]
    return (f"removing layers {list(preview.removed)} multiplies perplexity on the first {blocks} held-out blocks by "
            f"{preview.ratio}; after {preview.prompt!r} the dense model's most probable next token is {dense.text!r} "
            f"(p = {dense.probability:.3g}), the pruned model's {pruned.text!r} (p = {pruned.probability:.3g})")
