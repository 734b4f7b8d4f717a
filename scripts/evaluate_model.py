"""Score a model on the shipped multiple-choice benchmarks and write a JSON + Markdown table.

    .venv/bin/python scripts/evaluate_model.py --model smollm2-135m --limit 200

Writes results/<model>_benchmarks.json (scores, settings, the weights' checksum and where it was run:
git revision, versions, command, hardware) and prints the table that docs/benchmarks.md quotes.
"""

import argparse
import time
from pathlib import Path

from shortlab.evaluate import evaluate_mc
from shortlab.files import write_json_atomically
from shortlab.models import load_model
from shortlab.runs import run_record, weights_fingerprint

DEFAULT_RUNS = [  # (task, shots)
    ("hellaswag", 0), ("piqa", 0), ("winogrande", 0), ("arc_easy", 0), ("arc_challenge", 0),
    ("boolq", 0), ("openbookqa", 0), ("mmlu", 0), ("mmlu", 5),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default=None)
    parser.add_argument("--limit", type=int, default=200,
                        help="questions per task (seeded subset); 0 scores every question")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("results"))
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    rows = []
    for task, shots in DEFAULT_RUNS:
        start = time.perf_counter()
        score = evaluate_mc(model, tokenizer, task, limit=args.limit or None,
                            batch_size=args.batch_size, num_fewshot=shots, seed=args.seed,
                            progress=False)[task]
        rows.append({"task": task, "shots": shots, **score, "seconds": time.perf_counter() - start})
        print(f"| {task} | {shots} | {score['n']} | {100 * score['acc']:.1f} ± "
              f"{100 * score['acc_stderr']:.1f} | {100 * score['acc_norm']:.1f} ± "
              f"{100 * score['acc_norm_stderr']:.1f} |", flush=True)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    name = args.model.replace("/", "__")
    record = {"model": args.model, "dtype": args.dtype, "limit": args.limit, "seed": args.seed,
              "weights_sha256": weights_fingerprint(model.named_parameters()), "results": rows,
              "provenance": run_record()}
    write_json_atomically(args.output_dir / f"{name}_benchmarks.json", record, indent=2)


if __name__ == "__main__":
    main()
