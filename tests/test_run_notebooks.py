"""The notebook runner's checks, and every numbered notebook executed in FAST mode."""

import json
from pathlib import Path

import nbformat
import pytest

from shortlab import run_notebooks as rn
from shortlab.plotting import repository_root


def write_notebook(path, parameters_source, tagged=True, extra_cells=()):
    cell = nbformat.v4.new_code_cell(parameters_source)
    if tagged:
        cell.metadata["tags"] = ["parameters"]
    notebook = nbformat.v4.new_notebook(cells=[cell, *extra_cells])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, str(path))
    return path


def test_parameters_are_read_from_the_tagged_cell(tmp_path):
    path = write_notebook(tmp_path / "a.ipynb", "MODEL = 'x'\nFAST = False\nLIMIT = 5\nFIG_DIR = None\n")
    assert rn.notebook_parameters(path) == {"MODEL": "x", "FAST": False, "LIMIT": 5, "FIG_DIR": None}


def test_missing_parameters_cell_is_an_error(tmp_path):
    path = write_notebook(tmp_path / "a.ipynb", "MODEL = 'x'", tagged=False)
    with pytest.raises(rn.NotebookParameterError, match="exactly one cell tagged 'parameters'"):
        rn.notebook_parameters(path)


def test_non_literal_parameters_are_refused(tmp_path):
    path = write_notebook(tmp_path / "a.ipynb", "import os\nMODEL = 'x'")
    with pytest.raises(rn.NotebookParameterError, match="only `NAME = literal`"):
        rn.notebook_parameters(path)
    path = write_notebook(tmp_path / "b.ipynb", "N = len('abc')")
    with pytest.raises(rn.NotebookParameterError, match="non-literal default"):
        rn.notebook_parameters(path)


def test_unknown_override_names_it_and_the_known_ones(tmp_path):
    path = write_notebook(tmp_path / "a.ipynb", "MODEL = 'x'\nFAST = False")
    with pytest.raises(rn.NotebookParameterError, match=r"'MODLE'.*known: \['FAST', 'MODEL'\]"):
        rn.check_overrides(path, {"MODLE": "y"})


def test_grouped_parameters_are_overridden_key_by_key(tmp_path):
    path = write_notebook(tmp_path / "a.ipynb", "MODEL = 'x'\nMORE = {'limit': 5, 'rankings': ['bi'], 'seed': 0}")
    resolved = rn.resolve_overrides(path, {"MORE.limit": 7, "MODEL": "y", "MORE.seed": 3})
    assert resolved == {"MORE": {"limit": 7, "rankings": ["bi"], "seed": 3}, "MODEL": "y"}
    assert rn.resolve_overrides(path, {"MORE": {"limit": 1}})["MORE"] == {"limit": 1, "rankings": ["bi"], "seed": 0}
    with pytest.raises(rn.NotebookParameterError, match=r"unknown key 'limt' of parameter MORE.*\['limit'"):
        rn.check_overrides(path, {"MORE.limt": 7})
    with pytest.raises(rn.NotebookParameterError, match="expects a value like 5"):
        rn.check_overrides(path, {"MORE.limit": "many"})
    with pytest.raises(rn.NotebookParameterError, match="not a dict"):
        rn.check_overrides(path, {"MODEL.size": 1})
    with pytest.raises(rn.NotebookParameterError, match=r"unknown key\(s\) \['x'\]"):
        rn.check_overrides(path, {"MORE": {"x": 1}})
    with pytest.raises(rn.NotebookParameterError, match=r"keys \['limit'\] expect values like \[5\]"):
        rn.check_overrides(path, {"MORE": {"limit": "many"}})
    with pytest.raises(rn.NotebookParameterError, match="takes a dict of its keys"):
        rn.check_overrides(path, {"MORE": None})


@pytest.mark.parametrize("name,value,ok", [
    ("FAST", True, True), ("FAST", "yes", False), ("FAST", 1, False),
    ("LIMIT", 7, True), ("LIMIT", 0.5, True), ("LIMIT", "7", False),
    ("MODEL", "m", True), ("MODEL", 3, False), ("LAYERS", [1, 2], True), ("LAYERS", 3, False),
    ("FIG_DIR", "/tmp/f", True),
])
def test_override_types_must_fit_the_default(tmp_path, name, value, ok):
    path = write_notebook(
        tmp_path / "a.ipynb", "MODEL = 'x'\nFAST = False\nLIMIT = 5\nLAYERS = (0,)\nFIG_DIR = None"
    )
    if ok:
        rn.check_overrides(path, {name: value})
    else:
        with pytest.raises(rn.NotebookParameterError, match=f"parameter {name}"):
            rn.check_overrides(path, {name: value})


def test_parse_value():
    assert rn.parse_value("True") is True
    assert rn.parse_value("50") == 50
    assert rn.parse_value("[1, 2]") == [1, 2]
    assert rn.parse_value("qwen2.5-0.5b") == "qwen2.5-0.5b"
    assert rn.parse_value("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_cli_refuses_unknown_parameter_before_running(tmp_path, capsys):
    path = write_notebook(tmp_path / "01_a.ipynb", "MODEL = 'x'")
    with pytest.raises(rn.NotebookParameterError, match="MODLE"):
        rn.main([str(path), "-p", "MODLE", "y", "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_run_notebook_injects_overrides(tmp_path):
    check = nbformat.v4.new_code_cell(
        "import json, pathlib\npathlib.Path(OUT).write_text(json.dumps({'MODEL': MODEL}))"
    )
    out_file = tmp_path / "seen.json"
    path = write_notebook(tmp_path / "01_a.ipynb", f"MODEL = 'x'\nOUT = {str(out_file)!r}",
                          extra_cells=[check])
    rn.run_notebook(path, tmp_path / "executed.ipynb", {"MODEL": "y"}, cwd=tmp_path,
                    progress_bar=False)
    assert json.loads(out_file.read_text()) == {"MODEL": "y"}


def test_executed_notebook_records_its_source_and_overrides(tmp_path):
    path = write_notebook(tmp_path / "01_a.ipynb", "MODEL = 'x'",
                          extra_cells=[nbformat.v4.new_code_cell("print(MODEL)")])
    rn.run_notebook(path, tmp_path / "executed.ipynb", {"MODEL": "y"}, cwd=tmp_path, progress_bar=False)
    executed = nbformat.read(str(tmp_path / "executed.ipynb"), as_version=4)
    assert executed.metadata[rn.RUN_RECORD_KEY] == {"source_digest": rn.source_digest(path), "parameters": {"MODEL": "y"}}
    # the injected-parameters cell does not count: the executed copy has its source's digest
    assert rn.source_digest(executed) == rn.source_digest(path)
    assert any(line.strip() == "y" for line in executed.cells[-1].outputs[0].text.splitlines())
    assert rn.stale_outputs(tmp_path / "executed.ipynb") == [
        "executed.ipynb outputs come from a run with overrides {'MODEL': 'y'}"]
    # a committed run with overrides (another model's run) is current while its source is unchanged
    assert rn.stale_outputs(tmp_path / "executed.ipynb", source=path) == []
    notebook = nbformat.read(str(path), as_version=4)
    notebook.cells[-1].source = "print(MODEL * 2)"
    nbformat.write(notebook, str(path))
    assert rn.stale_outputs(tmp_path / "executed.ipynb", source=path) == [
        f"{path.name} (which executed.ipynb ran) changed since its outputs were made: rerun `make figures`"]


def test_in_place_run_replaces_the_notebook_and_is_then_current(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_notebook(tmp_path / "01_a.ipynb", "N = 2", extra_cells=[nbformat.v4.new_code_cell("N * 21")])
    assert rn.stale_outputs(path) == ["01_a.ipynb has no run record: it was not executed by `make figures`"]
    rn.run_in_place(path)
    notebook = nbformat.read(str(path), as_version=4)
    assert notebook.cells[-1].outputs[0]["data"]["text/plain"] == "42"
    assert rn.stale_outputs(path) == []
    notebook.cells[-1].source = "N * 20"
    nbformat.write(notebook, str(path))
    assert rn.stale_outputs(path) == ["01_a.ipynb changed since its outputs were made: rerun `make figures`"]


def test_failed_in_place_run_leaves_the_notebook_as_it_was(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_notebook(tmp_path / "01_a.ipynb", "N = 2", extra_cells=[nbformat.v4.new_code_cell("1 / 0")])
    before = path.read_bytes()
    with pytest.raises(Exception, match="ZeroDivisionError"):
        rn.run_in_place(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["01_a.ipynb"]


def test_in_place_runs_see_the_notebooks_as_committed_until_the_last_one_ends(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = write_notebook(tmp_path / "01_a.ipynb", "N = 2", extra_cells=[nbformat.v4.new_code_cell("N * 21")])
    # the second notebook reads the first from disk while it runs: still without outputs
    peek = f'import json; len(json.load(open({str(first)!r}))["cells"][-1]["outputs"])'
    second = write_notebook(tmp_path / "02_b.ipynb", "M = 1", extra_cells=[nbformat.v4.new_code_cell(peek)])
    rn.run_in_place([first, second])
    assert nbformat.read(str(second), as_version=4).cells[-1].outputs[0]["data"]["text/plain"] == "0"
    assert nbformat.read(str(first), as_version=4).cells[-1].outputs[0]["data"]["text/plain"] == "42"
    assert rn.stale_outputs(first) == rn.stale_outputs(second) == []
    recorded = nbformat.read(str(first), as_version=4).metadata.papermill
    assert Path(recorded["output_path"]) == Path(recorded["input_path"]) == first  # not the scratch file


def test_in_place_failure_keeps_the_runs_before_it_and_leaves_the_rest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = write_notebook(tmp_path / "01_a.ipynb", "N = 2", extra_cells=[nbformat.v4.new_code_cell("N * 21")])
    bad = write_notebook(tmp_path / "02_b.ipynb", "N = 2", extra_cells=[nbformat.v4.new_code_cell("1 / 0")])
    later = write_notebook(tmp_path / "03_c.ipynb", "N = 2")
    untouched = {path: path.read_bytes() for path in (bad, later)}
    with pytest.raises(Exception, match="ZeroDivisionError"):
        rn.run_in_place([good, bad, later])
    assert rn.stale_outputs(good) == []
    assert all(path.read_bytes() == before for path, before in untouched.items())


def test_unexecuted_code_cells_are_stale(tmp_path):
    path = write_notebook(tmp_path / "01_a.ipynb", "N = 2", extra_cells=[nbformat.v4.new_code_cell("N")])
    notebook = nbformat.read(str(path), as_version=4)
    notebook.metadata[rn.RUN_RECORD_KEY] = {"source_digest": rn.source_digest(notebook), "parameters": {}}
    nbformat.write(notebook, str(path))
    assert rn.stale_outputs(path) == ["01_a.ipynb: code cells [0, 1] have not run"]


def test_in_place_takes_no_overrides(tmp_path):
    path = write_notebook(tmp_path / "01_a.ipynb", "MODEL = 'x'")
    with pytest.raises(SystemExit):
        rn.main([str(path), "--in-place", "-p", "MODEL", "y"])


def test_figure_dir_keeps_the_committed_figures_for_the_default_run_only():
    root = repository_root()
    name = "03_rope_base_bound.ipynb"
    defaults = rn.notebook_parameters(root / "notebooks" / name)
    assert rn.figure_dir(None, dict(defaults), name) == root / "figures"
    assert rn.figure_dir(None, {**defaults, "FAST": True}, name) == root / "outputs" / "figures" / name[:-6]
    assert rn.figure_dir("somewhere", {**defaults, "FAST": True}, name) == Path("somewhere")


def test_figure_dir_names_a_missing_notebook():
    with pytest.raises(FileNotFoundError, match="no notebook"):
        rn.figure_dir(None, {}, "99_missing.ipynb")



def test_numbered_notebooks_are_found_in_order():
    names = [p.name for p in rn.numbered_notebooks()]
    assert names == sorted(names) and names and names[0].startswith("00_")


# FAST-mode overrides per notebook: tiny random models keep the suite quick; the main job
# (`make figures`) runs the same notebooks on the real embedded default.
FAST_OVERRIDES = {
    "00_quickstart.ipynb": {"MODEL": "tiny-llama"},
    "01_block_influence_pruning.ipynb": {"MODEL": "tiny-llama", "HEAL_SEEDS": [0, 1]},
    "02_shortv_visual_freezing.ipynb": {"MODEL": "tiny-llava"},
}


@pytest.mark.notebook
@pytest.mark.parametrize("path", rn.numbered_notebooks(), ids=lambda p: p.name)
def test_notebook_runs_in_fast_mode(path, tmp_path):
    _run_in_fast_mode(path, tmp_path, FAST_OVERRIDES.get(path.name, {}))


# The ShortV notebook on the real LLaVA chat templates and classes (LLaVA-1.5's Vicuna prompt,
# LLaVA-NeXT's anyres tiling and Mistral prompt).
@pytest.mark.notebook
@pytest.mark.parametrize("model", ["tiny-llava-1.5", "tiny-llava-next"])
def test_shortv_notebook_runs_on_real_llava_templates(model, tmp_path):
    path = next(p for p in rn.numbered_notebooks() if p.name == "02_shortv_visual_freezing.ipynb")
    _run_in_fast_mode(path, tmp_path, {"MODEL": model, "SECOND_TASK": None})


# The ShortV notebook on the generated scene task (calibrated on its validation split), with
# easy-VQA as the second task its layer choices are compared on.
@pytest.mark.notebook
def test_shortv_notebook_runs_on_the_scene_task(tmp_path):
    path = next(p for p in rn.numbered_notebooks() if p.name == "02_shortv_visual_freezing.ipynb")
    _run_in_fast_mode(path, tmp_path, {"MODEL": "tiny-llava", "TASK": "scenes", "SECOND_TASK": "easy-vqa"})


def _run_in_fast_mode(path, tmp_path, overrides):
    overrides = {"FAST": True, "FIG_DIR": str(tmp_path / "figures"), **overrides}
    rn.run_notebook(path, tmp_path / path.name, overrides, progress_bar=False)
    figures = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    number = path.name[:2]
    assert figures and all(name.startswith(number + "_") for name in figures)
    for png in (tmp_path / "figures").glob("*.png"):
        assert png.with_suffix(".json").is_file()


def test_run_notebook_leaves_its_output_file_alone_until_the_run_ends(tmp_path):
    output = tmp_path / "runs" / "out.ipynb"
    output.parent.mkdir()
    output.write_text("committed")
    peek = f"open({str(output)!r}).read()"  # a committed run must not change while figures record the revision
    path = write_notebook(tmp_path / "01_a.ipynb", "N = 2", extra_cells=[nbformat.v4.new_code_cell(peek)])
    rn.run_notebook(path, output, {"N": 3}, cwd=tmp_path, progress_bar=False)
    executed = nbformat.read(str(output), as_version=4)
    assert executed.cells[-1].outputs[0]["data"]["text/plain"] == "'committed'"
    assert sorted(p.name for p in output.parent.iterdir()) == ["out.ipynb"]

    failing = write_notebook(tmp_path / "02_b.ipynb", "N = 2", extra_cells=[nbformat.v4.new_code_cell("1 / 0")])
    with pytest.raises(Exception, match="ZeroDivisionError"):
        rn.run_notebook(failing, output, cwd=tmp_path, progress_bar=False)
    assert "ZeroDivisionError" in output.read_text()  # the failed run is shown, as papermill does
    assert sorted(p.name for p in output.parent.iterdir()) == ["out.ipynb"]


def test_notebook_shape_counts_code_and_knobs(tmp_path):
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell("# title"),
                      nbformat.v4.new_code_cell("A = 1\nB = 2\n\nC = 'x'", metadata={"tags": ["parameters"]}),
                      nbformat.v4.new_code_cell("x = A\n\n\nprint(x)\nprint(B)")]
    path = tmp_path / "00_shape.ipynb"
    nbformat.write(notebook, str(path))
    assert rn.notebook_shape(path) == {"code_cells": 2, "code_lines": 6, "largest_cell": 3, "parameters_lines": 3,
                                       "markdown_cells": 1, "knobs": 3}


def test_start_notebook_reads_the_parameters_and_saves_what_it_shows(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    namespace = {"MODEL": "tiny", "OPTIONS": {"a": 1}, "FIG_DIR": str(tmp_path / "figs"), "lower": 3, "MODULE": rn}
    run = rn.start_notebook(namespace, "99_unused.ipynb", seed=1)
    assert run.parameters == {"MODEL": "tiny", "OPTIONS": {"a": 1}, "FIG_DIR": str(tmp_path / "figs")}
    assert run.fig_dir == tmp_path / "figs" and run.seconds() >= 0
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    ax.set(xlabel="x", ylabel="y")
    assert run.show(fig, "99_line") is None
    assert (tmp_path / "figs" / "99_line.png").is_file() and (tmp_path / "figs" / "99_line.json").is_file()


# What a reader meets in each numbered notebook (scripts/notebook_shape.py prints the numbers):
# at most about 250 lines of code, cells of about 15 lines (a plain-PyTorch definition of the
# paper's measure or a block of imports may take 20), and about a dozen core knobs, the rest in
# the parameters cell's OPTIONS dict.
@pytest.mark.parametrize("path", rn.numbered_notebooks(), ids=lambda p: p.name)
def test_notebooks_read_in_short_cells(path):
    shape = rn.notebook_shape(path)
    assert shape["code_lines"] <= 250, shape
    assert shape["largest_cell"] <= 20, shape
    assert shape["knobs"] <= 15, shape


def test_widget_outputs_say_what_they_are_without_a_kernel():
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("display(box)")
    cell.outputs = [nbformat.v4.new_output("display_data", data={
        "text/plain": "VBox(children=(HBox(children=(SelectMultiple(...", rn.WIDGET_MIME: {"model_id": "x"}}),
        nbformat.v4.new_output("stream", text="hello\n")]
    notebook.cells = [cell]
    assert rn.describe_widgets(notebook) == 1
    assert cell.outputs[0]["data"]["text/plain"] == rn.WIDGET_FALLBACK and cell.outputs[1]["text"] == "hello\n"
    assert rn.describe_widgets(notebook) == 0
