"""What a notebook run found, in words: each claim's outcome, how it departs from the paper, and
what would be needed to tell the undecided ones — written from the run's own numbers.

A notebook collects ``Finding`` s as it judges its claims and ends with ``findings_markdown``,
displayed as Markdown in a cell tagged ``findings``. ``notebook_findings`` reads that cell's
output back from an executed notebook, so the README can quote it (folded, ``readme_block``) and
a test can check that the README says what the committed runs found (``readme_findings`` /
``replace_readme_findings``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shortlab.stats import CANNOT_TELL, CONTRADICTED, EQUIVALENT, OUTCOMES, SUPPORTED, Interval, describe

FINDINGS_TAG = "findings"
_HEADINGS = {SUPPORTED: "What held", CONTRADICTED: "What did not hold", EQUIVALENT: "Ties within the margin",
             CANNOT_TELL: "What this run cannot tell"}


@dataclass(frozen=True)
class Finding:
    """One judged claim. ``claim``: the claim in words ("BI removal beats random removal at
    k = 8"); ``outcome``: a verdict of ``shortlab.stats``; ``interval``: what it was judged from
    (None for a count or a summary); ``practical``: the practical size in words ("by more than
    0.05 in accuracy"); ``paper``: how this departs from or matches the paper, with its numbers;
    ``to_tell``: for an undecided claim, what would be needed to decide it."""

    claim: str
    outcome: str
    interval: Interval | str | None = None
    practical: str = ""
    margin: float | None = None
    paper: str = ""
    to_tell: str = ""
    detail: str = ""  # a further sentence, whatever the outcome (e.g. a family's counts after Holm)

    def __post_init__(self):
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {self.outcome!r}; expected one of {OUTCOMES}")
        if not self.claim.strip():
            raise ValueError("a finding needs its claim in words")

    def sentence(self) -> str:
        text = self.claim.rstrip(".")
        if self.practical:
            text += f" {self.practical}"
        if self.interval is not None:
            text += f" (95 % interval {self.interval})"
        if self.outcome == EQUIVALENT:
            text += f": {describe(EQUIVALENT, self.margin)}"
        text = _capital(text) + "."
        if self.detail:
            text += f" {_capital(self.detail.rstrip('.'))}."
        if self.to_tell and self.outcome == CANNOT_TELL:
            text += f" {_capital(self.to_tell.rstrip('.'))}."
        return text


def _capital(text: str) -> str:
    """Capitalise a sentence's first word unless it is a name (``smollm2-135m``, ``llava-mini``)."""
    first = text.split(" ", 1)[0]
    return text[:1].upper() + text[1:] if first.isalpha() and first.islower() else text


_COUNT_WORDS = {SUPPORTED: "held", CONTRADICTED: "did not hold", EQUIVALENT: "came out the same within the margin",
                CANNOT_TELL: "cannot be told at this sample size"}


def in_short(findings: Sequence[Finding]) -> str:
    """How the claims came out, counted: "Of 12 claims, 5 held, 4 did not hold, ..."."""
    counts = [(sum(f.outcome == outcome for f in findings), words) for outcome, words in _COUNT_WORDS.items()]
    parts = [f"{count} {words}" for count, words in counts if count]
    listed = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    return f"Of {len(findings)} claim{'s' if len(findings) != 1 else ''}, {listed}."


def headline_sentence(finding: Finding) -> str:
    """The paper's central claim and how it came out, as the first sentence of "In short":
    "The central claim, that removing 8 of 30 layers ..., held (the claim: more than 60% of it; measured 0.697
    [0.621, 0.772], 95 % interval)."""
    claim = finding.claim.rstrip(".")
    first = claim.split(" ", 1)[0]
    if first.isalpha() and first[1:].islower():  # "Removing" -> "removing"; "BI", "smollm2-135m" stay
        claim = claim[:1].lower() + claim[1:]
    text = f"The central claim, that {claim}, {_COUNT_WORDS[finding.outcome]}"
    said = [f"the claim: {finding.practical.strip().removeprefix('(').removesuffix(')')}"] if finding.practical else []
    if finding.interval is not None:
        said.append(f"measured {finding.interval}, 95 % interval")
    elif finding.detail:  # a family of verdicts: how its members came out
        said.append(finding.detail.rstrip("."))
    return text + (f" ({'; '.join(said)})" if said else "") + "."


def findings_markdown(title: str, findings: Sequence[Finding], departures: Sequence[str] = (),
                      setting: str = "", headline: Finding | None = None) -> str:
    """The closing section of a notebook: a heading (``title``; none when empty), what was run
    (``setting``, one sentence), how the paper's central claim came out (``headline``, one of
    ``findings``) and how many claims came out each way (``in_short``), then one bullet per claim
    under each kind of outcome (what held, what did not, ties, what cannot be told and what would
    tell it), then how the run departs from the paper."""
    if not findings:
        raise ValueError("no findings to write")
    if headline is not None and headline not in findings:
        raise ValueError("the headline must be one of the findings (it is counted with them)")
    parts = [f"### {title}"] if title else []
    if setting:
        parts.append(_capital(setting.rstrip(".")) + ".")
    lead = "" if headline is None else headline_sentence(headline) + " "
    parts.append(f"**In short.** {lead}{in_short(findings)}")
    for outcome in (SUPPORTED, CONTRADICTED, EQUIVALENT, CANNOT_TELL):
        chosen = [f for f in findings if f.outcome == outcome]
        if chosen:
            parts.append(f"**{_HEADINGS[outcome]}.**\n\n" + "\n".join(f"- {f.sentence()}" for f in chosen))
    paper = [_capital(text.rstrip(".")) + "." for text in [f.paper for f in findings if f.paper] + list(departures)]
    if paper:
        parts.append("**Beside the paper.**\n\n" + "\n".join(f"- {text}" for text in paper))
    return "\n\n".join(parts) + "\n"


def readme_block(findings: str) -> str:
    """A run's findings as the README shows them: the heading, the setting and the counts in
    view, every claim folded into a ``<details>`` element (GitHub renders it closed)."""
    head, marker, rest = findings.partition("\n\n**What ")
    if not marker:
        head, marker, rest = findings.partition("\n\n**Beside the paper")
        if not marker:
            return findings.rstrip() + "\n"
        marker = "\n\n**Beside the paper"
    body = (marker.lstrip("\n") + rest).rstrip()
    return f"{head.rstrip()}\n\n<details><summary>Every claim, with its interval</summary>\n\n{body}\n\n</details>\n"


def notebook_findings(path: str | Path) -> str:
    """The Markdown output of the cell tagged ``findings`` in an executed notebook."""
    notebook = json.loads(Path(path).read_text())
    for cell in notebook["cells"]:
        if FINDINGS_TAG in cell.get("metadata", {}).get("tags", []):
            for output in cell.get("outputs", []):
                markdown = output.get("data", {}).get("text/markdown")
                if markdown is not None:
                    return "".join(markdown) if isinstance(markdown, list) else markdown
            raise ValueError(f"{path}: the cell tagged {FINDINGS_TAG!r} has no Markdown output (not executed?)")
    raise ValueError(f"{path}: no cell tagged {FINDINGS_TAG!r}")


def significant(count: int, digits: int = 2) -> str:
    """``count`` rounded to ``digits`` significant digits with thousands separators (42744 ->
    "43,000"): a sample-size estimate is rough, and more digits would claim a precision it lacks."""
    if count <= 0:
        return str(count)
    rounded = int(round(count, digits - 1 - int(math.floor(math.log10(count)))))
    return f"{rounded:,}"


def _marker(key: str) -> tuple[str, str]:
    return f"<!-- findings: {key} -->", f"<!-- /findings: {key} -->"


def readme_findings(readme: str, key: str) -> str:
    """The text between the README's findings markers for ``key`` (a committed run's path)."""
    start, end = _marker(key)
    match = re.search(re.escape(start) + r"\n(.*?)" + re.escape(end), readme, flags=re.S)
    if match is None:
        raise ValueError(f"the README has no findings block for {key!r} ({start} … {end})")
    return match.group(1)


def replace_readme_findings(readme: str, key: str, findings: str) -> str:
    """``readme`` with the findings block for ``key`` replaced by ``findings``."""
    start, end = _marker(key)
    readme_findings(readme, key)  # raises when the block is missing
    pattern = re.escape(start) + r"\n.*?" + re.escape(end)
    return re.sub(pattern, lambda _: f"{start}\n{findings.rstrip()}\n{end}", readme, count=1, flags=re.S)


def readme_findings_keys(readme: str) -> list[str]:
    """The committed runs (paths relative to the repository) whose findings the README quotes."""
    return re.findall(r"<!-- findings: (\S+) -->", readme)


def update_readme_findings(root: str | Path) -> list[str]:
    """Copy each committed run's findings into ``root``/README.md, at its findings markers (written
    atomically); returns the keys whose text changed."""
    from shortlab.files import write_atomically

    path = Path(root) / "README.md"
    readme = updated = path.read_text()
    changed = []
    for key in readme_findings_keys(readme):
        findings = readme_block(notebook_findings(Path(root) / key))
        if readme_findings(updated, key) != findings.rstrip() + "\n":
            updated = replace_readme_findings(updated, key, findings)
            changed.append(key)
    if changed:
        write_atomically(path, lambda tmp: Path(tmp).write_text(updated))
    return changed


# README's verdict table of notebook 01: row -> the text of its claim in a run's printed
# conclusions, and the committed runs it summarises, column by column
VERDICT_TABLE_ROWS = {
    "BI's removal raises perplexity less than iterative BI's": "BI's removal raises perplexity less than iterative BI's",
    "… than relative magnitude's": "BI's removal raises perplexity less than relative magnitude's",
    "… than angular distance's": "BI's removal raises perplexity less than angular distance's",
    "… than reverse order's": "BI's removal raises perplexity less than reverse order's",
    "BI's removal keeps more accuracy than iterative BI's": "BI's removal keeps more accuracy than iterative BI's",
    "… than relative magnitude's (accuracy)": "BI's removal keeps more accuracy than relative magnitude's",
    "… than angular distance's (accuracy)": "BI's removal keeps more accuracy than angular distance's",
    "… than reverse order's (accuracy)": "BI's removal keeps more accuracy than reverse order's",
    "BI beats random removal (every k)": "BI beats random removal",
    "the dense model beats the strongest rule that needs no model": "the dense model scores above the strongest rule",
    "a quarter of the layers removed keeps most of the accuracy above that rule": "keeps most of what the dense model scores",
    "removal and 4-bit weights compose in perplexity": "removal and 4-bit weights compose in perplexity",
    "… in accuracy (± 2 points)": "removal and 4-bit weights compose in accuracy",
}
VERDICT_TABLE_RUNS = {"SmolLM2-135M": "notebooks/01_block_influence_pruning.ipynb",
                      "Qwen2.5-Coder-0.5B": "notebooks/runs/qwen2.5-0.5b/01_block_influence_pruning.ipynb",
                      "Qwen2.5-Coder-1.5B": "notebooks/runs/qwen2.5-1.5b/01_block_influence_pruning.ipynb"}
_CONCLUSION = re.compile(r"- (Supported|Contradicted|The same within the margin|Cannot tell at this sample size): (.*)")


def run_verdicts(path: str | Path) -> dict[str, str]:
    """Verdict-table row -> the verdict an executed run of notebook 01 prints for it ("—" when it
    prints none: a ranking that picks BI's own layers is not judged against BI)."""
    cells = json.loads(Path(path).read_text())["cells"]
    lines = [line for cell in cells if cell["cell_type"] == "code" for output in cell.get("outputs", [])
             if output.get("output_type") == "stream" for line in "".join(output["text"]).splitlines()]
    conclusions = [m for m in map(_CONCLUSION.match, lines) if m]
    verdicts = {}
    for row, claim in VERDICT_TABLE_ROWS.items():
        found = {m.group(1).lower().removesuffix(" at this sample size") for m in conclusions if claim in m.group(2)}
        if len(found) > 1:
            raise ValueError(f"{path}: {row!r} has several verdicts {sorted(found)}")
        verdicts[row] = found.pop() if found else "—"
    return verdicts


def verdict_table(root: str | Path) -> str:
    """The README's verdict table (markdown) from the committed runs under ``root``."""
    columns = {name: run_verdicts(Path(root) / path) for name, path in VERDICT_TABLE_RUNS.items()}
    lines = [f"| claim | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {row} | {' | '.join(column[row] for column in columns.values())} |" for row in VERDICT_TABLE_ROWS]
    return "\n".join(lines) + "\n"


def replace_verdict_table(readme: str, table: str) -> str:
    """``readme`` with the table that starts like ``table`` (same header) replaced by it."""
    header = table.split("\n", 1)[0]
    match = re.search(re.escape(header) + r"\n(?:\|.*\n)*", readme)
    if match is None:
        raise ValueError(f"the README has no verdict table starting {header!r}")
    return readme[: match.start()] + table + readme[match.end():]


def update_readme_verdict_table(root: str | Path) -> bool:
    """Rewrite ``root``/README.md's verdict table from the committed runs (atomically); returns
    whether it changed."""
    from shortlab.files import write_atomically

    path = Path(root) / "README.md"
    readme = path.read_text()
    updated = replace_verdict_table(readme, verdict_table(root))
    if updated != readme:
        write_atomically(path, lambda tmp: Path(tmp).write_text(updated))
    return updated != readme
