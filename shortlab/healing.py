"""Healing a pruned model: a short recovery training on calibration text.

ShortGPT reports its pruned models without retraining; later work heals them, either with a LoRA
adapter over every decoder layer (Gromov et al., 2024) or by fine-tuning only the LM head and the
last layers (Lu et al., 2024, "Reassessing layer pruning"). ``heal(model, tokenizer, config)``
does either, on blocks of the *calibration* split of a text source (never the split perplexity
is measured on), so that every pruned variant healed with one ``HealingConfig`` gets the same
budget: the same steps, blocks per step and tokens, in the same order.

* ``method="lora"``: a LoRA adapter (the ``peft`` package) on every linear layer of the decoder
  layers, trained, then merged into the weights: the model keeps its architecture and plain
  transformers reloads it.
* ``method="last_layers"``: the last ``last_layers`` decoder layers, the final norm and the LM
  head are trained, everything else frozen. A head tied to the input embeddings is untied first
  (otherwise training it would change the embeddings too): the model then has its own head
  matrix and ``tie_word_embeddings = False``.

Training runs with the model in eval mode: no dropout (the adapter has none either), so a
healing is determined by its seed and resumes exactly. The trained weights must be float32
(load the model in float32; ``compute_dtype="bfloat16"`` still runs the passes in bfloat16).

``heal`` changes ``model``'s weights in place; that is what it is for. Everything else is left as
it was: the ``requires_grad`` flags, train/eval mode, and, when it raises or stops at its
``deadline``, the weights themselves (the adapter is removed unmerged; trained layers are restored
from a copy). With ``checkpoint`` it saves the trainable state every ``checkpoint_every`` steps
(atomically) and resumes from it: a long healing runs in chunks, and a checkpoint made for other
weights or another configuration is refused. The data order and the adapter's initialisation come
from ``config.seed``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from shortlab.arch import model_parts
from shortlab.models import warn_if_bfloat16_is_emulated

METHODS = ("lora", "last_layers")


@dataclasses.dataclass(frozen=True)
class HealingConfig:
    """One healing budget and recipe. ``steps`` × ``batch_size`` blocks of ``block_size`` tokens of
    ``source``'s calibration split (``shortlab.data``), AdamW at ``lr`` after ``warmup`` linear
    steps, then cosine decay to zero; gradients clipped to norm 1. ``lora_rank``/``lora_alpha``:
    the adapter (``lora``); ``last_layers``: how many final decoder layers ``last_layers`` trains.
    ``compute_dtype``: "float32", or "bfloat16" to run the forward and backward passes under
    autocast (several times faster on CPUs with AMX and on GPUs; the weights stay in their dtype)."""

    method: str = "lora"
    steps: int = 100
    batch_size: int = 4
    block_size: int = 256
    lr: float = 2e-4
    warmup: int = 10
    lora_rank: int = 8
    lora_alpha: float = 16.0
    last_layers: int = 2
    source: str = "wiki"
    seed: int = 0
    compute_dtype: str = "float32"

    def __post_init__(self):
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown healing method {self.method!r}; known: {', '.join(METHODS)}")
        for name in ("steps", "batch_size", "lora_rank", "last_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.block_size < 2:
            raise ValueError(f"block_size must be at least 2 tokens, got {self.block_size}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must be in 0..steps-1 ({self.steps - 1}), got {self.warmup}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    @property
    def tokens(self) -> int:
        """Tokens seen in training: the budget every healed variant shares."""
        return self.steps * self.batch_size * self.block_size

    @property
    def label(self) -> str:
        """A short, unique name for stores and figures, e.g. ``lora-r8-100x4x256-s0-1a2b3c``: the
        recipe's main numbers, the seed, and a hash of every field (two recipes that differ in
        any of them get different names)."""
        import hashlib
        import json

        recipe = f"r{self.lora_rank}" if self.method == "lora" else f"last{self.last_layers}"
        precision = "-bf16" if self.compute_dtype == "bfloat16" else ""
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:6]
        return (f"{self.method}-{recipe}-{self.steps}x{self.batch_size}x{self.block_size}{precision}"
                f"-s{self.seed}-{digest}")


def training_blocks(tokenizer, config: HealingConfig) -> torch.Tensor:
    """The blocks healing trains on, in training order: LongTensor[steps × batch_size, block_size]
    from the calibration split of ``config.source`` (documents shuffled with ``config.seed``)."""
    from shortlab.data import calibration_batch

    return calibration_batch(tokenizer, config.source, config.steps * config.batch_size, config.block_size,
                             split="calib", seed=config.seed)["input_ids"]


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: ``logits`` [B, T, V] at position t predict ``input_ids``
    [B, T] at t + 1; the first token of a block (a BOS, or text) is context only."""
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                       input_ids[:, 1:].reshape(-1))


def linear_targets(model: nn.Module) -> list[str]:
    """Full names of the linear layers inside the decoder layers (what the LoRA adapter wraps)."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    layers = {id(layer) for layer in model_parts(model).layers}
    names = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and any(
                id(owner) in layers for owner in _owners(model, name)):
            names.append(name)
    return names


def _owners(model: nn.Module, name: str) -> Iterator[nn.Module]:
    module = model
    for part in name.split(".")[:-1]:
        module = getattr(module, part)
        yield module


def _configs(model: nn.Module) -> list:
    parts = model_parts(model)
    return list({id(c): c for c in (model.config, parts.text_config)}.values())


def untie_lm_head(model: nn.Module) -> list | None:
    """Give the LM head its own copy of the weight it shares with the input embeddings, and
    record ``tie_word_embeddings = False`` in the config(s). Returns what each config said
    before ([(config, value or the missing marker)], for ``retie_lm_head``), None when the head
    was not tied."""
    parts = model_parts(model)
    head = parts.lm_head
    if head.weight.data_ptr() != parts.embed_tokens.weight.data_ptr():
        return None
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    before = [(config, config.__dict__.get("tie_word_embeddings", _MISSING)) for config in _configs(model)]
    for config, _ in before:
        config.tie_word_embeddings = False
    return before


def retie_lm_head(model: nn.Module, before: list) -> None:
    """Undo ``untie_lm_head``: the head shares the embeddings' weight again and each config says
    what it said before."""
    parts = model_parts(model)
    parts.lm_head.weight = parts.embed_tokens.weight
    for config, value in before:
        if value is _MISSING:
            config.__dict__.pop("tie_word_embeddings", None)
        else:
            config.tie_word_embeddings = value


_MISSING = object()


def _schedule(config: HealingConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / (config.warmup + 1)
        progress = (step - config.warmup) / max(config.steps - config.warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@contextlib.contextmanager
def _kept_flags(model: nn.Module) -> Iterator[None]:
    """Restore every parameter's ``requires_grad``, the train/eval mode of every module, and the
    config fields peft changes (``pretraining_tp``) on exit."""
    flags = {name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)}
    modes = {name: module.training for name, module in model.named_modules()}
    configs = [(config, config.__dict__.get("pretraining_tp", _MISSING)) for config in _configs(model)]
    try:
        yield
    finally:
        for name, parameter in model.named_parameters(remove_duplicate=False):
            if name in flags:
                parameter.requires_grad_(flags[name])
        for name, module in model.named_modules():
            if name in modes:
                module.train(modes[name])
        for config, value in configs:
            if value is _MISSING:
                config.__dict__.pop("pretraining_tp", None)
            else:
                config.pretraining_tp = value


class _Trainable:
    """What one method trains: set up on the model, its state for checkpoints, and how it ends."""

    def __init__(self, model: nn.Module, config: HealingConfig):
        self.model, self.config = model, config
        self.tied_before = None
        if config.method == "lora":
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError:
                raise ImportError("healing with a LoRA adapter needs the peft package: "
                                  "pip install 'shortlab[heal]' (or pip install peft)") from None

            targets = linear_targets(model)
            if not targets:
                raise ValueError(f"{type(model).__name__} has no linear layers in its decoder layers to adapt")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)  # the adapter's initialisation
                self.wrapped = get_peft_model(model, LoraConfig(
                    r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0, bias="none",
                    target_modules=targets))
            self.parameters = [p for p in self.wrapped.parameters() if p.requires_grad]
            self._original = None
        else:
            parts = model_parts(model)
            if config.last_layers >= parts.num_layers:
                raise ValueError(f"last_layers {config.last_layers}: the model has {parts.num_layers} decoder "
                                 f"layers; train fewer than all of them")
            modules = [*parts.layers[parts.num_layers - config.last_layers:], parts.final_norm, parts.lm_head]
            low = sorted({str(p.dtype) for m in modules for p in m.parameters() if p.dtype != torch.float32})
            if low:
                raise ValueError(f"last_layers trains the weights themselves, which are {', '.join(low)} here: "
                                 "updates that small round away; load the model in float32 (compute_dtype="
                                 "'bfloat16' still runs the passes in bfloat16)")
            self.tied_before = untie_lm_head(model)
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            self.parameters = list(dict.fromkeys(p for m in modules for p in m.parameters()))
            for parameter in self.parameters:
                parameter.requires_grad_(True)
            self._original = [p.detach().clone() for p in self.parameters]
            self.wrapped = model

    def state(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.parameters]

    def load(self, state: list[torch.Tensor]) -> None:
        if len(state) != len(self.parameters) or any(a.shape != b.shape for a, b in zip(state, self.parameters)):
            raise ValueError("the checkpoint's trainable tensors do not match this model and method")
        with torch.no_grad():
            for parameter, value in zip(self.parameters, state):
                parameter.copy_(value)

    @property
    def untied(self) -> bool:
        return self.tied_before is not None

    def finish(self) -> None:
        """Make the training permanent: merge the adapter into the weights (all of it or, should a
        merge fail, none: the merged layers are unmerged before the error goes on)."""
        if self.config.method == "lora":
            try:
                self.wrapped.merge_adapter()
            except BaseException:
                self.wrapped.unmerge_adapter()
                raise
            self.wrapped.unload()  # the base layers keep the merged weights

    def abandon(self) -> None:
        """Leave the model as it was before healing."""
        if self.config.method == "lora":
            self.wrapped.unload()
            return
        with torch.no_grad():
            for parameter, value in zip(self.parameters, self._original):
                parameter.copy_(value)
        if self.untied:  # tie the head back to the embeddings it was copied from
            retie_lm_head(self.model, self.tied_before)


def heal(model: nn.Module, tokenizer, config: HealingConfig, *, checkpoint: str | Path | None = None,
         checkpoint_every: int = 10, deadline: float | None = None, max_steps: int | None = None,
         log: Callable[[str], None] | None = print) -> dict:
    """Train ``model`` (in place) as ``config`` says on calibration text of ``tokenizer``'s
    encoding; see the module docstring. Returns the healing record: the config, the tokens seen,
    the trainable parameter count, the loss per step, the wall time, and ``complete``. With a
    ``checkpoint``, a chunk can end early: at the first step past ``deadline`` (a
    ``time.monotonic()`` value) or after ``max_steps`` steps in this call; ``complete`` is then
    False, the progress saved and the model as it was."""
    from shortlab.files import write_atomically
    from shortlab.runs import weights_fingerprint

    if (deadline is not None or max_steps is not None) and checkpoint is None:
        raise ValueError("stopping early (deadline, max_steps) needs a checkpoint to resume from")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
    blocks = training_blocks(tokenizer, config)
    device = model.get_input_embeddings().weight.device
    warn_if_bfloat16_is_emulated(config.compute_dtype, device, "healing")
    signature = {"config": dataclasses.asdict(config), "weights": weights_fingerprint(model.named_parameters())}
    saved = None
    if checkpoint is not None and Path(checkpoint).is_file():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if saved["signature"] != signature:
            raise ValueError(f"{checkpoint} holds a healing of other weights or with another configuration "
                             f"({saved['signature']['config']}); delete it or pass another path")

    with _kept_flags(model):
        trainable = _Trainable(model, config)
        done = False
        try:
            optimizer = torch.optim.AdamW(trainable.parameters, lr=config.lr, weight_decay=0.0)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
            step, losses, seconds = 0, [], 0.0
            if saved is not None:
                trainable.load(saved["trainable"])
                optimizer.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
                step, losses, seconds = saved["step"], saved["losses"], saved["seconds"]
                if log:
                    log(f"healing resumes at step {step} of {config.steps} from {checkpoint}")
            trainable.wrapped.eval()  # no dropout: a healing is its seed's, and resumes exactly
            start = time.perf_counter()

            def save(at_step: int) -> None:
                state = {"signature": signature, "trainable": trainable.state(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "step": at_step, "losses": losses,
                         "seconds": seconds + time.perf_counter() - start}
                write_atomically(checkpoint, lambda path: torch.save(state, path))

            first_step = step
            while step < config.steps:
                if ((deadline is not None and time.monotonic() > deadline)
                        or (max_steps is not None and step - first_step >= max_steps)):
                    save(step)
                    if log:
                        log(f"healing stops at step {step} of {config.steps} for now: saved to {checkpoint}")
                    return {**_record(config, trainable, losses, seconds + time.perf_counter() - start), "complete": False}
                batch = blocks[step * config.batch_size:(step + 1) * config.batch_size].to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.compute_dtype == "bfloat16"):
                    logits = trainable.wrapped(input_ids=batch, use_cache=False).logits
                loss = causal_lm_loss(logits, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable.parameters, 1.0)
                optimizer.step()
                scheduler.step()
                losses.append(round(loss.item(), 5))
                step += 1
                if log and (step == 1 or step % 10 == 0 or step == config.steps):
                    log(f"healing step {step}/{config.steps}: loss {losses[-1]:.4f}")
                if checkpoint is not None and (step % checkpoint_every == 0 or step == config.steps):
                    save(step)
            record = _record(config, trainable, losses, seconds + time.perf_counter() - start)
            trainable.finish()
            done = True
        finally:
            if not done:
                trainable.abandon()
            for parameter in trainable.parameters:
                parameter.grad = None
    return {**record, "complete": True}


def _record(config: HealingConfig, trainable: _Trainable, losses: list[float], seconds: float) -> dict:
    from shortlab import __version__

    tail = losses[-10:]
    return {"shortlab_version": __version__, **dataclasses.asdict(config), "label": config.label,
            "split": "calib", "tokens": config.tokens,
            "trainable_parameters": sum(p.numel() for p in trainable.parameters),
            "untied_lm_head": trainable.untied, "steps_done": len(losses),
            "first_loss": losses[0] if losses else None,
            "final_loss": round(sum(tail) / len(tail), 5) if tail else None,
            "losses": losses, "seconds": round(seconds, 1)}
