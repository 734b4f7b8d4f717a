"""Save figures with a JSON sidecar recording how they were made."""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from shortlab.files import write_atomically

RECORDED_PACKAGES = ("shortlab", "torch", "transformers", "numpy", "matplotlib")


def repository_root() -> Path | None:
    """The git checkout holding this package (an editable install), or None."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / ".git").exists() and (here / "pyproject.toml").is_file() else None


def repository_relative(path: str | Path | None) -> str | None:
    """``path`` relative to the checkout when it lies inside it, else as given: what a committed
    notebook prints, so its outputs do not carry the folder it happened to run in."""
    if path is None:
        return None
    root = repository_root()
    resolved = Path(path).resolve()
    if root is not None and resolved.is_relative_to(root):
        return str(resolved.relative_to(root))
    return str(path)


def default_figure_dir() -> Path:
    """``<repo>/figures`` when shortlab runs from its checkout, else ``./figures``."""
    root = repository_root()
    return (root or Path.cwd()) / "figures"


STYLE = {"context": "notebook", "style": "whitegrid", "palette": "colorblind"}


def use_style() -> None:
    """One look for every notebook figure: seaborn's theme ``STYLE`` (whitegrid, colorblind palette)."""
    import seaborn as sns

    sns.set_theme(**STYLE, rc={"figure.dpi": 100, "axes.titlesize": "medium"})


def drawable_text(text: str) -> str:
    """``text`` with every printable character that matplotlib's current font cannot draw written
    as its Python escape (``\\uXXXX``): a model's tokens (Qwen's Chinese ones, emoji) would otherwise be
    drawn as empty boxes, with a warning per glyph."""
    from matplotlib import font_manager

    drawable = _font_characters(font_manager.findfont(font_manager.FontProperties()))
    return "".join(c if ord(c) in drawable or not c.isprintable()
                   else c.encode("unicode_escape").decode("ascii") for c in text)


@functools.cache
def _font_characters(path: str) -> frozenset[int]:
    from matplotlib import ft2font

    return frozenset(ft2font.FT2Font(path).get_charmap())


def git_revision(outputs: tuple[str, ...] = ("figures",)) -> str | None:
    """The checkout's commit hash, with ``-dirty`` when tracked files outside the ``outputs``
    folders have uncommitted changes (a run that overwrites committed figures still comes from a
    clean commit; evidence stores pass ``("figures", "results")``)."""
    root = repository_root()
    if root is None:
        return None
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
             *(f":(exclude){folder}" for folder in outputs)],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def package_versions(names=RECORDED_PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def jsonable(value):
    """``value`` with containers made JSON lists/dicts and anything else non-JSON as its repr."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def _visible_texts(texts) -> list:
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def _boxes_overlap(a, b, renderer) -> bool:
    box_a, box_b = a.get_window_extent(renderer), b.get_window_extent(renderer)
    return box_a.overlaps(box_b) and box_a.width > 0 and box_b.width > 0


def _overlapping(texts, renderer) -> list[tuple[str, str]]:
    """Pairs of ``texts`` whose drawn boxes intersect (each pair once)."""
    return [(a.get_text(), b.get_text()) for i, a in enumerate(texts) for b in texts[i + 1:]
            if _boxes_overlap(a, b, renderer)]


def _crowded_ticks(ax, axis: str, renderer) -> list[tuple[str, str]]:
    """Neighbouring tick labels of ``ax``'s ``axis`` ("x" or "y") that overlap where they are
    drawn: inside the view, and for rotated labels (parallel lines of text) when the gap between
    their lines is less than a line's height."""
    import math

    view = sorted(getattr(ax, f"get_{axis}lim")())
    ticks = [(float(position), label) for position, label in
             zip(getattr(ax, f"get_{axis}ticks")(), getattr(ax, f"get_{axis}ticklabels")())
             if view[0] <= position <= view[1] and label.get_visible() and label.get_text().strip()]
    ticks.sort(key=lambda pair: pair[0])
    crowded = []
    for (p, a), (q, b) in zip(ticks, ticks[1:]):
        angle = math.radians(a.get_rotation()) % math.pi
        if math.isclose(math.sin(angle), 0.0, abs_tol=1e-6) or math.isclose(math.cos(angle), 0.0, abs_tol=1e-6):
            hit = _boxes_overlap(a, b, renderer)
        else:  # parallel rotated lines: their distance across the text against the text's height
            points = ax.transData.transform([(p, 0), (q, 0)] if axis == "x" else [(0, p), (0, q)])
            gap = abs(points[1][0] - points[0][0]) if axis == "x" else abs(points[1][1] - points[0][1])
            across = gap * abs(math.sin(angle) if axis == "x" else math.cos(angle))
            hit = across < 0.9 * a.get_fontsize() * ax.figure.dpi / 72
        if hit:
            crowded.append((a.get_text(), b.get_text()))
    return crowded


# where place_labels tries a label, in points from its point: right/left, above/below, then further out
_LABEL_OFFSETS = ((4, 5), (4, -5), (-4, 5), (-4, -5), (6, 0), (-6, 0), (4, 14), (4, -14), (-4, 14), (-4, -14))


def place_labels(ax, points, labels, colors=None, fontsize: float = 7, marker_points: float = 4.0) -> list:
    """Label each (x, y) of ``points`` (data coordinates) with ``labels``, at the first of a few
    offsets around it (``_LABEL_OFFSETS``) where the text overlaps no label placed before, no
    point's marker (a square of ``marker_points`` around every point) and stays inside the axes;
    where no offset is free, the first one. Call it after the axis limits are set. Returns the
    annotations."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    half = marker_points * fig.dpi / 72
    centres = ax.transData.transform(list(points)) if len(points) else []
    markers = [Bbox.from_extents(cx - half, cy - half, cx + half, cy + half) for cx, cy in centres]
    frame = ax.get_window_extent(renderer)
    placed, annotations = [], []
    colors = colors if colors is not None else [None] * len(labels)
    for (x, y), label, color in zip(points, labels, colors):
        for attempt, (dx, dy) in enumerate((*_LABEL_OFFSETS, _LABEL_OFFSETS[0])):
            text = ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                               color=color, ha="left" if dx >= 0 else "right",
                               va="bottom" if dy > 0 else "top" if dy < 0 else "center")
            box = text.get_window_extent(renderer)
            free = (frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
                    and not any(box.overlaps(other) for other in [*placed, *markers]))
            if free or attempt == len(_LABEL_OFFSETS):
                break
            text.remove()
        placed.append(box)
        annotations.append(text)
    return annotations


def figure_problems(fig) -> list[str]:
    """What would fail a reader in ``fig``, in words (empty when nothing): an axes with no data,
    a data axis without a label (its own or the figure's ``supxlabel``/``supylabel``), tick labels
    of one axis that overlap where they are drawn, titles of different axes that overlap.
    Colorbars, polar axes, axes switched off and hidden axes (a twin's) are not checked. Never
    raises: a figure that cannot be drawn is reported as such."""
    try:
        return _figure_problems(fig)
    except Exception as error:  # a figure the checks cannot read: say so instead of failing the save
        return [f"the figure could not be checked: {type(error).__name__}: {error}"]


def _figure_problems(fig) -> list[str]:
    fig.draw_without_rendering()
    renderer = fig._get_renderer()
    figure_label = {"x": bool(getattr(fig, "_supxlabel", None) and fig._supxlabel.get_text()),
                    "y": bool(getattr(fig, "_supylabel", None) and fig._supylabel.get_text())}
    problems, titles = [], []
    for index, ax in enumerate(fig.axes):
        if (not ax.get_visible() or not ax.axison or getattr(ax, "_colorbar", None) is not None
                or ax.name != "rectilinear"):
            continue
        name = ax.get_title() or f"axes {index}"
        if not any([ax.lines, ax.collections, ax.patches, ax.images, ax.tables, ax.texts]):
            problems.append(f"{name!r} is empty")
        for axis in ("x", "y"):
            if not getattr(ax, f"{axis}axis").get_visible():
                continue
            label = getattr(ax, f"get_{axis}label")()
            if _visible_texts(getattr(ax, f"get_{axis}ticklabels")()) and not label.strip() and not figure_label[axis]:
                problems.append(f"{name!r} has no {axis} label")
            for a, b in _crowded_ticks(ax, axis, renderer):
                problems.append(f"{name!r}: {axis} tick labels {a!r} and {b!r} overlap")
        titles.extend(_visible_texts([ax.title, ax._left_title, ax._right_title]))
    for a, b in _overlapping(titles, renderer):
        problems.append(f"titles {a!r} and {b!r} overlap")
    return problems


def save_figure(fig, name: str, fig_dir: str | os.PathLike | None = None,
                parameters: dict | None = None, dpi: int = 120) -> Path:
    """Write ``fig`` to ``<fig_dir>/<name>.png`` and a ``<name>.json`` sidecar.

    The sidecar records ``parameters`` (e.g. the notebook's parameter cell), package versions
    and the git revision, so every committed figure says how to remake it, and what would fail a
    reader in it (``figure_problems``; empty when nothing).
    """
    if not name or "/" in name or name.endswith(".png"):
        raise ValueError(f"figure name {name!r} must be a bare name such as '01_bi_per_layer'")
    directory = Path(fig_dir) if fig_dir is not None else default_figure_dir()
    directory.mkdir(parents=True, exist_ok=True)
    png = directory / f"{name}.png"
    write_atomically(png, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))
    sidecar = {
        "figure": png.name,
        "parameters": jsonable(parameters or {}),
        "versions": package_versions(),
        "git_revision": git_revision(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "problems": figure_problems(fig),
    }
    write_atomically(
        directory / f"{name}.json",
        lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=2) + "\n"),
    )
    return png
