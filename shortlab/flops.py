"""Decoder FLOPs of one prefill: dense, with ShortV-frozen layers, with FastV, or both.

The ShortV paper (arXiv 2504.00502) counts, per decoder layer with ``t`` text and ``v`` visual
tokens (``n = t + v``), hidden size ``h`` and MLP width ``m``::

    dense layer          2n(4h + 3m)h + 4n²h
    ShortV-frozen layer  2t(4h + 3m)h + 4vh² + 4t(t + v)h

i.e. the q, k, v, o projections (4 · 2nh²), the gated MLP's three matrices (3 · 2nhm) and
attention's two products QKᵀ and AV (2 · 2n²h); in a frozen layer only the ``t`` text tokens are
queries and go through o and the MLP, while k and v are still computed for all ``n`` tokens.

Here the same count is made for grouped-query attention: q and o are ``h × q_dim`` with
``q_dim = num_attention_heads · head_dim``, k and v are ``h × kv_dim`` with
``kv_dim = num_key_value_heads · head_dim``, and the attention products scale with ``q_dim``
(keys and values are shared by head groups, but every query head does its own products). With
``q_dim = kv_dim = h`` the formulas above come back exactly (tested).

Counted: those matrix multiplications of every decoder layer, a multiply-add being 2 FLOPs, for
one sequence (multiply by the batch size for a batch). Attention is counted in full, ``n × n``,
as the paper does and as an attention kernel with an explicit mask computes it (a causal kernel
skipping the upper triangle does about half). Not counted: token embeddings, the LM head, norms,
RoPE, softmax, activations and residual additions, the vision tower and projector, and FastV's
scoring in layer ``k − 1`` (one extra query: ``2h · q_dim + 2n · q_dim``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .arch import model_parts, validate_layer_indices
from .hooks import _hooks


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a decoder stack that its FLOPs depend on."""

    num_layers: int
    hidden: int  # h
    intermediate: int  # m, the MLP width
    q_dim: int  # num_attention_heads · head_dim (width of q and of o's input)
    kv_dim: int  # num_key_value_heads · head_dim (width of k and v)

    @classmethod
    def from_config(cls, config) -> DecoderShape:
        """Read a (text) config; a multimodal config's text config is used."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(
            num_layers=config.num_hidden_layers, hidden=config.hidden_size,
            intermediate=config.intermediate_size, q_dim=heads * head_dim,
            kv_dim=kv_heads * head_dim,
        )


def _shape(config_or_shape) -> DecoderShape:
    if isinstance(config_or_shape, DecoderShape):
        return config_or_shape
    return DecoderShape.from_config(config_or_shape)


def dense_layer_flops(config_or_shape, n_tokens: int) -> int:
    """FLOPs of one dense decoder layer over ``n_tokens`` tokens (all queries, all keys)."""
    s = _shape(config_or_shape)
    n = n_tokens
    projections = 2 * n * s.hidden * (2 * s.q_dim + 2 * s.kv_dim)
    mlp = 2 * n * s.hidden * 3 * s.intermediate
    attention = 4 * n * n * s.q_dim
    return projections + mlp + attention


def frozen_layer_flops(config_or_shape, n_text: int, n_visual: int) -> int:
    """FLOPs of one ShortV-frozen layer: ``n_text`` queries (q, o, MLP, attention rows) over
    ``n_text + n_visual`` keys (k and v computed for every token)."""
    s = _shape(config_or_shape)
    n = n_text + n_visual
    queries = 2 * n_text * s.hidden * 2 * s.q_dim  # q and o
    keys = 2 * n * s.hidden * 2 * s.kv_dim  # k and v
    mlp = 2 * n_text * s.hidden * 3 * s.intermediate
    attention = 4 * n_text * n * s.q_dim
    return queries + keys + mlp + attention


def fastv_num_dropped(n_visual: int, ratio: float) -> int:
    """Visual tokens FastV drops from ``n_visual`` at ``ratio``: ``ratio · n_visual`` rounded half
    up (``shortlab.shortv.fastv`` drops exactly this many per sequence)."""
    check_fastv_ratio(ratio)
    return math.floor(ratio * n_visual + 0.5)


def check_fastv_ratio(ratio: float) -> float:
    """Validate FastV's ratio, the fraction of visual tokens to drop: a number in [0, 1]."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"the FastV ratio must be a number, got {type(ratio).__name__} {ratio!r}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"the FastV ratio must be in [0, 1], got {ratio}")
    return float(ratio)


def check_fastv_k(num_layers: int, k: int) -> int:
    """Validate FastV's ``k``: tokens are scored in layer ``k − 1`` and dropped for layers ``≥ k``,
    so ``1 ≤ k ≤ num_layers − 1``."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"FastV's k must be an int, got {type(k).__name__} {k!r}")
    if not 1 <= k < num_layers:
        raise ValueError(
            f"FastV's k must be in 1..{num_layers - 1} for a model with {num_layers} layers "
            f"(tokens are scored in layer k - 1 and dropped from layer k on), got {k}"
        )
    return k


def prefill_flops(
    config_or_shape,
    n_text: int,
    n_visual: int,
    frozen_layers: Iterable[int] = (),
    fastv_k: int | None = None,
    fastv_ratio: float = 0.0,
) -> int:
    """Decoder FLOPs of one prefill of ``n_text + n_visual`` tokens (one sequence).

    ``frozen_layers``: layers where visual tokens are frozen (ShortV). ``fastv_k``/``fastv_ratio``:
    from layer ``fastv_k`` on, ``fastv_num_dropped(n_visual, fastv_ratio)`` visual tokens are gone
    (frozen layers there freeze the kept visual tokens). See the module docstring for what is
    counted.
    """
    s = _shape(config_or_shape)
    if n_text < 0 or n_visual < 0:
        raise ValueError(f"token counts must be non-negative, got {n_text} and {n_visual}")
    frozen = set(validate_layer_indices(s.num_layers, frozen_layers, allow_empty=True))
    dropped = 0
    if fastv_k is not None:
        check_fastv_k(s.num_layers, fastv_k)
        dropped = fastv_num_dropped(n_visual, fastv_ratio)
    elif fastv_ratio:
        raise ValueError("fastv_ratio needs fastv_k")
    total = 0
    for layer in range(s.num_layers):
        visual = n_visual - dropped if fastv_k is not None and layer >= fastv_k else n_visual
        if layer in frozen:
            total += frozen_layer_flops(s, n_text, visual)
        else:
            total += dense_layer_flops(s, n_text + visual)
    return total


def flops_ratio(
    config_or_shape,
    n_text: int,
    n_visual: int,
    frozen_layers: Iterable[int] = (),
    fastv_k: int | None = None,
    fastv_ratio: float = 0.0,
) -> float:
    """``prefill_flops`` with the given reductions over the dense model's: the fraction of decoder
    FLOPs kept (its inverse is the compute-bound speedup to expect)."""
    reduced = prefill_flops(config_or_shape, n_text, n_visual, frozen_layers, fastv_k, fastv_ratio)
    return reduced / prefill_flops(config_or_shape, n_text, n_visual)


def fastv_ratio_matching_flops(
    config_or_shape, n_text: int, n_visual: int, target_flops: float, k: int
) -> float:
    """The smallest FastV ratio (after layer ``k``) whose ``prefill_flops`` do not exceed
    ``target_flops``, e.g. a ShortV setting's, for a FLOPs-matched comparison.

    FastV drops a whole number of tokens, so the answer is ``d / n_visual`` for the smallest
    count ``d`` that meets the budget (any ratio that rounds to ``d`` costs the same); FLOPs
    fall as ``d`` grows, so ``d`` is found by bisection over 0 … n_visual. Returns 0.0 when the
    dense prefill already fits. Raises ValueError when even dropping every visual token from
    layer ``k`` on costs more than ``target_flops``.
    """
    s = _shape(config_or_shape)
    check_fastv_k(s.num_layers, k)
    if n_visual < 1:
        raise ValueError(f"FastV needs visual tokens to drop, got n_visual = {n_visual}")

    def cost(dropped: int) -> int:
        return prefill_flops(s, n_text, n_visual, fastv_k=k, fastv_ratio=dropped / n_visual)

    if cost(n_visual) > target_flops:
        dense = prefill_flops(s, n_text, n_visual)
        raise ValueError(
            f"no FastV ratio after layer {k} reaches {target_flops:.4g} FLOPs "
            f"({target_flops / dense:.1%} of dense): dropping all {n_visual} visual tokens "
            f"still costs {cost(n_visual) / dense:.1%}"
        )
    low, high = -1, n_visual  # cost(low) > target (by convention at -1), cost(high) <= target
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if cost(middle) > target_flops else (low, middle)
    return high / n_visual


def counted_layer_flops(model: nn.Module, run: Callable[[], object]) -> dict[int, int]:
    """The FLOPs torch's ``FlopCounterMode`` counts inside each decoder layer while ``run()``
    executes (e.g. a forward pass under ``freeze_visual_tokens``): ``{layer index: FLOPs}``
    summed over the layer's calls, to set beside ``prefill_flops``. Attention runs eagerly
    meanwhile (restored afterwards on every exit path): the counter has no formula for the CPU
    flash kernel that sdpa uses."""
    parts = model_parts(model)
    counter = FlopCounterMode(display=False, depth=None)
    entered: dict[int, int] = {}
    per_layer: dict[int, int] = {}

    def enter(index: int):
        def hook(module, args, kwargs):
            entered[index] = counter.get_total_flops()
        return hook

    def leave(index: int):
        def hook(module, args, kwargs, output):
            per_layer[index] = per_layer.get(index, 0) + counter.get_total_flops() - entered.pop(index)
        return hook

    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with _hooks(pre=[(layer, enter(i)) for i, layer in enumerate(parts.layers)],
                    post=[(layer, leave(i)) for i, layer in enumerate(parts.layers)]), counter:
            run()
    finally:
        model.set_attn_implementation(implementation)
    return per_layer
