"""The package as a library: its public API, its dependency declarations and the lock file.

pyproject.toml holds dependency ranges (what `pip install shortlab` resolves), requirements-lock.txt
the exact tested environment (what `make env` installs), environment.yml the conda form of the lock.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

import shortlab

tomllib = pytest.importorskip("tomllib")  # Python 3.11+: the locked environment's version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

# Import names of the optional extras' packages. `import shortlab` and every name it exports must
# work without them.
OPTIONAL_IMPORTS = (
    "onnx", "onnxruntime", "PIL", "skimage", "matplotlib", "seaborn", "pandas", "nbformat",
    "papermill", "IPython", "ipykernel", "ipywidgets", "jupyterlab", "lm_eval", "peft",
)
# Modules that exist for one extra may import its packages at module level.
MODULE_EXTRAS = {
    "shortlab.vision": "vision",
    "shortlab.plotting": "notebooks",
    "shortlab.run_notebooks": "notebooks",
    # the notebooks' sections: tables (pandas) and figures (matplotlib, seaborn)
    "shortlab.shortgpt_report": "notebooks",
    "shortlab.llava_mini.report": "notebooks",
    "shortlab.rope_experiment.report": "notebooks",
    "shortlab.harness": "eval",
}


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter outside the repository (so ``shortlab`` is the installed
    package, not the working directory)."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def requirement_names(requirements) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def locked_versions() -> dict[str, Version]:
    versions = {}
    for line in (ROOT / "requirements-lock.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"requirements-lock.txt: {line!r} is not an exact `name==version` pin"
        key = canonicalize_name(name)
        assert key not in versions, f"requirements-lock.txt pins {name} twice"
        versions[key] = Version(version)
    return versions


def embedded_names() -> set[str]:
    lines = (ROOT / "requirements-embedded.txt").read_text().splitlines()
    pins = [line for line in lines if line.strip() and not line.startswith("#")]
    return {canonicalize_name(line.split("==")[0]) for line in pins}


# ------------------------------------------------------------------------------------ public API


def test_version_is_the_single_source_pyproject_reads():
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "shortlab.__version__"}
    assert str(Version(shortlab.__version__)) == shortlab.__version__


def test_exports_are_unique_and_come_from_their_module():
    listed = [name for names in shortlab._EXPORTS.values() for name in names]
    assert len(listed) == len(set(listed)), "a name is exported from two modules"
    assert shortlab.__all__ == sorted(listed)
    for name in shortlab.__all__:
        value = getattr(shortlab, name)
        module = shortlab._MODULE_OF[name]
        assert value is getattr(importlib.import_module(module), name)
        if inspect.isroutine(value) or inspect.isclass(value):
            defined_in = value.__module__
            assert defined_in == module or defined_in.startswith(module + "."), f"{name} is from {defined_in}"


@pytest.mark.parametrize("name", shortlab.__all__)
def test_every_export_is_documented(name):
    value = getattr(shortlab, name)
    if inspect.isroutine(value) or inspect.isclass(value):
        doc = (value.__doc__ or "").strip()
        # A dataclass without a docstring gets its signature, "Name(field: type, ...)", as __doc__.
        assert doc and not doc.startswith(f"{value.__name__}("), f"{name} has no docstring"
    else:  # a constant: the package docstring says what it holds
        assert f"``{name}``:" in shortlab.__doc__, f"constant {name} is not described in shortlab's docstring"


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        shortlab.no_such_name  # noqa: B018
    assert "load_model" in dir(shortlab)


def test_import_shortlab_loads_neither_torch_nor_transformers():
    result = run_python(
        "import sys, shortlab; print(shortlab.__file__); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


def test_every_export_works_without_the_optional_dependencies():
    # A None entry in sys.modules makes `import name` fail and find_spec(name) report it missing,
    # as if it were not installed.
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in OPTIONAL_IMPORTS)
    result = run_python(
        f"import sys; {blocked}\n"
        "import shortlab\n"
        "for name in shortlab.__all__:\n"
        "    getattr(shortlab, name)\n"
        "print(len(shortlab.__all__))"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) == len(shortlab.__all__)


def _third_party_imports(path: Path) -> tuple[set[str], set[str]]:
    """Top-level names of the non-stdlib packages ``path`` imports: (at module level, anywhere)."""
    tree = ast.parse(path.read_text())
    module_level = set(tree.body)
    top, anywhere = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            root = name.split(".")[0]
            if root in sys.stdlib_module_names or root in ("shortlab", "__future__"):
                continue
            anywhere.add(root)
            if node in module_level:
                top.add(root)
    return top, anywhere


def test_modules_import_only_declared_dependencies():
    """Module-level imports need only the core dependencies (or, in a module that exists for one
    extra, that extra's); imports inside functions may use any extra."""
    distributions = metadata.packages_distributions()
    core = requirement_names(PROJECT["dependencies"])
    extras = {name: requirement_names(r for r in reqs if not r.startswith("shortlab["))
              for name, reqs in PROJECT["optional-dependencies"].items()}
    every_extra = set().union(*extras.values())
    problems = []
    for path in sorted((ROOT / "shortlab").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        allowed_at_top = core | extras.get(MODULE_EXTRAS.get(module), set())
        top, anywhere = _third_party_imports(path)
        for root in sorted(anywhere):
            dists = {canonicalize_name(d) for d in distributions.get(root, [])}
            if not dists:
                problems.append(f"{module}: imports {root}, which no installed distribution provides")
            elif root in top and not dists & allowed_at_top:
                problems.append(f"{module}: imports {root} ({sorted(dists)}) at module level; "
                                "not a core dependency")
            elif not dists & (core | every_extra):
                problems.append(f"{module}: imports {root} ({sorted(dists)}); not declared in pyproject.toml")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------- declarations and the lock


def test_pyproject_ranges_admit_every_locked_version():
    locked = locked_versions()
    requirements = list(PROJECT["dependencies"])
    for extra in PROJECT["optional-dependencies"].values():
        requirements += [r for r in extra if not r.startswith("shortlab[")]
    for text in requirements:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{text} is declared but requirements-lock.txt does not pin it"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"pyproject.toml's {text} excludes the locked {requirement.name}=={locked[name]}"
        )


def test_dependencies_are_ranges_not_pins():
    for extra, requirements in [("core", PROJECT["dependencies"]), *PROJECT["optional-dependencies"].items()]:
        for text in requirements:
            assert "==" not in text, f"{extra}: {text} pins an exact version; the lock file does that"


def test_extras_compose():
    extras = PROJECT["optional-dependencies"]
    assert set(extras) == {"vision", "notebooks", "eval", "heal", "test", "all"}
    assert extras["all"] == ["shortlab[notebooks,vision,eval,heal,test]"]
    # The test suite runs the notebooks, the lm-eval bridge and healing.
    assert "shortlab[notebooks,vision,eval,heal]" in extras["test"]


def test_python_range_is_torchs_and_admits_the_locked_python():
    supported = SpecifierSet(PROJECT["requires-python"])
    assert "3.10" in supported  # the oldest Python that torch 2.13 supports
    assert "3.11" in supported  # the lock's, as environment.yml and setup_env.sh say
    assert "sys.version_info[:2] == (3, 11)" in (ROOT / "scripts" / "setup_env.sh").read_text()


def test_lock_holds_neither_shortlab_nor_the_embedded_wheels():
    locked = set(locked_versions())
    assert "shortlab" not in locked
    assert not locked & embedded_names(), "embedded-model wheels belong in requirements-embedded.txt"


def test_environment_yml_installs_the_lock():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    dependencies = environment["dependencies"]
    assert "python=3.11" in dependencies
    pip_sections = [d["pip"] for d in dependencies if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1
    pip = pip_sections[0]
    if pip != ["-r requirements-lock.txt"]:  # or a mirror of the lock, line for line
        mirrored = {canonicalize_name(p.split("==")[0]): Version(p.split("==")[1]) for p in pip}
        assert mirrored == locked_versions()


def test_setup_env_installs_lock_then_package_then_embedded():
    script = (ROOT / "scripts" / "setup_env.sh").read_text()
    installs = re.findall(r"pip install (.*)", script)
    targets = [line.split()[-1] for line in installs]
    assert targets == ["pip", "requirements-lock.txt", ".", "requirements-embedded.txt"]
    assert "--no-deps" in installs[2] and "--no-deps" in installs[3]
    stamp_line = next(line for line in script.splitlines() if line.startswith("wanted="))
    for name in ("requirements-lock.txt", "pyproject.toml", "requirements-embedded.txt"):
        assert name in stamp_line, f"the install stamp does not cover {name}"


def test_wheel_holds_every_module_and_the_package_data(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (source / name).write_bytes((ROOT / name).read_bytes())
    package_files = [p for p in (ROOT / "shortlab").rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts]
    for path in package_files:
        target = source / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=source, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = tmp_path.glob("shortlab-*.whl")
    assert wheel.name.startswith(f"shortlab-{shortlab.__version__}-")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    expected = {str(p.relative_to(ROOT)) for p in package_files}
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    assert any(n.startswith("shortlab/weights/") and n.endswith(".safetensors") for n in names)
    assert any(n.startswith("shortlab/model_configs/") and n.endswith(".json") for n in names)
    assert not any(n.startswith("tests/") for n in names)
