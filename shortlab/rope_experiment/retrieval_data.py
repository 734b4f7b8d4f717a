"""Training data for small character-level models: real text with key–value retrieval.

``CharTokenizer`` (newline + printable ASCII, so L tokens are L characters) and ``char_stream``
turn documents into ids; ``RetrievalTask`` describes records hidden in the text and queries
about them, at the end of the sequence or anywhere in it (``layout``); ``retrieval_example``
builds one sequence (optionally with one query at an exact distance), ``training_batches``
endless batches of them, ``repeated_sequence_batches`` the induction warm-up that comes before
them, ``distance_batch`` probes by distance and ``text_batch`` plain windows of text.

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

LAYOUTS = ("end", "anywhere")  # where a RetrievalTask puts its queries

@dataclass(frozen=True)
class RetrievalTask:
    """Key–value records hidden in text, queried at the end of the sequence.

    A record reads ``"[" key separator value "]"`` and a query ``"\\n?" key separator value``.
    The defaults give records like ``[#7]`` and queries like ``?#7``: one-symbol keys from
    symbols that (almost) never occur in the text, one-digit values. Keys of several letters
    from a small alphabet (e.g. ``key_alphabet="abcd", key_length=4, separator="="`` gives
    ``[abca=41]``) make records look alike, and ``near_keys`` adds, for every queried key,
    records whose key differs from it in exactly one position.

    ``n_records`` records per sequence (distinct keys), ``n_queries`` queries, each about a
    different record. ``layout="end"`` puts the queries together at the end of the sequence;
    ``layout="anywhere"`` scatters records and queries over the whole sequence (each query after
    its record), so that query positions, and hence the text positions the task occupies, do
    not depend on the distance being tested. The *anchor* of a record or query is the token
    just before its value; a query's distance is its anchor's index minus its record's anchor's
    index.
    """

    key_alphabet: str = "#$&*+<>@^_`{|}~"
    key_length: int = 1
    value_length: int = 1
    value_alphabet: str = string.digits
    n_records: int = 12
    n_queries: int = 8
    near_keys: int = 0
    separator: str = ""
    layout: str = "end"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; known: {', '.join(LAYOUTS)}")
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
        if self.layout == "anywhere":  # every block followed by a free cell
            return (self.n_records + self.n_queries) * (self.record_length + 1)
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


def _end_layout(task: RetrievalTask, keys: list[str], queried: list[str], length: int,
                rng: np.random.Generator, distance: int | None
                ) -> tuple[dict[str, int], list[tuple[int, str]]]:
    """Records at random places before the queries, which fill the end of the sequence. Returns
    (record key → start index, [(query start index, key)] in sequence order)."""
    queries_start = length - task.n_queries * task.query_length
    anchor = task.key_length + len(task.separator)
    query_anchor = queries_start + 1 + anchor  # of the first query
    width = task.record_length
    order = [str(key) for key in rng.permutation(keys)]
    starts: dict[str, int] = {}
    if distance is None:
        starts.update(zip(order, (int(x) for x in _place(queries_start, len(order), width, rng))))
    else:
        start = query_anchor - distance - anchor
        if start < 0 or start + width >= queries_start:
            shortest = query_anchor - (queries_start - width - 1) - anchor
            longest = query_anchor - anchor
            raise ValueError(f"distance {distance} does not fit in {length} characters: it "
                             f"must be in [{shortest}, {longest}]")
        starts[queried[0]] = start
        order.remove(queried[0])
        starts.update(_place_around(order, [(0, max(start - 1, 0)),
                                            (start + width + 1, queries_start)], width, rng))
    query_order = [queried[j] for j in rng.permutation(task.n_queries)]
    return starts, [(queries_start + j * task.query_length, key)
                    for j, key in enumerate(query_order)]


def _place_around(keys: list[str], gaps: Sequence[tuple[int, int]], width: int,
                  rng: np.random.Generator) -> dict[str, int]:
    """Start indices for records ``keys`` in the free ``gaps`` [(first cell, end)], each record
    followed by a free cell: records go one by one to a gap drawn in proportion to the room it
    has left, then ``_place`` spreads each gap's records uniformly over it."""
    rooms = np.array([max(end - first, 0) // (width + 1) for first, end in gaps])
    if rooms.sum() < len(keys):
        raise ValueError(f"no room for {len(keys)} more records of {width} (+1) cells in the gaps "
                         f"{list(gaps)}")
    counts = np.zeros(len(gaps), dtype=int)
    for _ in keys:
        left = rooms - counts
        counts[rng.choice(len(gaps), p=left / left.sum())] += 1
    offsets = [int(first + x) for (first, end), count in zip(gaps, counts)
               for x in _place(max(end - first, 0), int(count), width, rng)]
    return dict(zip(keys, offsets))


def _anywhere_layout(task: RetrievalTask, keys: list[str], queried: list[str], length: int,
                     rng: np.random.Generator, distance: int | None, depth: float | None = None
                     ) -> tuple[dict[str, int], list[tuple[int, str]]]:
    """Records and queries scattered over the whole sequence, each query after its record
    (``layout="anywhere"``); returns what ``_end_layout`` does.

    Without ``distance``: all blocks are placed uniformly (``_place``), the block roles (record
    or query) are a random order in which every query has more records than queries before it,
    and each query asks about a random earlier record not yet asked about. With ``distance``
    (one query): the record's start is uniform over those that fit (or, with ``depth`` in
    [0, 1], that fraction of the way from the first to the last start that fits: the record's
    depth in the sequence, set independently of the distance), the query follows at that
    distance, and the other records fill the gaps around them.
    """
    width = task.record_length  # == task.query_length
    if distance is not None:
        shortest, longest = width + 2, length - width + 1
        if not shortest <= distance <= longest:
            raise ValueError(f"distance {distance} does not fit in {length} characters: it "
                             f"must be in [{shortest}, {longest}]")
        last_start = length - width - distance + 1
        record_start = int(rng.integers(0, last_start + 1)) if depth is None else round(depth * last_start)
        query_start = record_start + distance - 1  # anchors at start + anchor and start + 1 + anchor
        others = [key for key in rng.permutation(keys) if key != queried[0]]
        starts = {queried[0]: record_start}
        starts.update(_place_around([str(key) for key in others],
                                    [(0, record_start), (record_start + width + 1, query_start),
                                     (query_start + width + 1, length)], width, rng))
        return starts, [(query_start, queried[0])]
    blocks = [int(x) for x in _place(length, task.n_records + task.n_queries, width, rng)]
    total = len(blocks)
    for _ in range(10_000):
        is_query = np.zeros(total, dtype=bool)
        is_query[rng.choice(total, task.n_queries, replace=False)] = True
        if np.all(np.cumsum(~is_query) >= np.cumsum(is_query)):
            break
    else:  # only reachable for n_queries close to n_records with many blocks
        raise ValueError(f"could not order {task.n_records} records before {task.n_queries} "
                         f"queries; use fewer queries")
    unasked: list[int] = []  # block indices of records not yet asked about
    asked_at: dict[int, int] = {}  # record block → query block
    for index in range(total):
        if is_query[index]:
            asked_at[unasked.pop(int(rng.integers(len(unasked))))] = index
        else:
            unasked.append(index)
    queried_iter = iter(queried)
    other_iter = iter(key for key in rng.permutation(keys) if key not in queried)
    starts: dict[str, int] = {}
    queries: list[tuple[int, str]] = []
    for index in range(total):
        if is_query[index]:
            continue
        key = str(next(queried_iter)) if index in asked_at else str(next(other_iter))
        starts[key] = blocks[index]
        if index in asked_at:
            queries.append((blocks[asked_at[index]], key))
    return starts, sorted(queries)


def retrieval_example(text_ids: np.ndarray, tokenizer: CharTokenizer, task: RetrievalTask,
                      length: int, rng: np.random.Generator,
                      distance: int | None = None, depth: float | None = None) -> RetrievalExample:
    """A sequence of ``length`` characters: real text with ``task.n_records`` records and
    ``task.n_queries`` queries placed as ``task.layout`` says (see ``RetrievalTask``), text
    filling every other position in its original order (a random window of ``text_ids``).

    With ``distance`` given, the task must have one query, whose record is placed so that the
    query's distance is exactly ``distance``; otherwise distances follow from where the records
    fall. ``depth`` (with ``distance``, layout "anywhere"): where the record sits among the starts
    that fit, 0 the first and 1 the last.
    """
    if length < task.min_length():
        raise ValueError(f"length {length} is too short for the task (needs >= {task.min_length()})")
    if distance is not None and task.n_queries != 1:
        raise ValueError("a requested distance needs a task with n_queries = 1")
    if depth is not None and (distance is None or task.layout != "anywhere" or not 0 <= depth <= 1):
        raise ValueError(f"a depth needs a distance, the 'anywhere' layout and a value in [0, 1]; got depth "
                         f"{depth}, distance {distance}, layout {task.layout!r}")
    keys, queried = _draw_keys(task, rng)
    values = {key: "".join(rng.choice(list(task.value_alphabet), task.value_length))
              for key in keys}
    if task.layout == "anywhere":
        starts, queries = _anywhere_layout(task, keys, queried, length, rng, distance, depth)
    else:
        starts, queries = _end_layout(task, keys, queried, length, rng, distance)
    sequence = np.full(length, -1, dtype=np.int64)
    for key, start in starts.items():
        record = f"[{key}{task.separator}{values[key]}]"
        sequence[start: start + task.record_length] = tokenizer.encode(record)
    for start, key in queries:
        sequence[start: start + task.query_length] = tokenizer.encode(
            f"\n?{key}{task.separator}{values[key]}")
    holes = np.flatnonzero(sequence < 0)
    if text_ids.size < holes.size:
        raise ValueError(f"text of {text_ids.size} characters cannot fill {holes.size} positions")
    offset = int(rng.integers(0, text_ids.size - holes.size + 1))
    sequence[holes] = text_ids[offset: offset + holes.size]
    # the anchor, the token just before the value: offset in a record "[key=", a query "\n?key="
    anchor = task.key_length + len(task.separator)
    query_anchors = [start + 1 + anchor for start, _ in queries]
    answers = np.array([[position + 1 + i for i in range(task.value_length)]
                        for position in query_anchors])
    distances = np.array([position - (starts[key] + anchor)
                          for position, (_, key) in zip(query_anchors, queries)])
    return RetrievalExample(sequence, answers, distances, [key for _, key in queries],
                            [values[key] for _, key in queries])


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


def repeated_sequence_batches(vocab_size: int, length: int, batch_size: int, seed: int
                              ) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of uniformly random token sequences whose second half repeats the first
    ({"input_ids": LongTensor[batch_size, length], "answer_mask": BoolTensor}, the mask True on
    every repeated token after the first, which copying the token that followed its earlier
    occurrence predicts). Small models form induction heads on this within a few hundred steps;
    the retrieval task alone rewards them too sparsely, and models trained only on it stall at
    answering with the value of some record rather than the queried one."""
    if length < 4:
        raise ValueError(f"length must be >= 4 to repeat anything, got {length}")
    rng = np.random.default_rng(seed)
    half = (length + 1) // 2
    mask = torch.zeros(batch_size, length, dtype=torch.bool)
    mask[:, half + 1:] = True
    while True:
        first = rng.integers(0, vocab_size, (batch_size, half))
        yield {"input_ids": torch.from_numpy(np.concatenate([first, first], 1)[:, :length]),
               "answer_mask": mask.clone()}


def distance_batch(text_ids: np.ndarray, tokenizer: CharTokenizer, task: RetrievalTask,
                   length: int, distances: Sequence[int], per_distance: int, seed: int,
                   depths: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """``per_distance`` single-query sequences at each requested distance (``stack_examples``),
    the record anywhere it fits; with ``depths``, ``per_distance`` at each (distance, depth) of
    the grid instead (rows distance-major, then depth, then trial), so that where the record sits
    varies independently of how far the query is from it."""
    if task.n_queries != 1:
        raise ValueError("distance batches need a task with n_queries = 1")
    rng = np.random.default_rng(seed)
    cells = [(distance, None) for distance in distances] if depths is None else \
        [(distance, depth) for distance in distances for depth in depths]
    return stack_examples([retrieval_example(text_ids, tokenizer, task, length, rng, distance, depth)
                           for distance, depth in cells for _ in range(per_distance)])


def text_batch(text_ids: np.ndarray, length: int, n_rows: int, seed: int) -> torch.Tensor:
    """``n_rows`` random windows of ``length`` ids from ``text_ids``: LongTensor[n_rows, length]."""
    if text_ids.size < length:
        raise ValueError(f"text of {text_ids.size} ids is shorter than one row of {length}")
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, text_ids.size - length + 1, n_rows)
    return torch.from_numpy(np.stack([text_ids[o: o + length] for o in offsets]))


def model_free_rules(task: RetrievalTask, n_samples: int = 20000, seed: int = 0) -> dict[str, float]:
    """Accuracy of rules that answer a query without a model: "uniform guess" (1 / alphabet^length;
    values are drawn uniformly, so always answering the most frequent value does no better) and
    "most common record value" (answer the value that most records of the sequence hold, ties
    broken at random: it needs no key, yet the queried value is among the records). The second is
    estimated by simulating ``n_samples`` sequences' values (seeded)."""
    alphabet = len(task.value_alphabet) ** task.value_length
    rng = np.random.default_rng(seed)
    values = rng.integers(0, alphabet, (n_samples, task.n_records))  # record 0 is the queried one
    counts = np.stack([(values == v).sum(1) for v in range(alphabet)], axis=1)  # [samples, alphabet]
    modal = counts == counts.max(1, keepdims=True)
    hit = modal[np.arange(n_samples), values[:, 0]] / modal.sum(1)  # chance the tie-break picks it
    return {"uniform guess": 1.0 / alphabet, "most common record value": float(hit.mean())}


def strongest_model_free_rule(task: RetrievalTask) -> tuple[str, float]:
    """(name, accuracy) of the best of ``model_free_rules``: what an accuracy is set beside."""
    rules = model_free_rules(task)
    best = max(rules, key=rules.get)
    return best, rules[best]
