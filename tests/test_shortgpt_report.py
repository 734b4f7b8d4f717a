"""Notebook 01's report functions on toy inputs whose answers are known (the notebook's FAST run
exercises all of them on a tiny model)."""

import numpy as np
import pytest

from shortlab import shortgpt_report as report
from shortlab.findings import _CONCLUSION
from shortlab.references import paper_numbers
from shortlab.stats import CANNOT_TELL, SUPPORTED, Interval

OPTIONS = {"explorer_blocks": 4, "device_map": None, "calib_source": "wiki", "n_calib": 16, "seq_len": 256,
           "eval_source": "wiki", "eval_seq_len": 512, "dense_blocks": 256, "max_remove": 12, "remove_step": 4,
           "random_draws": 20, "random_blocks": 8, "task_rankings": None, "quant_bits": 4, "quant_group": 32,
           "batch_size": 8, "heal_method": "lora", "heal_steps": 100, "heal_batch": 4, "heal_block": 256,
           "heal_warmup": 10, "heal_dtype": "bfloat16", "heal_rankings": ["block_influence"], "depth_models": ["a", "b"]}


def interval(estimate, low, high):
    return Interval(estimate, low, high, 0.95, "toy")


def test_options_fold_in_the_core_sizes_and_fast_shrinks_every_size():
    used = report.notebook_options(OPTIONS, eval_blocks=96, limit=300, model="m")
    assert used["eval_blocks"] == 96 and used["limit"] == 300 and used["depth_models"] == ["a", "b"]
    fast = report.notebook_options(OPTIONS, eval_blocks=96, limit=300, model="m", fast=True)
    assert fast["eval_blocks"] == report.FAST_SIZES["eval_blocks"] and fast["depth_models"] == ["m"]
    assert OPTIONS["n_calib"] == 16  # the caller's options are not changed
    with pytest.raises(ValueError, match="explorer_blocks = 4"):
        report.notebook_options(OPTIONS, eval_blocks=3, limit=10, model="m")


def test_evidence_config_matches_the_options_and_needs_block_influence():
    config = report.evidence_config(report.notebook_options(OPTIONS, eval_blocks=96, limit=300, model="m"),
                                    tasks=["piqa"], rankings=["block_influence", "reverse_order"], table_fraction=0.25,
                                    heal_seeds=[0, 1], seed=3)
    assert (config.eval_blocks, config.task_limit, config.tasks, config.seed) == (96, 300, ("piqa",), 3)
    assert [h.seed for h in config.healing] == [0, 1] and config.healing[0].compute_dtype == "bfloat16"
    with pytest.raises(ValueError, match="block_influence"):
        report.evidence_config(OPTIONS, tasks=["piqa"], rankings=["reverse_order"], table_fraction=0.25, heal_seeds=[])


def test_calibration_stability_ranks_and_overlaps():
    found = report.CalibrationStability({"main": np.array([0.1, 0.5, 0.2, 0.9]), "other": np.array([0.3, 0.5, 0.1, 0.9]),
                                         "far": np.array([0.9, 0.1, 0.8, 0.2])}, k=2)
    np.testing.assert_array_equal(found.ranks[0], [0, 2, 1, 3])
    assert found.chosen == {"main": {0, 2}, "other": {0, 2}, "far": {1, 3}}
    np.testing.assert_allclose(found.jaccard, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    words = found.words()
    assert "removed under every setting: []" in words and "median 0.00" in words and "[0.0, 0.67]" in words


def test_similarity_words_find_the_flattest_span():
    similarity = np.eye(4)
    similarity[1, 3] = similarity[3, 1] = 0.9  # input of layer 1 and output of layer 2 point the same way
    similarity[0, 3] = 0.2
    words = report.similarity_words(similarity, [2])
    assert "input of layer 1 vs output of layer 2, mean cos 0.900" in words and "last: mean cos 0.200" in words


def test_conclusions_are_the_lines_the_readme_table_reads():
    claims = [report.Claim("BI keeps more accuracy than reverse_order", 8, interval(0.05, 0.03, 0.07), SUPPORTED,
                           "by more than 0.02 in pooled acc", 0.02, 900, 0.0),
              report.Claim("the dense model scores above the strongest rule", 0, interval(0.1, -0.1, 0.3), CANNOT_TELL,
                           "by more than 0.05", 0.05, 40, 0.0)]
    lines = report.conclusions(claims).splitlines()
    matched = [_CONCLUSION.match(line) for line in lines]
    assert all(matched) and matched[0].group(1) == "Supported" and "at k = 8 (by more than 0.02" in matched[0].group(2)
    assert "at k =" not in lines[1]
    assert "questions instead of 40 would decide it" in claims[1].finding().to_tell


def test_table5_beside_has_ours_where_this_run_measures_it():
    two = report.TwoByTwo(None, {}, {"interaction": interval(-0.01, -0.03, 0.01)}, 0.1, [],
                          {"dense": 0.6, "4-bit": 0.58, "BI −8": 0.5, "BI −8, 4-bit": 0.47})
    table = report.table5_beside(paper_numbers("shortgpt"), two, "tiny")
    ours = table["ours (tiny)"]
    assert ours["baseline"] == "60.0" and ours["remove then quantise"] == "47.0" and ours["quantise then remove"] == "—"
    assert not table.isna().any().any()
    assert "ours -1.0 [-3.0, +1.0]" in report.table5_words(paper_numbers("shortgpt"), two)
