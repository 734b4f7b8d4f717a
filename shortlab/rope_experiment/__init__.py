"""Experiments around RoPE's long-context bound (Men et al., 2024, arXiv 2405.14591).

``shortlab.rope`` holds the maths of the bound; this package holds what notebook 03 runs,
split by topic (every name is importable from ``shortlab.rope_experiment`` itself):

* ``theory``: the derivation's objects, to check the theorem numerically: ``rope_matrix`` R_m,
  ``rotate`` (RoPE applied to vectors at positions, in either pair layout) and
  ``score_gap_monte_carlo`` (E[qᵀR_m k*] − E[qᵀR_m k] by sampling, to set beside 2σ²B(m));
  and the published bounds re-checked (``valid_bases``, ``nearest_valid_base``,
  ``published_checks``);
* ``retrieval_data``: a character-level ``CharTokenizer``, real text mixed with a synthetic
  key–value retrieval task (``retrieval_example``, ``training_batches``, ``distance_batch``);
* ``training``: small Llama models trained from scratch that differ only in RoPE base
  (``rope_model_config``, ``build_model``, ``train_lm``);
* ``measurements``: on any causal LM, ``per_position_nll`` (loss by position, masked),
  ``retrieval_accuracy``, ``qk_pair_covariances`` (per-head query–key covariance per rotary
  pair: the theorem's weights, giving the expected score gap ``score_gap`` and its bound
  ``score_gap_bound``) and ``qk_pair_weights`` (the pooled-variance heuristic);
* ``from_scratch``: the experiment with power — one pretrained model fine-tuned with bases
  whose bounds fall inside the context, several seeds (``ExperimentConfig``,
  ``run_experiment``, ``summarize``, ``load_text`` / ``export_text``);
* ``passkey``: the passkey test (``passkey_prompt``, ``passkey_trial``; batched and by distance
  with Wilson intervals: ``passkey_found``, ``passkey_accuracy``);
* ``finetune``: a pretrained model fine-tuned with another base (``with_rope_base``,
  ``finetune_batches``, ``fine_tune``) and measured (``perplexity_by_position``,
  ``distance_grid``, ``bound_verdicts``); ``scripts/rope_finetune.py`` runs it, and
  ``finetune_summary`` reads its results file back for notebook 03, recomputing intervals and
  verdicts from the per-trial and per-row measurements (``describe_finetune``: as text).

Positions and distances are token indices; "distance" is always the index of the token that
asks minus the index of the token it must find (defined exactly where each is built).
"""

from shortlab.rope_experiment.finetune import (
    bound_verdicts, default_text, describe_finetune, difference_of_rates, distance_grid, fine_tune,
    finetune_batches, finetune_summary, perplexity_by_position, position_edges, rope_base, shipped_bound_verdict,
    split_stream, tokenize_text, with_rope_base,
)
from shortlab.rope_experiment.from_scratch import (
    SMOKE_SIZES, ExperimentConfig, base_for_bound, checkpoint_path, crossed_bootstrap, export_text, load_text,
    run_experiment, summarize,
)
from shortlab.rope_experiment.measurements import (
    binned_perplexity, crossing_distance, describe_half_accuracy, half_accuracy_distance, half_accuracy_summary, per_position_nll,
    qk_pair_covariance, qk_pair_covariances, qk_pair_weights, retrieval_accuracy, score_gap, score_gap_bound,
)
from shortlab.rope_experiment.passkey import (
    PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUESTION, PasskeyPrompt, min_passkey_distance,
    passkey_accuracy, passkey_found, passkey_length, passkey_prompt, passkey_trial,
)
from shortlab.rope_experiment.retrieval_data import (
    CharTokenizer, RetrievalExample, RetrievalTask, answer_mask, char_stream, distance_batch,
    repeated_sequence_batches, retrieval_example, stack_examples, text_batch, training_batches,
)
from shortlab.rope_experiment.theory import (
    nearest_valid_base, published_checks, rope_matrix, rotate, score_gap_monte_carlo, valid_bases,
)
from shortlab.rope_experiment.training import build_model, lm_losses, rope_model_config, train_lm

__all__ = [
    "PASSKEY_INTRO", "PASSKEY_NEEDLE", "PASSKEY_QUESTION", "SMOKE_SIZES", "CharTokenizer",
    "ExperimentConfig",
    "PasskeyPrompt", "base_for_bound", "checkpoint_path", "crossed_bootstrap", "crossing_distance", "describe_half_accuracy", "export_text",
    "half_accuracy_distance", "half_accuracy_summary", "load_text", "qk_pair_covariance", "qk_pair_covariances", "run_experiment", "score_gap",
    "score_gap_bound", "summarize",
    "RetrievalExample", "RetrievalTask", "answer_mask", "binned_perplexity", "build_model",
    "char_stream", "distance_batch", "lm_losses", "nearest_valid_base", "passkey_prompt",
    "passkey_trial", "per_position_nll", "published_checks", "qk_pair_weights",
    "repeated_sequence_batches", "retrieval_accuracy", "retrieval_example", "rope_matrix", "rope_model_config",
    "rotate", "score_gap_monte_carlo", "stack_examples", "text_batch", "train_lm", "training_batches",
    "valid_bases",
    "bound_verdicts", "default_text", "describe_finetune", "difference_of_rates", "distance_grid", "fine_tune",
    "finetune_batches", "finetune_summary", "min_passkey_distance", "passkey_accuracy", "passkey_found",
    "passkey_length", "perplexity_by_position", "position_edges", "rope_base",
    "shipped_bound_verdict", "split_stream",
    "tokenize_text", "with_rope_base",
]
