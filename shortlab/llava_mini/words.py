"""What each section of notebook 02 found, in sentences built from its own intervals and
verdicts: the notebook's prose explains the method, these sentences state the result, so no
number or outcome is ever typed into its markdown."""

from __future__ import annotations

import numpy as np

from shortlab.stats import CANNOT_TELL, CONTRADICTED, EQUIVALENT, SUPPORTED, describe

_HOW = {SUPPORTED: "holds", CONTRADICTED: "fails", EQUIVALENT: "is a tie", CANNOT_TELL: "is undecided"}


def layer_ranges(layers) -> str:
    """Sorted layer indices as ranges: [3, 4, 5, 9] -> "3–5, 9"."""
    layers = sorted(int(layer) for layer in layers)
    if not layers:
        return "none"
    parts, start = [], layers[0]
    for previous, current in zip(layers, [*layers[1:], None]):
        if current != previous + 1:
            parts.append(str(start) if start == previous else f"{start}–{previous}")
            start = current
    return ", ".join(parts)


def by_outcome(outcomes: dict, margin: float | None = None, label: str = "N = ") -> str:
    """{key: outcome} grouped by outcome: "supported at N = 6, 12; contradicted at N = 24"."""
    groups: dict[str, list] = {}
    for key, outcome in outcomes.items():
        groups.setdefault(outcome, []).append(str(key))
    return "; ".join(f"{describe(outcome, margin)} at {label}{', '.join(keys)}" for outcome, keys in groups.items())


def layer_contribution_words(visual: np.ndarray, text: np.ndarray, judgement, frozen) -> str:
    """Section 1: where text LC exceeds visual LC, the per-question verdict, the layers whose
    visual LC is exactly 0 and where the frozen layers lie. ``visual``, ``text``: [layers]."""
    num_layers = len(visual)
    more = int(np.sum(text > visual))
    sentences = [f"Text tokens have the larger Layer Contribution in {more} of {num_layers} layers; per calibration "
                 f"question, the layer-mean text LC minus visual LC is {judgement.interval} nats, so the claim "
                 f"\"text tokens contribute more than visual tokens\" {_HOW[judgement.outcome]} "
                 f"({judgement.words()})."]
    zeros = [int(layer) for layer in np.flatnonzero(visual == 0)]
    if zeros:
        last = zeros == [num_layers - 1]
        sentences.append(f"The visual LC of layer {layer_ranges(zeros)} is exactly 0"
                         + (": in the last layer nothing reads the visual tokens' update any more (the answer "
                            "position attends to that layer's keys and values, which freezing keeps), so "
                            "freezing them there is free by construction." if last else "."))
    frozen = sorted(frozen)
    late = sum(layer >= num_layers / 2 for layer in frozen)
    sentences.append(f"The {len(frozen)} layers of lowest visual LC, the ones ShortV freezes, are layers "
                     f"{layer_ranges(frozen)}: {late} of them in the second half of the decoder.")
    return " ".join(sentences)


def baseline_words(dense, blank, prior, judgement, rule_name: str, by_type: str, ceiling: bool) -> str:
    """Section 2: the dense model against the rules that need no image, and whether the task
    leaves room for a layer choice to lose accuracy."""
    uses = {SUPPORTED: "uses the image", CONTRADICTED: "does not beat the strongest rule that needs no image",
            EQUIVALENT: "does no better than the strongest rule that needs no image",
            CANNOT_TELL: "may or may not beat the rules that need no image at this sample size"}[judgement.outcome]
    room = ("It sits at the accuracy ceiling: settings that keep its accuracy are ties more questions cannot break."
            if ceiling else
            "It is off the ceiling, so a layer choice that costs accuracy can show it.")
    return (f"The dense model answers {dense}; shown a blank image instead it answers {blank}, and the "
            f"question-only prior reaches {prior}. Against the strongest rule that needs no model ({rule_name}) "
            f"the dense model {uses} ({judgement}); per question type: {by_type} {room}")


def frozen_curve_words(chains: dict[int, str], margin: float, max_kept: int | None, min_lost: int | None,
                       num_layers: int, tolerance: float, shortv_n: int, shortv_loss) -> str:
    """Section 3: the ordering "LC > visual cosine > random" at each N, and how far N goes
    before the loss exceeds ``tolerance``."""
    kept = (f"Freezing the visual tokens in the LC layers is established to cost at most {tolerance:g} in accuracy "
            f"up to N = {max_kept} of {num_layers} layers" if max_kept is not None else
            f"At no N is the loss of the LC layers established to be at most {tolerance:g}")
    lost = (f"; from N = {min_lost} on, the loss is established to exceed it" if min_lost is not None else
            "; at no N is a larger loss established")
    lost += (" (an N between the two is undecided at this sample size)."
             if max_kept is not None and min_lost is not None else ".")
    return (f"The ordering \"LC > visual cosine > random\" (both links by more than {margin:g}): "
            f"{by_outcome(chains, margin)}. {kept}{lost} At ShortV's N = {shortv_n} the loss is "
            f"{shortv_loss.interval}: \"at most a {tolerance:g} loss\" {_HOW[shortv_loss.outcome]} "
            f"({describe(shortv_loss.outcome, tolerance)}).")


def type_loss_words(hurts_first: dict, coarse: str | None, shortv_n: int) -> str:
    """Which question types lose first: the verdict on "this detailed type loses more than the
    coarse one" per detailed type, or why there is none."""
    if not hurts_first:
        return "This task does not order its question types by the detail they need: there is no claim to judge."
    return " ".join(f"At N = {shortv_n}, \"{kind} questions lose more than {coarse} questions\" "
                    f"{_HOW[judgement.outcome]}: {judgement}." for kind, judgement in hurts_first.items())


def token_words(judgements: dict, margin: float) -> str:
    """Section 4: freezing the visual tokens against freezing each other token group."""
    return "Freezing the visual tokens instead of " + "; instead of ".join(
        f"{'all tokens' if name == 'all' else f'the {name} tokens'}: {judgement.interval} "
        f"({describe(judgement.outcome, margin)})"
        for name, judgement in judgements.items()) + " (the visual tokens' accuracy minus the other group's)."


def frontier_words(shortv_vs_fastv, combinations: dict[str, str], margin: float) -> str:
    """Section 5: ShortV against FastV at the same FLOPs, and ShortV + FastV against each alone."""
    parts = []
    if shortv_vs_fastv is not None:
        parts.append(f"At the same FLOPs, \"ShortV beats FastV\" {_HOW[shortv_vs_fastv.outcome]} ({shortv_vs_fastv}).")
    for label, outcome in combinations.items():
        parts.append(f"\"ShortV + FastV ({label}) beats each method alone at its FLOPs\" {_HOW[outcome]} "
                     f"({describe(outcome, margin)}).")
    return " ".join(parts) or "No FastV setting is in this run's plan."


def stability_words(subsets: int, distinct: int, median_jaccard: float, family_summary: str, outcome: str,
                    tolerance: float) -> str:
    """Section 6: how often other calibration sets choose the same layers, and whether their
    choices keep the main choice's accuracy."""
    return (f"{subsets} calibration subsets chose {distinct} distinct layer sets (median Jaccard overlap with the "
            f"main set {median_jaccard:.2f}). \"Every subset's layers keep the main choice's accuracy within "
            f"{tolerance:g}\" {_HOW[outcome]} ({describe(outcome, tolerance)}); subset by subset: {family_summary}")


def speed_words(speed, shortv_n: int) -> str:
    """Section 7: measured against FLOPs-predicted prefill speed-up (``speed``: a frame indexed
    by N with measured_speedup, predicted_speedup, measured_over_predicted)."""
    frozen = speed[speed.index > 0]
    row = speed.loc[shortv_n]
    return (f"At N = {shortv_n} the decoder prefill runs {row.measured_speedup:.2f}× faster against "
            f"{row.predicted_speedup:.2f}× predicted by FLOPs ({row.measured_over_predicted:.0%} of the prediction); "
            f"across N = {layer_ranges(frozen.index)} the measured share of the prediction runs from "
            f"{frozen.measured_over_predicted.min():.0%} to {frozen.measured_over_predicted.max():.0%}.")
