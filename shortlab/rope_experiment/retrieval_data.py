"""Training data for small character-level models: real text with key–value retrieval.

``CharTokenizer`` (newline + printable ASCII, so L tokens are L characters) and ``char_stream``
turn documents into ids; ``RetrievalTask`` describes records hidden in the text and queried at
the end; ``retrieval_example`` builds one sequence (optionally with one query at an exact
distance), ``training_batches`` endless batches of them, ``distance_batch`` probes by distance
and ``text_batch`` plain windows of text.

A query's distance is the index of its anchor (the token just before its value) minus the index
of its record's anchor.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch


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
