"""Reusing the dense model's first layers across settings that leave them unchanged.

Removing layers from ``first`` on (or freezing tokens there) changes nothing before layer
``first``: on the same inputs, layers ``0 .. first - 1`` compute the same hidden states in every
such setting. A sweep that scores many settings on the same batches can compute them once.

``PrefixCache(depth)`` remembers, per distinct batch, what the first ``depth`` decoder layers
hand to the next one. ``with cache.attached(model):`` wraps those layers of ``model``: the first
time a batch comes through they run and their output is stored; every later time (in this model
or another one attached with the same first layers) they are skipped and the stored output is
handed on. A batch is recognised by the exact bytes of what enters the first layer (the
embeddings), its positions and its attention mask, so a hit can only return what the layers
would have computed. The first layers' weights are fingerprinted at every attach, and a model
whose first layers differ (another checkpoint, quantised weights, a removed layer below
``depth``) is refused.

On a hit the first ``depth`` layers do not run at all: their hooks do not fire and, but for the
last of them, they hand their input on unchanged. So the model's final output is exact, but
per-layer records of those layers (``output_hidden_states``, attention weights, hooks on them)
are not: attach the cache only for forward passes that read the final output. The key hashes
the inputs on the CPU, which on a GPU costs a synchronisation per forward pass.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from shortlab.arch import model_parts
from shortlab.runs import weights_fingerprint


def _digest_tensor(digest, value) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        digest.update(f"{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.contiguous().view(torch.uint8).cpu().numpy().tobytes()
                      if tensor.numel() else b"")
    elif isinstance(value, dict):
        for key in sorted(value):
            digest.update(str(key).encode())
            _digest_tensor(digest, value[key])
    elif isinstance(value, (tuple, list)):
        for item in value:
            _digest_tensor(digest, item)
    else:
        digest.update(repr(value).encode())


def layers_fingerprint(layers, sample: int = 1024) -> str:
    """A hash of ``layers``' parameters (``runs.weights_fingerprint`` with each name prefixed by its
    layer's index): enough to tell checkpoints, quantisations and layer orders apart, at little cost."""
    return weights_fingerprint(((f"{index}.{name}", parameter) for index, layer in enumerate(layers)
                                for name, parameter in layer.named_parameters()), sample)


def best_depth(reaches: Sequence[int]) -> int:
    """The number of first layers to share over measurements that can each share up to
    ``reaches[i]`` of them (0: none): the depth ``d`` at which ``d × (measurements reaching d − 1)``,
    the layer passes spared (the first measurement computes them), is largest; 0 when no two
    measurements share a layer."""
    best, best_saving = 0, 0
    for depth in range(1, max(reaches, default=0) + 1):
        saving = depth * (sum(reach >= depth for reach in reaches) - 1)
        if saving > best_saving:
            best, best_saving = depth, saving
    return best


class _Layer(nn.Module):
    """One of the first ``depth`` layers, run or skipped as the cache decides."""

    def __init__(self, cache: PrefixCache, layer: nn.Module, index: int):
        super().__init__()
        self.cache, self.layer, self.index = cache, layer, index

    def forward(self, hidden_states, *args, **kwargs):
        return self.cache._step(self.layer, self.index, hidden_states, args, kwargs)

    def __getattr__(self, name):
        # anything else is the wrapped layer's (its attention module, its index for the KV cache),
        # so code that inspects the layers while the cache is attached finds what it expects
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)


class PrefixCache:
    """The output of the first ``depth`` decoder layers per distinct batch (see the module
    docstring). ``hits`` and ``misses`` count batches served from it and computed into it;
    ``stored_bytes`` is what it holds."""

    def __init__(self, depth: int):
        if depth < 1:
            raise ValueError(f"depth must be at least 1 (layers to share), got {depth}")
        self.depth = depth
        self._outputs: dict[str, object] = {}
        self._fingerprint: str | None = None
        self._key: str | None = None
        self._returns_tuple = False  # whether the layers return (hidden_states, ...) tuples
        self.hits = 0
        self.misses = 0

    @property
    def stored_bytes(self) -> int:
        def size(value) -> int:
            if isinstance(value, torch.Tensor):
                return value.numel() * value.element_size()
            return sum(size(v) for v in value) if isinstance(value, (tuple, list)) else 0

        return sum(size(output) for output in self._outputs.values())

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator[PrefixCache]:
        """Within the block, ``model``'s first ``depth`` layers go through the cache; the layer list
        is restored on every exit. Raises ``ValueError`` when ``model`` has fewer layers than
        ``depth`` + 1 or first layers other than those the cache holds outputs of."""
        parts = model_parts(model)
        if parts.num_layers <= self.depth:
            raise ValueError(f"the model has {parts.num_layers} decoder layers; sharing the first {self.depth} "
                             f"leaves none to compute")
        layers = parts.layers
        originals = [layers[i] for i in range(self.depth)]
        fingerprint = layers_fingerprint(originals)
        if self._fingerprint is None:
            self._fingerprint = fingerprint
        elif fingerprint != self._fingerprint:
            raise ValueError(f"this model's first {self.depth} layers differ from those whose outputs the cache "
                             f"holds (another checkpoint, other weights, or a layer removed below {self.depth})")
        for i, layer in enumerate(originals):
            layers[i] = _Layer(self, layer, i)
        try:
            yield self
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
            self._key = None

    def _step(self, layer, index, hidden_states, args, kwargs):
        if index == 0:
            # everything the first layer is given: anything else that differs (an object whose
            # repr names its address) only makes the key differ, never a wrong output
            digest = hashlib.sha256()
            _digest_tensor(digest, hidden_states)
            _digest_tensor(digest, args)
            _digest_tensor(digest, kwargs)
            self._key = digest.hexdigest()
            if self._key in self._outputs:
                self.hits += 1
        if self._key in self._outputs:  # a stored batch: hand its output on, compute nothing
            if index == self.depth - 1:
                return self._outputs[self._key]
            return (hidden_states,) if self._returns_tuple else hidden_states
        output = layer(hidden_states, *args, **kwargs)
        self._returns_tuple = isinstance(output, tuple)
        if index == self.depth - 1:
            self._outputs[self._key] = _detached(output)
            self.misses += 1
        return output


def _detached(output):
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, tuple):
        return tuple(_detached(item) for item in output)
    return output
