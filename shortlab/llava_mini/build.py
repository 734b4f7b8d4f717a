"""Assembling llava-mini: the processor, the trained projector (and optional LoRA delta) and
``build_llava_mini``, which joins the embedded SmolLM2, the converted DINOv2 tower and the
projector into a plain ``LlavaForConditionalGeneration``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shortlab.arch import model_parts
from shortlab.checkpoints import (
    CHAT_TEMPLATE, DEFAULT_MODEL, IMAGE_TOKEN, embedded_checkpoint, resolve_dtype,
)

LANGUAGE_MODEL = DEFAULT_MODEL  # "smollm2-135m"
DEFAULT_IMAGE_SIZE = 224  # 16×16 = 256 visual tokens; 336 gives 24×24 = 576 (LLaVA-1.5's count)
PATCH_SIZE = 14
VISION_FEATURE_LAYER = -2
VISION_FEATURE_SELECT_STRATEGY = "default"  # drop the CLS token

# shortlab/weights: package data next to this subpackage
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
PROJECTOR_FILE = "llava_mini_projector.safetensors"
LORA_FILE = "llava_mini_lora.safetensors"
CARD_FILE = "llava_mini_card.json"
LOG_FILE = "llava_mini_train.log"


def num_image_tokens(image_size: int) -> int:
    """Visual tokens LLaVA inserts for an ``image_size``² input (CLS dropped, no registers)."""
    return (image_size // PATCH_SIZE) ** 2


def build_processor(tokenizer, image_size: int = DEFAULT_IMAGE_SIZE):
    """A ``LlavaProcessor``: DINOv2 image processor at ``image_size``, the tokenizer (with
    ``<image>`` added if missing), patch size 14, "default" strategy, the chat template."""
    from transformers import LlavaProcessor

    from shortlab.vision import dinov2_image_processor  # the vision extra

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


def trained_weights_provenance(weights_dir: str | Path | None = None) -> list[str]:
    """One line per trained file of llava-mini (projector, LoRA delta): its path under the
    repository, the tensor dtypes stored in it and what its card says of it (the LoRA's rank and
    how it is merged). Read from the safetensors headers and the card, not from the model."""
    from safetensors import safe_open

    projector, lora, card = _trained_files(Path(weights_dir or WEIGHTS_DIR))
    lines = []
    for label, path in [("projector", projector), ("LoRA delta", lora)]:
        if path is None:
            continue
        with safe_open(str(path), "pt") as handle:
            dtypes = sorted({str(handle.get_slice(key).get_dtype()) for key in handle.keys()})
            count = len(list(handle.keys()))
        inside = path.resolve().is_relative_to(WEIGHTS_DIR.resolve())
        where = f"shortlab/weights/{path.resolve().relative_to(WEIGHTS_DIR.resolve())}" if inside else str(path)
        line = f"{label}: {where}, {count} tensors stored as {'/'.join(dtypes)}"
        if label == "LoRA delta":
            line += f", rank {card['lora']['rank']}, merged into the language model ({card['lora']['merged']})"
        else:
            line += f", {card['projector']}"
        lines.append(line + f"; trained here on {card['data'].get('task', 'easy-vqa')} ({CARD_FILE})")
    return lines


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

    from shortlab.vision import load_dinov2  # the vision extra

    if image_size <= 0 or image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a positive multiple of {PATCH_SIZE}, got {image_size}")
    torch_dtype = resolve_dtype(dtype)
    lm_folder = embedded_checkpoint(LANGUAGE_MODEL)
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
        projector = model_parts(model).projector
        for module in projector.modules():
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
                  for k, v in projector.state_dict().items()})

    lora_names: list[str] = []
    if trained:
        projector_path, lora_path, card = _trained_files(Path(weights_dir or WEIGHTS_DIR))
        projector_state = load_file(projector_path)
        expected = {k.removeprefix("model.multi_modal_projector.") for k in state
                    if k.startswith("model.multi_modal_projector.")}
        if set(projector_state) != expected:
            raise ValueError(f"{projector_path} holds {sorted(projector_state)}, expected {sorted(expected)}")
        state.update({f"model.multi_modal_projector.{k}": v.float() for k, v in projector_state.items()})

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
    model.config.shortlab = {"name": "llava-mini", "trained": trained, "lora_merged": lora_names,
                             "weights_dir": str(weights_dir or WEIGHTS_DIR) if trained else None}
    model = model.to(torch_dtype).eval()
    return model, processor
