"""Packing several questions about one image into one sequence: the image prefix is shared, each
question sees only the prefix and itself (a 4D attention mask), and its position ids continue
right after the prefix, so a packed question gets exactly the logits it would get alone, at a
fraction of the cost. ``build_eval_sequence`` hangs every candidate answer below each question
(the token tree itself: ``shortlab.packing``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from shortlab.checkpoints import IMAGE_TOKEN
from shortlab.llava_mini.easy_vqa import blank_image, user_prompt
from shortlab.packing import PackedSequence, pack, packed_attention_mask, packed_batch

__all__ = ["PackedSequence", "PromptTokens", "build_eval_sequence", "pack", "packed_attention_mask",
           "packed_batch", "prompt_tokens"]


@dataclass
class PromptTokens:
    """Token ids for packing, for any chat template that writes one image, then the question, then
    the generation prompt, then the answer: the shared prefix (everything up to and including the
    image tokens, with the tokenizer's BOS if it adds one), per-question blocks (the text after the
    image up to the end of the generation prompt) and answers with their end token, so that
    ``prefix + block(q) + answer(a) + [end_id]`` are the ids the processor gives the conversation.

    Text is tokenized in context (the ids of a longer text minus those of its start), because
    SentencePiece tokenizers split "ASSISTANT: yes" differently from " yes" alone; every
    difference is checked to be a true prefix split, so a template/tokenizer pair that merges
    tokens across the split is refused instead of scored wrongly."""

    prefix: list[int]  # for an image of ``image_size``
    image_token_id: int
    end_id: int  # see prompt_tokens: the template's end-of-turn token, else the tokenizer's EOS
    tokenizer: object
    template: str  # the one-question prompt, _QUESTION_MARKER in place of the question
    separator: str  # what the template writes between the generation prompt and the answer
    image_size: tuple[int, int]  # (width, height) the prefix is for
    processor: object = field(repr=False)
    _prefixes: dict = field(default_factory=dict, repr=False)

    def block(self, question: str) -> list[int]:
        before, after = self.template.split(IMAGE_TOKEN, 1)
        return self._continuation(before + IMAGE_TOKEN, after.replace(_QUESTION_MARKER, user_prompt(question)))

    def answer(self, answer: str) -> list[int]:
        """The answer's ids after the generation prompt (separator included, e.g. "Ġyes")."""
        return self._continuation(_generation_prompt(self.template), self.separator + answer)

    def prefix_for(self, image_size: tuple[int, int]) -> list[int]:
        """The prefix for an image of ``image_size`` (width, height): LLaVA-NeXT tiles an image by
        its size (anyres), so its number of image tokens depends on it; LLaVA's does not."""
        if tuple(image_size) == tuple(self.image_size):
            return self.prefix
        if tuple(image_size) not in self._prefixes:
            self._prefixes[tuple(image_size)] = _prefix(self.processor, self.template, image_size)
        return self._prefixes[tuple(image_size)]

    def _continuation(self, context: str, text: str) -> list[int]:
        """The ids ``text`` gets after ``context``: ids(context + text) minus ids(context)."""
        return _continuation_ids(self.tokenizer, context, text)


_QUESTION_MARKER = "\x00QUESTION\x00"
_ANSWER_MARKER = "\x00ANSWER\x00"
_PROBE_ANSWER = "yes"  # an easy-VQA answer, to find the end token in context


def _generation_prompt(template: str) -> str:
    """The text after the question (e.g. " ASSISTANT:"), behind the image token: the special
    token splits the text there, so this tokenizes as it does in the full prompt."""
    return IMAGE_TOKEN + template.split(_QUESTION_MARKER, 1)[1]


def _continuation_ids(tokenizer, context: str, text: str) -> list[int]:
    start = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + text, add_special_tokens=False)["input_ids"]
    if whole[: len(start)] != start:
        raise ValueError(
            f"the tokenizer merges {text!r} with the text before it ({context[-20:]!r}), so the chat "
            f"template's prompt cannot be split there for packing"
        )
    return whole[len(start):]


def _prefix(processor, template: str, image_size: tuple[int, int]) -> list[int]:
    """The processor's ids for the template's text up to the image, with a blank image of
    ``image_size`` (the image tokens' count depends on the size only). The tokenizer's own special
    tokens are kept (a Llama tokenizer's BOS), as in the processor's ids for a whole prompt."""
    from PIL import Image

    before = template.split(IMAGE_TOKEN, 1)[0]
    blank = Image.new("RGB", tuple(image_size))
    return list(map(int, processor(images=blank, text=before + IMAGE_TOKEN)["input_ids"][0]))


def prompt_tokens(processor, image_size: tuple[int, int] | None = None) -> PromptTokens:
    """Split the single-question prompt of ``processor``'s chat template into the shared prefix,
    the per-question text and the answer, for images of ``image_size`` (width, height; default
    easy-VQA's 64 x 64).

    The chat template must write exactly one image, then the question, then the generation prompt,
    and an assistant answer right after the generation prompt, optionally behind a separator (LLaVA-1.5's
    "ASSISTANT:" + " yes"; ChatML and LLaVA-NeXT's Mistral template: "[INST] <image>\\nQ [/INST]" +
    " yes</s>"). Anything else raises ``ValueError`` naming what the template does instead.

    The end token is what a model generates to close its answer: the first token the template
    writes after an assistant answer (ChatML's ``<|im_end|>``, Mistral's ``</s>``), or, when the
    template writes only whitespace there (LLaVA-1.5 writes "yes " and no EOS), the tokenizer's EOS
    token, with which generation stops. Scores are log-likelihoods of answer + end token.
    """
    tokenizer = processor.tokenizer
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _QUESTION_MARKER}]}
    template = processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    if template.count(IMAGE_TOKEN) != 1:
        raise ValueError(f"the chat template writes {template.count(IMAGE_TOKEN)} image tokens for one image "
                         f"({template!r}); packing needs exactly one")
    if template.count(_QUESTION_MARKER) != 1 or template.index(_QUESTION_MARKER) < template.index(IMAGE_TOKEN):
        raise ValueError(f"the chat template must write the question once, after the image ({template!r})")
    separator, after = _answer_turn(processor, user, template)
    if after.strip():
        context = _generation_prompt(template) + separator + _PROBE_ANSWER
        end_id = _continuation_ids(tokenizer, context, after)[0]
    elif tokenizer.eos_token_id is None:
        raise ValueError("the chat template writes no end-of-turn token after an answer and the tokenizer "
                         "has no EOS token: nothing marks the end of an answer")
    else:
        end_id = tokenizer.eos_token_id
    image_size = tuple(image_size or blank_image().size)
    return PromptTokens(prefix=_prefix(processor, template, image_size),
                        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), end_id=int(end_id),
                        tokenizer=tokenizer, template=template, separator=separator,
                        image_size=image_size, processor=processor)


def _answer_turn(processor, user: dict, prompt: str) -> tuple[str, str]:
    """What the template writes between the generation prompt and an assistant answer (the
    separator) and after the answer."""
    assistant = {"role": "assistant", "content": [{"type": "text", "text": _ANSWER_MARKER}]}
    full = processor.apply_chat_template([user, assistant], tokenize=False)
    if not full.startswith(prompt) or full.count(_ANSWER_MARKER) != 1:
        raise ValueError(
            f"the chat template does not write the assistant answer after the generation prompt: prompt "
            f"{prompt!r}, conversation {full!r}"
        )
    separator, after = full[len(prompt):].split(_ANSWER_MARKER)
    return separator, after


def build_eval_sequence(tokens: PromptTokens, questions: list[str], answers,
                        prefix: list[int] | None = None):
    """Pack every question about one image with one branch per candidate answer below it, below
    ``prefix`` (default ``tokens.prefix``; ``tokens.prefix_for(image.size)`` for an image of
    another size). ``answers``: the candidates of every question (a list of strings), or one list
    per question (each question scored over the answers its type can have). Returns the sequence,
    per question (index of the question's last token, {answer: [token index of each answer
    token]}), and the ids of every answer."""
    per_question_answers = ([list(answers)] * len(questions) if not answers or isinstance(answers[0], str)
                            else [list(a) for a in answers])
    if len(per_question_answers) != len(questions):
        raise ValueError(f"{len(questions)} questions but candidate answers for {len(per_question_answers)}")
    answer_ids = {a: tokens.answer(a) for candidates in per_question_answers for a in candidates}
    segments: list[tuple[list[int], int]] = []
    layout = []
    for question, candidates in zip(questions, per_question_answers):
        segments.append((tokens.block(question), 0))
        q_segment = len(segments)
        branch_segments = {}
        for answer in candidates:
            segments.append((answer_ids[answer], q_segment))
            branch_segments[answer] = len(segments)
        layout.append((q_segment, branch_segments))
    seq = pack(tokens.prefix if prefix is None else prefix, segments)
    per_question = []
    for q_segment, branch_segments in layout:
        last = seq.segment_end(q_segment)
        per_question.append((last, {a: list(range(seq.starts[s], seq.segment_end(s) + 1))
                                    for a, s in branch_segments.items()}))
    return seq, per_question, answer_ids
