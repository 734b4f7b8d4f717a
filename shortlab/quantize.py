"""Simulated weight quantisation of the decoder layers (int8, 4-bit, …), to measure what it costs.

``quantize_weights(model, bits, group_size)`` rounds every weight matrix inside the decoder layers
to ``bits``-bit integers, symmetric round-to-nearest with levels −(2^(bits−1) − 1) … 2^(bits−1) − 1,
with one scale per output channel (``group_size=None``) or per group of ``group_size``
consecutive input channels of each output channel (the GGUF/GPTQ-style group-wise layout; 4 bits
in groups of 32 is close to llama.cpp's Q4_0), and stores the de-quantised values back in the
model's own dtype. ``quantize_weights_int8`` is the 8-bit, per-channel case. The model computes
exactly what a weight-only kernel with float activations would compute, so perplexity and
benchmark scores measure the accuracy cost of the quantised weights; it does **not** run faster
or take less memory (the weights stay floats). ``quantized_parameter_bytes`` says how many bytes
the same model would take with those weights stored as integers plus their scales.

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


def _check_scheme(bits: int, group_size: int | None) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an int in 2..16, got {bits!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1):
        raise ValueError(f"group_size must be a positive int or None (one scale per channel), got {group_size!r}")


def round_trip(weight: torch.Tensor, channel_dim: int = 0, bits: int = 8,
               group_size: int | None = None) -> torch.Tensor:
    """Quantise ``weight`` to ``bits``-bit integers and de-quantise it again.

    ``weight``: [out, in] (``channel_dim=0``) or [in, out] (``channel_dim=1``). Each scale group —
    a whole output channel, or ``group_size`` consecutive input channels of it (the last group may
    be shorter) — gets s = max|w| / q_max with q_max = 2^(bits−1) − 1, and w ↦ s · clamp(round(w / s),
    −q_max, q_max), computed in float32 and returned in ``weight``'s dtype and shape (a new
    tensor). All-zero groups stay zero.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-d weight matrix, got shape {tuple(weight.shape)}")
    if channel_dim not in (0, 1):
        raise ValueError(f"channel_dim must be 0 or 1, got {channel_dim}")
    _check_scheme(bits, group_size)
    q_max = 2 ** (bits - 1) - 1
    w = weight.float() if channel_dim == 0 else weight.float().T  # [out, in]
    n_out, n_in = w.shape
    group = n_in if group_size is None else min(group_size, n_in)
    n_groups = -(-n_in // group)
    padded = torch.nn.functional.pad(w, (0, n_groups * group - n_in)).view(n_out, n_groups, group)
    scale = padded.abs().amax(dim=2, keepdim=True) / q_max  # zero padding never raises a max
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    levels = torch.round(padded / safe_scale).clamp(-q_max, q_max)
    result = (levels * safe_scale).view(n_out, n_groups * group)[:, :n_in]
    return (result if channel_dim == 0 else result.T).contiguous().to(weight.dtype)


def int8_round_trip(weight: torch.Tensor, channel_dim: int = 0) -> torch.Tensor:
    """``round_trip`` with 8 bits and one scale per output channel (levels −127..127)."""
    return round_trip(weight, channel_dim, bits=8)


def quantize_weights(model: nn.Module, bits: int = 8, group_size: int | None = None,
                     inplace: bool = False) -> nn.Module:
    """The model with every decoder-layer weight matrix replaced by its ``round_trip`` (``bits``,
    ``group_size``); biases, embeddings, norms and the LM head are unchanged. ``inplace=False``
    (default) works on a deep copy and leaves ``model`` untouched; ``inplace=True`` edits
    ``model`` and returns it."""
    _check_scheme(bits, group_size)
    target = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for module in decoder_weight_modules(target).values():
            weight = module.weight
            weight.copy_(round_trip(weight, _output_channel_dim(module), bits, group_size))
    return target


def quantize_weights_int8(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``quantize_weights`` with 8 bits and one scale per output channel."""
    return quantize_weights(model, bits=8, inplace=inplace)


def quantized_parameter_bytes(model: nn.Module, bits: int = 8, group_size: int | None = None,
                              scale_bytes: int = 4) -> int:
    """Bytes of the model's parameters if its decoder-layer weight matrices were stored as
    ``bits``-bit integers (packed) with one ``scale_bytes`` scale per scale group (see
    ``round_trip``), every other parameter as it is now (tied or shared parameters counted once)."""
    _check_scheme(bits, group_size)
    quantised = {}
    for module in decoder_weight_modules(model).values():
        channel_dim = _output_channel_dim(module)
        n_out, n_in = module.weight.shape[channel_dim], module.weight.shape[1 - channel_dim]
        groups_per_channel = 1 if group_size is None else -(-n_in // group_size)
        quantised[id(module.weight)] = -(-n_out * n_in * bits // 8) + scale_bytes * n_out * groups_per_channel
    total = 0
    for parameter in model.parameters():  # yields each shared parameter once
        total += quantised.get(id(parameter), parameter.numel() * parameter.element_size())
    return total


def int8_parameter_bytes(model: nn.Module) -> int:
    """``quantized_parameter_bytes`` for int8 weights with one float32 scale per output channel."""
    return quantized_parameter_bytes(model, bits=8)
