"""Context managers that observe or change what decoder layers do; the one place in shortlab
that touches module internals.

Every context manager here owns the handles and patches it adds and undoes exactly those in a
``finally`` block, on every exit path (normal exit, an exception in the ``with`` block or inside a
hook during a forward pass), and nested contexts unwind in order; hooks and patches added by
others are never touched.

Hidden states are ``[batch, seq, hidden]``. A layer's input is its first positional argument or
its ``hidden_states`` keyword; its output is a tensor (transformers 5) or a tuple whose first
element is the hidden state (older layers), whose other elements are passed through unchanged.
Layer indices are positions in ``model_parts(model).layers`` and may be negative.

Hooks on a layer run in the order they were registered, so a capture entered inside a
``replace_layer_outputs`` sees the replaced output, and one entered outside sees the layer's own.

Under a ``device_map`` that spreads the layers over devices, a layer's input arrives on the
device of the layer before it (accelerate moves it inside the layer's forward, after our hooks
see it) while its output is on the layer's own device; functions that combine the two get them
on one device, as each one's docstring says.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .arch import model_parts, validate_layer_indices

HiddenFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``fn(hidden_in, hidden_out) -> new_hidden_out``, all ``[batch, seq, hidden]``."""

Reducer = Callable[[int, torch.Tensor, torch.Tensor], object]
"""``fn(layer_index, hidden_in, hidden_out)``, called once per layer and forward pass."""


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_hidden_out(output, hidden: torch.Tensor):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@functools.cache
def _cache_position(layer_class: type) -> int | None:
    """Where ``past_key_values`` sits among the positional arguments of the layer's forward."""
    names = list(inspect.signature(layer_class.forward).parameters)[1:]  # drop ``self``
    return names.index("past_key_values") if "past_key_values" in names else None


def _cache_argument(layer: nn.Module, args: tuple, kwargs: dict):
    """The KV cache a layer was called with, or None (GPT-2 blocks get it positionally)."""
    if "past_key_values" in kwargs:
        return kwargs["past_key_values"]
    position = _cache_position(type(layer))
    return args[position] if position is not None and position < len(args) else None


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration, then every module's own training flag back as it
    was, on every exit path."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextmanager
def _hooks(
    pre: Iterable[tuple[nn.Module, Callable]] = (),
    post: Iterable[tuple[nn.Module, Callable]] = (),
) -> Iterator[None]:
    """Register ``(module, hook)`` pairs as forward pre-hooks / forward hooks (with kwargs) and
    remove exactly those handles on exit, including when registration itself fails halfway."""
    handles = []
    try:
        for module, hook in pre:
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        for module, hook in post:
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()


# ---------------------------------------------------------------- capture


@dataclass
class LayerIO:
    """What ``capture_layer_io`` recorded: per chosen layer, one tensor per forward pass.

    ``inputs[i][k]`` is layer i's input x_i and ``outputs[i][k]`` its output x_{i+1} in the k-th
    forward pass, detached, ``[batch, seq, hidden]``. Both stay empty when a reducer was given.
    """

    layers: tuple[int, ...]
    inputs: dict[int, list[torch.Tensor]]
    outputs: dict[int, list[torch.Tensor]]


@contextmanager
def capture_layer_io(
    model: nn.Module, layers: Iterable[int] | None = None, reduce: Reducer | None = None
) -> Iterator[LayerIO]:
    """Record each chosen layer's input and output hidden states over any number of forward passes.

    ``layers=None`` chooses every layer; an empty selection is an error. With ``reduce``, each
    ``(layer_index, hidden_in, hidden_out)`` pair (detached, ``[batch, seq, hidden]``, the output
    moved to the input's device) goes to ``reduce`` inside the hook and nothing is stored, so a metric over many layers (e.g. a
    streaming Block Influence sum) never holds more than one layer's states::

        with capture_layer_io(model, reduce=accumulator) as record:
            for batch in batches:
                model(**batch)
    """
    parts = model_parts(model)
    chosen = (
        list(range(parts.num_layers)) if layers is None else validate_layer_indices(parts, layers)
    )
    record = LayerIO(
        layers=tuple(chosen),
        inputs={i: [] for i in chosen},
        outputs={i: [] for i in chosen},
    )

    def make_hook(index: int):
        def hook(module, args, kwargs, output):
            hidden_in = _hidden_in(args, kwargs).detach()
            hidden_out = _hidden_out(output).detach()
            if reduce is not None:
                reduce(index, hidden_in, hidden_out.to(hidden_in.device))
            else:
                record.inputs[index].append(hidden_in)
                record.outputs[index].append(hidden_out)

        return hook

    with _hooks(post=[(parts.layers[i], make_hook(i)) for i in chosen]):
        yield record


# ---------------------------------------------------------------- replacing outputs


def _output_hook(index: int, fn: HiddenFn):
    def hook(module, args, kwargs, output):
        hidden_out = _hidden_out(output)
        new = fn(_hidden_in(args, kwargs).to(hidden_out.device), hidden_out)
        if not isinstance(new, torch.Tensor) or new.shape != hidden_out.shape:
            shape = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(
                f"the replacement for layer {index} returned {shape}; expected a tensor of the "
                f"layer output's shape {tuple(hidden_out.shape)}"
            )
        return _with_hidden_out(output, new)

    return hook


@contextmanager
def replace_layer_outputs(
    model: nn.Module, replacements: Mapping[int, HiddenFn]
) -> Iterator[None]:
    """Replace layer outputs: for each ``index: fn``, layer ``index`` returns
    ``fn(hidden_in, hidden_out)`` (same ``[batch, seq, hidden]`` shape) instead of ``hidden_out``;
    ``hidden_in`` is moved to the device of ``hidden_out``, where the result must stay.

    The layer still runs (and fills its KV cache); only what flows on changes. An empty mapping
    is a no-op, so sweeps can include the unpatched baseline.
    """
    parts = model_parts(model)
    validate_layer_indices(parts, replacements, allow_empty=True)
    normalised = {index % parts.num_layers: fn for index, fn in replacements.items()}
    with _hooks(post=[(parts.layers[i], _output_hook(i, fn)) for i, fn in normalised.items()]):
        yield


# ---------------------------------------------------------------- skipping layers


def _advance_cache(cache, kv_index: int, hidden: torch.Tensor) -> None:
    """Append placeholder keys/values for the current tokens to a skipped layer's cache slot.

    The model derives positions and mask sizes from the cache's sequence length (layer 0's by
    default, or the first layer of each attention type), so a skipped layer that wrote nothing
    would silently shift every later decode step. The placeholder is never attended to, so its
    content is irrelevant; it is ``[batch, 1, seq, 1]`` unless the slot already holds real keys.
    """
    # GPT-2 with cross-attention wraps the self-attention cache in an EncoderDecoderCache.
    cache = getattr(cache, "self_attention_cache", cache)
    batch, seq = hidden.shape[:2]
    heads, head_dim = 1, 1
    slots = getattr(cache, "layers", [])
    if kv_index < len(slots) and getattr(slots[kv_index], "keys", None) is not None:
        keys = slots[kv_index].keys
        if keys.dim() == 4:  # an initialised slot: match it so that concatenation works
            heads, head_dim = keys.shape[1], keys.shape[3]
    placeholder = hidden.new_zeros(batch, heads, seq, head_dim)
    cache.update(placeholder, placeholder, kv_index)


def _skipping_forward(layer: nn.Module, kv_index: int):
    def forward(*args, **kwargs):
        hidden = _hidden_in(args, kwargs)
        cache = _cache_argument(layer, args, kwargs)
        if cache is not None:
            _advance_cache(cache, kv_index, hidden)
        return hidden

    return forward


@contextmanager
def _patched_forward(module: nn.Module, forward: Callable) -> Iterator[None]:
    """Set ``module.forward`` on the instance; restore the previous instance attribute (or its
    absence) exactly on exit. Hooks live in ``__call__``, so they keep running around it."""
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had_own:
            module.forward = previous
        else:
            del module.forward


@contextmanager
def skip_layers(model: nn.Module, indices: Iterable[int]) -> Iterator[None]:
    """Run the model with the given decoder layers acting as the identity, skipping their compute.

    The layers' ``forward`` is swapped on the instance, so forward hooks on a skipped layer still
    run (seeing input == output) while its submodules do not. With a KV cache, a skipped layer
    appends placeholder entries so that ``use_cache=True`` and ``generate`` stay consistent (see
    ``_advance_cache``). A skipped layer returns the bare hidden-state tensor, the transformers 5
    convention. An empty selection is a no-op.
    """
    parts = model_parts(model)
    with ExitStack() as stack:
        for i in validate_layer_indices(parts, indices, allow_empty=True):
            layer = parts.layers[i]
            stack.enter_context(
                _patched_forward(layer, _skipping_forward(layer, parts.kv_cache_index(layer)))
            )
        yield


# ---------------------------------------------------------------- ShortV: frozen tokens


def _check_token_mask(token_mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(token_mask, torch.Tensor) or token_mask.dtype != torch.bool:
        got = getattr(token_mask, "dtype", type(token_mask).__name__)
        raise TypeError(f"token_mask must be a bool tensor [batch, seq], got {got}")
    if token_mask.dim() != 2:
        raise ValueError(
            f"token_mask must have shape [batch, seq], got shape {tuple(token_mask.shape)}"
        )
    return token_mask


def _mask_window(
    token_mask: torch.Tensor, hidden: torch.Tensor, past: int, has_cache: bool, index: int
) -> torch.Tensor:
    """The part of ``token_mask`` covering the positions ``past .. past + seq - 1`` of ``hidden``
    ``[batch, seq, hidden]``, False beyond the mask; returns ``[batch, seq]``."""
    batch, seq = hidden.shape[:2]
    mask_batch, mask_seq = token_mask.shape
    if batch != mask_batch or (not has_cache and seq < mask_seq):
        raise ValueError(
            f"token_mask of shape {(mask_batch, mask_seq)} does not match the hidden states "
            f"{(batch, seq)} entering layer {index}"
            + ("" if batch != mask_batch else " (without a KV cache the input must cover the mask)")
        )
    window = token_mask[:, past : past + seq].to(hidden.device)
    if window.shape[1] < seq:
        window = torch.cat([window, window.new_zeros(batch, seq - window.shape[1])], dim=1)
    return window


@contextmanager
def keep_tokens_unchanged(
    model: nn.Module, layers: Iterable[int], token_mask: torch.Tensor
) -> Iterator[None]:
    """In the given layers, tokens where ``token_mask`` (bool ``[batch, seq]``) is True leave the
    layer with their input hidden state (no attention or MLP update), while still serving as keys
    and values for the other tokens: layer ``i`` outputs ``where(mask, x_in, x_out)``.

    This is ShortV's Layer Contribution intervention (e.g. ``mask = input_ids == image_token_id``).

    ``token_mask[b, t]`` refers to absolute position ``t`` of the sequence. A forward pass over
    positions ``past .. past + seq - 1`` (``past`` = tokens already in the KV cache) uses that
    window of the mask, and positions at or beyond the mask's length (tokens generated after the
    prompt) are updated normally, so ``generate`` with or without a cache gives the same result.
    The batch size must match, and without a cache the input must be at least as long as the mask;
    anything else raises ``ValueError``. An empty layer selection is a no-op.
    """
    parts = model_parts(model)
    chosen = validate_layer_indices(parts, layers, allow_empty=True)
    token_mask = _check_token_mask(token_mask)
    # Filled by a pre-hook (before the layer writes its cache), read by the output hook.
    call_state: dict[int, tuple[int, bool]] = {}

    def make_pre_hook(index: int):
        kv_index = parts.kv_cache_index(index)

        def hook(module, args, kwargs):
            cache = _cache_argument(module, args, kwargs)
            past = 0 if cache is None else cache.get_query_offset(kv_index)
            call_state[index] = (past, cache is not None)

        return hook

    def make_keep(index: int) -> HiddenFn:
        def keep(hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> torch.Tensor:
            past, has_cache = call_state.pop(index)
            window = _mask_window(token_mask, hidden_out, past, has_cache, index)
            return torch.where(window.unsqueeze(-1), hidden_in, hidden_out)

        return keep

    with _hooks(
        pre=[(parts.layers[i], make_pre_hook(i)) for i in chosen],
        post=[(parts.layers[i], _output_hook(i, make_keep(i))) for i in chosen],
    ):
        yield
