"""Atomic writes (``shortlab.files``): whole files or the previous file, readable by everyone."""

import json
import stat

import pytest

from shortlab.files import write_atomically, write_json_atomically


def test_json_round_trips_into_new_folders_readable_by_everyone(tmp_path):
    path = write_json_atomically(tmp_path / "a" / "b.json", {"x": [1, 2.5, None]}, indent=1)
    assert json.loads(path.read_text()) == {"x": [1, 2.5, None]}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = write_json_atomically(tmp_path / "r.json", {"kept": True})

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_atomically(path, fail)
    assert json.loads(path.read_text()) == {"kept": True}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
