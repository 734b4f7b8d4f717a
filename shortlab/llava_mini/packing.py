"""Packing several questions about one image into one sequence: the image prefix is shared, each
question sees only the prefix and itself (a 4D attention mask), and its position ids continue
right after the prefix, so a packed question gets exactly the logits it would get alone, at a
fraction of the cost. ``build_eval_sequence`` hangs every candidate answer below each question."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shortlab.checkpoints import IMAGE_TOKEN
from shortlab.llava_mini.easy_vqa import user_prompt


@dataclass
class PromptTokens:
    """Token ids for packing: the shared prefix (system, user header, image tokens) and per-question
    blocks (the text after the image up to the assistant header), answers with their end token."""

    prefix: list[int]
    image_token_id: int
    end_id: int  # <|im_end|>
    tokenizer: object
    template: str  # the chat-template text with _QUESTION_MARKER in place of the question

    def block(self, question: str) -> list[int]:
        return self.tokenizer(self._after_image(question), add_special_tokens=False)["input_ids"]

    def answer(self, answer: str) -> list[int]:
        return self.tokenizer(answer, add_special_tokens=False)["input_ids"]

    def _after_image(self, question: str) -> str:
        return self.template.split(IMAGE_TOKEN, 1)[1].replace(_QUESTION_MARKER, user_prompt(question))


_QUESTION_MARKER = "\x00QUESTION\x00"


def prompt_tokens(processor) -> PromptTokens:
    """Split the single-question prompt into the shared prefix and the per-question text.

    The image token is special, so text on either side of it tokenizes independently: prefix +
    block(question) equals the processor's ``input_ids`` for that question (checked in tests).
    The processor itself expands the image token (so any LLaVA tower's token count is right), and
    the end-of-turn token is the one the chat template writes after an assistant answer.
    """
    from PIL import Image

    tokenizer = processor.tokenizer
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _QUESTION_MARKER}]}
    template = processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    if template.count(IMAGE_TOKEN) != 1:
        raise ValueError("the chat template must place exactly one image token")
    crop = processor.image_processor.crop_size
    blank = Image.new("RGB", (crop["width"], crop["height"]))
    before = template.split(IMAGE_TOKEN, 1)[0]
    prefix = processor(images=blank, text=before + IMAGE_TOKEN, add_special_tokens=False)["input_ids"][0]
    return PromptTokens(prefix=list(map(int, prefix)), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                        end_id=_turn_end_id(processor, user, template), tokenizer=tokenizer,
                        template=template)


def _turn_end_id(processor, user: dict, prompt: str) -> int:
    """The first token the chat template writes after an assistant answer (``<|im_end|>`` for
    ChatML). Packed scoring appends answers right after the generation prompt, so a template that
    writes anything in between (Vicuna's space after "ASSISTANT:") is refused."""
    answer = "yes"
    assistant = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
    full = processor.apply_chat_template([user, assistant], tokenize=False)
    if not full.startswith(prompt + answer):
        raise ValueError("the chat template does not write the assistant answer right after the generation prompt")
    after = processor.tokenizer(full[len(prompt + answer):], add_special_tokens=False)["input_ids"]
    if not after:
        raise ValueError("the chat template writes nothing after an assistant answer; no end-of-turn token")
    return int(after[0])


@dataclass
class PackedSequence:
    """One image's packed token tree: segment 0 is the prefix, others hang below a parent."""

    input_ids: list[int]
    position_ids: list[int]
    segment_of: list[int]  # segment index of every token
    parents: list[int | None]  # parent segment of each segment
    starts: list[int]  # first token of each segment

    def segment_end(self, segment: int) -> int:
        """Index of the last token of ``segment``."""
        nxt = self.starts[segment + 1] if segment + 1 < len(self.starts) else len(self.input_ids)
        return nxt - 1


def pack(prefix: list[int], segments: list[tuple[list[int], int]]) -> PackedSequence:
    """Lay out ``prefix`` then ``segments`` ``(tokens, parent_segment)`` (parent 0 = the prefix,
    k = the k-th segment, 1-based, which must come earlier). A segment's positions continue after
    its parent's last token; it attends to its ancestors and causally to itself."""
    ids, positions, segment_of = list(prefix), list(range(len(prefix))), [0] * len(prefix)
    parents: list[int | None] = [None]
    starts = [0]
    ends = [len(prefix) - 1]
    for k, (tokens, parent) in enumerate(segments, start=1):
        if not 0 <= parent < k:
            raise ValueError(f"segment {k} has parent {parent}; parents must come first")
        first = positions[ends[parent]] + 1
        starts.append(len(ids))
        ids.extend(tokens)
        positions.extend(range(first, first + len(tokens)))
        segment_of.extend([k] * len(tokens))
        parents.append(parent)
        ends.append(len(ids) - 1)
    return PackedSequence(ids, positions, segment_of, parents, starts)


def packed_attention_mask(sequences: list[PackedSequence], length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask [batch, 1, length, length] for padded packed sequences (0 = attend)."""
    masks = []
    for seq in sequences:
        n = len(seq.input_ids)
        segment = torch.tensor(seq.segment_of)
        num_segments = len(seq.parents)
        ancestor = torch.eye(num_segments, dtype=torch.bool)  # ancestor[s, t]: s may see t
        for s in range(num_segments):
            p = seq.parents[s]
            while p is not None:
                ancestor[s, p] = True
                p = seq.parents[p]
        allowed = ancestor[segment][:, segment]
        allowed &= ~((segment[:, None] == segment[None, :]) & (torch.arange(n)[None, :] > torch.arange(n)[:, None]))
        full = torch.eye(length, dtype=torch.bool)  # padding rows see themselves only
        full[:n, :n] = allowed
        masks.append(full)
    allowed = torch.stack(masks)[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def packed_batch(sequences: list[PackedSequence], pad_id: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
    """``(input_ids, position_ids, attention_mask)`` tensors for a batch of packed sequences:
    [batch, length], [batch, length] and [batch, 1, length, length], on ``device`` (default
    the CPU). They are built on the CPU, where their many small writes are cheap, and moved once."""
    length = max(len(s.input_ids) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq.input_ids)] = torch.tensor(seq.input_ids)
        position_ids[row, : len(seq.input_ids)] = torch.tensor(seq.position_ids)
    mask = packed_attention_mask(sequences, length, dtype)
    return input_ids.to(device), position_ids.to(device), mask.to(device)


def build_eval_sequence(tokens: PromptTokens, questions: list[str], answers: list[str]):
    """Pack every question about one image with 13 answer branches each; returns the sequence and
    per question: (index of the question's last token, {answer: [token index of each answer token]})."""
    answer_ids = {a: tokens.answer(a) for a in answers}
    segments: list[tuple[list[int], int]] = []
    layout = []
    for question in questions:
        segments.append((tokens.block(question), 0))
        q_segment = len(segments)
        branch_segments = {}
        for answer in answers:
            segments.append((answer_ids[answer], q_segment))
            branch_segments[answer] = len(segments)
        layout.append((q_segment, branch_segments))
    seq = pack(tokens.prefix, segments)
    per_question = []
    for q_segment, branch_segments in layout:
        last = seq.segment_end(q_segment)
        per_question.append((last, {a: list(range(seq.starts[s], seq.segment_end(s) + 1))
                                    for a, s in branch_segments.items()}))
    return seq, per_question, answer_ids
