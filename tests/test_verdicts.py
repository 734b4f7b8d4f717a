"""Verdicts against a practical size: every outcome is reachable, on toy intervals and on data."""

import numpy as np
import pytest

from shortlab.findings import (Finding, findings_markdown, notebook_findings, readme_block, readme_findings,
                               replace_readme_findings)
from shortlab.stats import (CANNOT_TELL, CONTRADICTED, EQUIVALENT, SUPPORTED, Interval, above_strongest_rule,
                            at_ceiling, bootstrap_interval, describe, family_verdicts, holm_reject,
                            sample_size_to_tell, strongest_rule, verdict)


def iv(low, high, estimate=None):
    return Interval((low + high) / 2 if estimate is None else estimate, low, high, 0.95, "toy")


@pytest.mark.parametrize("low, high, expected", [
    (0.06, 0.2, SUPPORTED),        # clears threshold + margin
    (-0.03, 0.04, EQUIVALENT),     # inside ± margin
    (-0.3, -0.1, CONTRADICTED),    # the other way
    (-0.2, 0.03, CONTRADICTED),    # falls short of the practical size, not a tie
    (0.02, 0.09, CANNOT_TELL),     # above 0 but reaches both sides of the edge
    (-0.1, 0.3, CANNOT_TELL),
])
def test_verdict_reaches_every_outcome_above(low, high, expected):
    assert verdict(iv(low, high), 0.0, margin=0.05) == expected


@pytest.mark.parametrize("low, high, expected", [
    (0.2, 0.35, SUPPORTED), (0.45, 0.54, EQUIVALENT), (0.6, 0.7, CONTRADICTED), (0.3, 0.6, CANNOT_TELL)])
def test_verdict_mirrors_for_below(low, high, expected):
    assert verdict(iv(low, high), 0.5, claim="below", margin=0.05) == expected


def test_zero_margin_is_the_plain_test_and_never_an_equivalence():
    assert verdict(iv(0.01, 0.02)) == SUPPORTED
    assert verdict(iv(-0.02, -0.01)) == CONTRADICTED
    assert verdict(iv(-0.01, 0.01)) == CANNOT_TELL
    with pytest.raises(ValueError, match="margin"):
        verdict(iv(0, 1), margin=-0.1)
    with pytest.raises(ValueError, match="claim"):
        verdict(iv(0, 1), claim="sideways")


def test_verdicts_on_data_come_out_each_way():
    rng = np.random.default_rng(0)
    effect = bootstrap_interval(rng.normal(0.3, 0.1, 400))
    tie = bootstrap_interval(rng.normal(0.0, 0.1, 400))
    worse = bootstrap_interval(rng.normal(-0.3, 0.1, 400))
    noisy = bootstrap_interval(rng.normal(0.1, 1.0, 20))
    assert [verdict(i, margin=0.05) for i in (effect, tie, worse, noisy)] == \
        [SUPPORTED, EQUIVALENT, CONTRADICTED, CANNOT_TELL]


def test_describe_names_the_margin():
    assert describe(EQUIVALENT, 0.02) == "the same within ±0.02"
    assert describe(SUPPORTED, 0.02) == SUPPORTED
    with pytest.raises(ValueError):
        describe("maybe")


def test_ceiling_is_named_only_at_the_ceiling():
    assert at_ceiling(iv(0.995, 1.0, 0.998), iv(0.993, 1.0, 0.997))
    assert not at_ceiling(iv(0.8, 0.9), iv(0.993, 1.0, 0.997))


def test_holm_step_down():
    assert holm_reject([0.01, 0.04, 0.03, 0.2], 0.05) == [True, False, False, False]
    assert holm_reject([0.001, 0.01, 0.02], 0.05) == [True, True, True]  # 0.02 <= 0.05 / 1
    assert holm_reject([0.5], 0.05) == [False]


def test_family_of_one_is_the_single_verdict_and_holm_is_stricter():
    for interval in (iv(0.06, 0.2), iv(-0.03, 0.04), iv(-0.3, -0.1), iv(0.02, 0.09)):
        family = family_verdicts({"only": interval}, margin=0.05)
        assert family.holm["only"] == family.per_setting["only"] == verdict(interval, margin=0.05)
        assert family.summary(0.05).startswith("1 setting, judged alone: 1 ")
    # ten settings that each barely clear the edge alone do not all survive the adjustment
    barely = {f"s{i}": iv(0.001, 0.2) for i in range(10)}
    family = family_verdicts(barely)
    assert set(family.per_setting.values()) == {SUPPORTED}
    assert set(family.holm.values()) == {CANNOT_TELL}
    assert family.expected_by_chance == pytest.approx(0.25)
    assert "after Holm" in family.summary()
    strong = family_verdicts({f"s{i}": iv(0.5, 0.6) for i in range(10)})
    assert set(strong.holm.values()) == {SUPPORTED}
    contradicted = family_verdicts({f"s{i}": iv(-0.6, -0.5) for i in range(10)}, margin=0.05)
    assert set(contradicted.holm.values()) == {CONTRADICTED}


def test_sample_size_to_tell():
    assert sample_size_to_tell(iv(-0.02, 0.06, 0.02), 100) == 400  # half width 0.04 vs distance 0.02
    assert sample_size_to_tell(iv(-0.02, 0.06, 0.05), 100, margin=0.05) is None


def test_strongest_rule_and_the_judgement_against_it():
    rules = {"chance": np.full(200, 0.5), "shortest answer": np.r_[np.ones(120), np.zeros(80)]}
    assert strongest_rule(rules)[0] == "shortest answer"
    model = np.r_[np.ones(125), np.zeros(75)]
    judged = above_strongest_rule(model, rules, margin=0.02)
    assert judged["rule"] == "shortest answer" and judged["verdict"] in (CANNOT_TELL, CONTRADICTED, EQUIVALENT)
    assert judged["verdict"] != SUPPORTED  # above chance, but not above the rule by 2 points
    clearly = above_strongest_rule(np.ones(200), rules, margin=0.02)
    assert clearly["verdict"] == SUPPORTED
    with pytest.raises(ValueError, match="same items"):
        strongest_rule({"a": [1, 0], "b": [1]})


def test_findings_are_written_per_outcome_and_read_back(tmp_path):
    findings = [Finding("BI beats random", SUPPORTED, iv(0.1, 0.2), "by more than 0.05", 0.05,
                        paper="the paper reports the same"),
                Finding("LC beats cosine", EQUIVALENT, iv(-0.01, 0.01), margin=0.02),
                Finding("ties", CANNOT_TELL, iv(-0.1, 0.1), to_tell="about 400 questions would tell")]
    text = findings_markdown("What this run found", findings, setting="SmolLM2, 500 questions")
    assert "**In short.** Of 3 claims, 1 held, 1 came out the same within the margin and 1 cannot be told" in text
    assert "**What held.**\n\n- BI beats random by more than 0.05 (95 % interval" in text
    assert "the same within ±0.02" in text and "About 400 questions would tell." in text
    assert "**Beside the paper.**\n\n- The paper reports the same." in text
    folded = readme_block(text)
    assert folded.startswith("### What this run found\n\nSmolLM2, 500 questions.\n\n**In short.**")
    assert "<details><summary>" in folded and folded.rstrip().endswith("</details>")
    assert folded.index("**In short.**") < folded.index("<details>") < folded.index("**What held.**")
    with pytest.raises(ValueError, match="outcome"):
        Finding("x", "probably")
    notebook = {"cells": [{"cell_type": "code", "metadata": {"tags": ["findings"]}, "source": "",
                           "outputs": [{"output_type": "display_data", "data": {"text/markdown": text}}]}]}
    path = tmp_path / "nb.ipynb"
    path.write_text(__import__("json").dumps(notebook))
    assert notebook_findings(path) == text
    readme = "x\n<!-- findings: nb -->\nold\n<!-- /findings: nb -->\ny\n"
    updated = replace_readme_findings(readme, "nb", text)
    assert readme_findings(updated, "nb") == text.rstrip() + "\n" and updated.endswith("y\n")
    with pytest.raises(ValueError, match="no findings block"):
        readme_findings("nothing", "nb")


def test_the_central_claim_leads_in_short_whichever_way_it_came_out():
    central = Finding("Removing 8 of 30 layers by BI keeps most of the accuracy", CONTRADICTED, iv(0.3, 0.5),
                      "(more than 60% of it)", 0.05)
    other = Finding("BI beats random", SUPPORTED, iv(0.1, 0.2), "by more than 0.05", 0.05)
    text = findings_markdown("", [other, central], headline=central)
    assert text.startswith("**In short.** The central claim, that removing 8 of 30 layers by BI keeps most of the "
                           "accuracy, did not hold (the claim: more than 60% of it; measured 0.400 [0.300, 0.500], 95 % interval).")
    assert "Of 2 claims, 1 held and 1 did not hold." in text and "###" not in text
    assert "The central claim, that BI beats random, held (the claim: by more" in findings_markdown("t", [other], headline=other)
    with pytest.raises(ValueError, match="one of the findings"):
        findings_markdown("t", [other], headline=central)


def test_readme_findings_are_copied_from_the_committed_runs(tmp_path):
    import json

    from shortlab.findings import update_readme_findings

    def executed(text):
        return json.dumps({"cells": [{"cell_type": "code", "metadata": {"tags": ["findings"]}, "source": "",
                                      "outputs": [{"output_type": "display_data",
                                                   "data": {"text/markdown": text}}]}]})

    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "01.ipynb").write_text(executed("### found\n\n**What held.** X.\n"))
    readme = "intro\n<!-- findings: notebooks/01.ipynb -->\nold text\n<!-- /findings: notebooks/01.ipynb -->\nend\n"
    (tmp_path / "README.md").write_text(readme)
    assert update_readme_findings(tmp_path) == ["notebooks/01.ipynb"]
    written = (tmp_path / "README.md").read_text()
    assert "**What held.** X." in written and "<details>" in written and "old text" not in written
    assert update_readme_findings(tmp_path) == []  # already current: nothing written
    (tmp_path / "notebooks" / "01.ipynb").write_text(json.dumps({"cells": []}))
    with pytest.raises(ValueError, match="no cell tagged 'findings'"):
        update_readme_findings(tmp_path)


def test_verdict_table_replaces_only_its_own_rows():
    from shortlab.findings import replace_verdict_table

    readme = "intro\n\n| claim | A |\n|---|---|\n| x | supported |\n\nafter\n| other | table |\n"
    updated = replace_verdict_table(readme, "| claim | A |\n|---|---|\n| x | contradicted |\n")
    assert updated == "intro\n\n| claim | A |\n|---|---|\n| x | contradicted |\n\nafter\n| other | table |\n"
    with pytest.raises(ValueError, match="no verdict table"):
        replace_verdict_table("nothing here\n", "| claim | B |\n|---|---|\n")


def test_group_difference_interval_pairs_groups_within_clusters():
    from shortlab.stats import group_difference_interval

    rng = np.random.default_rng(0)
    images = np.repeat(np.arange(200), 2)
    groups = np.tile(["counting", "existence"], 200)
    shared = np.repeat(rng.normal(size=200), 2)  # an image effect both questions share
    values = shared + np.where(groups == "counting", 0.3, 0.0) + rng.normal(scale=0.1, size=400)
    paired = group_difference_interval(values, groups, "counting", "existence", images)
    unpaired = group_difference_interval(values, groups, "counting", "existence")
    assert paired.low < 0.3 < paired.high and paired.estimate == pytest.approx(0.3, abs=0.05)
    assert paired.high - paired.low < 0.5 * (unpaired.high - unpaired.low)  # the image effect cancels
    with pytest.raises(ValueError, match="no item belongs to group 'relation'"):
        group_difference_interval(values, groups, "relation", "existence", images)
