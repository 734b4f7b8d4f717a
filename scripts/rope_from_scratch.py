"""The from-scratch RoPE-bound experiment of notebook 03 (``shortlab.rope_experiment.from_scratch``).

    PYTHONPATH=. python3 scripts/rope_from_scratch.py --device cuda --jobs 8      # GPU default
    .venv/bin/python scripts/rope_from_scratch.py --smoke --output /tmp/smoke.json  # seconds, CPU
    .venv/bin/python scripts/rope_from_scratch.py --export-text /tmp/wiki_text.json # for a machine
                                                                 # without the text's wheel

Small Llamas, one per ``--pretrain-seeds``, pretrained with a base whose bound lies far above the
context (text + retrieval scattered over the whole sequence), then each fine-tuned per (base,
seed) with bases whose bounds fall inside the context (and the pretraining base as the control),
the bases of one model on the same data; probed on a depth × distance grid. Results go to
``--output`` (JSON, written atomically after every stage; a rerun skips finished stages, so it
runs in chunks, ``--max-minutes`` at a time) with the pretrained weights next to it
(``*.pretrain<seed>.pt``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from shortlab.rope_experiment.from_scratch import (
    SMOKE_SIZES, ExperimentConfig, export_text, load_text, run_experiment,
)

def parse_args(argv=None) -> argparse.Namespace:
    defaults = ExperimentConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(defaults.seeds),
                        help="fine-tunes of each pretrained model per base")
    parser.add_argument("--pretrain-seeds", type=int, nargs="+", default=list(defaults.pretrain_seeds),
                        help="independently pretrained models (the unit the intervals resample)")
    parser.add_argument("--probe-depths", type=float, nargs="*", default=list(defaults.probe_depths),
                        help="depths of the record in the probe sequences, 0 (first) to 1 (last start that fits); "
                             "none: anywhere it fits")
    parser.add_argument("--bases", type=float, nargs="+", default=None,
                        help="fine-tuning bases (default: bounds at --bound-fractions of the context)")
    parser.add_argument("--bound-fractions", type=float, nargs="+",
                        default=list(defaults.bound_fractions))
    parser.add_argument("--pretrain-base", type=float, default=defaults.pretrain_base)
    parser.add_argument("--context", type=int, default=defaults.context)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="fine-tuning steps")
    parser.add_argument("--induction-steps", type=int, default=defaults.induction_steps,
                        help="repeated random sequences before pretraining (induction heads; 0: none)")
    parser.add_argument("--short-context", type=int, default=defaults.short_context,
                        help="the context the retrieval task is first learned at (a length curriculum)")
    parser.add_argument("--short-context-steps", type=int, default=defaults.short_context_steps,
                        help="pretraining steps at --short-context before the full context (0: none)")
    parser.add_argument("--pretrain-steps", type=int, default=defaults.pretrain_steps)
    parser.add_argument("--pretrain-rounds", type=int, default=defaults.pretrain_rounds,
                        help="at most this many rounds of --pretrain-steps, until the model "
                             "retrieves at short distances")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--probe-trials", type=int, default=defaults.probe_trials,
                        help="held-out probes per distance (and depth)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no new stage after this long; run again to continue")
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes for data generation and parallel fine-tunes")
    parser.add_argument("--output", type=Path,
                        default=Path("results/rope_from_scratch/depth_distance_grid.json"))
    parser.add_argument("--text-file", type=Path, default=None,
                        help="text written by --export-text (default: shortlab.data's wiki text)")
    parser.add_argument("--export-text", type=Path, default=None, metavar="PATH",
                        help="write the training / evaluation text to PATH and exit")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that all stages run")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    return args


def config_from(args: argparse.Namespace) -> ExperimentConfig:
    config = ExperimentConfig(
        context=args.context, pretrain_base=args.pretrain_base, bases=tuple(args.bases or ()),
        bound_fractions=tuple(args.bound_fractions), seeds=tuple(args.seeds),
        pretrain_seeds=tuple(args.pretrain_seeds), probe_depths=tuple(args.probe_depths),
        induction_steps=args.induction_steps, short_context=args.short_context,
        short_context_steps=args.short_context_steps, pretrain_steps=args.pretrain_steps,
        pretrain_rounds=args.pretrain_rounds, steps=args.steps, batch_size=args.batch_size,
        probe_trials=args.probe_trials)
    return replace(config, **SMOKE_SIZES) if args.smoke else config


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.export_text is not None:
        info = export_text(args.export_text)
        print(f"wrote {args.export_text}: {json.dumps(info)}")
        return 0
    config = config_from(args)
    train_ids, eval_ids, info = load_text(args.text_file)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)

    log(f"device {args.device}, jobs {args.jobs}; text {json.dumps(info)}")
    log("bases (bound): " + ", ".join(f"{b:.6g} ({config.bound(b)})" for b in config.finetune_bases())
        + f"; context {config.context}; {len(config.pretrain_seeds)} pretrained models x {len(config.seeds)} seeds")
    deadline = None if args.max_minutes is None else time.monotonic() + 60 * args.max_minutes
    results = run_experiment(config, args.output, train_ids, eval_ids, text_info=info,
                             device=args.device, jobs=args.jobs, deadline=deadline, log=log)
    for row in results["summary"]["bases"]:
        verdict = row.get("verdict", "no distance beyond the bound")
        log(f"base {row['base']:.6g} (bound {row['bound']}): " + " ".join(
            f"{a['distance']}:{a['rate']:.2f}" for a in row["accuracy"]) + f"  -> {verdict}")
    log(f"done: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
