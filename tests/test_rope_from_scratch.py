"""The from-scratch bound experiment: scattered retrieval layout, the theorem's query–key
covariance weights, the crossed bootstrap, and the resumable script end to end (smoke size)."""

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from shortlab import rope
from shortlab.rope_experiment import (
    CharTokenizer, ExperimentConfig, RetrievalTask, base_for_bound, build_model, char_stream,
    checkpoint_path, crossed_bootstrap, crossing_distance, describe_half_accuracy, distance_batch,
    half_accuracy_distance, half_accuracy_summary, qk_pair_covariance, qk_pair_covariances,
    qk_pair_weights, repeated_sequence_batches, retrieval_example, rope_model_config, rotate, score_gap,
    score_gap_bound, summarize,
)
from shortlab.rope_experiment.from_scratch import generate_batches, worker_pool
from shortlab.stats import CONTRADICTED, SUPPORTED

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import rope_from_scratch  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "How vexingly quick daft zebras jump! ") * 60


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer()


@pytest.fixture(scope="module")
def text_ids(tokenizer):
    return char_stream(tokenizer, [TEXT])


# ----------------------------------------------------------------------------- layout

def test_anywhere_layout_puts_each_query_after_its_record_anywhere(tokenizer, text_ids):
    task = RetrievalTask(n_records=8, n_queries=5, layout="anywhere")
    rng = np.random.default_rng(0)
    first_query = []
    for _ in range(100):
        example = retrieval_example(text_ids, tokenizer, task, 128, rng)
        text = tokenizer.decode(example.input_ids)
        assert text.count("[") == 8 and text.count("?") == 5
        for key, value, answer, distance in zip(example.keys, example.values,
                                                example.answer_positions, example.distances):
            record = text.index("[" + key)
            assert text[record + 2] == value and text[answer[0]] == value
            assert text[answer[0] - 2: answer[0]] == "?" + key
            assert distance == (answer[0] - 1) - (record + 1) > 0
        first_query.append(example.answer_positions.min())
    assert min(first_query) < 40  # queries are not confined to the end


def test_anywhere_probes_have_exact_distances_and_spread_queries(tokenizer, text_ids):
    task = RetrievalTask(n_records=6, n_queries=1, layout="anywhere")
    width = task.record_length
    distances = [width + 2, 30, 128 - width + 1]
    batch = distance_batch(text_ids, tokenizer, task, 128, distances, per_distance=40, seed=0)
    assert batch["distances"][:, 0].tolist() == [d for d in distances for _ in range(40)]
    short = batch["answer_positions"][:40, 0, 0]
    assert short.min() < 40 and short.max() > 100  # a short distance is asked all over the context
    for ids, positions in zip(batch["input_ids"], batch["answer_positions"]):
        text = tokenizer.decode(ids.numpy())
        assert text.count("[") == 6
        key = text[positions[0, 0] - 1]
        assert text[text.index("[" + key) + 2] == text[positions[0, 0]]
    for impossible in (width + 1, 128 - width + 2):
        with pytest.raises(ValueError, match=rf"does not fit .* \[{width + 2}, {128 - width + 1}\]"):
            distance_batch(text_ids, tokenizer, task, 128, [impossible], 1, 0)


def test_depth_grid_places_the_record_independently_of_the_distance(tokenizer, text_ids):
    """At each (distance, depth) the record starts that fraction of the way through the starts
    that fit: depth 0 at the sequence start, depth 1 as late as the distance allows."""
    task = RetrievalTask(n_records=6, n_queries=1, layout="anywhere")
    width, length = task.record_length, 128
    distances, depths = [10, 60], [0.0, 0.5, 1.0]
    batch = distance_batch(text_ids, tokenizer, task, length, distances, per_distance=3, seed=0, depths=depths)
    assert batch["distances"][:, 0].tolist() == [d for d in distances for _ in depths for _ in range(3)]
    anchor = task.key_length + len(task.separator)
    answers = batch["answer_positions"][:, 0, 0].reshape(len(distances), len(depths), 3)
    for i, distance in enumerate(distances):
        last_start = length - width - distance + 1
        for j, depth in enumerate(depths):
            record_anchor = answers[i, j] - 1 - distance  # the query's anchor is just before its answer
            assert (record_anchor == round(depth * last_start) + anchor).all()
    assert answers[0, 0].max() < answers[0, 2].min()  # the same distance, the record early and late
    with pytest.raises(ValueError, match="a depth needs a distance"):
        retrieval_example(text_ids, tokenizer, task, length, np.random.default_rng(0), depth=0.5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        retrieval_example(text_ids, tokenizer, task, length, np.random.default_rng(0), distance=20, depth=1.5)


def test_repeated_sequences_repeat_their_first_half_and_mark_the_predictable_copies():
    first, second = (next(repeated_sequence_batches(96, 9, 3, seed=4)) for _ in range(2))
    ids, mask = first["input_ids"], first["answer_mask"]
    assert ids.shape == mask.shape == (3, 9) and ids.dtype == torch.long and 0 <= ids.min() and ids.max() < 96
    assert torch.equal(ids[:, 5:], ids[:, :4])  # half = 5: positions 5.. copy 0..
    assert mask.tolist() == [[False] * 6 + [True] * 3] * 3  # the first copied token is not predictable
    assert torch.equal(second["input_ids"], ids)  # seeded
    batches = repeated_sequence_batches(96, 9, 3, seed=4)
    next(batches)
    assert not torch.equal(next(batches)["input_ids"], ids)
    with pytest.raises(ValueError, match="length"):
        next(repeated_sequence_batches(96, 3, 1, seed=0))
    with pytest.raises(ValueError, match="induction_steps"):
        ExperimentConfig(induction_steps=-1)


def test_layout_is_validated():
    with pytest.raises(ValueError, match="unknown layout 'middle'"):
        RetrievalTask(layout="middle")
    assert RetrievalTask(n_records=4, n_queries=2, layout="anywhere").min_length() == 6 * 5


def test_generated_batches_are_deterministic_and_mark_the_answers(tokenizer, text_ids):
    task = RetrievalTask(n_records=4, n_queries=2, layout="anywhere")
    ids, mask = generate_batches(text_ids, task, 64, 3, 30, seed=4)
    again, _ = generate_batches(text_ids, task, 64, 3, 30, seed=4)
    other, _ = generate_batches(text_ids, task, 64, 3, 30, seed=5)
    assert ids.shape == mask.shape == (30, 3, 64) and ids.dtype == np.uint8
    np.testing.assert_array_equal(ids, again)
    assert not np.array_equal(ids, other)
    assert (mask.sum(-1) == 2).all()  # one answer digit per query
    assert set(tokenizer.decode(ids[mask])) <= set("0123456789")
    with worker_pool(2, text_ids) as pool:  # spawned processes generate the same chunks
        pooled, pooled_mask = generate_batches(text_ids, task, 64, 3, 30, seed=4, pool=pool)
    np.testing.assert_array_equal(pooled, ids)
    np.testing.assert_array_equal(pooled_mask, mask)


# ----------------------------------------------------------------------------- B_w

def test_pair_covariance_is_the_score_gap_of_rotated_vectors():
    """For correlated q and k, E[(R_(p+m)q)·(R_p k)] − E[(R_(p+m)q)·(R_p k')] (k' an independent
    key) equals Σ c_i cos(mθ_i) + s_i sin(mθ_i), in both pair layouts."""
    generator = torch.Generator().manual_seed(0)
    n, d, base = 200_000, 8, 10.0
    q = torch.randn(n, d, generator=generator, dtype=torch.float64) * torch.linspace(0.5, 2, d)
    mixing = torch.randn(d, d, generator=generator, dtype=torch.float64)
    k = q @ mixing + 0.3 * torch.randn(n, d, generator=generator, dtype=torch.float64) + 1.0
    independent = k[torch.randperm(n, generator=generator)]
    positions = torch.randint(0, 1000, (n,), generator=generator)
    for layout in ("half", "interleaved"):
        c, s = qk_pair_covariance(q, k, layout=layout)
        assert np.abs(s).max() > 0.1  # the sine term matters here
        thetas = rope.rope_frequencies(base, d)
        for m in (0, 1, 3, 7):
            rq = rotate(q, positions + m, base, layout=layout)
            gap = ((rq * rotate(k, positions, base, layout=layout)).sum(-1)
                   - (rq * rotate(independent, positions, base, layout=layout)).sum(-1))
            stderr = gap.std().item() / math.sqrt(n)
            assert abs(gap.mean().item() - score_gap(m, thetas, c, s)) < 5 * stderr + 1e-9


def test_pair_covariance_of_noisy_copies_is_the_theorems_two_sigma_squared():
    generator = torch.Generator().manual_seed(1)
    sigma = 0.7
    q = sigma * torch.randn(400_000, 16, generator=generator, dtype=torch.float64)
    k = q + 0.5 * torch.randn(400_000, 16, generator=generator, dtype=torch.float64)
    c, s = qk_pair_covariance(q, k)
    np.testing.assert_allclose(c, 2 * sigma**2, rtol=0.02)
    np.testing.assert_allclose(s, 0, atol=0.01)
    with pytest.raises(ValueError, match="aligned samples"):
        qk_pair_covariance(q, k[:, :8])


def test_score_gap_bound_reduces_to_the_plain_bound_and_flags_anticorrelation():
    thetas = rope.rope_frequencies(500.0, 32)
    ones, zeros = np.ones(16), np.zeros(16)
    assert score_gap_bound(thetas, ones, zeros, limit=10_000) == rope.max_context(500.0, 32)
    assert score_gap_bound(thetas, -ones, zeros, limit=100) == -1
    assert score_gap_bound(rope.rope_frequencies(1e9, 32), ones, zeros, limit=50) == 50
    np.testing.assert_allclose(score_gap(np.arange(5), thetas, ones, zeros),
                               rope.rope_bias(np.arange(5), 500.0, 32))


def test_model_covariances_match_the_captured_projections_and_remove_their_hooks():
    torch.manual_seed(0)
    config = rope_model_config(100.0, CharTokenizer().vocab_size, context=64, hidden_size=32,
                               num_layers=2, head_dim=8, intermediate_size=64)
    model = build_model(config, 0).eval()
    ids = torch.randint(0, config.vocab_size, (3, 40))
    c, s = qk_pair_covariances(model, ids)
    assert c.shape == s.shape == (2, 4, 4)
    assert all(not layer.self_attn.q_proj._forward_hooks for layer in model.model.layers)
    captured = {}
    handles = [model.model.layers[1].self_attn.q_proj.register_forward_hook(
                   lambda m, a, out: captured.__setitem__("q", out)),
               model.model.layers[1].self_attn.k_proj.register_forward_hook(
                   lambda m, a, out: captured.__setitem__("k", out))]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    q, k = captured["q"].unflatten(-1, (4, 8)), captured["k"].unflatten(-1, (4, 8))
    expected = qk_pair_covariance(q[..., 2, :], k[..., 2, :], layout="half")
    np.testing.assert_allclose(c[1, 2], expected[0])
    np.testing.assert_allclose(s[1, 2], expected[1])
    assert qk_pair_weights(model, ids).shape == (2, 4, 4)


# ----------------------------------------------------------------------------- analysis

def test_crossed_bootstrap_pairs_terms_and_widens_with_seed_spread():
    subsets = {"a": np.arange(0, 50), "b": np.arange(50, 100)}
    values = np.zeros((3, 100))
    values[:, :50] = 1
    exact = crossed_bootstrap([(1.0, values, "b"), (-1.0, values, "a")], subsets)
    assert (exact.estimate, exact.low, exact.high) == (-1.0, -1.0, -1.0)
    rng = np.random.default_rng(0)
    noisy = (rng.random((3, 100)) < np.array([[0.2], [0.5], [0.8]])).astype(float)
    spread = crossed_bootstrap([(1.0, noisy, "a")], subsets)
    assert spread.high - spread.low > 0.3  # seeds this different cannot give a narrow interval
    paired = crossed_bootstrap([(1.0, noisy, "a"), (-1.0, noisy, "a")], subsets)
    assert paired.low == paired.high == 0.0


def test_crossing_distance_interpolates_and_marks_curves_that_never_cross():
    distances = [10, 20, 40]
    curves = np.array([[1.0, 0.8, 0.2],   # crosses 0.5 halfway between 20 and 40
                       [1.0, 1.0, 0.9],   # never does
                       [0.4, 0.3, 0.1],   # already below at the first distance
                       [1.0, 0.5, 0.5]])  # reaches the level exactly at 20
    assert crossing_distance(distances, curves, 0.5).tolist() == [30.0, math.inf, 10.0, 20.0]
    with pytest.raises(ValueError, match="distances must increase"):
        crossing_distance([20, 10], np.ones(2), 0.5)
    with pytest.raises(ValueError, match="must match the 3 distances"):
        crossing_distance(distances, np.ones(2), 0.5)


def test_half_accuracy_distance_brackets_the_crossing_and_reports_censoring():
    rng = np.random.default_rng(0)
    distances = np.array([10, 20, 30, 40, 50])
    truth = np.array([1.0, 1.0, 0.9, 0.2, 0.1])  # halfway level (1 + 0.1) / 2 = 0.55 between 30 and 40
    correct = (rng.random((3, 5, 200)) < truth[None, :, None]).astype(float)
    half = half_accuracy_distance(distances, correct, chance=0.1)
    assert 30 < half.low <= half.estimate <= half.high < 40
    assert abs(half.estimate - 35) < 2
    never = half_accuracy_distance(distances, np.ones((3, 5, 20)), chance=0.1)
    assert never.estimate == never.low == never.high == math.inf
    with pytest.raises(ValueError, match="seeds, distances, trials"):
        half_accuracy_distance(distances, np.ones((5, 20)), chance=0.1)
    with pytest.raises(ValueError, match="n_resamples must be at least 100"):
        half_accuracy_distance(distances, correct, chance=0.1, n_resamples=10)
    with pytest.raises(ValueError, match="level must be in"):
        half_accuracy_distance(distances, correct, chance=0.1, level=95)


def test_half_accuracy_summary_is_json_safe_and_judges_only_bounds_inside_the_grid():
    distances = [10, 20, 40]
    failing = np.zeros((2, 3, 10))
    failing[:, 0] = 1  # perfect at 10, nothing from 20 on
    inside = half_accuracy_summary(distances, failing, chance=0.0, bound=12)
    assert inside["distance"]["estimate"] == pytest.approx(15.0) and inside["bound"] == 12
    assert inside["verdict"] == SUPPORTED and not inside["below_at_shortest"]
    assert "halves at 15 [15, 15] = 1.25 [1.25, 1.25] × L_θ" in describe_half_accuracy(inside, distances)
    early = half_accuracy_summary(distances, failing, chance=0.0, bound=30)
    assert early["verdict"] == CONTRADICTED  # retrieval gone well before the bound
    perfect = half_accuracy_summary(distances, np.ones((2, 3, 10)), chance=0.0, bound=12)
    json.dumps(perfect, allow_nan=False)  # no infinity in the file
    assert perfect["over_bound"]["estimate"] is None and perfect["verdict"] == SUPPORTED
    assert "does not halve within the probed distances (up to 40 = 3.33 × L_θ)" in describe_half_accuracy(perfect, distances)
    beyond = half_accuracy_summary(distances, np.ones((2, 3, 10)), chance=0.0, bound=100)
    assert "verdict" not in beyond and "no verdict" in describe_half_accuracy(beyond, distances)
    never = half_accuracy_summary(distances, np.zeros((2, 3, 10)), chance=0.0, bound=12)
    assert never["below_at_shortest"] and "already at the shortest distance, 10" in describe_half_accuracy(never, distances)
    assert "not computed" in describe_half_accuracy(None, distances)


def _fake_results(correct_by_base: dict[float, np.ndarray], config: ExperimentConfig) -> dict:
    """A results file as ``run_experiment`` writes it, with given 0/1 outcomes per base."""
    runs = {}
    for base, correct in correct_by_base.items():
        for seed_index, seed in enumerate(config.seeds):
            runs[f"{base!r}|{seed}"] = {
                "base": base, "seed": seed, "correct": correct[seed_index].tolist(),
                "bin_nll": np.full((4, config.position_bins), 10.0).tolist(),
                "bin_counts": [16] * config.position_bins,
                "covariance_bounds": [[5, 9]], "variance_bounds": [[7, 8]]}
    return {"config": {**config.__dict__}, "distances": config.distances(),
            "position_edges": config.position_edges(),
            "bases": [{"base": b, "bound": config.bound(b), "control": b == config.pretrain_base}
                      for b in correct_by_base],
            "pretrained": {"correct": np.ones((len(config.distances()), 10)).tolist()},
            "runs": runs}


def test_summary_verdicts_follow_the_outcomes():
    config = ExperimentConfig(context=64, head_dim=16, bases=(30.0,), pretrain_base=1e6,
                              seeds=(0, 1, 2), probe_distances=(8, 12, 30, 50), probe_trials=10,
                              position_bins=4, n_records=4, n_queries=2)
    bound = config.bound(30.0)
    assert 12 <= bound < 30
    within = np.array(config.distances()) <= bound
    failing = np.ones((3, 4, 10))
    failing[:, ~within] = 0
    summary = summarize(_fake_results({30.0: failing, 1e6: np.ones((3, 4, 10))}, config))
    row = next(r for r in summary["bases"] if r["base"] == 30.0)
    assert row["verdict"] == SUPPORTED and row["relative_verdict"] == SUPPORTED
    assert row["beyond"]["rate"] == 0 and row["within"]["rate"] == 1
    assert row["accuracy"][0]["per_seed"] == [1.0, 1.0, 1.0]
    assert summary["pretrained"]["learned"] == SUPPORTED
    assert row["perplexity_verdict"] == SUPPORTED  # same NLL as the control: comparable within the tolerance
    control = next(r for r in summary["bases"] if r["base"] == 1e6)
    last_within, first_beyond = config.distances()[int(within.sum()) - 1: int(within.sum()) + 1]
    half = row["half_accuracy"]  # accuracy 1 at last_within, 0 at first_beyond: linear in between
    expected = last_within + (1 - half["halfway_level"]) * (first_beyond - last_within)
    assert half["halfway_level"] == pytest.approx((1 + summary["chance"]) / 2)
    assert half["distance"]["estimate"] == pytest.approx(expected)
    assert half["over_bound"]["estimate"] == pytest.approx(expected / bound)
    assert half["verdict"] == SUPPORTED and "verdict" not in control["half_accuracy"]
    assert control["half_accuracy"]["distance"]["estimate"] is None  # perfect at every distance: beyond the grid
    flat = summarize(_fake_results({30.0: np.ones((3, 4, 10)), 1e6: np.ones((3, 4, 10))}, config))
    assert flat["bases"][0]["verdict"] == CONTRADICTED  # retrieves beyond its bound


def test_bases_for_fractions_put_the_bound_at_least_there():
    config = ExperimentConfig()
    bases = config.finetune_bases()
    assert bases[-1] == config.pretrain_base and len(bases) == len(config.bound_fractions) + 1
    for fraction, base in zip(config.bound_fractions, bases):
        # the default design: every bound at least its target and at most a fifth of the context
        assert round(fraction * config.context) <= config.bound(base) <= config.context / 5
    assert config.bound(config.pretrain_base) > config.context
    assert base_for_bound(16, 32) == bases[0]
    distances = config.distances()  # geometric: as many short distances as long ones
    assert len(distances) >= 15 and sum(d <= config.context / 8 for d in distances) >= len(distances) / 3
    with pytest.raises(ValueError, match="must put the bound above the context"):
        ExperimentConfig(context=128, head_dim=32, pretrain_base=500.0)
    with pytest.raises(ValueError, match="probe distances must lie in"):
        ExperimentConfig(context=64, probe_distances=(2,), n_records=4, n_queries=2)


# ----------------------------------------------------------------------------- script

def test_script_smoke_run_resumes_and_refuses_another_config(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    text_file = tmp_path / "text.json"
    text_file.write_text(json.dumps({"source": "test", "train": TEXT * 3, "eval": TEXT}))
    output = tmp_path / "out" / "results.json"
    args = ["--smoke", "--device", "cpu", "--output", str(output), "--text-file", str(text_file)]
    assert rope_from_scratch.main(args) == 0
    results = json.loads(output.read_text())
    config = rope_from_scratch.config_from(rope_from_scratch.parse_args(args))
    assert len(config.pretrain_seeds) == 2 and all(checkpoint_path(output, seed).is_file() for seed in config.pretrain_seeds)
    for seed in config.pretrain_seeds:
        assert results["pretrained"][str(seed)]["induction"]["steps"] == results["config"]["induction_steps"] > 0
        curriculum = results["pretrained"][str(seed)]["short_context"]
        assert curriculum["steps"] == config.curriculum_steps() > 0 and curriculum["context"] < config.context
        assert len(curriculum["history"]["answer_loss"]) == config.curriculum_steps()
    assert len(results["summary"]["pretrained"]["by_depth"]) == len(config.probe_depths)
    assert len(results["runs"]) == len(config.models()) * len(config.finetune_bases())
    assert results["sessions"][0]["command"] and "git_revision" in results["sessions"][0]
    # every probe distance holds its depths x trials, and the summary reads them back per depth
    assert all(len(row) == len(config.probe_depths) * config.probe_trials for run in results["runs"].values()
               for row in run["correct"])
    assert all(len(row["by_depth"]) == len(config.probe_depths) and "depth_verdict" in row
               for row in results["summary"]["bases"])
    assert {row["base"] for row in results["summary"]["bases"]} == set(config.finetune_bases())
    first = {key: run["seconds"] for key, run in results["runs"].items()}
    # a rerun finds every run done: nothing is retrained
    monkeypatch.setattr("shortlab.rope_experiment.from_scratch.train_lm",
                        lambda *a, **k: pytest.fail("a finished run was retrained"))
    assert rope_from_scratch.main(args) == 0
    assert {k: r["seconds"] for k, r in json.loads(output.read_text())["runs"].items()} == first
    with pytest.raises(ValueError, match="another configuration .*pretrain_base"):
        rope_from_scratch.main(args + ["--pretrain-base", "1e7"])  # --smoke fixes the sizes, not the base
    assert not list(output.parent.glob(".*"))  # no temporary files left behind


def test_a_schema_one_store_reads_the_same_after_the_upgrade():
    """The committed store of the first design (one pretrained model, no depth grid, distances
    spread linearly) upgrades to the current schema meaning the same: every run under its
    (base, pretraining seed, seed), the same probe distances, and a summary of every base."""
    from shortlab.plotting import repository_root
    from shortlab.rope_experiment.from_scratch import SCHEMA, base_runs, run_key, upgrade

    stored = json.loads((repository_root() / "results" / "rope_from_scratch" / "results.json").read_text())
    assert stored.get("schema", 1) == 1
    upgraded = upgrade(stored)
    assert upgraded["schema"] == SCHEMA and upgrade(upgraded) is upgraded
    config = ExperimentConfig.from_dict(upgraded["config"])
    pretrain_seed = stored["config"]["pretrain_seed"]
    assert config.pretrain_seeds == (pretrain_seed,) and not config.probe_depths
    assert config.distances() == upgraded["distances"] == stored["distances"]
    assert len(upgraded["runs"]) == len(stored["runs"])
    for run in stored["runs"].values():
        assert upgraded["runs"][run_key(run["base"], pretrain_seed, run["seed"])] == {**run, "pretrain_seed": pretrain_seed}
    assert all(base_runs(upgraded, entry["base"]) for entry in upgraded["bases"])
    assert upgraded["pretrained"] == {str(pretrain_seed): stored["pretrained"]}
    assert [row["base"] for row in summarize(upgraded)["bases"]] == [entry["base"] for entry in stored["bases"]]


def test_the_pretrained_model_is_judged_at_the_depth_where_it_retrieves_worst():
    """Perfect with the record first (no other record before the query: copying any value is
    right) and at chance with it last must read as not learned, however good the pooled rate."""
    config = ExperimentConfig(context=64, head_dim=16, pretrain_base=1e6, probe_distances=(8, 12, 50),
                              probe_depths=(0.0, 1.0), probe_trials=10, position_bins=4, n_records=4, n_queries=2,
                              short_context=32, short_context_steps=4)
    from shortlab.rope_experiment.from_scratch import _short_distance_accuracy, short_distance_outcomes

    correct = np.zeros((3, 20), dtype=int)
    correct[:, :10] = 1  # depth 0 right every time, depth 1 never
    first, last = short_distance_outcomes(config, correct)
    assert first.tolist() == [1] * 20 and last.tolist() == [0] * 20  # distances 8 and 12 (<= 64 / 4) only
    assert _short_distance_accuracy(config, correct).estimate == 0
    results = {"schema": 2, "config": asdict(config), "distances": config.distances(), "depths": [0.0, 1.0],
               "position_edges": config.position_edges(), "bases": [], "runs": {},
               "pretrained": {"0": {"correct": correct.tolist()}}}
    pretrained = summarize(results)["pretrained"]
    assert pretrained["short_distance_accuracy"]["rate"] == 0.5 and pretrained["hardest_depth"] == 1.0
    assert [r["rate"] for r in pretrained["by_depth"]] == [1.0, 0.0]
    assert pretrained["learned"] == CONTRADICTED
    correct[:, 10:] = 1
    assert summarize({**results, "pretrained": {"0": {"correct": correct.tolist()}}})["pretrained"]["learned"] == SUPPORTED


def test_the_length_curriculum_is_validated_and_absent_from_older_stores():
    with pytest.raises(ValueError, match="short_context 40 cannot hold the task"):
        ExperimentConfig(short_context=40)
    with pytest.raises(ValueError, match="short_context_steps must be >= 0"):
        ExperimentConfig(short_context_steps=-1)
    assert ExperimentConfig(short_context=40, short_context_steps=0).curriculum_steps() == 0  # unused: not checked
    assert ExperimentConfig(short_context=512).curriculum_steps() == 0  # not shorter than the context: none
    assert ExperimentConfig().curriculum_steps() == ExperimentConfig().short_context_steps > 0
    stored = asdict(ExperimentConfig())
    del stored["short_context"], stored["short_context_steps"]
    assert ExperimentConfig.from_dict(stored).short_context_steps == 0
