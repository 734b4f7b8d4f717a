"""Run the numbered notebooks through papermill, rejecting parameters a notebook does not have.

papermill only warns about an unknown parameter (a typo such as ``-p MODLE ...`` silently runs
the default model), so every override is checked against the notebook's ``parameters`` cell
first.

    python -m shortlab.run_notebooks --all
    python -m shortlab.run_notebooks notebooks/00_quickstart.ipynb -p MODEL qwen2.5-0.5b -p FAST True
"""

from __future__ import annotations

import argparse
import ast
import logging
import sys
from pathlib import Path

import nbformat

from shortlab.plotting import repository_root

PARAMETERS_TAG = "parameters"


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
    """Raise unless every override names a declared parameter with a value of a fitting type."""
    declared = notebook_parameters(path)
    unknown = sorted(set(overrides) - set(declared))
    if unknown:
        raise NotebookParameterError(
            f"unknown notebook parameter(s) {unknown} for {Path(path).name}; "
            f"known: {sorted(declared)}"
        )
    for name, value in overrides.items():
        if not _compatible(declared[name], value):
            raise NotebookParameterError(
                f"parameter {name} of {Path(path).name} expects a value like "
                f"{declared[name]!r}, got {value!r}"
            )
    return declared


def numbered_notebooks(directory: str | Path | None = None) -> list[Path]:
    """``NN_*.ipynb`` in number order (the main job's order)."""
    folder = Path(directory) if directory else (repository_root() or Path.cwd()) / "notebooks"
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def run_notebook(path: str | Path, output_path: str | Path, parameters: dict | None = None,
                 cwd: str | Path | None = None, log_output: bool = False,
                 progress_bar: bool = True, timeout: int | None = None):
    """Check ``parameters`` against the notebook, then execute it with papermill.

    Runs from ``cwd`` (default: the repository root) so relative paths resolve the same way as
    ``papermill`` launched from the checkout.
    """
    import papermill

    overrides = dict(parameters or {})
    check_overrides(path, overrides)
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    return papermill.execute_notebook(
        str(path), str(output_path), parameters=overrides,
        cwd=str(cwd or repository_root() or Path.cwd()), log_output=log_output,
        progress_bar=progress_bar, execution_timeout=timeout, kernel_name="python3",
    )


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # papermill logs cell output
    paths = numbered_notebooks() if args.all else args.notebooks
    if not paths:
        parser.error("name notebooks to run, or --all")
    overrides = {name: parse_value(value) for name, value in args.parameter}
    for path in paths:  # check them all before spending time on any
        check_overrides(path, overrides)
    output_dir = args.output_dir or (repository_root() or Path.cwd()) / "outputs"
    for path in paths:
        print(f"running {path} {overrides or ''}", flush=True)
        run_notebook(path, output_dir / path.name, overrides, log_output=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except NotebookParameterError as error:
        sys.exit(f"error: {error}")
