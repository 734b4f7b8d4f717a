"""Every verdict function notebook 02 judges ShortV with, driven to each of its outcomes on
synthetic data: a verdict that could not come out otherwise would say nothing."""

import numpy as np
import pytest

from shortlab.findings import Finding
from shortlab.llava_mini import evidence
from shortlab.llava_mini.easy_vqa import VQAItem, no_model_rules, type_chance
from shortlab.stats import CANNOT_TELL, CONTRADICTED, EQUIVALENT, OUTCOMES, SUPPORTED, Interval


def iv(low, high, estimate=None):
    return Interval((low + high) / 2 if estimate is None else estimate, low, high, 0.95, "synthetic")


# ---------------------------------------------------------------- loss ("keeps the accuracy")

@pytest.mark.parametrize("interval,expected", [
    (iv(-0.004, 0.008), EQUIVALENT),  # inside ± 0.01: the same accuracy
    (iv(-0.03, 0.005), SUPPORTED),  # below the tolerance, perhaps a gain larger than it
    (iv(0.013, 0.037), CONTRADICTED),  # a loss larger than the tolerance
    (iv(0.0, 0.03), CANNOT_TELL),  # reaches both sides of the tolerance
])
def test_loss_verdict_reaches_every_outcome(interval, expected):
    assert evidence.loss_verdict(interval, 0.01) == expected


def test_loss_verdict_follows_the_tolerance():
    loss = iv(0.013, 0.037)
    assert evidence.loss_verdict(loss, 0.01) == CONTRADICTED
    assert evidence.loss_verdict(loss, 0.05) == EQUIVALENT


def test_loss_family_mirrors_each_verdict_and_holm_can_undo_a_lone_contradiction():
    family = evidence.loss_family({"tie": iv(-0.004, 0.008), "gain": iv(-0.03, 0.005), "loss": iv(0.013, 0.037),
                                   "open": iv(0.0, 0.03)}, 0.01)
    assert family.per_setting == {"tie": EQUIVALENT, "gain": SUPPORTED, "loss": CONTRADICTED, "open": CANNOT_TELL}
    assert set(family.holm.values()) <= set(OUTCOMES)
    # one interval barely above the tolerance among many: contradicted alone, not after Holm
    many = {f"s{i}": iv(-0.004, 0.008) for i in range(30)}
    many["edge"] = iv(0.0101, 0.05, estimate=0.03)
    family = evidence.loss_family(many, 0.01)
    assert family.per_setting["edge"] == CONTRADICTED
    assert family.holm["edge"] == CANNOT_TELL
    assert "after Holm" in family.summary(0.01) and "±0.01" in family.summary(0.01)


def test_max_frozen_within_counts_ties_as_kept():
    clusters = np.arange(400) // 4
    dense = np.ones(400)
    frozen = {2: np.ones(400),  # no loss: the same within the tolerance
              4: np.r_[np.zeros(8), np.ones(392)],  # 2 % loss, the interval reaches below 1 %
              6: np.r_[np.zeros(200), np.ones(200)]}  # 50 % loss
    rows, largest, smallest = evidence.max_frozen_within(dense, frozen, clusters, tolerance=0.01)
    assert [row["verdict"] for row in rows] == [EQUIVALENT, CANNOT_TELL, CONTRADICTED]
    assert (largest, smallest) == (2, 6)
    better = {3: np.ones(400)}  # frozen better than the reference by far: supported, also kept
    rows, largest, _ = evidence.max_frozen_within(np.r_[np.zeros(100), np.ones(300)], better, clusters, tolerance=0.01)
    assert rows[0]["verdict"] == SUPPORTED and largest == 3


# ---------------------------------------------------------------- chains and families

@pytest.mark.parametrize("verdicts,tie_holds,expected", [
    ([SUPPORTED, SUPPORTED], False, SUPPORTED),
    ([SUPPORTED, EQUIVALENT], False, EQUIVALENT),  # a tie at one link denies "better"
    ([SUPPORTED, CANNOT_TELL], False, CANNOT_TELL),
    ([EQUIVALENT, CONTRADICTED], False, CONTRADICTED),
    ([], False, CANNOT_TELL),
    ([SUPPORTED, EQUIVALENT], True, SUPPORTED),  # "keeps": a tie is a keep
    ([EQUIVALENT, EQUIVALENT], True, EQUIVALENT),
    ([EQUIVALENT, CANNOT_TELL], True, CANNOT_TELL),
    ([EQUIVALENT, CONTRADICTED], True, CONTRADICTED),
])
def test_family_outcome(verdicts, tie_holds, expected):
    assert evidence.family_outcome(verdicts, tie_holds=tie_holds) == expected
    if not tie_holds:
        assert evidence.ordered_verdict(verdicts) == expected


# ---------------------------------------------------------------- judge, ceiling, what would tell

@pytest.mark.parametrize("interval,expected", [
    (iv(0.02, 0.05), SUPPORTED), (iv(-0.003, 0.006), EQUIVALENT), (iv(-0.05, 0.005), CONTRADICTED),
    (iv(-0.007, 0.033), CANNOT_TELL),
])
def test_judge_reaches_every_outcome_and_states_its_margin(interval, expected):
    judgement = evidence.judge(interval, margin=0.01)
    assert judgement.outcome == expected and not judgement.ceiling
    assert "practical size 0.01" in str(judgement)
    assert ("±0.01" in judgement.words()) == (expected == EQUIVALENT)


def test_judge_names_a_tie_at_the_ceiling_only_there():
    top = (iv(0.997, 1.0, 0.999), iv(0.994, 1.0, 0.998))
    tie = evidence.judge(iv(-0.003, 0.006, 0.001), margin=0.01, accuracies=top)
    assert tie.outcome == EQUIVALENT and tie.ceiling and "ceiling" in tie.words()
    assert "harder task" in evidence.to_tell(tie, 1000)
    lower = (iv(0.962, 0.986, 0.975), iv(0.946, 0.977, 0.962))
    assert not evidence.judge(iv(-0.003, 0.006, 0.001), margin=0.01, accuracies=lower).ceiling
    assert not evidence.judge(iv(0.02, 0.05), margin=0.01, accuracies=top).ceiling  # supported: nothing to name


def test_to_tell_gives_a_sample_size_only_for_undecided_verdicts():
    undecided = evidence.judge(iv(-0.007, 0.033, 0.013), margin=0.01)
    words = evidence.to_tell(undecided, 1000)
    needed = int(words.split()[1].replace(",", ""))
    assert needed > 1000 and "this run has 1,000" in words
    assert evidence.to_tell(evidence.judge(iv(0.02, 0.05), margin=0.01), 1000) == ""
    on_edge = evidence.judge(iv(-0.01, 0.03, 0.01), margin=0.01)
    assert "no sample size" in evidence.to_tell(on_edge, 1000)


def test_finding_carries_the_margin_and_what_would_tell():
    undecided = evidence.judge(iv(-0.007, 0.033, 0.013), margin=0.01)
    finding = evidence.finding("LC beats cosine", undecided, 1000)
    assert isinstance(finding, Finding) and finding.outcome == CANNOT_TELL
    assert "by more than 0.01 in accuracy" in finding.sentence() and "would decide it" in finding.sentence()
    tie = evidence.judge(iv(-0.003, 0.006, 0.001), margin=0.01, accuracies=(iv(0.997, 1.0, 0.999),))
    assert "harder task" in evidence.finding("LC beats cosine", tie, 1000).sentence()


# ---------------------------------------------------------------- equal FLOPs

def test_interpolation_at_flops_is_per_question_and_exact_at_a_setting():
    points = {0.4: np.array([1.0, 0.0]), 0.2: np.array([0.0, 0.0]), 1.0: np.array([1.0, 1.0])}
    scores, how = evidence.interpolate_at_flops(points, 0.35)
    np.testing.assert_allclose(scores, [0.75, 0.0])
    assert "20%" in how and "40%" in how
    scores, how = evidence.interpolate_at_flops(points, 0.4)
    np.testing.assert_allclose(scores, [1.0, 0.0])
    with pytest.raises(ValueError, match="outside the sweep"):
        evidence.interpolate_at_flops(points, 0.1)


def _combination(case):
    """A combination's answers and the two sweeps it is judged against, for each outcome."""
    n = 2000
    base = (np.arange(n) % 10 < 7).astype(float)  # 70 % right
    weak = (np.arange(n) % 10 < 3).astype(float)  # 30 % right
    flips = np.zeros(n)
    flips[np.arange(n) % 50 == 7] = 1.0  # 40 items (2 %) the combination gets right and ShortV gets wrong
    if case == SUPPORTED:
        combined, shortv = base, weak
    elif case == CONTRADICTED:
        combined, shortv = weak, base
    elif case == EQUIVALENT:
        combined, shortv = base, base.copy()
    else:  # beats ShortV by exactly the margin: the interval straddles it
        combined, shortv = np.maximum(base, flips), base
    return combined, {"ShortV alone": {0.3: shortv, 1.0: shortv}, "FastV alone": {0.3: weak, 1.0: weak}}


@pytest.mark.parametrize("case", [SUPPORTED, CONTRADICTED, EQUIVALENT, CANNOT_TELL])
def test_combination_verdicts_reach_every_outcome(case):
    combined, alone = _combination(case)
    rows, outcome = evidence.combination_verdicts(combined, 0.3, alone, np.arange(combined.size) // 2, margin=0.02)
    assert outcome == case
    assert rows["FastV alone"]["judgement"].outcome == (EQUIVALENT if case == CONTRADICTED else SUPPORTED)
    assert rows["ShortV alone"]["how"] == "the setting at 30% FLOPs"


def test_combination_outside_a_sweep_is_not_judged():
    shortv = {0.5: np.ones(10), 1.0: np.ones(10)}
    rows, outcome = evidence.combination_verdicts(np.ones(10), 0.3, {"ShortV alone": shortv}, np.arange(10),
                                                  margin=0.01)
    assert rows["ShortV alone"]["judgement"] is None and outcome == CANNOT_TELL


# ---------------------------------------------------------------- the strongest rule that needs no model

def test_rule_family_judges_against_the_strongest_rule_with_draws_crossed():
    n = 600
    clusters = np.arange(n) // 3
    rng = np.random.default_rng(0)
    truth_rule = (rng.random(n) < 0.7).astype(float)
    rules = {"chance": np.full(n, 0.5), "question prior": truth_rule}
    settings = {"good": np.ones(n), "same": truth_rule.copy(), "bad": np.zeros(n),
                "draws": np.stack([np.ones(n), truth_rule, np.ones(n)])}
    name, score, intervals, family = evidence.rule_family(settings, rules, clusters, margin=0.02)
    assert name == "question prior" and score == pytest.approx(truth_rule.mean())
    assert family.per_setting["good"] == SUPPORTED
    assert family.per_setting["same"] == EQUIVALENT
    assert family.per_setting["bad"] == CONTRADICTED
    assert "crossed" in intervals["draws"].method


def test_against_rules_by_group_picks_each_groups_strongest_rule():
    items = [VQAItem("is it red?", "yes", i) for i in range(40)] + [VQAItem("what shape?", "circle", i) for i in range(40)]
    masks = evidence.question_masks(items)
    assert set(masks) == {"all", "yes/no", "shape"} and masks["all"].all()
    rules = {"yes": np.r_[np.ones(40), np.zeros(40)], "circle-ish": np.r_[np.zeros(40), np.full(40, 0.9)]}
    correct = np.r_[np.ones(40), np.ones(40)]
    rows, family = evidence.against_rules_by_group(correct, rules, masks, np.arange(80), margin=0.02)
    strongest = {row["questions"]: row["strongest rule"] for row in rows}
    assert strongest["yes/no"] == "yes" and strongest["shape"] == "circle-ish"
    assert family.per_setting["yes/no"] == EQUIVALENT  # the rule already gets every yes/no right
    assert family.per_setting["shape"] == SUPPORTED  # 1.0 against 0.9 on every item


def test_no_model_rules_score_each_item():
    answers = ["yes", "no", "circle", "rectangle", "triangle", "red", "blue"]
    items = [VQAItem("is it red?", "yes", 0), VQAItem("what shape?", "circle", 1), VQAItem("what colour?", "red", 2)]
    assert [type_chance(item, answers) for item in items] == [0.5, pytest.approx(1 / 3), 0.5]
    train = [VQAItem("is it red?", "yes", 5), VQAItem("what shape?", "triangle", 6), VQAItem("what shape?", "triangle", 7)]
    rules = no_model_rules(items, train, blank_predictions=["no", "circle", "blue"], answers=answers)
    assert rules["question prior"] == [1.0, 0.0, 0.0]
    assert rules["majority"] == [0.0, 0.0, 0.0]  # "triangle"
    assert rules["blank image"] == [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="one blank-image answer per item"):
        no_model_rules(items, train, blank_predictions=["no"], answers=answers)


def test_family_losses_and_which_family_loses_more():
    from shortlab.llava_mini.tasks import SCENES_TASK

    items = SCENES_TASK.questions("test")[:600]
    clusters = np.array([item.image_id for item in items])
    counting = np.array([item.family == "counting" for item in items])
    dense = np.ones(len(items))
    frozen = np.where(counting, 0.0, 1.0)  # freezing breaks counting and nothing else
    rows = evidence.family_losses(dense, {6: dense, 12: frozen}, items, clusters, task="scenes")
    by = {(row["N"], row["type"]): row for row in rows}
    assert by[(6, "existence")]["verdict"] == evidence.EQUIVALENT and by[(12, "counting")]["verdict"] == evidence.CONTRADICTED
    assert by[(12, "counting")]["loss"].estimate == 1.0 and by[(12, "relation")]["loss"].estimate == 0.0
    more = evidence.loses_more(dense, frozen, items, clusters, "counting", "existence", task="scenes", margin=0.05)
    assert more.outcome == evidence.SUPPORTED
    less = evidence.loses_more(dense, frozen, items, clusters, "relation", "existence", task="scenes", margin=0.05)
    assert less.outcome == evidence.EQUIVALENT  # both lose nothing: the same within the margin
    reverse = evidence.loses_more(dense, frozen, items, clusters, "existence", "counting", task="scenes", margin=0.05)
    assert reverse.outcome == evidence.CONTRADICTED
