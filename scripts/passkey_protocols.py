"""Passkey retrieval of one model under notebook 03's two earlier protocols and RULER's essays,
side by side, to find what made them disagree.

    .venv/bin/python scripts/passkey_protocols.py                       # smollm2-135m, resumable
    .venv/bin/python scripts/passkey_protocols.py --max-minutes 30      # in chunks

Setups, each at the same distances with the same number of trials:

* ``bible-shared``: Bible filler, trial k's text block reused at every distance (notebook 03's
  first protocol: three trials, float32);
* ``wiki-windows``: held-out Wikipedia, every trial its own window (the fine-tuning grid's
  protocol: twenty trials, bfloat16);
* ``essays-windows``: RULER's Paul Graham essays, every trial its own window (the protocol kept).

Each setup runs in every ``--dtypes`` on identical prompts, so the precision's effect is paired
trial by trial; the filler's effect compares independent trials. Writes ``--output`` (JSON,
atomically) after every (setup, dtype), with where it ran (revision, versions, command,
hardware) and the weights' fingerprint; a rerun skips what is stored.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from shortlab.data import calibration_batch
from shortlab.files import write_json_atomically
from shortlab.models import load_model
from shortlab.rope_experiment.finetune import default_text, split_stream, tokenize_text
from shortlab.rope_experiment.passkey import essay_token_ids, passkey_accuracy, shared_filler_passkey
from shortlab.runs import run_record, weights_fingerprint

SETUPS = ("bible-shared", "wiki-windows", "essays-windows")
DISTANCES = (256, 512, 1024, 1536, 2048, 3072, 4096, 6144, 8000)  # notebook 03's passkey distances


def measure(setup: str, model, tokenizer, distances, trials: int, seed: int) -> list[dict]:
    """The rows of ``passkey_accuracy`` for one setup."""
    if setup == "bible-shared":
        blocks = calibration_batch(tokenizer, "bible", trials, max(distances), split="eval", seed=seed)["input_ids"]
        return shared_filler_passkey(model, tokenizer, [block.tolist() for block in blocks], distances, seed=seed)
    if setup == "wiki-windows":
        filler = split_stream(tokenize_text(tokenizer, default_text()))[1].tolist()
    elif setup == "essays-windows":
        filler = essay_token_ids(tokenizer)
    else:
        raise ValueError(f"unknown setup {setup!r}; setups: {SETUPS}")
    return passkey_accuracy(model, tokenizer, filler, distances, trials=trials, seed=seed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--distances", type=int, nargs="+", default=list(DISTANCES))
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=Path("results/rope_passkey/protocols.json"))
    parser.add_argument("--max-minutes", type=float, default=None, help="start no new setup after this long")
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error(f"--trials must be >= 1, got {args.trials}")
    wanted = {"model": args.model, "distances": sorted(args.distances), "trials": args.trials, "seed": args.seed}
    stored = json.loads(args.output.read_text()) if args.output.exists() else {**wanted, "runs": {}}
    if {key: stored.get(key) for key in wanted} != wanted:
        raise SystemExit(f"{args.output} holds another measurement ({ {k: stored.get(k) for k in wanted} }); "
                         "pass another --output")
    start = time.monotonic()
    for dtype in args.dtypes:
        todo = [setup for setup in args.setups if f"{setup}|{dtype}" not in stored["runs"]]
        if not todo:
            continue
        model, tokenizer = load_model(args.model, dtype=dtype, device=args.device)
        fingerprint = weights_fingerprint(model.named_parameters())[:16]
        for setup in todo:
            if args.max_minutes is not None and time.monotonic() - start > 60 * args.max_minutes:
                print("out of time: run again to continue", flush=True)
                return 3
            began = time.perf_counter()
            rows = measure(setup, model, tokenizer, wanted["distances"], args.trials, args.seed)
            stored["runs"][f"{setup}|{dtype}"] = {"setup": setup, "dtype": dtype, "rows": rows,
                                                  "seconds": round(time.perf_counter() - began, 1),
                                                  "weights_fingerprint": fingerprint, "provenance": run_record()}
            write_json_atomically(args.output, stored, indent=1)
            print(f"{setup} in {dtype}: " + " ".join(f"{row['distance']}:{row['correct']}/{row['n']}" for row in rows)
                  + f"  ({time.perf_counter() - began:.0f} s)", flush=True)
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
