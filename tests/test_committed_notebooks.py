"""What a reader sees on GitHub comes from the committed code: every numbered notebook carries
the outputs of the default run of its current source (`make figures`), every committed run with
overrides (`notebooks/runs/`, e.g. notebook 01 on Qwen2.5-0.5B) comes from its notebook's current
source, the committed figures come from clean commits, and every figure the README shows exists."""

import json
import re

import pytest

from shortlab import run_notebooks as rn
from shortlab.findings import notebook_findings, readme_findings, readme_findings_keys
from shortlab.plotting import repository_root

ROOT = repository_root()


@pytest.mark.parametrize("path", rn.numbered_notebooks(), ids=lambda p: p.name)
def test_committed_outputs_come_from_the_current_source(path):
    assert rn.stale_outputs(path) == []


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks" / "runs").rglob("*.ipynb")), ids=lambda p: p.name)
def test_committed_runs_with_overrides_come_from_the_current_source(path):
    source = ROOT / json.loads(path.read_text())["metadata"]["papermill"]["input_path"]
    assert rn.stale_outputs(path, source=source) == []


def test_committed_figures_come_from_clean_commits():
    sidecars = sorted((ROOT / "figures").rglob("*.json"))
    assert sidecars
    dirty = [p.name for p in sidecars if (json.loads(p.read_text())["git_revision"] or "-dirty").endswith("-dirty")]
    assert dirty == []


def test_every_figure_the_readme_names_is_committed():
    named = set(re.findall(r"figures/[\w./-]+?\.png", (ROOT / "README.md").read_text()))
    assert named
    assert sorted(name for name in named if not (ROOT / name).is_file()) == []


# README's verdict table for notebook 01 (row -> text of the claim in the runs' conclusions) and
# the committed runs it summarises, column by column
README_VERDICT_ROWS = {
    "BI removes less than iterative BI (perplexity)": "BI removes less than iterative_block_influence",
    "… than relative magnitude (perplexity)": "BI removes less than relative_magnitude",
    "… than angular distance (perplexity)": "BI removes less than angular_distance",
    "… than reverse order (perplexity)": "BI removes less than reverse_order",
    "BI keeps more accuracy than iterative BI": "BI keeps more accuracy than iterative_block_influence",
    "… than relative magnitude (accuracy)": "BI keeps more accuracy than relative_magnitude",
    "… than angular distance (accuracy)": "BI keeps more accuracy than angular_distance",
    "… than reverse order (accuracy)": "BI keeps more accuracy than reverse_order",
    "BI beats random removal (20 draws, every k)": "BI beats random removal",
    "the dense model beats the strongest rule that needs no model": "the dense model scores above the strongest rule",
    "a quarter of the layers removed keeps most of the accuracy above that rule": "keeps most of what the dense model scores",
    "removal and 4-bit weights compose in perplexity": "removal and 4-bit weights compose in perplexity",
    "… in accuracy (± 2 points)": "removal and 4-bit weights compose in accuracy",
}
README_VERDICT_RUNS = ["notebooks/01_block_influence_pruning.ipynb",
                       "notebooks/runs/qwen2.5-0.5b/01_block_influence_pruning.ipynb"]


def run_verdicts(path) -> dict[str, str]:
    """README row -> the verdict a committed run of notebook 01 concludes ("the same layers" when
    the run states none: a baseline that picks BI's layers is not judged)."""
    cells = json.loads((ROOT / path).read_text())["cells"]
    lines = [line for cell in cells if cell["cell_type"] == "code" for output in cell.get("outputs", [])
             if output.get("output_type") == "stream" for line in "".join(output["text"]).splitlines()]
    conclusions = [re.match(r"- (Supported|Contradicted|The same within the margin|Cannot tell at this sample size): (.*)",
                            line) for line in lines]
    verdicts = {}
    for row, claim in README_VERDICT_ROWS.items():
        found = {m.group(1).lower().removesuffix(" at this sample size") for m in conclusions if m and claim in m.group(2)}
        assert len(found) <= 1, f"{path}: {row!r} has several verdicts {found}"
        verdicts[row] = found.pop() if found else "—"
    return verdicts


def test_readme_verdict_table_is_what_the_committed_runs_conclude():
    readme = (ROOT / "README.md").read_text()
    columns = [run_verdicts(path) for path in README_VERDICT_RUNS]
    missing = [row for row in README_VERDICT_ROWS
               if f"| {row} | {' | '.join(column[row] for column in columns)} |" not in readme]
    assert missing == []


def test_readme_findings_are_what_the_committed_runs_found():
    readme = (ROOT / "README.md").read_text()
    keys = readme_findings_keys(readme)
    committed = [str(path.relative_to(ROOT)) for path in
                 [*rn.numbered_notebooks(), *sorted((ROOT / "notebooks" / "runs").rglob("*.ipynb"))]]
    assert sorted(keys) == sorted(committed), "the README quotes the findings of every committed run, once"
    stale = [key for key in keys if readme_findings(readme, key) != notebook_findings(ROOT / key).rstrip() + "\n"]
    assert stale == [], "python -m shortlab.run_notebooks --readme-findings copies them"
