"""Notebook 02's answer explorer: one easy-VQA question, the dense model's closed-set answer
distribution beside the one with the visual tokens frozen in chosen layers (ShortV), and the
image itself.

* ``answer_probabilities``: P(answer | image, question) over the closed set (the 13 easy-VQA
  answers): a softmax over the answers' log-likelihoods from the packed scorer
  (``scoring.score_answers``), with ``shortv.freeze_visual_tokens`` around the decoder forward;
* ``layer_presets``: the frozen-layer choices the explorer offers (none, lowest LC, lowest
  visual cosine, a seeded random draw);
* ``answer_view`` / ``draw_answer_view``: one explorer state and its figure (headless runs save
  this static rendering);
* ``answer_explorer``: the ipywidgets controls (image, question, frozen layers, presets) that
  redraw the figure on every change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from shortlab.arch import model_parts, validate_layer_indices
from shortlab.llava_mini.easy_vqa import VQAItem

PRESETS = ("none", "LC", "visual cosine", "random")


def answer_probabilities(model, processor, image, questions: Sequence[str],
                         frozen_layers: Iterable[int] = (), answers: Sequence[str] | Callable | None = None
                         ) -> list[dict[str, float]]:
    """For each of ``questions`` about ``image`` (a PIL image), the model's answer distribution
    over the closed set ``answers`` (default: easy-VQA's; or a function from a question to its own
    candidates, a task's ``candidates``): ``{answer: probability}``, summing to 1.

    The probability of an answer is the softmax, over the closed set, of its log-likelihood
    (answer and end-of-turn tokens, as ``scoring.score_answers`` scores them: the quantity whose
    argmax is the notebook's prediction). ``frozen_layers``: decoder layers in which the visual
    tokens (``input_ids == image_token_id``) keep their hidden state (``freeze_visual_tokens``);
    empty for the dense model. All questions share one packed forward. The model is not changed:
    the freezing is undone on exit, also on an error.

    Raises ``ValueError`` for no question, ``IndexError`` / ``TypeError`` / ``ValueError`` for
    bad layer indices (``arch.validate_layer_indices``), before any model pass.
    """
    from shortlab.llava_mini.scoring import score_answers
    from shortlab.shortv import freeze_visual_tokens

    if isinstance(questions, str) or not questions:
        raise ValueError(f"questions must be a non-empty list of question texts, got {questions!r}")
    layers = validate_layer_indices(model_parts(model), frozen_layers, allow_empty=True)
    image_token_id = model.config.image_token_id

    def freeze(input_ids, question_ends):
        return freeze_visual_tokens(model, layers, token_mask=input_ids == image_token_id)

    candidates = answers if callable(answers) or not answers else list(answers)
    scored = score_answers(model, processor, [image], [list(questions)], answers=candidates,
                           intervention=freeze if layers else None)[0]
    distributions = []
    for scores, _ in scored:
        names = list(scores)
        probabilities = torch.softmax(torch.tensor([scores[name] for name in names], dtype=torch.float64), 0)
        distributions.append(dict(zip(names, probabilities.tolist())))
    return distributions


def layer_presets(lc: Sequence[float], visual_cosine: Sequence[float], n: int, seed: int = 0
                  ) -> dict[str, tuple[int, ...]]:
    """The frozen-layer sets the explorer offers, each sorted: ``"none"``; ``"LC"``, the ``n``
    layers of lowest visual Layer Contribution (``lc`` [layers], ShortV's choice); ``"visual
    cosine"``, the ``n`` lowest of ``visual_cosine`` [layers] (ShortGPT's BI on the visual
    tokens); ``"random"``, ``n`` layers drawn with ``seed`` (``evidence.random_layers``).

    Raises ``ValueError`` when the two score lists differ in length or ``n`` is not in
    0..layers."""
    from shortlab.llava_mini.evidence import lowest, random_layers

    num_layers = len(lc)
    if len(visual_cosine) != num_layers:
        raise ValueError(f"lc has {num_layers} layers but visual_cosine {len(visual_cosine)}")
    if not 0 <= n <= num_layers:
        raise ValueError(f"n must be in 0..{num_layers} (the model's layers), got {n}")
    return {"none": (), "LC": lowest(np.asarray(lc), n), "visual cosine": lowest(np.asarray(visual_cosine), n),
            "random": random_layers(num_layers, n, seed)}


@dataclasses.dataclass(frozen=True)
class AnswerView:
    """One explorer state: ``item`` (question, true answer, image id), the ``frozen_layers`` and
    the answer distributions ``dense`` and ``frozen`` ({answer: probability})."""

    item: VQAItem
    frozen_layers: tuple[int, ...]
    dense: dict[str, float]
    frozen: dict[str, float]

    def table(self):
        """pandas DataFrame, one row per (answer, model): "answer", "model" ("dense" / "frozen"),
        "probability"; answers in the closed set's order."""
        import pandas as pd

        return pd.DataFrame([{"answer": answer, "model": label, "probability": distribution[answer]}
                             for label, distribution in [("dense", self.dense), ("frozen", self.frozen)]
                             for answer in self.dense])


def answer_view(model, processor, item: VQAItem, frozen_layers: Iterable[int], split: str = "test",
                dense: Mapping[str, float] | None = None, task: str = "easy-vqa") -> AnswerView:
    """The ``AnswerView`` of ``item`` (its image read from ``task``'s ``split``, its answers the
    question's candidates in that task) with the visual tokens frozen in ``frozen_layers``.
    ``dense``: the dense distribution when already known (the explorer caches it per question),
    else computed."""
    from shortlab.llava_mini.tasks import task as find_task

    vqa_task = find_task(task)
    image = vqa_task.image(split, item.image_id)
    layers = tuple(validate_layer_indices(model_parts(model), frozen_layers, allow_empty=True))
    if dense is None:
        dense = answer_probabilities(model, processor, image, [item.question], answers=vqa_task.candidates)[0]
    frozen = (answer_probabilities(model, processor, image, [item.question], layers, answers=vqa_task.candidates)[0]
              if layers else dict(dense))
    return AnswerView(item, layers, dict(dense), frozen)


def draw_answer_view(view: AnswerView, split: str = "test", title: str = "", task: str = "easy-vqa"):
    """A figure of ``view``: the image (from ``task``'s ``split``) with its question and true
    answer on the left, the dense and frozen answer distributions as bars on the right (the true
    answer's label in bold). Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from shortlab.llava_mini.tasks import task as find_task

    fig, (ax_image, ax_bars) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 2.6]})
    ax_image.imshow(find_task(task).image(split, view.item.image_id))
    ax_image.set_title(f"{view.item.question!r}\ntrue answer: {view.item.answer}", fontsize=9)
    ax_image.axis("off")
    frozen_label = f"frozen in {len(view.frozen_layers)} layers" if view.frozen_layers else "frozen (no layer)"
    table = view.table().replace({"model": {"frozen": frozen_label}})
    sns.barplot(table, x="answer", y="probability", hue="model", ax=ax_bars,
                palette={"dense": "0.25", frozen_label: sns.color_palette()[1]})
    for label in ax_bars.get_xticklabels():
        label.set_rotation(45)
        label.set_fontweight("bold" if label.get_text() == view.item.answer else "normal")
    ax_bars.set_ylim(0, 1)
    ax_bars.set_xlabel("closed-set answer (bold: the true one)")
    ax_bars.set_ylabel("P(answer | image, question)")
    layers = ", ".join(map(str, view.frozen_layers)) or "none"
    ax_bars.set_title(f"{title}visual tokens frozen in layers: {layers}", fontsize=9)
    ax_bars.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def answer_explorer(model, processor, items: Sequence[VQAItem], presets: Mapping[str, Iterable[int]],
                    default: str = "LC", split: str = "test", title: str = "", initial: AnswerView | None = None,
                    task: str = "easy-vqa"):
    """Interactive controls for ``draw_answer_view``: an image (the distinct images of ``items``),
    one of its questions, the frozen layers (a multiple selection preset to ``presets[default]``)
    and one button per preset. Every change redraws the figure below the controls; dense
    distributions are cached per question. ``initial``: a view already computed (e.g. the one a
    headless run saves), shown first without another model pass; its question must be one of
    ``items``. Returns the ipywidgets box (``display`` it).

    Raises ``ValueError`` for no item, an unknown ``default`` preset or an ``initial`` view of
    another question."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    if not items:
        raise ValueError("the explorer needs at least one question")
    if default not in presets:
        raise ValueError(f"unknown preset {default!r}; the presets are {', '.join(presets)}")
    if initial is not None and initial.item not in items:
        raise ValueError(f"the initial view's question {initial.item} is not one of the explorer's items")
    by_image: dict[int, list[VQAItem]] = {}
    for item in items:
        by_image.setdefault(item.image_id, []).append(item)
    first = initial.item if initial is not None else items[0]
    num_layers = model_parts(model).num_layers
    image = widgets.Dropdown(options=[(f"test image {i}", i) for i in by_image], value=first.image_id,
                             description="image")
    question = widgets.Dropdown(options=[(it.question, k) for k, it in enumerate(by_image[first.image_id])],
                                value=by_image[first.image_id].index(first), description="question",
                                layout=widgets.Layout(width="420px"))
    start_layers = initial.frozen_layers if initial is not None else tuple(presets[default])
    layers = widgets.SelectMultiple(options=list(range(num_layers)), value=tuple(start_layers),
                                    rows=min(num_layers, 10), description="frozen layers")
    buttons = [widgets.Button(description=name, layout=widgets.Layout(width="110px")) for name in presets]
    output = widgets.Output()
    dense_cache: dict[VQAItem, dict[str, float]] = {} if initial is None else {initial.item: initial.dense}
    quiet = [False]  # True while the question list is replaced, so that one image change draws once

    def show(view: AnswerView) -> None:
        with output:
            output.clear_output(wait=True)
            fig = draw_answer_view(view, split, title, task)
            plt.show()
            plt.close(fig)

    def redraw(change=None) -> None:
        if quiet[0]:
            return
        item = by_image[image.value][question.value]
        view = answer_view(model, processor, item, layers.value, split, dense=dense_cache.get(item), task=task)
        dense_cache[item] = view.dense
        show(view)

    def image_changed(change) -> None:
        quiet[0] = True
        try:
            question.options = [(it.question, k) for k, it in enumerate(by_image[image.value])]
            question.value = 0
        finally:
            quiet[0] = False
        redraw()

    def preset_clicked(button) -> None:
        layers.value = tuple(presets[button.description])

    image.observe(image_changed, names="value")
    for control in (question, layers):
        control.observe(redraw, names="value")
    for button in buttons:
        button.on_click(preset_clicked)
    if initial is not None:
        show(initial)
    else:
        redraw()
    return widgets.VBox([widgets.HBox([image, question]), widgets.HBox([layers, widgets.VBox(buttons)]), output])
