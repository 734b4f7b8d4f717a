"""What a reader sees on GitHub comes from the committed code: every numbered notebook carries
the outputs of the default run of its current source (`make figures`), every committed run with
overrides (`notebooks/runs/`, e.g. notebook 01 on Qwen2.5-0.5B) comes from its notebook's current
source, the committed figures come from clean commits, and every figure the README shows exists."""

import json
import re

import pytest

from shortlab import run_notebooks as rn
from shortlab.findings import notebook_findings, readme_block, readme_findings, readme_findings_keys, verdict_table
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


def test_readme_verdict_table_is_what_the_committed_runs_conclude():
    readme = (ROOT / "README.md").read_text()
    assert verdict_table(ROOT) in readme, "python -m shortlab.run_notebooks --readme-findings writes it"


def test_readme_findings_are_what_the_committed_runs_found():
    readme = (ROOT / "README.md").read_text()
    keys = readme_findings_keys(readme)
    committed = [str(path.relative_to(ROOT)) for path in
                 [*rn.numbered_notebooks(), *sorted((ROOT / "notebooks" / "runs").rglob("*.ipynb"))]]
    assert sorted(keys) == sorted(committed), "the README quotes the findings of every committed run, once"
    stale = [key for key in keys if readme_findings(readme, key) != readme_block(notebook_findings(ROOT / key))]
    assert stale == [], "python -m shortlab.run_notebooks --readme-findings copies them"


def test_committed_figures_have_nothing_that_fails_a_reader():
    """Every committed figure was checked when it was saved (``plotting.figure_problems``: axis
    labels set, tick labels that do not overlap, no empty axes) and nothing was found; a sidecar
    without the check comes from a figure no current notebook writes."""
    sidecars = sorted((ROOT / "figures").rglob("*.json"))
    unchecked = [p.relative_to(ROOT).as_posix() for p in sidecars if "problems" not in json.loads(p.read_text())]
    assert unchecked == [], "rerun the notebooks (make figures), or remove figures no notebook writes"
    flagged = {p.relative_to(ROOT).as_posix(): json.loads(p.read_text())["problems"] for p in sidecars}
    assert {name: problems for name, problems in flagged.items() if problems} == {}
