"""Simulated int8 weight quantisation of the decoder layers, to measure what it costs in accuracy.

``quantize_weights_int8`` rounds every weight matrix inside the decoder layers to int8 with one
symmetric scale per output channel (round to nearest, levels −127..127) and stores the
de-quantised values back in the model's own dtype. The model computes exactly what an int8
weight-only kernel with float activations would compute, so perplexity and benchmark scores
measure the accuracy cost of int8 weights; it does **not** run faster or take less memory (the
weights stay floats). ``int8_parameter_bytes`` says how many bytes the same model would take
with those weights stored as int8 plus their scales.

Why simulated: in torch 2.13 ``torch.ao.quantization.quantize_dynamic`` still runs on CPU, but
every call warns that ``torch.ao.quantization`` is deprecated and slated for removal (the
migration path is the separate ``torchao`` package), the quantized-tensor constructors it uses
are deprecated as well, and its default scheme is one scale per tensor. Building a notebook on
an API announced as going away would not age well; the simulation is exact about accuracy and
independent of any kernel. Token embeddings, norms and the LM head are left in full precision,
as weight-only int8 schemes usually do.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from shortlab.arch import model_parts

INT8_MAX = 127


def _output_channel_dim(module: nn.Module) -> int | None:
    """The weight axis holding output channels: 0 for ``nn.Linear`` ([out, in]), 1 for the
    GPT-2-style ``Conv1D`` ([in, out]); None for any other module."""
    if isinstance(module, nn.Linear):
        return 0
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return 1
    return None


def decoder_weight_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The linear modules (``nn.Linear``, GPT-2 ``Conv1D``) inside the decoder layers, by their
    qualified name in ``model`` (e.g. ``model.layers.3.mlp.down_proj``)."""
    parts = model_parts(model)
    found = {
        f"{parts.layers_path}.{name}": module
        for name, module in parts.layers.named_modules()
        if _output_channel_dim(module) is not None
    }
    if not found:
        raise ValueError(
            f"no nn.Linear or Conv1D module inside the decoder layers of {type(model).__name__}"
        )
    return found


def int8_round_trip(weight: torch.Tensor, channel_dim: int = 0) -> torch.Tensor:
    """Quantise ``weight`` to int8 per output channel and de-quantise it again.

    ``weight``: [out, in] (``channel_dim=0``) or [in, out] (``channel_dim=1``). Each channel c
    gets scale s_c = max|w_c| / 127 and w ↦ s_c · clamp(round(w / s_c), −127, 127), computed
    in float32 and returned in ``weight``'s dtype and shape (a new tensor). All-zero channels
    stay zero.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-d weight matrix, got shape {tuple(weight.shape)}")
    if channel_dim not in (0, 1):
        raise ValueError(f"channel_dim must be 0 or 1, got {channel_dim}")
    w = weight.float()
    scale = w.abs().amax(dim=1 - channel_dim, keepdim=True) / INT8_MAX
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    levels = torch.round(w / safe_scale).clamp(-INT8_MAX, INT8_MAX)
    return (levels * safe_scale).to(weight.dtype)


def quantize_weights_int8(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The model with every decoder-layer weight matrix replaced by its int8 round trip
    (``int8_round_trip``, one scale per output channel); biases, embeddings, norms and the LM
    head are unchanged. ``inplace=False`` (default) works on a deep copy and leaves ``model``
    untouched; ``inplace=True`` edits ``model`` and returns it."""
    target = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for module in decoder_weight_modules(target).values():
            weight = module.weight
            weight.copy_(int8_round_trip(weight, _output_channel_dim(module)))
    return target


def int8_parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters if its decoder-layer weight matrices were stored as int8
    with one float32 scale per output channel, every other parameter as it is now (tied or
    shared parameters counted once)."""
    quantised = {
        id(module.weight): module.weight.shape[_output_channel_dim(module)]
        for module in decoder_weight_modules(model).values()
    }
    total = 0
    for parameter in model.parameters():  # yields each shared parameter once
        if id(parameter) in quantised:
            total += parameter.numel() + 4 * quantised[id(parameter)]
        else:
            total += parameter.numel() * parameter.element_size()
    return total
