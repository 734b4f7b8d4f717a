"""The passkey test: a number hidden early in real text, asked for at the end.

``passkey_prompt`` builds the prompt with the answer appended (teacher forcing) so that the
distance between the passkey and its answer is exact in tokens; ``passkey_trial`` scores one
prompt in one forward pass (found or not, and the filler's loss by position).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shortlab.rope_experiment.measurements import _next_token_stats

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
