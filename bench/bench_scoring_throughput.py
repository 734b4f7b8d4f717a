"""Multiple-choice scoring speed: shared contexts against one sequence per choice and against
lm-evaluation-harness, side by side in one run, with the per-item answers of all three.

On the same seeded questions of three tasks (ARC-Easy and SciQ: four choices; PIQA: two), each
model is scored by ``loglikelihoods`` with shared contexts (every question's context once, its
choices packed below it), by the same function with ``shared_context=False`` (every choice its own
sequence, the scorer before packing) and by lm-eval's ``HFLM`` through ``shortlab.harness``.
Each time covers everything from the task's questions to the per-item answers (lm-eval's also
builds its task objects from the configs, which it does on every call). Printed: items per
second, the ratios, and how many per-item answers (acc and acc_norm) differ from lm-eval's.

Then one whole measurement of notebook 01's default store (``shortgpt_evidence.measure`` on the
dense default model: the held-out perplexity blocks and every question of the three tasks),
before and after: ``shared_context=False`` and ``True``.

Last, the share of layer passes that computing the dense model's first layers once
(``shortlab.prefix``) spares over notebook 01's question-scored settings, from the stored rankings.

``--models`` chooses the models (default: SmolLM2-135M and Qwen2.5-0.5B); ``--items`` the
questions per task; ``--skip-measurement`` leaves out the notebook-01 measurement.
"""

import argparse
import time

import torch

from shortlab.benchmarking import add_device_arguments, report, save_results
from shortlab.evaluate import encode_examples, item_correct, load_task, loglikelihoods
from shortlab.harness import evaluate_with_lm_eval
from shortlab.models import DEFAULT_MODEL, load_model

TASKS = ("arc_easy", "piqa", "sciq")
BATCH_SIZE = 8


def ours(model, tokenizer, n_items: int, shared_context: bool) -> tuple[float, dict]:
    start = time.perf_counter()
    answers = {}
    for name in TASKS:
        examples = load_task(name, limit=n_items)
        logliks = loglikelihoods(model, encode_examples(tokenizer, examples), BATCH_SIZE,
                                 shared_context=shared_context)
        answers[name] = {metric: values.tolist() for metric, values in item_correct(examples, logliks.tolist()).items()}
    return time.perf_counter() - start, answers


def harness(model, tokenizer, n_items: int) -> tuple[float, dict]:
    start = time.perf_counter()
    results = evaluate_with_lm_eval(model, tokenizer, list(TASKS), limit=n_items, batch_size=BATCH_SIZE,
                                    per_item=True)
    answers = {name: {"acc": results[name]["correct"], "acc_norm": results[name].get("correct_norm")}
               for name in TASKS}
    return time.perf_counter() - start, answers


def differing(answers: dict, reference: dict) -> int:
    """Per-item answers (acc and acc_norm, every task) that differ from ``reference``'s."""
    count = 0
    for name, metrics in reference.items():
        for metric, values in metrics.items():
            if values is not None:
                count += sum(a != b for a, b in zip(answers[name][metric], values, strict=True))
    return count


def throughput(name: str, args) -> None:
    model, tokenizer = load_model(name, dtype=args.dtype, device=args.device)
    n = args.items * len(TASKS)
    # one untimed pass each, so that no scorer pays for first-call allocation
    ours(model, tokenizer, 2, True), ours(model, tokenizer, 2, False), harness(model, tokenizer, 2)
    seconds_packed, packed = ours(model, tokenizer, args.items, True)
    seconds_alone, alone = ours(model, tokenizer, args.items, False)
    seconds_lm_eval, lm_eval = harness(model, tokenizer, args.items)
    report(f"{name}_items", n)
    report(f"{name}_items_per_s_shared_context", n / seconds_packed)
    report(f"{name}_items_per_s_one_sequence_per_choice", n / seconds_alone)
    report(f"{name}_items_per_s_lm_eval", n / seconds_lm_eval)
    report(f"{name}_speedup_vs_lm_eval", seconds_lm_eval / seconds_packed)
    report(f"{name}_speedup_vs_one_sequence_per_choice", seconds_alone / seconds_packed)
    report(f"{name}_answers_differing_from_lm_eval_shared_context", differing(packed, lm_eval))
    report(f"{name}_answers_differing_from_lm_eval_one_sequence_per_choice", differing(alone, lm_eval))


def notebook_measurement(args) -> None:
    from shortlab.data import calibration_batch
    from shortlab.shortgpt_evidence import EvidenceConfig, Measurement, measure

    config = EvidenceConfig()
    model, tokenizer = load_model(DEFAULT_MODEL, dtype=args.dtype, device=args.device)
    held_out = calibration_batch(tokenizer, config.eval_source, config.eval_blocks, config.eval_seq_len,
                                 split="eval", seed=config.seed)
    examples = {task: load_task(task, limit=config.task_limit, seed=config.seed) for task in config.tasks}
    dense = Measurement(removed=(), bits=None, group_size=None, n_blocks=config.eval_blocks, tasks=True)
    records = {}
    for shared in (False, True):
        records[shared] = measure(model, tokenizer, dense, held_out, examples, config.batch_size,
                                  shared_context=shared)
    n_questions = sum(len(e) for e in examples.values())
    print(f"measurement_model: {DEFAULT_MODEL}", flush=True)
    report("measurement_questions", n_questions)
    report("measurement_heldout_tokens", int(held_out["attention_mask"].sum()))
    report("measurement_seconds_before", records[False]["seconds"])
    report("measurement_seconds_after", records[True]["seconds"])
    report("measurement_speedup", records[False]["seconds"] / records[True]["seconds"])
    report("measurement_answers_differing",
           sum(a != b for task in examples for metric in ("acc", "acc_norm")
               for a, b in zip(records[False]["correct"][task][metric], records[True]["correct"][task][metric])))


def prefix_sharing(models) -> None:
    """Layer passes that ``collect``'s shared prefix spares over notebook 01's question-scored
    settings (dense and every stored ranking at the table's k, as ``removal_counts`` sets it for the
    model's depth), from the stored rankings: counted, not timed (the same numbers are computed
    either way, ``tests/test_prefix.py``)."""
    import json

    from shortlab.arch import model_parts
    from shortlab.shortgpt_evidence import (
        EvidenceConfig, Measurement, default_results_dir, removal_counts, reuses_prefix, shared_prefix_depth,
    )

    config = EvidenceConfig()
    for name in models:
        rankings_file = default_results_dir(name) / "rankings.json"
        if not rankings_file.is_file():
            continue  # no stored rankings for this model: nothing to count
        num_layers = model_parts(load_model(name)[0]).num_layers
        _, k = removal_counts(num_layers, config.max_remove, config.remove_step, config.table_fraction)
        rankings = json.loads(rankings_file.read_text())["choices"]
        measurements = [Measurement((), None, None, 1, True)] + list(dict.fromkeys(
            Measurement(tuple(sorted(layers[str(k)])), None, None, 1, True) for layers in rankings.values()))
        depth = shared_prefix_depth(measurements, num_layers)
        passes = sum(num_layers - len(m.removed) for m in measurements)
        spared = depth * (sum(reuses_prefix(m, depth) for m in measurements) - 1) if depth else 0
        report(f"{name}_prefix_depth_k{k}", depth)
        report(f"{name}_prefix_layer_passes_spared_k{k}", spared / passes)


def main() -> None:
    parser = add_device_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--models", nargs="+", default=[DEFAULT_MODEL, "qwen2.5-0.5b"])
    parser.add_argument("--items", type=int, default=100, help="questions per task")
    parser.add_argument("--skip-measurement", action="store_true")
    args = parser.parse_args()
    report("threads", torch.get_num_threads())
    for name in args.models:
        throughput(name, args)
    if not args.skip_measurement:
        notebook_measurement(args)
    prefix_sharing(args.models)


if __name__ == "__main__":
    main()
    save_results(__file__)
