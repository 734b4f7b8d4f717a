"""shortlab: Block Influence layer pruning (ShortGPT), visual-token freezing (ShortV) and the RoPE-base
context bound, as functions over Hugging Face decoder models.

Every name in ``__all__`` is importable from ``shortlab`` itself, e.g.::

    from shortlab import block_influence, calibration_batch, load_model, rank_layers, remove_layers

    model, tokenizer = load_model("smollm2-135m")
    batches = [calibration_batch(tokenizer, "wiki", n_blocks=8, seq_len=256)]
    print(block_influence(model, batches))  # layer index -> BI
    pruned = remove_layers(model, rank_layers("block_influence", model, batches, n_remove=8))

The submodules hold more (``shortlab.hooks``, ``shortlab.llava_mini``, ``shortlab.vision``,
``shortlab.plotting``, ...). Names are imported on first use, so ``import shortlab`` is quick and
pulls in neither torch nor transformers until a function needs them; ``shortlab.vision`` (ONNX),
``shortlab.plotting`` (matplotlib) and ``shortlab.run_notebooks`` (papermill) need the
``vision`` and ``notebooks`` extras; ``evaluate_with_lm_eval`` needs the ``eval`` extra (lm-eval),
imported when it is called. The command line is ``python -m shortlab`` (``shortlab.cli``).

Constants exported besides the functions and classes:

* ``DEFAULT_MODEL``: the name ``load_model`` loads when given none (embedded SmolLM2-135M);
* ``RANKINGS``: ranking name → ranking function, the names ``rank_layers`` accepts;
* ``TASKS``: benchmark name → loader, the names ``load_task`` and ``evaluate_mc`` accept;
* ``SOURCES``: the calibration text sources ``load_documents`` and ``calibration_batch`` accept.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"  # the only copy: pyproject.toml reads it (dynamic version)

# Public name -> the submodule defining it, imported on first attribute access (PEP 562): importing
# torch and transformers takes seconds, which `python -m shortlab --help` should not pay.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "shortlab.models": ("load_model", "known_models"),
    "shortlab.checkpoints": ("DEFAULT_MODEL", "resolve_dtype", "cache_dir"),
    "shortlab.arch": (
        "model_parts", "ModelParts", "supported_architectures", "UnsupportedArchitectureError",
    ),
    "shortlab.hooks": ("capture_layer_io", "LayerIO", "skip_layers", "replace_layer_outputs"),
    "shortlab.metrics": ("block_influence", "layer_similarity", "token_cosine"),
    "shortlab.pruning": (
        "remove_layers", "RANKINGS", "rank_layers", "rank_layers_for_counts", "lowest_layers",
        "iterative_block_influence", "relative_magnitude", "angular_distances", "random_layers",
    ),
    "shortlab.contribution": (
        "layer_contribution", "mean_layer_contribution", "token_groups", "reading_positions",
    ),
    "shortlab.shortv": ("freeze_visual_tokens", "fastv", "FastVRecord"),
    "shortlab.flops": (
        "DecoderShape", "dense_layer_flops", "frozen_layer_flops", "fastv_num_dropped", "prefill_flops",
        "flops_ratio", "fastv_ratio_matching_flops", "counted_layer_flops",
    ),
    "shortlab.rope": (
        "rope_frequencies", "rope_bias", "weighted_rope_bias", "context_length", "max_context",
        "max_context_from_frequencies", "check_base", "min_base", "BaseBound", "bound_table",
        "scaled_frequencies", "rope_setup", "RopeSetup", "RopeVariant", "shipped_configs", "rope_report",
    ),
    "shortlab.evaluate": (
        "TASKS", "load_task", "MCExample", "mmlu_subjects", "loglikelihoods", "evaluate_mc", "perplexity",
        "block_nll", "EvaluationCache",
    ),
    "shortlab.harness": ("evaluate_with_lm_eval", "lm_eval_task_configs"),
    "shortlab.data": ("SOURCES", "load_documents", "token_blocks", "calibration_batch", "iter_batches"),
    "shortlab.speed": ("measure_speed", "SpeedMeasurement"),
    "shortlab.quantize": ("quantize_weights", "quantize_weights_int8", "quantized_parameter_bytes"),
    "shortlab.references": ("paper_numbers",),
    "shortlab.explorers": ("NextToken", "ModelSnapshot", "RemovalPreview", "top_next_tokens", "model_snapshot",
                           "removal_preview", "removal_preview_figure"),
    "shortlab.shortgpt_evidence": (
        "EvidenceConfig", "EvidenceStore", "prepare", "collect", "quantisation_interaction", "random_versus",
    ),
    "shortlab.stats": (
        "Interval", "wilson_interval", "bootstrap_interval", "paired_interval", "ratio_interval",
        "perplexity_interval", "paired_perplexity_ratio", "verdict", "crossed_bootstrap_interval",
        "retained_fraction_interval", "equivalence_verdict",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        # An AttributeError lets `from shortlab import <submodule>` fall back to importing it.
        raise AttributeError(f"module 'shortlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
