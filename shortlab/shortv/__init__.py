"""ShortV inference (visual tokens frozen in chosen layers) and the FastV baseline, both skipping
real compute.

* ``freeze_visual_tokens(model, layers, token_mask=None)`` — ShortV (Yuan et al., 2025): in each
  chosen decoder layer the visual tokens are not queries. Their input norm and k/v projections
  (with k_norm and RoPE) are still computed, so every token serves as a key and value and the KV
  cache receives every token; only the other tokens go through q, attention, o, the
  post-attention norm and the MLP, and the visual tokens leave the layer with their input hidden
  state. This computes what ``hooks.keep_tokens_unchanged`` (the zeroed-update reference) does,
  without computing what it then throws away.
* ``fastv(model, k, ratio, token_mask=None, query_mask=None)`` — FastV (Chen et al., 2024): in
  layer ``k − 1`` the visual tokens are ranked by the attention the last token (or the mean of the
  ``query_mask`` rows) pays them (softmax row of that layer, averaged over heads), and the ``ratio`` share with the least attention (``ratio · v`` rounded
  half up, per sequence) leave the computation of layers ``≥ k``: they are neither keys nor
  queries there (their hidden states, RoPE tables and mask rows/columns are gathered away).
  FastV's public code does the same (at layer K = ``fast_v_agg_layer`` it ranks the image
  tokens by the head-averaged attention weights layer K − 1 returned, read at the last position).

Both run through one engine per model that patches every decoder layer's ``forward`` (on the
instance, restored exactly on exit). In each forward pass a patched layer gets a plan: the *key*
tokens (all tokens, or FastV's kept tokens from layer ``k`` on) and the *query* tokens among them
(all keys, or the keys that are not frozen). Layers with nothing to skip, and calls where nothing
is frozen (e.g. ``generate``'s decode steps, which carry no visual tokens), run the layer's own
forward unchanged. The two context managers compose: ShortV + FastV freezes the kept visual
tokens in frozen layers from ``k`` on.

Which tokens are visual: ``token_mask`` (bool ``[batch, seq]``, absolute positions as in
``keep_tokens_unchanged``: a forward over positions ``past .. past + seq − 1`` uses that window,
positions beyond the mask are not visual) if given; otherwise, at every top-level forward,
``input_ids == config.image_token_id`` of that call, so ``model.generate(**processor_inputs)``
works as is. A call without ``input_ids`` (``inputs_embeds`` only, e.g. packed evaluation through
the decoder stack) needs ``token_mask``.

Batched rows may differ in their number of frozen or dropped tokens: gathered queries and keys are
padded per row (a padded slot repeats a real one and is never written back; padded keys are
masked). Attention masks: none (causal), the 4D masks transformers builds from a 2D padding mask,
and custom 4D additive or boolean masks (e.g. ``llava_mini.packed_batch``): the engine slices the
rows of the kept queries and the columns of the kept keys.

Supported: Llama, Mistral, Qwen2, Qwen3 (q/k norms), Gemma, Gemma 2 (post-attention and pre/post
feed-forward norms, attention-logit soft-capping, query_pre_attn_scalar, sliding-window layers) and
Gemma 3 (also q/k norms and local/global RoPE tables) decoder layers, alone or inside a LLaVA,
LLaVA-NeXT or Gemma 3 multimodal wrapper, and the Qwen2-VL / Qwen2.5-VL text stacks (their
multimodal RoPE reaches the layers as one merged cos/sin table), with the ``eager`` or ``sdpa``
attention implementation (Gemma 2 is eager-only in transformers); anything else, and stacks with
bidirectional attention, raise ``arch.UnsupportedArchitectureError`` naming the class.

Limitations: FastV is prefill-only (call with ``use_cache=False``; a KV cache or ``generate``
raises, because the dropped tokens would leave later layers' caches shorter than the others); a
layer that skips tokens computes its attention itself, without calling its attention module's
``forward``, so hooks on ``self_attn`` and ``output_attentions`` miss it (hooks on the decoder
layers and their linear submodules see it); FastV's dropped positions keep, from layer ``k``
on, the hidden state they entered layer ``k`` with, so the final hidden states there are not
meaningful.

The package is split by topic; every name is importable from ``shortlab.shortv`` itself:

* ``checks``: the supported decoder layers and attention implementations, argument access;
* ``tokens``: per-row token subsets padded to one width (``_TokenSet``);
* ``plans``: one layer's key and query tokens in one forward pass (``_Plan``);
* ``attention``: the attention math of a layer that skips tokens;
* ``engine``: the layer patches and forward-pass state shared by both context managers;
* ``api``: ``freeze_visual_tokens`` and ``fastv``.
"""

from shortlab.shortv.api import fastv, freeze_visual_tokens
from shortlab.shortv.checks import (
    PREFILL_ONLY, SOFTCAP_ATTENTION, SUPPORTED_ATTENTION, SUPPORTED_LAYERS,
)
from shortlab.shortv.engine import FastVRecord

# Internals the tests check directly (the engine registry), reachable from here as they were from
# the single module.
from shortlab.shortv.engine import _ENGINES as _ENGINES
from shortlab.shortv.engine import _Engine as _Engine

__all__ = [
    "PREFILL_ONLY", "SOFTCAP_ATTENTION", "SUPPORTED_ATTENTION", "SUPPORTED_LAYERS", "FastVRecord",
    "fastv", "freeze_visual_tokens",
]
