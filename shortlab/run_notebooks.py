"""Run the numbered notebooks through papermill, rejecting parameters a notebook does not have.

papermill only warns about an unknown parameter (a typo such as ``-p MODLE ...`` silently runs
the default model), so every override is checked against the notebook's ``parameters`` cell
first.

    python -m shortlab.run_notebooks --all --in-place   # the default runs, outputs committed (make figures)
    python -m shortlab.run_notebooks notebooks/00_quickstart.ipynb -p MODEL qwen2.5-0.5b -p FAST True

Every executed notebook records in its metadata the digest of the source it ran and the
overrides it ran with, so a test can tell when committed outputs no longer match the notebook
(``stale_outputs``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat

from shortlab.files import write_atomically
from shortlab.plotting import default_figure_dir, jsonable, repository_relative, repository_root

PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"  # papermill's cell holding the overrides
RUN_RECORD_KEY = "shortlab_run"  # notebook metadata: {"source_digest", "parameters"} of the run that made the outputs


class NotebookParameterError(ValueError):
    """A notebook lacks its parameters cell, or an override names or types a parameter wrongly."""


def parameters_cell_source(path: str | Path) -> str:
    notebook = nbformat.read(str(path), as_version=4)
    tagged = [c for c in notebook.cells if PARAMETERS_TAG in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise NotebookParameterError(
            f"{path} must have exactly one cell tagged {PARAMETERS_TAG!r}, found {len(tagged)}"
        )
    if tagged[0].cell_type != "code":
        raise NotebookParameterError(f"the {PARAMETERS_TAG!r} cell of {path} is not a code cell")
    return tagged[0].source


def notebook_parameters(path: str | Path) -> dict[str, object]:
    """The parameters a notebook declares, with their default values (literals only)."""
    source = parameters_cell_source(path)
    parameters: dict[str, object] = {}
    for statement in ast.parse(source).body:
        if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)):
            raise NotebookParameterError(
                f"the parameters cell of {path} may hold only `NAME = literal` lines; found "
                f"{ast.get_source_segment(source, statement)!r}"
            )
        name = statement.targets[0].id
        try:
            parameters[name] = ast.literal_eval(statement.value)
        except ValueError:
            raise NotebookParameterError(
                f"parameter {name} of {path} has a non-literal default "
                f"{ast.get_source_segment(source, statement.value)!r}"
            ) from None
    return parameters


def _compatible(default, value) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def check_overrides(path: str | Path, overrides: dict[str, object]) -> dict[str, object]:
    """Raise unless every override names a declared parameter with a value of a fitting type;
    ``GROUP.key`` names one key of a dict-valued parameter ``GROUP`` (which must have that key).
    Returns the declared defaults."""
    declared = notebook_parameters(path)
    for name, value in overrides.items():
        group, _, key = name.partition(".")
        if group not in declared:
            raise NotebookParameterError(
                f"unknown notebook parameter {name!r} for {Path(path).name}; known: {sorted(declared)}"
            )
        default = declared[group]
        if key:
            if not isinstance(default, dict) or key not in default:
                known = sorted(default) if isinstance(default, dict) else "none: it is not a dict"
                raise NotebookParameterError(
                    f"unknown key {key!r} of parameter {group} of {Path(path).name}; known keys: {known}"
                )
            default = default[key]
        if not _compatible(default, value):
            raise NotebookParameterError(
                f"parameter {name} of {Path(path).name} expects a value like {default!r}, got {value!r}"
            )
        if isinstance(default, dict) and not key:
            if not isinstance(value, dict):
                raise NotebookParameterError(f"parameter {name} of {Path(path).name} takes a dict of its keys, "
                                             f"got {value!r}")
            extra = sorted(set(value) - set(default))
            if extra:
                raise NotebookParameterError(
                    f"unknown key(s) {extra} of parameter {name} of {Path(path).name}; known keys: {sorted(default)}"
                )
            wrong = [k for k, v in value.items() if not _compatible(default[k], v)]
            if wrong:
                raise NotebookParameterError(f"parameter {name} of {Path(path).name}: keys {wrong} expect values "
                                             f"like {[default[k] for k in wrong]}")
    return declared


def resolve_overrides(path: str | Path, overrides: dict[str, object]) -> dict[str, object]:
    """``overrides`` as papermill takes them: every ``GROUP.key`` (and a partial dict for
    ``GROUP``) merged into the notebook's default dict ``GROUP``, after ``check_overrides``."""
    declared = check_overrides(path, overrides)
    resolved: dict[str, object] = {}
    for name, value in overrides.items():
        group, _, key = name.partition(".")
        if isinstance(declared[group], dict):
            merged = resolved.setdefault(group, dict(declared[group]))
            merged.update({key: value} if key else value)
        else:
            resolved[name] = value
    return resolved


def figure_dir(fig_dir: str | os.PathLike | None, parameters: dict, notebook: str) -> Path:
    """Where a notebook's figures go: ``fig_dir`` when given; else the committed ``figures/``
    folder for the notebook's default run, and ``outputs/figures/<notebook>/`` for a run whose
    ``parameters`` differ from the defaults of ``notebooks/<notebook>``, so that a run with other
    parameters never overwrites the committed figures unless told to (``FIG_DIR="figures"``).

    ``parameters``: the notebook's parameter values as run (e.g. its ``PARAMETERS`` dict).
    """
    if fig_dir is not None:
        return Path(fig_dir)
    root = repository_root() or Path.cwd()
    source = root / "notebooks" / notebook
    if not source.is_file():
        raise FileNotFoundError(f"figure_dir: no notebook {source}; pass fig_dir explicitly")
    changed = sorted(name for name, default in notebook_parameters(source).items()
                     if name in parameters and jsonable(parameters[name]) != jsonable(default))
    if not changed:
        return default_figure_dir()
    directory = root / "outputs" / "figures" / Path(notebook).stem
    print(f"figures go to {directory} (parameters differ from the defaults: {', '.join(changed)}; "
          f"FIG_DIR='figures' overwrites the committed ones)")
    return directory


@dataclasses.dataclass
class NotebookRun:
    """A running notebook's own record: its ``parameters`` as run (the upper-case names of its
    parameters cell), where its figures go (``fig_dir``, ``figure_dir``) and when it started."""

    parameters: dict
    fig_dir: Path
    started: float

    def show(self, fig, name: str) -> None:
        """Save ``fig`` as ``<fig_dir>/<name>.png`` with its JSON sidecar (``plotting.save_figure``),
        then show it (nothing is returned, so a cell that ends with it shows no value)."""
        import matplotlib.pyplot as plt

        from shortlab.plotting import save_figure

        save_figure(fig, name, self.fig_dir, self.parameters)
        plt.show()

    def seconds(self) -> float:
        return time.perf_counter() - self.started


def start_notebook(namespace: dict, notebook: str, seed: int = 0) -> NotebookRun:
    """What every notebook run starts with: its parameters read from ``namespace`` (the
    notebook's ``globals()``: the upper-case names holding plain values), its figure folder
    (``FIG_DIR`` there, else ``figure_dir``), the plotting style, torch's seed, and no progress
    bars (a loading bar would be committed as a frozen "0%" widget)."""
    import torch
    import transformers

    from shortlab.plotting import use_style

    parameters = {name: value for name, value in namespace.items()
                  if name.isupper() and isinstance(value, (int, float, str, list, dict, type(None)))}
    directory = figure_dir(namespace.get("FIG_DIR"), parameters, notebook)
    use_style()
    torch.manual_seed(seed)
    transformers.logging.disable_progress_bar()
    return NotebookRun(parameters, directory, time.perf_counter())


def numbered_notebooks(directory: str | Path | None = None) -> list[Path]:
    """``NN_*.ipynb`` in number order (the main job's order)."""
    folder = Path(directory) if directory else (repository_root() or Path.cwd()) / "notebooks"
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def notebook_shape(path: str | Path) -> dict[str, int]:
    """How a notebook reads, in numbers: code cells, code lines (non-blank, the parameters cell
    included), the largest code cell's lines other than the parameters cell (a list of documented
    knobs, reported as ``parameters_lines``), markdown cells, and the parameters cell's knobs
    (``notebook_parameters``)."""
    notebook = nbformat.read(str(path), as_version=4)
    code, parameters = [], 0
    for cell in notebook.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if cell.cell_type != "code" or INJECTED_TAG in tags:
            continue
        lines = len([line for line in cell.source.splitlines() if line.strip()])
        if "parameters" in tags:
            parameters = lines
        code.append(lines)
    others = list(code)
    if parameters:
        others.remove(parameters)
    return {"code_cells": len(code), "code_lines": sum(code), "largest_cell": max(others, default=0),
            "parameters_lines": parameters, "markdown_cells": sum(cell.cell_type == "markdown" for cell in notebook.cells),
            "knobs": len(notebook_parameters(path))}


def source_digest(notebook: str | Path | nbformat.NotebookNode) -> str:
    """sha256 of a notebook's cell types and sources, in order: what a run executes. Outputs,
    execution counts, metadata and papermill's injected-parameters cell do not count, so an
    executed notebook has the digest of the source it was run from."""
    if not isinstance(notebook, nbformat.NotebookNode):
        notebook = nbformat.read(str(notebook), as_version=4)
    cells = [[cell.cell_type, cell.source] for cell in notebook.cells
             if INJECTED_TAG not in cell.get("metadata", {}).get("tags", [])]
    return hashlib.sha256(json.dumps(cells, ensure_ascii=False).encode()).hexdigest()


def stale_outputs(path: str | Path, source: str | Path | None = None) -> list[str]:
    """Why a committed notebook's outputs do not come from the default run of its current source
    (empty when they do): no run record, a source changed since the run, overrides, or code
    cells that did not run. With ``source``, ``path`` is a committed run *with overrides* (e.g.
    notebook 01 on another model, ``notebooks/runs/``) that must come from ``source``'s current
    cells; its overrides are then expected."""
    notebook = nbformat.read(str(path), as_version=4)
    record = notebook.metadata.get(RUN_RECORD_KEY)
    if record is None:
        return [f"{Path(path).name} has no run record: it was not executed by `make figures`"]
    problems = []
    current = source_digest(notebook if source is None else nbformat.read(str(source), as_version=4))
    if record.get("source_digest") != current or (source is not None and source_digest(notebook) != current):
        changed = Path(path).name if source is None else f"{Path(source).name} (which {Path(path).name} ran)"
        problems.append(f"{changed} changed since its outputs were made: rerun `make figures`")
    if record.get("parameters") and source is None:
        problems.append(f"{Path(path).name} outputs come from a run with overrides {record['parameters']}")
    unexecuted = [i for i, cell in enumerate(notebook.cells)
                  if cell.cell_type == "code" and cell.source.strip() and cell.get("execution_count") is None]
    if unexecuted:
        problems.append(f"{Path(path).name}: code cells {unexecuted} have not run")
    return problems


def run_notebook(path: str | Path, output_path: str | Path, parameters: dict | None = None,
                 cwd: str | Path | None = None, log_output: bool = False,
                 progress_bar: bool = True, timeout: int | None = None, recorded_output: str | Path | None = None):
    """Check ``parameters`` against the notebook, then execute it with papermill and record the
    source digest and the overrides in the executed notebook's metadata (``RUN_RECORD_KEY``).
    papermill's own record of the input and output paths is kept relative to the checkout
    (``recorded_output``: the output path to record, when the file is moved there later).

    Runs from ``cwd`` (default: the repository root) so relative paths resolve the same way as
    ``papermill`` launched from the checkout. papermill rewrites its output after every cell: it
    writes an untracked scratch file beside ``output_path`` instead, which replaces
    ``output_path`` at the end (on failure too, with the error shown). A committed output, e.g.
    ``notebooks/runs/``, thus stays as committed during the run, and the figures' sidecars
    record a clean revision.
    """
    import papermill

    overrides = resolve_overrides(path, dict(parameters or {}))
    digest = source_digest(path)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    scratch = output_path.with_name(f".{output_path.stem}.running{output_path.suffix}")
    try:
        executed = papermill.execute_notebook(
            str(path), str(scratch), parameters=overrides,
            cwd=str(cwd or repository_root() or Path.cwd()), log_output=log_output,
            progress_bar=progress_bar, execution_timeout=timeout, kernel_name="python3",
        )
    except BaseException:
        if scratch.exists():
            os.replace(scratch, output_path)
        raise
    scratch.unlink(missing_ok=True)
    describe_widgets(executed)
    executed.metadata[RUN_RECORD_KEY] = {"source_digest": digest, "parameters": overrides}
    executed.metadata.papermill["input_path"] = repository_relative(path)
    executed.metadata.papermill["output_path"] = repository_relative(recorded_output or output_path)
    write_atomically(output_path, lambda tmp: nbformat.write(executed, str(tmp)))
    return executed


WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_FALLBACK = ("(An interactive explorer: it runs when the notebook is opened in Jupyter and executed; "
                   "the figure below shows its default view.)")


def describe_widgets(notebook: nbformat.NotebookNode) -> int:
    """Give every widget output a plain-text fallback that says what it is: a viewer without the
    kernel (GitHub, nbviewer) shows the text instead of the widget, and the repr ("VBox(children=
    (...))") says nothing to a reader. Returns how many outputs were changed."""
    changed = 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET_MIME in data and data.get("text/plain") != WIDGET_FALLBACK:
                data["text/plain"] = WIDGET_FALLBACK
                changed += 1
    return changed


def run_in_place(paths: str | Path | list, log_output: bool = False, timeout: int | None = None):
    """Execute the default run of each of ``paths`` (one path or a list, in order) and replace
    each notebook with its executed copy, outputs included (what is committed).

    Every run goes to a scratch file, and the notebooks are replaced only after the last run
    (or the first failure): while they run the checkout stays as committed, so each figure's
    sidecar records a clean revision (``plotting.git_revision``). A failed run leaves its
    notebook, and those after it, as they were; the runs before it are still written."""
    paths = [Path(p) for p in (paths if isinstance(paths, list) else [paths])]
    with tempfile.TemporaryDirectory() as scratch:
        done = []
        try:
            for index, path in enumerate(paths):
                executed = Path(scratch) / f"{index}_{path.name}"
                run_notebook(path, executed, {}, log_output=log_output, timeout=timeout, recorded_output=path)
                done.append((path, executed))
        finally:
            for path, executed in done:
                write_atomically(path, lambda tmp, executed=executed: shutil.copyfile(executed, tmp))


def parse_value(text: str):
    """Command-line values: Python literals where they parse (``True``, ``50``, ``[1, 2]``), else text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--all", action="store_true", help="every numbered notebook, in order")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[],
                        metavar=("NAME", "VALUE"))
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where executed copies go (default: <repo>/outputs)")
    parser.add_argument("--in-place", action="store_true",
                        help="the default run: write each executed notebook over its source (outputs committed)")
    parser.add_argument("--readme-findings", action="store_true",
                        help="afterwards (or alone) copy each committed run's findings into README.md")
    args = parser.parse_args(argv)
    if args.in_place and (args.parameter or args.output_dir):
        parser.error("--in-place is the default run: it takes no -p overrides and no --output-dir")
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # papermill logs cell output
    paths = numbered_notebooks() if args.all else args.notebooks
    if not paths and args.readme_findings:
        return _update_readme()
    if not paths:
        parser.error("name notebooks to run, or --all")
    overrides = {name: parse_value(value) for name, value in args.parameter}
    for path in paths:  # check them all before spending time on any
        check_overrides(path, overrides)
    if args.in_place:
        print(f"running {', '.join(map(str, paths))}; each replaced by its executed copy after the last", flush=True)
        run_in_place(list(paths), log_output=True)
        return _update_readme() if args.readme_findings else 0
    output_dir = args.output_dir or (repository_root() or Path.cwd()) / "outputs"
    for path in paths:
        print(f"running {path} {overrides or ''}", flush=True)
        run_notebook(path, output_dir / path.name, overrides, log_output=True)
    return _update_readme() if args.readme_findings else 0


def _update_readme() -> int:
    from shortlab.findings import update_readme_findings, update_readme_verdict_table

    root = repository_root() or Path.cwd()
    changed = update_readme_findings(root)
    print(f"README findings updated from {', '.join(changed)}" if changed else "README findings already current")
    print("README verdict table updated" if update_readme_verdict_table(root) else "README verdict table already current")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except NotebookParameterError as error:
        sys.exit(f"error: {error}")
