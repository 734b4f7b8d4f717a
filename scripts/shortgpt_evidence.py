"""Measure and store notebook 01's per-item evidence (block NLLs, per-question correctness) for one model.

    .venv/bin/python scripts/shortgpt_evidence.py --model smollm2-135m
    .venv/bin/python scripts/shortgpt_evidence.py --model qwen2.5-0.5b --eval-blocks 96 --task-limit 300
    .venv/bin/python scripts/shortgpt_evidence.py --model qwen2.5-1.5b --dtype bfloat16 --eval-blocks 64 \
        --task-limit 300 --rankings block_influence reverse_order angular_distance relative_magnitude \
        --random-draws 10 --max-remove 7 --remove-step 7
    .venv/bin/python scripts/shortgpt_evidence.py --model smollm2-135m --smoke   # minutes: tiny sizes
    .venv/bin/python scripts/shortgpt_evidence.py --model smollm2-135m --heal-seeds 0 1 --max-minutes 60

``--heal-seeds`` adds the healing study: each of ``--heal-rankings``' removals at the table's k, and the
dense model as the control, healed once per seed with one recipe and budget (``--heal-method``,
``--heal-steps``, ...; ``shortlab.healing``) and measured like the rest. ``--max-minutes`` starts nothing
new after that long and stops a healing in progress with its progress saved beside the store: run the
same command again to continue.

Writes one JSON file per measurement under results/shortgpt/<model>/ (``--results-dir``), each as
soon as it is measured, so an interrupted run resumes where it stopped; files whose fingerprint
(model weights, dtype, held-out tokens, questions, setting) does not match are measured again.
Notebook 01 with the same ``MODEL`` and sizes reads them, e.g. for the second line above:

    .venv/bin/python -m shortlab.run_notebooks notebooks/01_block_influence_pruning.ipynb \
        -p MODEL qwen2.5-0.5b -p EVAL_BLOCKS 96 -p LIMIT 300 -p FIG_DIR figures/qwen2.5-0.5b

``--smoke`` writes to a separate ``smoke`` subfolder so it never mixes with the default run's files.
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from shortlab.healing import HealingConfig
from shortlab.models import load_model
from shortlab.shortgpt_evidence import (EvidenceConfig, collect, default_results_dir, dense_precision,
                                       healing_configs, open_store, prepare)

SMOKE = dict(n_calib=2, calib_seq_len=64, eval_blocks=4, dense_blocks=6, eval_seq_len=64, max_remove=2, remove_step=1,
             random_draws=2, random_blocks=2, task_limit=4)


def main() -> None:
    defaults = EvidenceConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results-dir", default=None, help="default: results/shortgpt/<model>")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, into <results-dir>/smoke")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--dense-blocks", type=int, default=defaults.dense_blocks,
                        help="held-out blocks for the dense perplexity alone (0: eval-blocks)")
    for field in ("eval_blocks", "eval_seq_len", "n_calib", "max_remove", "remove_step", "random_draws",
                  "random_blocks", "task_limit", "bits", "group_size", "batch_size", "seed"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(defaults, field))
    parser.add_argument("--tasks", nargs="*", default=list(defaults.tasks))
    parser.add_argument("--rankings", nargs="+", default=list(defaults.rankings))
    parser.add_argument("--task-rankings", nargs="*", default=None,
                        help="rankings scored on the tasks at the table's k (default: every ranking)")
    recipe = HealingConfig()
    parser.add_argument("--heal-seeds", nargs="*", type=int, default=[],
                        help="healing seeds (default none: no healing study)")
    parser.add_argument("--heal-rankings", nargs="+", default=list(defaults.healing_rankings))
    parser.add_argument("--heal-method", default=recipe.method, choices=("lora", "last_layers"))
    parser.add_argument("--heal-compute-dtype", default=recipe.compute_dtype, choices=("float32", "bfloat16"),
                        help="bfloat16: healing under autocast (fast on CPUs with AMX); part of the recipe")
    for field in ("steps", "batch_size", "block_size", "warmup", "lora_rank", "last_layers"):
        parser.add_argument(f"--heal-{field.replace('_', '-')}", type=int, default=getattr(recipe, field))
    for field in ("lr", "lora_alpha"):
        parser.add_argument(f"--heal-{field.replace('_', '-')}", type=float, default=getattr(recipe, field))
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start nothing new after this long (a healing in progress stops and resumes next run)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    sizes = {field: getattr(args, field) for field in
             ("eval_blocks", "eval_seq_len", "n_calib", "max_remove", "remove_step", "random_draws",
              "random_blocks", "task_limit", "bits", "group_size", "batch_size", "seed")}
    config = EvidenceConfig(**{**sizes, "tasks": tuple(args.tasks), "rankings": tuple(args.rankings),
                               "task_rankings": None if args.task_rankings is None else tuple(args.task_rankings),
                               "task_limit": args.task_limit or None, "group_size": args.group_size or None,
                               "dense_blocks": args.dense_blocks or None,
                               "healing": healing_configs(args.heal_seeds, method=args.heal_method,
                                                          compute_dtype=args.heal_compute_dtype, **{
                                   field: getattr(args, f"heal_{field}") for field in (
                                       "steps", "batch_size", "block_size", "warmup", "lora_rank", "last_layers",
                                       "lr", "lora_alpha")}),
                               "healing_rankings": tuple(args.heal_rankings)})
    directory = default_results_dir(args.model) if args.results_dir is None else args.results_dir
    if args.smoke:
        config = dataclasses.replace(config, **SMOKE)
        directory = f"{directory}/smoke"

    start = time.perf_counter()
    deadline = None if args.max_minutes is None else time.monotonic() + 60 * args.max_minutes
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    prepared = prepare(model, tokenizer, config, Path(directory) / "rankings.json",
                       log=lambda line: print(line, flush=True))
    store = open_store(directory, model, args.model, prepared, args.dtype)
    distinct = len({setting.measurement for setting in prepared.settings})
    print(f"{args.model}: k = {list(prepared.plan.ks)} (table {prepared.plan.table_k}); {len(prepared.settings)} "
          f"settings, {distinct} distinct measurements -> {directory} (prepared in {time.perf_counter() - start:.0f} s)",
          flush=True)
    records = collect(model, tokenizer, prepared.settings, store, prepared.held_out, prepared.task_examples,
                      config.batch_size, log=lambda line: print(line, flush=True), deadline=deadline)
    left = distinct - len(records)
    if left:
        print(f"stopped after {time.perf_counter() - start:.0f} s with {left} measurements left "
              f"({store.written} measured now): run the same command again to continue", flush=True)
        sys.exit(3)
    dense_precision(model, tokenizer, config, store, log=lambda line: print(f"dense precision {line}", flush=True))
    print(f"done in {time.perf_counter() - start:.0f} s: {store.written} measured, {store.read} read back "
          "(and the dense precision record)")


if __name__ == "__main__":
    main()
