"""Experiments around RoPE's long-context bound (Men et al., 2024, arXiv 2405.14591).

``shortlab.rope`` holds the maths of the bound; this module holds what notebook 03 runs:

* the derivation's objects, to check the theorem numerically: ``rope_matrix`` R_m, ``rotate``
  (RoPE applied to vectors at positions, in either pair layout) and
  ``score_gap_monte_carlo`` (E[qᵀR_m k*] − E[qᵀR_m k] by sampling, to set beside 2σ²B(m));
* small Llama models trained from scratch that differ only in RoPE base: a character-level
  ``CharTokenizer``, real text mixed with a synthetic key–value retrieval task
  (``retrieval_example``, ``training_batches``), ``rope_model_config`` / ``build_model`` and
  ``train_lm``;
* measurements on any causal LM: ``per_position_nll`` (loss by position, masked),
  ``retrieval_accuracy``, ``qk_pair_weights`` (per-head weights for the paper's B_w(m) from
  the pre-rotation queries and keys), and the passkey test (``passkey_prompt``,
  ``passkey_trial``).

Positions and distances are token indices; "distance" is always the index of the token that
asks minus the index of the token it must find (defined exactly where each is built).
"""

from __future__ import annotations

import math
import string
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shortlab.arch import model_parts
from shortlab.rope import (
    CONTEXT_K, LAYOUTS, M_RANGES, check_base, context_length, max_context,
    pair_variances_from_vectors, rope_frequencies,
)


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown pair layout {layout!r}; use one of {LAYOUTS}")
    return layout


# ----------------------------------------------------------------------------- the derivation

def rope_matrix(m: float, base: float, head_dim: int, *, layout: str = "interleaved"
                ) -> torch.Tensor:
    """R_m: the (d, d) float64 rotation RoPE applies at position m, one 2×2 rotation by m·θ_i
    per pair; ``layout`` says which dimensions form pair i (see ``shortlab.rope.pair_weights``).
    Rotating a vector x at position m is R_m x, and R_aᵀ R_b = R_{b−a}."""
    thetas = torch.from_numpy(rope_frequencies(base, head_dim))
    half = head_dim // 2
    first, second = ((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2))
                     if _check_layout(layout) == "interleaved"
                     else (torch.arange(half), torch.arange(half, head_dim)))
    cos, sin = torch.cos(m * thetas), torch.sin(m * thetas)
    matrix = torch.zeros(head_dim, head_dim, dtype=torch.float64)
    matrix[first, first] = cos
    matrix[second, second] = cos
    matrix[first, second] = -sin
    matrix[second, first] = sin
    return matrix


def rotate(x: torch.Tensor, positions, base: float, *, layout: str = "interleaved"
           ) -> torch.Tensor:
    """RoPE: rotate each vector x[..., j, :] (d = x.shape[-1]) by its position positions[j].

    ``positions`` broadcasts against x.shape[:-1] (a scalar, or one position per vector). Computed
    in float64. ``layout="half"`` is transformers' ``x·cos + rotate_half(x)·sin``.
    """
    x = x.to(torch.float64)
    head_dim = x.shape[-1]
    thetas = torch.from_numpy(rope_frequencies(base, head_dim))
    angles = torch.as_tensor(positions, dtype=torch.float64)[..., None] * thetas  # [..., d/2]
    cos, sin = torch.cos(angles), torch.sin(angles)
    if _check_layout(layout) == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    a, b = x[..., : head_dim // 2], x[..., head_dim // 2:]
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


def score_gap_monte_carlo(base: float, head_dim: int, distances: Sequence[int], *,
                          n_samples: int = 4096, sigma: float = 1.0, noise_std: float = 0.5,
                          layout: str = "interleaved", seed: int = 0) -> dict[str, np.ndarray]:
    """The theorem's two expectations by sampling, at each relative distance m.

    Draws q and a random key k i.i.d. N(0, σ²) per dimension and a similar key k* = q + ε
    (ε ~ N(0, noise_std²)); places the key at a random position p and the query at p + m,
    rotates both with ``rotate`` and takes the dot product, as attention does. Returns
    float64 arrays over ``distances``: "similar" (mean score with k*), "random" (with k),
    "gap" (their mean paired difference) and "gap_stderr"; the theorem says gap = 2σ²·B(m).
    """
    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2, got {n_samples}")
    generator = torch.Generator().manual_seed(seed)
    q = sigma * torch.randn(n_samples, head_dim, generator=generator, dtype=torch.float64)
    k_random = sigma * torch.randn(n_samples, head_dim, generator=generator, dtype=torch.float64)
    k_similar = q + noise_std * torch.randn(n_samples, head_dim, generator=generator,
                                            dtype=torch.float64)
    key_positions = torch.randint(0, 10_000, (n_samples,), generator=generator)
    out = {name: np.empty(len(distances)) for name in ("similar", "random", "gap", "gap_stderr")}
    for index, m in enumerate(distances):
        rotated_q = rotate(q, key_positions + m, base, layout=layout)
        similar = (rotated_q * rotate(k_similar, key_positions, base, layout=layout)).sum(-1)
        random = (rotated_q * rotate(k_random, key_positions, base, layout=layout)).sum(-1)
        difference = similar - random
        out["similar"][index] = similar.mean()
        out["random"][index] = random.mean()
        out["gap"][index] = difference.mean()
        out["gap_stderr"][index] = difference.std() / math.sqrt(n_samples)
    return out


# ----------------------------------------------------------------------------- published bounds

def valid_bases(bases, context: int, head_dim: int, *, m_range: str = "closed") -> np.ndarray:
    """Whether each base keeps B(m) ≥ 0 on the context's m range (``shortlab.rope.max_context``
    scanned up to ``context``): a bool array, for maps of the islands of valid bases."""
    return np.array([max_context(float(base), head_dim, limit=context, m_range=m_range) == context
                     for base in np.asarray(bases, dtype=np.float64).ravel()]).reshape(np.shape(bases))


def nearest_valid_base(base: float, context: int, head_dim: int, *, direction: int,
                       m_range: str = "closed", rtol: float = 1e-4, span: float = 4.0
                       ) -> float | None:
    """The first base of the log grid base·(1 + rtol)^(±j), j ≥ 1, going up (``direction=+1``) or
    down (−1) at most a factor ``span``, that satisfies the criterion (confirmed by
    ``check_base``); None if there is none in that range."""
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    steps = math.ceil(math.log(span) / math.log1p(rtol))
    for j in range(1, steps + 1):
        candidate = base * math.exp(direction * j * math.log1p(rtol))
        if candidate > 1 and max_context(candidate, head_dim, limit=context,
                                         m_range=m_range) == context:
            if check_base(candidate, context, head_dim, m_range=m_range)[0]:
                return candidate
    return None


def published_checks(published, head_dim: int, *, ks: Sequence[int] = CONTEXT_K,
                     m_ranges: Sequence[str] = M_RANGES) -> list[dict]:
    """Each published (context label → base) checked against the criterion itself under every
    convention: "1K" as 1000 or 1024 (``ks``) and m in [0, L] or [0, L − 1] (``m_ranges``).

    One row per label: context, base, and for each convention a key ``"k=<k> <m_range>"``
    holding (ok, first m with B(m) < 0 or None), plus ``holds_under``: the conventions under
    which the base is valid.
    """
    rows = []
    for label, base in published.items():
        row = {"context": label, "base": float(base)}
        for k in ks:
            for m_range in m_ranges:
                row[f"k={k} {m_range}"] = check_base(base, context_length(label, k), head_dim,
                                                     m_range=m_range)
        row["holds_under"] = [name for name, value in row.items()
                              if name.startswith("k=") and value[0]]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- characters

class CharTokenizer:
    """A fixed character vocabulary: newline and the 95 printable ASCII characters (id = index).

    Text is normalised first (``normalize``): Unicode compatibility decomposition with accents
    and other non-ASCII characters dropped, tabs and other whitespace turned into spaces.
    Characters are the tokens, so a context of L tokens is L characters.
    """

    chars = "\n" + "".join(chr(c) for c in range(32, 127))

    def __init__(self):
        self._table = np.full(128, -1, dtype=np.int64)
        for index, char in enumerate(self.chars):
            self._table[ord(char)] = index

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @staticmethod
    def normalize(text: str) -> str:
        text = unicodedata.normalize("NFKD", text)
        text = "".join(" " if (c.isspace() and c != "\n") else c for c in text)
        return text.encode("ascii", "ignore").decode("ascii")

    def encode(self, text: str) -> np.ndarray:
        """Ids (int64) of an already normalised text; raises on a character outside the vocabulary."""
        raw = np.frombuffer(text.encode("ascii", "strict"), dtype=np.uint8)
        ids = self._table[raw]
        if (ids < 0).any():
            bad = sorted({chr(c) for c in raw[ids < 0]})
            raise ValueError(f"characters outside the vocabulary: {bad!r}; normalize() first")
        return ids

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def char_stream(tokenizer: CharTokenizer, documents: Sequence[str], separator: str = "\n\n"
                ) -> np.ndarray:
    """All documents, normalised and joined by ``separator``, as one int64 id array."""
    text = separator.join(tokenizer.normalize(doc).strip() for doc in documents)
    if not text:
        raise ValueError("no text: the documents are empty after normalisation")
    return tokenizer.encode(text)


# ----------------------------------------------------------------------------- retrieval data

@dataclass(frozen=True)
class RetrievalTask:
    """Key–value records hidden in text, queried at the end of the sequence.

    A record reads ``"[" key separator value "]"`` and a query ``"\\n?" key separator value``.
    The defaults give records like ``[#7]`` and queries like ``?#7``: one-symbol keys from
    symbols that (almost) never occur in the text, one-digit values. Keys of several letters
    from a small alphabet (e.g. ``key_alphabet="abcd", key_length=4, separator="="`` gives
    ``[abca=41]``) make records look alike, and ``near_keys`` adds, for every queried key,
    records whose key differs from it in exactly one position.

    ``n_records`` records per sequence (distinct keys), ``n_queries`` queries at its end, each
    about a different record. The *anchor* of a record or query is the token just before its
    value; a query's distance is its anchor's index minus its record's anchor's index.
    """

    key_alphabet: str = "#$&*+<>@^_`{|}~"
    key_length: int = 1
    value_length: int = 1
    value_alphabet: str = string.digits
    n_records: int = 12
    n_queries: int = 8
    near_keys: int = 0
    separator: str = ""

    def __post_init__(self):
        if len(set(self.key_alphabet)) != len(self.key_alphabet) or len(self.key_alphabet) < 2:
            raise ValueError(f"key_alphabet needs >= 2 distinct letters, got {self.key_alphabet!r}")
        if self.key_length < 1 or self.value_length < 1:
            raise ValueError("key_length and value_length must be >= 1")
        if len(set(self.value_alphabet)) < 2:
            raise ValueError(f"value_alphabet needs >= 2 symbols, got {self.value_alphabet!r}")
        if set(self.key_alphabet + self.separator) & set(self.value_alphabet + "[]?\n"):
            raise ValueError("keys and separator may not use value symbols, brackets, '?' or "
                             "newlines")
        if not 1 <= self.n_queries <= self.n_records:
            raise ValueError(f"need 1 <= n_queries <= n_records, got {self.n_queries} and "
                             f"{self.n_records}")
        if self.n_queries * (1 + self.near_keys) > self.n_records:
            raise ValueError(f"{self.n_queries} queried keys with {self.near_keys} near keys each "
                             f"need more than n_records = {self.n_records} records")
        if self.n_records > len(self.key_alphabet) ** self.key_length:
            raise ValueError(f"{self.n_records} records need distinct keys; only "
                             f"{len(self.key_alphabet) ** self.key_length} exist")

    @property
    def record_length(self) -> int:  # "[" key separator value "]"
        return self.key_length + len(self.separator) + self.value_length + 2

    @property
    def query_length(self) -> int:  # "\n?" key separator value
        return self.key_length + len(self.separator) + self.value_length + 2

    def min_length(self) -> int:
        """Shortest sequence that holds every record and query."""
        return self.n_records * (self.record_length + 1) + self.n_queries * self.query_length


@dataclass
class RetrievalExample:
    """One sequence: ids (int64, [length]); per query (in order) the positions of its answer
    tokens ([n_queries, value_length]), its distance, its key and its value."""

    input_ids: np.ndarray
    answer_positions: np.ndarray
    distances: np.ndarray
    keys: list[str]
    values: list[str]


def _draw_keys(task: RetrievalTask, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Distinct keys: the queried ones first, each with ``near_keys`` one-letter variants among
    the rest. Returns (all record keys, queried keys)."""
    alphabet = task.key_alphabet

    def random_key() -> str:
        return "".join(rng.choice(list(alphabet), task.key_length))

    keys: list[str] = []
    queried: list[str] = []
    for _ in range(1000 * task.n_queries):
        if len(queried) == task.n_queries:
            break
        key = random_key()
        if key in keys:
            continue
        variants = []
        for _ in range(100 * (task.near_keys + 1)):
            if len(variants) == task.near_keys:
                break
            slot = int(rng.integers(task.key_length))
            letter = rng.choice([c for c in alphabet if c != key[slot]])
            variant = key[:slot] + letter + key[slot + 1:]
            if variant not in keys and variant != key and variant not in variants:
                variants.append(variant)
        if len(variants) < task.near_keys:
            continue
        keys += [key, *variants]
        queried.append(key)
    else:
        raise ValueError(f"could not draw {task.n_queries} keys with {task.near_keys} distinct "
                         f"one-letter variants each from {alphabet!r}")
    while len(keys) < task.n_records:
        key = random_key()
        if key not in keys:
            keys.append(key)
    return keys, queried


def _place(region: int, count: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted start offsets of ``count`` blocks of ``width`` cells in ``region`` cells, each
    followed by at least one free cell, uniformly over all such layouts: the blocks (with their
    free cell) and the remaining free cells are items in a random order."""
    free = region - count * (width + 1)
    if free < 0:
        raise ValueError(f"no room for {count} blocks of {width} (+1) cells in {region} cells")
    slots = np.sort(rng.choice(free + count, count, replace=False))  # item index of each block
    return slots + np.arange(count) * width  # each earlier block is width + 1 cells, not 1


def retrieval_example(text_ids: np.ndarray, tokenizer: CharTokenizer, task: RetrievalTask,
                      length: int, rng: np.random.Generator,
                      distance: int | None = None) -> RetrievalExample:
    """A sequence of ``length`` characters: real text with ``task.n_records`` records at random
    places and ``task.n_queries`` queries at the end, text filling every other position in its
    original order (a random window of ``text_ids``).

    With ``distance`` given, the task must have one query, whose record is placed so that the
    query's distance is exactly ``distance``; otherwise distances follow from where the records
    fall.
    """
    if length < task.min_length():
        raise ValueError(f"length {length} is too short for the task (needs >= {task.min_length()})")
    keys, queried = _draw_keys(task, rng)
    values = {key: "".join(rng.choice(list(task.value_alphabet), task.value_length))
              for key in keys}
    queries_start = length - task.n_queries * task.query_length
    # the anchor, the token just before the value: offset in a record "[key=", a query "\n?key="
    anchor = task.key_length + len(task.separator)
    query_anchors = [queries_start + j * task.query_length + 1 + anchor
                     for j in range(task.n_queries)]
    width = task.record_length
    order = [str(key) for key in rng.permutation(keys)]
    starts: dict[str, int] = {}
    if distance is None:
        starts.update(zip(order, (int(x) for x in _place(queries_start, len(order), width, rng))))
    else:
        if task.n_queries != 1:
            raise ValueError("a requested distance needs a task with n_queries = 1")
        start = query_anchors[0] - distance - anchor
        if start < 0 or start + width >= queries_start:
            shortest = query_anchors[0] - (queries_start - width - 1) - anchor
            longest = query_anchors[0] - anchor
            raise ValueError(f"distance {distance} does not fit in {length} characters: it "
                             f"must be in [{shortest}, {longest}]")
        starts[queried[0]] = start
        order.remove(queried[0])
        # the others go before (in [0, start − 1)) or after (in [start + width + 1, queries_start))
        before, after = max(start - 1, 0), queries_start - (start + width + 1)
        room_before, room_after = before // (width + 1), after // (width + 1)
        if room_before + room_after < len(order):
            raise ValueError(f"no room for {task.n_records} records in {length} characters with "
                             f"one at distance {distance}")
        n_before = int(rng.binomial(len(order), before / max(before + after, 1)))
        n_before = min(max(n_before, len(order) - room_after), room_before)
        offsets = [*_place(before, n_before, width, rng),
                   *(start + width + 1 + _place(after, len(order) - n_before, width, rng))]
        starts.update(zip(order, (int(x) for x in offsets)))
    sequence = np.full(length, -1, dtype=np.int64)
    for key, start in starts.items():
        record = f"[{key}{task.separator}{values[key]}]"
        sequence[start: start + task.record_length] = tokenizer.encode(record)
    query_order = [queried[j] for j in rng.permutation(task.n_queries)]
    sequence[queries_start:] = tokenizer.encode(
        "".join(f"\n?{key}{task.separator}{values[key]}" for key in query_order))
    holes = np.flatnonzero(sequence < 0)
    if text_ids.size < holes.size:
        raise ValueError(f"text of {text_ids.size} characters cannot fill {holes.size} positions")
    offset = int(rng.integers(0, text_ids.size - holes.size + 1))
    sequence[holes] = text_ids[offset: offset + holes.size]
    answers = np.array([[position + 1 + i for i in range(task.value_length)]
                        for position in query_anchors])
    distances = np.array([position - (starts[key] + anchor)
                          for position, key in zip(query_anchors, query_order)])
    return RetrievalExample(sequence, answers, distances, query_order,
                            [values[key] for key in query_order])


def stack_examples(examples: Sequence[RetrievalExample]) -> dict[str, torch.Tensor]:
    """A batch: input_ids [N, T], answer_positions [N, Q, D], distances [N, Q] (LongTensors)."""
    return {
        "input_ids": torch.from_numpy(np.stack([e.input_ids for e in examples])),
        "answer_positions": torch.from_numpy(np.stack([e.answer_positions for e in examples])),
        "distances": torch.from_numpy(np.stack([e.distances for e in examples])),
    }


def answer_mask(answer_positions: torch.Tensor, length: int) -> torch.Tensor:
    """Bool [N, length], True at the answer tokens of ``answer_positions`` [N, Q, D]."""
    mask = torch.zeros(answer_positions.shape[0], length, dtype=torch.bool)
    return mask.scatter_(1, answer_positions.flatten(1), True)


def training_batches(text_ids: np.ndarray, tokenizer: CharTokenizer, task: RetrievalTask,
                     length: int, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of ``retrieval_example`` sequences: {"input_ids": LongTensor[batch_size,
    length], "answer_mask": BoolTensor (``answer_mask``)}. The same seed gives the same batches,
    so models trained on them see identical data."""
    rng = np.random.default_rng(seed)
    while True:
        batch = stack_examples([retrieval_example(text_ids, tokenizer, task, length, rng)
                                for _ in range(batch_size)])
        yield {"input_ids": batch["input_ids"],
               "answer_mask": answer_mask(batch["answer_positions"], length)}


def distance_batch(text_ids: np.ndarray, tokenizer: CharTokenizer, task: RetrievalTask,
                   length: int, distances: Sequence[int], per_distance: int, seed: int
                   ) -> dict[str, torch.Tensor]:
    """``per_distance`` single-query sequences at each requested distance (``stack_examples``)."""
    if task.n_queries != 1:
        raise ValueError("distance batches need a task with n_queries = 1")
    rng = np.random.default_rng(seed)
    return stack_examples([retrieval_example(text_ids, tokenizer, task, length, rng, distance)
                           for distance in distances for _ in range(per_distance)])


def text_batch(text_ids: np.ndarray, length: int, n_rows: int, seed: int) -> torch.Tensor:
    """``n_rows`` random windows of ``length`` ids from ``text_ids``: LongTensor[n_rows, length]."""
    if text_ids.size < length:
        raise ValueError(f"text of {text_ids.size} ids is shorter than one row of {length}")
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, text_ids.size - length + 1, n_rows)
    return torch.from_numpy(np.stack([text_ids[o: o + length] for o in offsets]))


# ----------------------------------------------------------------------------- models

def rope_model_config(base: float, vocab_size: int, *, context: int, hidden_size: int = 128,
                      num_layers: int = 2, head_dim: int = 32, intermediate_size: int | None = None):
    """A small ``LlamaConfig`` (standard transformers RoPE, rotate_half layout) whose only
    RoPE-specific field is the base: models built for different bases differ in nothing else.
    hidden_size / head_dim heads (no grouped KV), tied embeddings, no dropout."""
    from transformers import LlamaConfig

    if hidden_size % head_dim:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of head_dim {head_dim}")
    heads = hidden_size // head_dim
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim,
        intermediate_size=intermediate_size or 4 * hidden_size, max_position_embeddings=context,
        rope_parameters={"rope_type": "default", "rope_theta": float(base)},
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        attn_implementation="sdpa",
    )


def build_model(config, seed: int):
    """``LlamaForCausalLM(config)`` with weights drawn from ``seed`` (RoPE has no weights, so
    configs differing only in base give identical initial weights), in train mode."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.train()


def lm_losses(model, input_ids: torch.Tensor, answer_mask: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean next-token cross-entropy over every predicted token, mean over the answer tokens
    only — where answer_mask [N, T] is True; NaN when there are none)."""
    logits = model(input_ids=input_ids).logits[:, :-1]
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten(),
                                               reduction="none").view(input_ids.shape[0], -1)
    return losses.mean(), losses[answer_mask[:, 1:]].mean()


def train_lm(model, batches: Iterator[dict[str, torch.Tensor]], steps: int, *,
             task_weight: float = 0.0, lr: float = 3e-3, warmup: int = 50,
             weight_decay: float = 0.01, clip: float = 1.0, seed: int = 0
             ) -> dict[str, list[float]]:
    """Next-token training on ``training_batches``: AdamW, linear warm-up then cosine decay to
    lr/10, gradient clipping. Minimises (mean loss over all tokens) + task_weight × (mean loss
    over the answer tokens): the answers are ~1 % of the tokens, and without the extra weight
    their gradient is drowned by the text's. Returns both losses ("loss", "answer_loss") of
    every step; leaves the model in eval mode."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if task_weight < 0:
        raise ValueError(f"task_weight must be >= 0, got {task_weight}")
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                                  betas=(0.9, 0.95))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    history: dict[str, list[float]] = {"loss": [], "answer_loss": []}
    for _ in range(steps):
        batch = next(batches)
        loss, answer_loss = lm_losses(model, batch["input_ids"], batch["answer_mask"])
        objective = loss + task_weight * answer_loss if task_weight else loss
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        schedule.step()
        history["loss"].append(loss.item())
        history["answer_loss"].append(answer_loss.item())
    model.eval()
    return history


# ----------------------------------------------------------------------------- measurements

def _next_token_stats(model, input_ids: torch.Tensor, chunk: int = 512
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """For every position t ≥ 1 of input_ids [N, T]: log p(token t | tokens < t) and the argmax
    prediction for position t, both [N, T − 1] (index t − 1). The LM head runs on ``chunk``
    positions at a time, so a 49k-word vocabulary at 8k tokens needs no 8k × 49k logits."""
    parts = model_parts(model)
    if getattr(parts.text_config, "final_logit_softcapping", None):
        raise ValueError("models with final_logit_softcapping are not supported here")
    device = parts.embed_tokens.weight.device
    input_ids = input_ids.to(device)
    hidden = parts.decoder(input_ids=input_ids).last_hidden_state[:, :-1]
    targets = input_ids[:, 1:]
    logprobs, argmax = [], []
    for start in range(0, hidden.shape[1], chunk):
        logits = parts.lm_head(hidden[:, start: start + chunk]).float().log_softmax(-1)
        logprobs.append(logits.gather(2, targets[:, start: start + chunk, None]).squeeze(2))
        argmax.append(logits.argmax(-1))
    return torch.cat(logprobs, 1).cpu(), torch.cat(argmax, 1).cpu()


@torch.inference_mode()
def per_position_nll(model, input_ids: torch.Tensor, target_mask: torch.Tensor | None = None,
                     batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Loss by position: (nll_sum, count), float64 arrays of length T for input_ids [N, T].

    Index t holds the summed negative log-likelihood of token t given tokens < t over the rows
    where target_mask[row, t] is True (default: every row), and how many rows that is; index 0
    (nothing to predict from) has count 0. Sums rather than means so that results over
    batches or sequences of different lengths add up; ``binned_perplexity`` turns them into
    perplexities.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [N, T], got shape {tuple(input_ids.shape)}")
    if target_mask is None:
        target_mask = torch.ones_like(input_ids, dtype=torch.bool)
    if target_mask.shape != input_ids.shape:
        raise ValueError(f"target_mask {tuple(target_mask.shape)} must match input_ids "
                         f"{tuple(input_ids.shape)}")
    length = input_ids.shape[1]
    nll_sum, count = np.zeros(length), np.zeros(length)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            logprobs, _ = _next_token_stats(model, input_ids[rows])
            keep = target_mask[rows, 1:].bool()
            nll_sum[1:] += (-logprobs.double() * keep).sum(0).numpy()
            count[1:] += keep.sum(0).numpy()
    finally:
        model.train(was_training)
    return nll_sum, count


def binned_perplexity(nll_sum: np.ndarray, count: np.ndarray, edges: Sequence[int]
                      ) -> np.ndarray:
    """exp(mean NLL) over positions [edges[j], edges[j+1]) for each bin (NaN where empty)."""
    edges = np.asarray(edges)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"edges must be increasing with at least two entries, got {edges}")
    out = np.full(edges.size - 1, np.nan)
    for j, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        n = count[low:high].sum()
        if n > 0:
            out[j] = math.exp(nll_sum[low:high].sum() / n)
    return out


@torch.inference_mode()
def retrieval_accuracy(model, batch: dict[str, torch.Tensor], batch_size: int = 16
                       ) -> np.ndarray:
    """Whether each query of a ``stack_examples`` batch is answered: every answer token is the
    model's argmax given the true text before it (what greedy decoding would write). Returns
    a bool array [N, n_queries]."""
    input_ids, positions = batch["input_ids"], batch["answer_positions"]
    correct = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start: start + batch_size]
            _, argmax = _next_token_stats(model, ids)
            where = positions[start: start + batch_size]  # token positions t; argmax index t − 1
            predicted = argmax.gather(1, (where - 1).flatten(1)).view_as(where)
            truth = ids.gather(1, where.flatten(1)).view_as(where)
            correct.append((predicted == truth).all(-1))
    finally:
        model.train(was_training)
    return torch.cat(correct).numpy()


@torch.inference_mode()
def qk_pair_weights(model, input_ids: torch.Tensor) -> np.ndarray:
    """Per layer and head, the weights σ²_a(i) + σ²_b(i) of the paper's B_w(m), from the model's
    own queries and keys before rotation (outputs of each attention's q_proj and k_proj,
    captured by hooks), pooled as the theorem's σ² is (``pair_variances_from_vectors``).

    Pairs follow transformers' rotate_half layout ("half"). A query head is pooled with the
    key head it reads (grouped-query attention). Returns float64 [layers, heads, head_dim/2].
    """
    parts = model_parts(model)
    config = parts.text_config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    captured: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for index in range(parts.num_layers):
        attention = parts.attention(index)
        for name in ("q_proj", "k_proj"):
            def hook(module, args, output, index=index, name=name):
                captured[(index, name)] = output.detach()
            handles.append(getattr(attention, name).register_forward_hook(hook))
    try:
        parts.decoder(input_ids=input_ids.to(parts.embed_tokens.weight.device))
    finally:
        for handle in handles:
            handle.remove()
    weights = np.empty((parts.num_layers, heads, head_dim // 2))
    for index in range(parts.num_layers):
        q = captured[(index, "q_proj")].unflatten(-1, (heads, head_dim))
        k = captured[(index, "k_proj")].unflatten(-1, (kv_heads, head_dim))
        for head in range(heads):
            pooled = torch.cat((q[..., head, :], k[..., head * kv_heads // heads, :]))
            weights[index, head] = pair_variances_from_vectors(pooled, layout="half")
    return weights


# ----------------------------------------------------------------------------- passkey

PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant "
                 "text. Find it and memorize it. I will quiz you about it.\n")
PASSKEY_NEEDLE = (" The pass key is", ". Remember it.\n")  # around " <passkey>"
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    """A passkey prompt with its answer appended (teacher forcing): input_ids [T] (LongTensor),
    answer_positions (token indices of " <passkey>" at the end), filler_mask (True on the
    haystack's text tokens, the only ones whose loss measures perplexity), distance (index of
    the answer's first token minus index of the passkey's first token in the needle)."""

    input_ids: torch.Tensor
    answer_positions: torch.Tensor
    filler_mask: torch.Tensor
    distance: int
    passkey: str


def passkey_prompt(tokenizer, filler_ids: Sequence[int], distance: int, passkey: str
                   ) -> PasskeyPrompt:
    """Intro, needle "The pass key is <passkey>. Remember it.", real text, question, answer.

    Takes exactly as many ``filler_ids`` (token ids of real text) as put the answer ``distance``
    tokens after the passkey's first token. Pieces are tokenised separately, so positions are
    exact.
    """
    if not passkey.isdigit():
        raise ValueError(f"the passkey must be digits, got {passkey!r}")

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    intro = encode(PASSKEY_INTRO)
    needle_head = encode(PASSKEY_NEEDLE[0])
    key_ids = encode(" " + passkey)
    needle_tail = encode(PASSKEY_NEEDLE[1])
    question = encode(PASSKEY_QUESTION)
    # the answer starts (len(key_ids) + len(needle_tail) + n_filler + len(question)) tokens
    # after the needle's passkey tokens start
    n_filler = distance - len(key_ids) - len(needle_tail) - len(question)
    if n_filler < 0:
        raise ValueError(f"distance {distance} is shorter than the needle tail and question "
                         f"({distance - n_filler} tokens)")
    if n_filler > len(filler_ids):
        raise ValueError(f"distance {distance} needs {n_filler} filler tokens, got "
                         f"{len(filler_ids)}")
    pieces = [intro, needle_head, key_ids, needle_tail, list(filler_ids[:n_filler]), question,
              key_ids]
    ids = [token for piece in pieces for token in piece]
    total = len(ids)
    filler_start = len(intro) + len(needle_head) + len(key_ids) + len(needle_tail)
    filler_mask = torch.zeros(total, dtype=torch.bool)
    filler_mask[filler_start: filler_start + n_filler] = True
    answer_positions = torch.arange(total - len(key_ids), total)
    key_start = len(intro) + len(needle_head)
    return PasskeyPrompt(torch.tensor(ids), answer_positions, filler_mask,
                         int(answer_positions[0]) - key_start, passkey)


@torch.inference_mode()
def passkey_trial(model, prompt: PasskeyPrompt) -> tuple[bool, np.ndarray, np.ndarray]:
    """One forward pass: (found — every answer token is the argmax, i.e. greedy decoding writes
    the passkey —, per-position NLL sums and counts over the filler, as ``per_position_nll``)."""
    was_training = model.training
    model.eval()
    try:
        logprobs, argmax = _next_token_stats(model, prompt.input_ids[None])
    finally:
        model.train(was_training)
    positions = prompt.answer_positions
    found = bool((argmax[0, positions - 1] == prompt.input_ids[positions]).all())
    keep = prompt.filler_mask[1:]
    nll_sum, count = np.zeros(prompt.input_ids.numel()), np.zeros(prompt.input_ids.numel())
    nll_sum[1:] = (-logprobs[0].double() * keep).numpy()
    count[1:] = keep.numpy()
    return found, nll_sum, count
