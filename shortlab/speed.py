"""What removing layers buys: measured prefill and decode speed, parameter and KV-cache memory.

Speeds are measured side by side (``benchmarking.time_side_by_side``: every model's prefill and
decode alternate within one run, in rotating order) and reported as medians, because the
machines this runs on are shared and noisy; compare models measured in the same call, not
numbers from different calls. On CUDA every timed call is bracketed by synchronising the
devices the models live on, so the seconds count the GPU work, not only its queueing.

* prefill: one forward pass over a [batch, prompt_len] prompt that fills a KV cache, the LM head
  on the last position only (as ``generate`` runs it);
* decode: ``new_tokens`` greedy steps of one token each, starting from a cache prefilled with
  the same prompt outside the timed region (each timed run starts from a fresh copy of it; the
  copy is inside the timed region and costs about as much as reading the cache once).

Prompts are seeded random token ids: speed does not depend on what the tokens say, and greedy
decoding never stops early because no end-of-sequence check is made.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from shortlab.arch import model_parts, supports_logits_to_keep
from shortlab.benchmarking import cuda_devices, time_side_by_side
from shortlab.quantize import decoder_weight_modules


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters as stored now (tied or shared parameters counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def matmul_weight_count(model: nn.Module) -> int:
    """Weights every token is multiplied by in a forward pass: the decoder layers' linear
    modules plus the LM head (embedding lookups and norms excluded). The ratio of two models'
    counts is the compute-bound speedup to expect at short context, where attention scores are
    cheap; unlike L / (L − n) it accounts for the LM head, which removing layers leaves alone."""
    layers = sum(module.weight.numel() for module in decoder_weight_modules(model).values())
    return layers + model_parts(model).lm_head.weight.numel()


def _device(model: nn.Module) -> torch.device:
    return model_parts(model).embed_tokens.weight.device


def _head_kwargs(model: nn.Module) -> dict:
    return {"logits_to_keep": 1} if supports_logits_to_keep(model) else {}


def random_prompt(model: nn.Module, batch_size: int, length: int, seed: int = 0) -> torch.Tensor:
    """Seeded random token ids, LongTensor[batch_size, length] on the model's input device."""
    if batch_size < 1 or length < 1:
        raise ValueError(f"batch_size and length must be at least 1, got {batch_size} and {length}")
    vocab = model_parts(model).embed_tokens.weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, length), generator=generator).to(_device(model))


@torch.inference_mode()
def prefill(model: nn.Module, input_ids: torch.Tensor):
    """One forward pass over ``input_ids`` [batch, seq] filling a new KV cache.

    Returns (cache, next token ids LongTensor[batch, 1] chosen greedily)."""
    output = model(input_ids=input_ids, use_cache=True, **_head_kwargs(model))
    return output.past_key_values, output.logits[:, -1].argmax(dim=-1, keepdim=True)


@torch.inference_mode()
def decode(model: nn.Module, cache, next_ids: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` greedy one-token forward passes continuing from ``cache`` (which grows by
    ``steps`` positions). ``next_ids``: LongTensor[batch, 1]. Returns the generated ids
    LongTensor[batch, steps]."""
    generated = []
    for _ in range(steps):
        output = model(input_ids=next_ids, past_key_values=cache, use_cache=True)
        next_ids = output.logits[:, -1].argmax(dim=-1, keepdim=True)
        generated.append(next_ids)
    return torch.cat(generated, dim=1)


def _cache_tensors(cache) -> list[torch.Tensor]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"cannot read the key/value tensors of a {type(cache).__name__}")
    return [tensor for layer in layers for tensor in (layer.keys, layer.values) if tensor is not None]


def kv_cache_bytes(model: nn.Module, context_len: int, batch_size: int = 1, seed: int = 0) -> int:
    """Measured bytes of the KV cache the model keeps after prefilling ``context_len`` tokens
    (``batch_size`` sequences): the key and value tensors of every layer, as the model's own
    cache stores them (sliding-window layers keep only their window)."""
    cache, _ = prefill(model, random_prompt(model, batch_size, context_len, seed))
    return sum(tensor.numel() * tensor.element_size() for tensor in _cache_tensors(cache))


@dataclass(frozen=True)
class SpeedMeasurement:
    """Timed runs of one model: seconds per prefill call and per decode call."""

    prefill_tokens: int  # tokens processed per prefill call (batch × prompt length)
    decode_tokens: int  # tokens generated per decode call (batch × new tokens)
    prefill_seconds: tuple[float, ...]
    decode_seconds: tuple[float, ...]

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / statistics.median(self.prefill_seconds)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / statistics.median(self.decode_seconds)


def measure_speed(models: Mapping[str, nn.Module], prompt_len: int = 128, new_tokens: int = 16,
                  batch_size: int = 1, repeats: int = 5, warmup: int = 1, seed: int = 0
                  ) -> dict[str, SpeedMeasurement]:
    """Prefill and decode timings of several models, interleaved in one run.

    Every model gets the same seeded prompt [batch_size, prompt_len] (the models must share a
    vocabulary). Returns {name: SpeedMeasurement} with ``repeats`` timed runs each, after
    ``warmup`` untimed ones. The models are only run, never modified.
    """
    if not models:
        raise ValueError("no models to measure")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be at least 1, got {new_tokens}")
    vocabularies = {name: model_parts(m).embed_tokens.weight.shape[0] for name, m in models.items()}
    if len(set(vocabularies.values())) != 1:
        raise ValueError(f"the models must share one vocabulary to get the same prompt: {vocabularies}")
    candidates = {}
    for name, model in models.items():
        prompt = random_prompt(model, batch_size, prompt_len, seed)
        cache, first = prefill(model, prompt)

        def run_prefill(model=model, prompt=prompt):
            prefill(model, prompt)

        def run_decode(model=model, cache=cache, first=first):
            decode(model, copy.deepcopy(cache), first, new_tokens)

        candidates[f"{name}/prefill"] = run_prefill
        candidates[f"{name}/decode"] = run_decode
    seconds = time_side_by_side(candidates, repeats=repeats, warmup=warmup,
                                devices=cuda_devices(*models.values()))
    return {
        name: SpeedMeasurement(
            prefill_tokens=batch_size * prompt_len,
            decode_tokens=batch_size * new_tokens,
            prefill_seconds=tuple(seconds[f"{name}/prefill"]),
            decode_seconds=tuple(seconds[f"{name}/decode"]),
        )
        for name in models
    }
