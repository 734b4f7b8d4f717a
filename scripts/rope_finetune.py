"""Fine-tune a model with small RoPE bases and a control with its own base; measure perplexity by
position and passkey retrieval by distance; and the shipped model's passkey (issue 12, items 1, 3).

    PYTHONPATH=. python3 scripts/rope_finetune.py --smoke --model tiny-llama --output /tmp/smoke.json
    PYTHONPATH=. python3 scripts/rope_finetune.py --model SmolLM2-135M-Instruct.Q4_1.gguf \\
        --text-file wiki.txt --device cuda          # the GPU run (scripts/gpu_rope_finetune.sh)
    PYTHONPATH=. python3 scripts/rope_finetune.py --export-text wiki.txt   # the default text

Every base starts from the same loaded weights and trains on the same rows in the same order for
the same steps (``shortlab.rope_experiment.finetune``); the text's tail is held out for the
perplexity rows and the passkey haystacks. The results JSON (``--output``) is rewritten
atomically after each finished base: a rerun with the same parameters skips the bases already
there (``"complete": false`` until everything is done), so ``--max-minutes`` can stop a CPU run
between bases and a later call continues it. A base's training itself is not checkpointed (its
model and optimiser state would be ~1.6 GB for SmolLM2-135M).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from shortlab import __version__
from shortlab.checkpoints import EMBEDDED_MODELS, sha256_of
from shortlab.files import write_json_atomically
from shortlab.models import load_model
from shortlab.plotting import git_revision, package_versions
from shortlab.rope import max_context
from shortlab.rope_experiment import finetune as ft
from shortlab.rope_experiment.passkey import min_passkey_distance, passkey_accuracy, passkey_length

REPOSITORY = Path(__file__).resolve().parent.parent
OWN = "own"  # the model's own base: the control
SHIPPED_DISTANCES = "1000,1500,2000,2500,3000,3250,3400,3500,3600,3615,3650,3750,3900,4000,4500,5000,6000,7000,8000"
SMOKE = dict(context=128, steps=2, batch_size=2, eval_rows=3, trials=20, shipped_distances="40,90")
# Parameters that do not change the results: a rerun may differ in them and still resume.
NOT_FINGERPRINTED = ("output", "max_minutes", "device", "eval_batch_size", "export_text", "label")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_ints(text: str, name: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"--{name} must be comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise SystemExit(f"--{name} must be positive, got {text!r}")
    return values


def parse_bases(text: str) -> list[str]:
    """Labels: "own" or a positive number written as given (e.g. "500")."""
    labels = [part.strip() for part in text.split(",") if part.strip()]
    if not labels:
        raise SystemExit("--bases is empty")
    for label in labels:
        if label == OWN:
            continue
        try:
            value = float(label)
        except ValueError:
            raise SystemExit(f"--bases: {label!r} is neither a number nor {OWN!r} "
                             f"(the model's own base)") from None
        if not value > 1:
            raise SystemExit(f"--bases: a RoPE base must be > 1, got {label!r}")
    if len(set(labels)) != len(labels):
        raise SystemExit(f"--bases repeats a base: {text!r}")
    return labels


def model_label(model: str) -> str:
    """The name results are filed under: a .gguf whose bytes are an embedded model gets that
    model's name (the GPU machine receives smollm2-135m as a bare file)."""
    path = Path(model)
    if model.endswith(".gguf") and path.is_file():
        sha = sha256_of([path])
        for name, source in EMBEDDED_MODELS.items():
            if source.sha256 == sha:
                return name
        return path.stem
    return path.name


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m",
                        help="a shortlab model name, a local .gguf file or a checkpoint folder")
    parser.add_argument("--label", help="name for the results (default: from --model)")
    parser.add_argument("--bases", default="own,500,2000,5000",
                        help="comma-separated RoPE bases; 'own' = the model's own base (the control, first so that a run cut short still has it)")
    parser.add_argument("--context", type=int, default=1024, help="fine-tuning context (tokens)")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, help="warm-up steps (default: a tenth of --steps)")
    parser.add_argument("--task-fraction", type=float, default=0.0,
                        help="share of synthetic passkey rows in training (default 0: plain text)")
    parser.add_argument("--answer-weight", type=float, default=5.0,
                        help="loss weight of passkey answer tokens in synthetic rows")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", help="autocast dtype for training and evaluation (weights stay "
                                        "float32); default bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--text-file", help="plain text to fine-tune on (default: the embedded "
                                            "Wikipedia text, see --export-text)")
    parser.add_argument("--eval-fraction", type=float, default=0.2,
                        help="tail of the text held out for evaluation")
    parser.add_argument("--export-text", metavar="PATH",
                        help="write the default text to PATH and exit")
    parser.add_argument("--eval-rows", type=int, default=32,
                        help="held-out rows of --context tokens for perplexity by position")
    parser.add_argument("--distances", default="",
                        help="passkey distances (default: dense around each bound and the context)")
    parser.add_argument("--trials", type=int, default=20, help="passkey trials per distance (>= 20)")
    parser.add_argument("--shipped-distances", default=SHIPPED_DISTANCES,
                        help="passkey distances for the untouched model ('' skips it)")
    parser.add_argument("--ppl-tolerance", type=float, default=1.1,
                        help="perplexity over the control's counted as comparable below this")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--output", help="results JSON (default results/rope_finetune/<label>.json)")
    parser.add_argument("--max-minutes", type=float,
                        help="start no new stage after this many minutes (rerun to continue)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny sizes ({SMOKE}), same code path")
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    if args.trials < 20:
        raise SystemExit(f"--trials must be at least 20 (the issue's minimum), got {args.trials}")
    for name in ("context", "steps", "batch_size", "eval_rows", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        raise SystemExit(f"--dtype {args.dtype!r} is not a torch dtype")
    args.bases = parse_bases(args.bases)
    args.distances = parse_ints(args.distances, "distances")
    args.shipped_distances = parse_ints(args.shipped_distances, "shipped-distances")
    args.label = args.label or model_label(args.model)
    if args.output is None:
        args.output = str(REPOSITORY / "results" / "rope_finetune" / f"{args.label}.json")
    return args


def load_text(args) -> tuple[str, dict]:
    if args.text_file is None:
        text = ft.default_text()
        source = "shortlab.data wiki (calib then eval documents)"
    else:
        path = Path(args.text_file)
        if not path.is_file():
            raise SystemExit(f"--text-file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        source = f"file {path.name}"
    return text, {"source": source, "chars": len(text),
                  "sha256": hashlib.sha256(text.encode()).hexdigest()}


def fingerprint(args) -> dict:
    return {key: value for key, value in vars(args).items() if key not in NOT_FINGERPRINTED}


def previous_results(path: Path, parameters: dict) -> dict | None:
    """The partial results of an earlier run with these parameters, to continue; an earlier
    run with other parameters is an error, not silently overwritten."""
    if not path.is_file():
        return None
    previous = json.loads(path.read_text())
    if previous.get("parameters") != parameters:
        changed = sorted(k for k in set(parameters) | set(previous.get("parameters", {}))
                         if parameters.get(k) != previous.get("parameters", {}).get(k))
        raise SystemExit(f"{path} holds results made with other parameters ({', '.join(changed)}); "
                         f"delete it or pass another --output")
    return previous


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.export_text:
        text = ft.default_text()
        write_path = Path(args.export_text)
        write_path.parent.mkdir(parents=True, exist_ok=True)
        write_path.write_text(text, encoding="utf-8")
        log(f"wrote the default text ({len(text)} characters) to {write_path}")
        return 0
    started = time.monotonic()
    output = Path(args.output)
    parameters = fingerprint(args)
    results = previous_results(output, parameters) or {
        "schema": 1, "complete": False, "parameters": parameters, "runs": [], "shipped_passkey": None,
    }
    results["environment"] = dict(
        shortlab=__version__, git_revision=git_revision() or os.environ.get("SHORTLAB_GIT_REVISION"),
        versions=package_versions(("torch", "transformers", "numpy")), device=args.device,
        device_name=torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
        torch_threads=torch.get_num_threads(),
    )
    dtype = getattr(torch, args.dtype)

    log(f"loading {args.model} (label {args.label}) on {args.device}, autocast {args.dtype}")
    base_model, tokenizer = load_model(args.model)  # float32 on the CPU: each run copies it
    own_base = ft.rope_base(base_model)
    config = base_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    max_positions = config.max_position_embeddings
    if args.context > max_positions:
        raise SystemExit(f"--context {args.context} exceeds the model's {max_positions} positions")
    text, text_info = load_text(args)
    ids = ft.tokenize_text(tokenizer, text)
    train_ids, held_out = ft.split_stream(ids, args.eval_fraction)
    text_info.update(tokens=ids.numel(), train_tokens=train_ids.numel(), eval_tokens=held_out.numel())
    rows = ft.eval_rows(held_out, args.context, args.eval_rows)
    edges = ft.position_edges(args.context)
    bases = {label: own_base if label == OWN else float(label) for label in args.bases}
    bounds = {label: max_context(base, head_dim) for label, base in bases.items()}
    longest = args.context - passkey_length(tokenizer, 0)  # the longest distance whose prompt fits
    distances = args.distances or ft.distance_grid(sorted(set(bounds.values())), longest,
                                                   min_passkey_distance(tokenizer))
    if args.smoke:  # a few distances across the grid, bounds included where they fall
        distances = distances[:: max(1, len(distances) // 4)]
    if max(distances) > longest:
        raise SystemExit(f"--distances: {max(distances)} is too long for --context {args.context} "
                         f"(a passkey prompt adds {args.context - longest} tokens; at most {longest})")
    results.update(model=dict(name=args.model, label=args.label, head_dim=head_dim, own_base=own_base,
                              own_bound=max_context(own_base, head_dim), max_positions=max_positions,
                              layers=config.num_hidden_layers),
                   text=text_info, distances=distances, perplexity_edges=edges)
    log(f"text: {ids.numel()} tokens ({train_ids.numel()} train, {held_out.numel()} held out); "
        f"bases {bases}; bounds {bounds}; {len(distances)} passkey distances up to {max(distances)}")

    def out_of_time() -> bool:
        if args.max_minutes is not None and time.monotonic() - started > 60 * args.max_minutes:
            log(f"--max-minutes {args.max_minutes} reached: stopping; rerun to continue")
            write_json_atomically(output, results, indent=1)
            return True
        return False

    done = {run["label"] for run in results["runs"]}
    for label, base in bases.items():
        if label in done:
            log(f"base {label}: already in {output}, skipped")
            continue
        if out_of_time():
            return 3
        log(f"base {label} = {base:g} (bound L_theta = {bounds[label]}): fine-tuning "
            f"{args.steps} steps x {args.batch_size} x {args.context} tokens")
        model = ft.with_rope_base(base_model, base).to(args.device)
        batches = ft.finetune_batches(train_ids, args.context, args.batch_size, seed=args.seed,
                                      tokenizer=tokenizer, task_fraction=args.task_fraction,
                                      answer_weight=args.answer_weight)

        def progress(step: int, loss: float, label=label) -> None:
            if step % max(1, args.steps // 20) == 0 or step + 1 == args.steps:
                log(f"  base {label} step {step + 1}/{args.steps} loss {loss:.3f}")

        history = ft.fine_tune(model, batches, args.steps, lr=args.lr, warmup=args.warmup,
                               autocast_dtype=dtype, gradient_checkpointing=args.gradient_checkpointing,
                               progress=progress)
        log(f"  trained in {history['seconds']:.1f} s "
            f"({history['tokens'] / history['seconds']:.0f} tokens/s); evaluating")
        eval_start = time.perf_counter()
        perplexity = ft.perplexity_by_position(model, rows, edges, autocast_dtype=dtype)
        with ft.autocast(args.device, dtype):
            passkey = passkey_accuracy(model, tokenizer, held_out.tolist(), distances,
                                       trials=args.trials, seed=args.seed, max_length=args.context,
                                       batch_size=args.eval_batch_size)
        results["runs"].append(dict(
            label=label, base=base, head_dim=head_dim, bound=bounds[label], steps=args.steps,
            tokens_seen=history["tokens"], train_seconds=history["seconds"],
            eval_seconds=time.perf_counter() - eval_start, device=results["environment"]["device_name"],
            final_loss=history["loss"][-1], loss_curve=ft.thin_curve(history["loss"]),
            perplexity=perplexity, passkey=passkey,
        ))
        log(f"  perplexity {perplexity['overall']['perplexity']:.2f}; passkey "
            + " ".join(f"{row['distance']}:{row['correct']}/{row['n']}" for row in passkey))
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        write_json_atomically(output, results, indent=1)

    control = next((run for run in results["runs"] if run["label"] == OWN), None)
    for run in results["runs"]:
        run["verdict"] = (None if control is None or run is control
                          else ft.bound_verdicts(run, control, args.context, args.ppl_tolerance))
        if run["verdict"] is not None:
            log(f"base {run['label']}: verdict {run['verdict']['overall']}")

    if args.shipped_distances and results["shipped_passkey"] is None:
        if out_of_time():
            return 3
        reach = max_positions - passkey_length(tokenizer, 0)
        if max(args.shipped_distances) > reach:
            raise SystemExit(f"--shipped-distances: {max(args.shipped_distances)} does not fit the "
                             f"model's {max_positions} positions (at most {reach})")
        log(f"shipped model: passkey at {args.shipped_distances} ({args.trials} trials each)")
        shipped_start = time.perf_counter()
        model = base_model.to(args.device)
        with ft.autocast(args.device, dtype):
            table = passkey_accuracy(model, tokenizer, held_out.tolist(), args.shipped_distances,
                                     trials=args.trials, seed=args.seed, max_length=max_positions,
                                     batch_size=args.eval_batch_size)
        results["shipped_passkey"] = dict(base=own_base, head_dim=head_dim,
                                          bound=max_context(own_base, head_dim),
                                          seconds=time.perf_counter() - shipped_start, passkey=table)
        log("  passkey " + " ".join(f"{row['distance']}:{row['correct']}/{row['n']}" for row in table))
    results["complete"] = True
    results["wall_seconds_last_call"] = time.monotonic() - started
    write_json_atomically(output, results, indent=1)
    log(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
