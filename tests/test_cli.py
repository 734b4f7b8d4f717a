"""The command line (``python -m shortlab``), run in-process through ``shortlab.cli.main`` except
for one real subprocess; and ``contribution.mean_layer_contribution`` behind shortv-layers."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shortlab import cli
from shortlab.contribution import layer_contribution, mean_layer_contribution, token_groups
from shortlab.data import calibration_batch, iter_batches
from shortlab.metrics import block_influence
from shortlab.models import load_model
from shortlab.pruning import RANKINGS, rank_layers, remove_layers
from shortlab.rope import max_context, min_base, rope_report, shipped_configs

REPO = Path(__file__).resolve().parents[1]
SMALL_CALIBRATION = ["--blocks", "2", "--block-size", "64"]
PROMPT = "The capital of France is"


def run(argv, capsys):
    """(exit status, stdout, stderr) of ``main(argv)``."""
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_usage_error(argv, capsys, *fragments):
    """Exit status 2, one line on stderr naming the problem, no traceback."""
    status, _, err = run(argv, capsys)
    assert status == 2
    lines = [line for line in err.splitlines() if line.startswith("shortlab: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def greedy_tokens(model, tokenizer, n=10):
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def small_batches(tokenizer):
    """The calibration the CLI builds from SMALL_CALIBRATION (wiki, seed 0, batches of 8)."""
    return list(iter_batches(calibration_batch(tokenizer, "wiki", 2, 64, seed=0), 8))


@pytest.fixture(scope="module")
def tiny_llama():
    return load_model("tiny-llama")


# ---------------------------------------------------------------- the module entry point


def test_help_runs_as_a_real_subprocess():
    result = subprocess.run([sys.executable, "-m", "shortlab", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for command in ("prune", "heal", "rope-bound", "shortv-layers"):
        assert command in result.stdout


def test_a_bad_metric_in_a_subprocess_exits_2_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "shortlab", "prune", "tiny-llama", "--remove", "1",
         "--metric", "cosine", "--output", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "unknown metric 'cosine'" in result.stderr and "block_influence" in result.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- prune


def test_prune_tiny_llama_saves_a_checkpoint_plain_transformers_loads(tmp_path, capsys,
                                                                      tiny_llama):
    model, tokenizer = tiny_llama
    output = tmp_path / "pruned"
    status, out, _ = run(["prune", "tiny-llama", "--remove", "2", *SMALL_CALIBRATION,
                          "--output", str(output)], capsys)
    assert status == 0
    expected = rank_layers("block_influence", model, small_batches(tokenizer), 2)
    scores = block_influence(model, small_batches(tokenizer))

    reloaded = AutoModelForCausalLM.from_pretrained(output)
    record = reloaded.config.shortlab_pruning
    assert record["removed_layers"] == expected
    assert record["kept_layers"] == [i for i in range(4) if i not in expected]
    assert record["metric"] == "block_influence" and record["source_model"] == "tiny-llama"
    assert record["source_num_layers"] == 4 and reloaded.config.num_hidden_layers == 2
    assert record["scores"] == pytest.approx({str(i): s for i, s in scores.items()}, rel=1e-5)
    assert record["removed_scores"] == pytest.approx([scores[i] for i in expected], rel=1e-5)
    assert record["calibration"] == {"source": "wiki", "split": "calib", "blocks": 2,
                                     "block_size": 64, "batch_size": 8, "seed": 0, "mode": "pack"}
    assert record["shortlab_version"] == cli.shortlab_version() != "unknown"

    in_memory = remove_layers(model, expected)
    assert greedy_tokens(reloaded, AutoTokenizer.from_pretrained(output)) == \
        greedy_tokens(in_memory, tokenizer)
    assert greedy_tokens(in_memory, tokenizer) != greedy_tokens(model, tokenizer)

    card = (output / "README.md").read_text()
    assert f"**{', '.join(map(str, sorted(expected)))}**" in card
    for layer in range(4):
        removed = "yes" if layer in expected else ""
        assert f"| {layer} | {scores[layer]:.6g} | {removed} |" in card
    assert "AutoModelForCausalLM.from_pretrained" in card
    assert f"removed 2 of 4 decoder layers {sorted(expected)}" in out
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]  # no temporary folder left


def test_prune_smollm2_reloads_and_generates_the_same_tokens(tmp_path, capsys, smollm2):
    model, tokenizer = smollm2
    output = tmp_path / "smollm2-pruned"
    status, _, _ = run(["prune", "smollm2-135m", "--remove", "3", *SMALL_CALIBRATION,
                        "--calibration", "wiki", "--output", str(output)], capsys)
    assert status == 0
    expected = rank_layers("block_influence", model, small_batches(tokenizer), 3)
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    record = json.loads((output / "config.json").read_text())["shortlab_pruning"]
    assert record["removed_layers"] == expected and reloaded.config.num_hidden_layers == 27
    in_memory = remove_layers(model, expected)  # a copy: the session fixture stays whole
    tokens = greedy_tokens(in_memory, tokenizer)
    assert greedy_tokens(reloaded, AutoTokenizer.from_pretrained(output)) == tokens
    assert len(tokens) == 10
    card = (output / "README.md").read_text()
    for layer in expected:
        assert f"| {layer} | {record['scores'][str(layer)]:.6g} | yes |" in card


@pytest.mark.parametrize("metric", sorted(RANKINGS))
def test_choose_layers_removes_what_rank_layers_removes(metric, tiny_llama):
    model, tokenizer = tiny_llama
    batches = small_batches(tokenizer)
    before = copy.deepcopy(model.state_dict())
    choice = cli.choose_layers(model, batches, metric, 2, seed=3)
    assert choice.removed == rank_layers(metric, model, batches, 2, seed=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    if metric in ("block_influence", "iterative_block_influence"):
        first_bi = block_influence(model, batches)
        assert choice.scores[choice.removed[0]] == pytest.approx(min(first_bi.values()))
    if metric == "iterative_block_influence":
        assert sorted(choice.scores) == sorted(choice.removed)  # BI at the step of removal
    if metric == "angular_distance":
        assert sorted(choice.scores) == [0, 1, 2]  # block starts for blocks of 2 in 4 layers
        assert min(choice.scores, key=choice.scores.get) == choice.removed[0]
    if metric in ("reverse_order", "random"):
        assert choice.scores == {}
    assert cli.calibration_passes(metric, 2) == (
        0 if metric in ("reverse_order", "random") else 2 if metric.startswith("iterative") else 1)


def test_prune_named_layers_records_scores_of_the_given_metric(tmp_path, capsys, tiny_llama):
    model, tokenizer = tiny_llama
    output = tmp_path / "out"
    status, _, _ = run(["prune", "tiny-llama", "--layers", "3,-3", "--metric",
                        "relative_magnitude", *SMALL_CALIBRATION, "--output", str(output)], capsys)
    assert status == 0
    record = json.loads((output / "config.json").read_text())["shortlab_pruning"]
    assert record["metric"] == "manual" and record["score_metric"] == "relative_magnitude"
    assert record["removed_layers"] == [1, 3] and record["kept_layers"] == [0, 2]
    from shortlab.pruning import relative_magnitude

    scores = relative_magnitude(model, small_batches(tokenizer))
    assert record["removed_scores"] == pytest.approx([scores[1], scores[3]], rel=1e-5)


def test_prune_without_data_needs_no_calibration(tmp_path, capsys):
    output = tmp_path / "out"
    status, out, _ = run(["prune", "tiny-llama", "--remove", "1", "--metric", "reverse_order",
                          "--blocks", "0", "--output", str(output)], capsys)
    assert status == 0  # --blocks 0 is not used: reverse order reads no data
    record = json.loads((output / "config.json").read_text())["shortlab_pruning"]
    assert record["removed_layers"] == [3] and record["calibration"] is None
    assert record["scores"] == {} and "## Scores" not in (output / "README.md").read_text()
    assert "No calibration data" in (output / "README.md").read_text()


def test_overwrite_replaces_a_non_empty_output(tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    status, _, _ = run(["prune", "tiny-llama", "--remove", "1", "--metric", "random",
                        "--output", str(output), "--overwrite"], capsys)
    assert status == 0
    assert not (output / "old.txt").exists() and (output / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_existing_empty_output_folder_is_used(tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    assert run(["prune", "tiny-llama", "--remove", "1", "--metric", "random",
                "--output", str(output)], capsys)[0] == 0
    assert (output / "model.safetensors").is_file()


def test_a_failed_write_leaves_the_output_untouched(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")

    def failing_write(folder):
        (folder / "partial").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        cli.write_directory_atomically(output, failing_write, overwrite=True)
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("argv, fragments", [
    (["--metric", "cosine", "--remove", "1"], ["unknown metric 'cosine'", "angular_distance",
                                               "iterative_block_influence", "reverse_order"]),
    (["--remove", "4"], ["--remove 4", "4 decoder layers", "at most 3"]),
    (["--remove", "0"], ["--remove 0"]),
    (["--layers", "1,4"], ["layer index 4 is out of range", "4 layers"]),
    (["--layers", "0,1,2,3"], ["all 4 decoder layers"]),
    (["--layers", "1,x"], ["--layers '1,x'"]),
    (["--layers", "1", "--metric", "random"], ["--metric random chooses layers itself"]),
    (["--layers", "1", "--remove", "1"], ["not allowed with argument"]),
    (["--remove", "1", "--blocks", "0"], ["empty calibration set", "--blocks 0"]),
    (["--remove", "1", "--block-size", "1"], ["empty calibration set"]),
    (["--remove", "1", "--calibration", "novels"], ["invalid choice: 'novels'"]),
])
def test_prune_errors(argv, fragments, tmp_path, capsys):
    output = tmp_path / "out"
    assert_usage_error(["prune", "tiny-llama", *argv, "--output", str(output)], capsys,
                       *fragments)
    assert not output.exists()


def test_prune_refuses_an_existing_output(tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "mine.txt").write_text("keep")
    assert_usage_error(["prune", "tiny-llama", "--remove", "1", "--output", str(output)], capsys,
                       "exists and is not empty", "--overwrite")
    assert [p.name for p in output.iterdir()] == ["mine.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_usage_error(["prune", "tiny-llama", "--remove", "1", "--output", str(a_file)], capsys,
                       "is not a folder")


def test_unknown_model_is_a_usage_error(tmp_path, capsys):
    assert_usage_error(["prune", "no-such-model-here", "--remove", "1", "--output",
                        str(tmp_path / "out")], capsys, "no-such-model-here")


def test_trust_remote_code_reaches_load_model(monkeypatch):
    calls = []

    def fake_load_model(name, dtype=None, device=None, trust_remote_code=False):
        calls.append(trust_remote_code)
        return "model", "tokenizer"

    monkeypatch.setattr("shortlab.models.load_model", fake_load_model)
    cli._load("x", None, None, trust_remote_code=False)
    cli._load("x", None, None, trust_remote_code=True)
    assert calls == [False, True]


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(IndexError, match="out of range"):
        cli.main(["--debug", "prune", "tiny-llama", "--layers", "9", "--output",
                  str(tmp_path / "out")])


# ---------------------------------------------------------------- rope-bound


def test_rope_bound_context_is_min_base(capsys):
    expected = min_base(4096, 64)
    status, out, _ = run(["rope-bound", "--context", "4K", "--head-dim", "64", "--json"], capsys)
    assert status == 0
    result = json.loads(out)
    assert result["smallest"] == expected.smallest and result["context"] == 4096
    assert result["stable"] == expected.stable
    status, out, _ = run(["rope-bound", "--context", "4096", "--head-dim", "64"], capsys)
    assert status == 0 and f"smallest base: {expected.smallest:.10g}" in out
    half_open = min_base(4096, 64, m_range="half_open")
    status, out, _ = run(["rope-bound", "--context", "4096", "--head-dim", "64", "--m-range",
                          "half_open", "--json"], capsys)
    assert json.loads(out)["smallest"] == half_open.smallest


def test_rope_bound_base_is_max_context(capsys):
    status, out, _ = run(["rope-bound", "--base", "10000", "--head-dim", "128", "--json"], capsys)
    assert status == 0
    assert json.loads(out)["max_context"] == max_context(10000, 128)
    status, out, _ = run(["rope-bound", "--base", "10000", "--head-dim", "128"], capsys)
    assert f"longest context {max_context(10000, 128)} " in out
    status, out, _ = run(["rope-bound", "--base", "1e9", "--head-dim", "128", "--limit", "1000"],
                         capsys)
    assert "at least 1000" in out


def test_rope_bound_of_a_shipped_config_file(capsys):
    path = REPO / "shortlab" / "model_configs" / "llama-2-7b.json"
    status, out, _ = run(["rope-bound", "--config", str(path), "--json"], capsys)
    assert status == 0
    rows = json.loads(out)
    (expected,) = rope_report({str(path): shipped_configs()["llama-2-7b"]})
    assert rows == [expected]
    assert expected["advertised"] == 4096
    status, out, _ = run(["rope-bound", "--model", "llama-2-7b"], capsys)
    assert f"bound {expected['bound']}" in out and "advertised context 4096" in out


def test_rope_bound_reads_every_variant_of_a_sliding_window_model(capsys):
    status, out, _ = run(["rope-bound", "--model", "gemma-3-4b", "--json"], capsys)
    assert status == 0
    assert {row["layer_type"] for row in json.loads(out)} == {"sliding_attention",
                                                              "full_attention"}


def test_rope_bound_of_a_tiny_model_and_a_local_folder(tmp_path, capsys, tiny_llama):
    status, out, _ = run(["rope-bound", "--model", "tiny-llama", "--json"], capsys)
    assert status == 0
    (row,) = json.loads(out)
    assert row["base"] == 10000.0 and row["head_dim"] == 16 and row["advertised"] == 512
    tiny_llama[0].config.save_pretrained(tmp_path)
    status, out, _ = run(["rope-bound", "--model", str(tmp_path), "--json"], capsys)
    assert status == 0 and json.loads(out)[0]["bound"] == row["bound"]


@pytest.mark.parametrize("argv, fragment", [
    ([], "exactly one of"),
    (["--context", "4096", "--base", "10000", "--head-dim", "64"], "exactly one of"),
    (["--context", "4096"], "need --head-dim"),
    (["--model", "llama-2-7b", "--head-dim", "64"], "drop it"),
    (["--config", "/no/such/config.json"], "--config /no/such/config.json"),
    (["--model", "nobody/no-such-model"], "cannot read the config of 'nobody/no-such-model'"),
    (["--context", "4096", "--head-dim", "63"], "head_dim"),
])
def test_rope_bound_errors(argv, fragment, capsys):
    assert_usage_error(["rope-bound", *argv], capsys, fragment)


# ---------------------------------------------------------------- shortv-layers


@pytest.fixture(scope="module")
def tiny_llava():
    return load_model("tiny-llava")


def test_shortv_layers_on_tiny_llava(capsys, tiny_llava):
    model, processor = tiny_llava
    status, out, _ = run(["shortv-layers", "tiny-llava", "--frozen", "2", "--questions", "3",
                          "--batch-size", "2", "--json"], capsys)
    assert status == 0
    result = json.loads(out)
    # notebook 02's recipe: per-batch LC weighted by the batch's questions, over all questions
    totals = torch.zeros(4, dtype=torch.float64)
    for batch in cli.vqa_calibration_batches(processor, 3, 2, seed=0):
        values = layer_contribution(model, batch, token_groups(model, batch["input_ids"],
                                                               batch["attention_mask"])["visual"])
        totals += len(batch["input_ids"]) * torch.tensor([values[i] for i in range(4)])
    expected = (totals / 3).tolist()
    got = [result["visual_layer_contribution"][str(i)] for i in range(4)]
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert result["frozen_layers"] == sorted(sorted(range(4), key=lambda i: (got[i], i))[:2])
    status, out, _ = run(["shortv-layers", "tiny-llava", "--frozen", "2", "--questions", "3",
                          "--batch-size", "2"], capsys)
    assert f"layers: {','.join(map(str, result['frozen_layers']))}" in out


@pytest.mark.parametrize("model, argv, fragment", [
    ("tiny-llava", ["--frozen", "0"], "--frozen 0"),
    ("tiny-llava", ["--frozen", "5"], "4 decoder layers"),
    ("tiny-llava", ["--frozen", "1", "--questions", "0"], "--questions 0"),
    ("tiny-llama", ["--frozen", "1"], "LLaVA-style"),
])
def test_shortv_layers_errors(model, argv, fragment, capsys):
    assert_usage_error(["shortv-layers", model, *argv], capsys, fragment)


# ---------------------------------------------------------------- mean_layer_contribution


def _same_length_batch(model, processor, n_rows):
    """n_rows questions of one text on different images: no padding, so the rows are
    independent and LC of the whole batch is the mean of its rows' LC."""
    from shortlab import llava_mini as lm

    images = [lm.easy_vqa_image("train", image_id) for image_id in range(n_rows)]
    text = lm.chat_text(processor, "what color is the shape?")
    batch = dict(processor(images=images, text=[text] * n_rows, return_tensors="pt"))
    assert batch["attention_mask"].all()
    return batch


def _rows(batch, start, stop):
    return {name: tensor[start:stop] for name, tensor in batch.items()}


def test_mean_layer_contribution_weights_each_question_once(tiny_llava):
    model, processor = tiny_llava
    batch = _same_length_batch(model, processor, 4)
    whole = layer_contribution(model, batch, token_groups(model, batch["input_ids"])["visual"])
    split = [_rows(batch, 0, 1), _rows(batch, 1, 2), _rows(batch, 2, 4)]  # unequal batch sizes
    mean = mean_layer_contribution(model, iter(split))
    assert list(mean) == [0, 1, 2, 3]
    for layer in whole:
        assert mean[layer] == pytest.approx(whole[layer], rel=1e-6, abs=1e-12)
    per_batch = [layer_contribution(model, b, token_groups(model, b["input_ids"])["visual"])
                 for b in split]
    unweighted = {layer: sum(v[layer] for v in per_batch) / 3 for layer in whole}
    assert any(abs(unweighted[layer] - whole[layer]) > 1e-6 * abs(whole[layer]) for layer in whole)


def test_mean_layer_contribution_groups_layers_and_errors(tiny_llava):
    model, processor = tiny_llava
    batch = _same_length_batch(model, processor, 2)
    text = mean_layer_contribution(model, [batch], group="text", layers=(-1, 1))
    visual_mask = token_groups(model, batch["input_ids"])["visual"]
    as_function = mean_layer_contribution(model, [batch], group=lambda b: ~visual_mask,
                                          layers=[1, 3])
    assert list(text) == [1, 3]
    assert text == pytest.approx(as_function, rel=1e-9)
    assert text == pytest.approx(layer_contribution(model, batch, ~visual_mask, layers=[1, 3]))
    with pytest.raises(ValueError, match="unknown token group 'audio'"):
        mean_layer_contribution(model, [batch], group="audio")
    with pytest.raises(ValueError, match="empty calibration set"):
        mean_layer_contribution(model, [])
