"""Compute notebook 02's ShortV evidence sweep into results/shortv/ (resumable).

    .venv/bin/python scripts/shortv_evidence.py                       # llava-mini, the full sweep
    .venv/bin/python scripts/shortv_evidence.py --device cuda --dtype bfloat16
    .venv/bin/python scripts/shortv_evidence.py --smoke               # tiny-llava, a minute, temporary folder
    .venv/bin/python scripts/shortv_evidence.py --task scenes --model llava-mini-scenes   # the scene task

Writes <model>_calibration.json (per-question Layer Contribution tables and the visual-cosine
scores every layer choice is made from) and <model>_predictions.json (each setting's predicted
answer for every test question), both fingerprinted by the model's weights, the dtype and the
questions: a retrained model recomputes them instead of mixing results. The plan is
``shortlab.llava_mini.evidence.evidence_plan``, the same the notebook builds, so the notebook
finds every setting here and computes only what is missing. An interrupted run (Ctrl-C,
``--max-minutes``) resumes where it stopped: every finished setting is written at once.
"""

import argparse
import tempfile
import time
from pathlib import Path

from shortlab.llava_mini import evidence
from shortlab.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llava-mini")
    parser.add_argument("--task", default="easy-vqa", choices=("easy-vqa", "scenes"),
                        help="the VQA task the sweep evaluates (and calibrates on)")
    parser.add_argument("--dtype", default="float32",
                        help="the notebook reads the stores only when its DTYPE is the same")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per packed forward")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"default {evidence.EVIDENCE_DIR} (--smoke: a temporary folder)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop starting new settings after this long; rerun to continue")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny-llava and the FAST-mode plan: checks the whole pipeline in about a minute")
    args = parser.parse_args()

    start = time.monotonic()
    deadline = None if args.max_minutes is None else start + 60 * args.max_minutes
    config = evidence.fast_config(args.task) if args.smoke else evidence.default_config(args.task)
    model_name = "tiny-llava" if args.smoke and args.model == "llava-mini" else args.model
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or (Path(scratch) if args.smoke else evidence.EVIDENCE_DIR)
        model, processor = load_model(model_name, dtype=args.dtype, device=args.device)

        def log(message: str) -> None:
            print(f"[{time.monotonic() - start:7.0f} s] {message}", flush=True)

        log(f"{model_name} ({args.dtype}) -> {out}")
        # First the main calibration and every setting it chooses, then the rest of the pools and
        # the stability study: an interrupted run has the main curves first.
        left = 0
        for main_only in (True, False):
            prepared = evidence.prepare_evidence(model, processor, model_name, args.dtype, config, out, log=log,
                                                 main_only=main_only, deadline=deadline)
            distinct = len({row["setting"] for row in prepared.plan})
            log(f"{len(prepared.items)} test questions; {distinct} distinct settings in the plan, "
                f"{prepared.missing()} to compute")
            left = evidence.run_plan(model, processor, prepared.items, prepared.plan, prepared.store,
                                     features=prepared.features, batch_size=args.batch_size, deadline=deadline,
                                     log=log, task=args.task)
        pools = prepared.calibration.complete_pools(config.pool_size)
        finished = not left and len(pools) == len(evidence.pools_of(args.task))
        log("done: every setting is stored" if finished else
            f"{left} settings left, calibration pools complete: {pools}; run again to continue")


if __name__ == "__main__":
    main()
