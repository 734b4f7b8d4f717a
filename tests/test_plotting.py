import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from shortlab import plotting  # noqa: E402


def test_save_figure_writes_png_and_sidecar(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = plotting.save_figure(fig, "99_test", tmp_path, {"MODEL": "tiny", "LAYERS": (1, 2)})
    plt.close(fig)
    assert png == tmp_path / "99_test.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sidecar = json.loads((tmp_path / "99_test.json").read_text())
    assert sidecar["parameters"] == {"MODEL": "tiny", "LAYERS": [1, 2]}
    assert sidecar["versions"]["torch"] and sidecar["versions"]["python"]
    assert sidecar["figure"] == "99_test.png"
    assert "git_revision" in sidecar
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_non_json_parameters_are_recorded_as_text(tmp_path):
    fig = plt.figure()
    plotting.save_figure(fig, "x", tmp_path, {"path": tmp_path})
    plt.close(fig)
    assert json.loads((tmp_path / "x.json").read_text())["parameters"]["path"] == repr(tmp_path)


@pytest.mark.parametrize("bad", ["", "a/b", "fig.png"])
def test_bad_figure_names_are_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="bare name"):
        plotting.save_figure(plt.figure(), bad, tmp_path)


def test_default_figure_dir_is_the_checkout_figures_folder():
    root = plotting.repository_root()
    assert root is not None and (root / "pyproject.toml").is_file()
    assert plotting.default_figure_dir() == root / "figures"
    revision = plotting.git_revision()
    assert revision is None or len(revision.removesuffix("-dirty")) == 40


def test_package_versions_marks_missing_packages():
    versions = plotting.package_versions(("torch", "no-such-package-xyz"))
    assert versions["no-such-package-xyz"] is None and versions["torch"]


def test_use_style_sets_one_theme():
    plotting.use_style()
    assert plt.rcParams["axes.grid"] and plt.rcParams["figure.dpi"] == 100


def test_git_revision_ignores_changed_figures_only(tmp_path, monkeypatch):
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.png").write_text("old")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    monkeypatch.setattr(plotting, "repository_root", lambda: tmp_path)
    (tmp_path / "figures" / "a.png").write_text("new")
    assert not plotting.git_revision().endswith("-dirty")
    (tmp_path / "code.py").write_text("x = 2\n")
    assert plotting.git_revision().endswith("-dirty")


def test_repository_relative_drops_the_checkout_folder_only(monkeypatch, tmp_path):
    monkeypatch.setattr(plotting, "repository_root", lambda: tmp_path)
    assert plotting.repository_relative(tmp_path / "results" / "shortv") == "results/shortv"
    elsewhere = tmp_path.parent / "elsewhere"
    assert plotting.repository_relative(elsewhere) == str(elsewhere)
    assert plotting.repository_relative(None) is None
    monkeypatch.setattr(plotting, "repository_root", lambda: None)  # an installed package, no checkout
    assert plotting.repository_relative(tmp_path / "x") == str(tmp_path / "x")


def test_drawable_text_escapes_only_what_the_font_cannot_draw():
    from matplotlib import font_manager

    from shortlab.plotting import _font_characters, drawable_text

    font = _font_characters(font_manager.findfont(font_manager.FontProperties()))
    assert drawable_text("'Paris' −8 é") == "'Paris' −8 é"
    missing = next(c for c in "巴黎\U0001F600\uE000" if ord(c) not in font)  # CJK, emoji, private use
    assert drawable_text(f"a{missing}b") == "a" + missing.encode("unicode_escape").decode() + "b"
    assert drawable_text("\U0001F600") in ("\U0001F600", "\\U0001f600")
    assert all(ord(c) in font for c in drawable_text("巴黎 Paris \U0001F600") if c.isprintable())


def test_figure_problems_names_what_fails_a_reader():
    import matplotlib.pyplot as plt

    from shortlab.plotting import figure_problems

    fig, (good, empty, crowded) = plt.subplots(1, 3, figsize=(9, 3))
    good.plot([0, 1], [0, 1])
    good.set(xlabel="x", ylabel="y", title="good")
    empty.set_title("nothing here")
    crowded.bar(range(30), range(30))
    crowded.set_xticks(range(30), [f"a long label {i}" for i in range(30)])
    crowded.set(ylabel="count", title="crowded")
    problems = figure_problems(fig)
    assert not [p for p in problems if p.startswith("'good'")]
    assert "'nothing here' is empty" in problems
    assert "'crowded' has no x label" in problems
    assert any(p.startswith("'crowded': x tick labels") and "overlap" in p for p in problems)
    plt.close(fig)
    fig, (a, b) = plt.subplots(1, 2, figsize=(4, 2))
    for ax in (a, b):
        ax.plot([0, 1])
        ax.set(xlabel="x", ylabel="y", title="a title far too long to fit above one narrow axes")
    assert any(p.startswith("titles") for p in figure_problems(fig))
    plt.close(fig)


def test_figure_problems_raise_no_false_alarms_on_twins_rotations_polar_and_bare_figures():
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from shortlab.plotting import figure_problems

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(10))
    ax.set(xlabel="x", ylabel="y", xlim=(0.5, 8.5))  # the ticks at 0 and 10 lie outside the view
    twin = ax.twinx()
    twin.plot(range(10), color="red")
    twin.set_ylabel("other y")
    assert figure_problems(fig) == []
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(range(5), range(5))
    ax.set_xticks(range(5), [f"criterion {i}" for i in range(5)], rotation=20, ha="right")
    ax.set(xlabel="removed by", ylabel="value")
    assert figure_problems(fig) == []
    ax.set_xticks(range(5), [f"a much longer criterion name {i}" for i in range(5)], rotation=0)
    assert any("overlap" in p for p in figure_problems(fig))
    plt.close(fig)
    fig = plt.figure()
    polar = fig.add_subplot(projection="polar")
    polar.plot([0, 1], [0, 1])
    assert figure_problems(fig) == []
    plt.close(fig)
    bare = Figure()
    axes = bare.add_subplot()
    axes.plot([0, 1])
    bare.supxlabel("time")
    axes.set_ylabel("y")
    assert figure_problems(bare) == []


def test_place_labels_keeps_labels_of_crowded_points_apart():
    fig, ax = plt.subplots(figsize=(5, 3))
    points = [(0.50, 0.50), (0.52, 0.505), (0.54, 0.51), (0.51, 0.49), (0.9, 0.2)]
    ax.plot(*zip(*points), "o")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    texts = plotting.place_labels(ax, points, ["N=3", "R=25%", "N=9", "R=50%", "far"])
    renderer = fig.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in texts]
    assert [text.get_text() for text in texts] == ["N=3", "R=25%", "N=9", "R=50%", "far"]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)


def test_place_labels_falls_back_to_the_first_offset_when_nothing_is_free():
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    (text,) = plotting.place_labels(ax, [(0.5, 0.5)], ["a label far wider than this tiny axes"])
    assert text.get_position() == (4, 5) and text.get_text().startswith("a label")
    plt.close(fig)
