"""Device handling: models whose layers sit on several devices, CUDA synchronisation in timing,
and the dtypes ``load_model`` picks.

No second device exists on the test machines, so ``SecondDevice`` simulates one: tensors a
module on "device 1" produces are CPU tensors that report ``cuda:1`` as their device, and any
operation mixing them with ordinary (CPU) tensors fails as a real cross-device operation does,
unless they are moved with ``.to``. Modules placed there move their inputs to their device
inside their forward, after the hooks have seen them, as accelerate's ``device_map`` does.
"""

import logging
import os

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from shortlab import models
from shortlab.arch import model_parts
from shortlab.benchmarking import cuda_devices, synchronize_cuda, time_side_by_side
from shortlab.metrics import block_influence, layer_similarity
from shortlab.models import load_model
from shortlab.pruning import angular_distances, relative_magnitude

FAKE = torch.device("cuda", 1)


class OnFake(torch.Tensor):
    """A CPU tensor that ``SecondDevice`` treats as living on ``FAKE``."""


def _plain(value):
    return value.as_subclass(torch.Tensor) if isinstance(value, OnFake) else value


def _to_fake(value):
    return value.as_subclass(OnFake) if isinstance(value, torch.Tensor) else value


def _names_fake(device) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device) == FAKE


class SecondDevice(TorchFunctionMode):
    """While active, ``OnFake`` tensors behave as if on ``FAKE``: ``.device`` says so, ``.to`` /
    ``device=`` moves between the CPU and ``FAKE``, and mixing devices raises."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__self__", None) is torch.Tensor.device:  # the ``.device`` getter
            return FAKE if isinstance(args[0], OnFake) else func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_fake = [isinstance(t, OnFake) for t in tensors]
        targets = [v for v in (*args[1:], kwargs.get("device")) if isinstance(v, (str, torch.device))]
        if getattr(func, "__name__", "") in ("to", "cuda", "cpu") or "device" in kwargs:
            moves_to_fake = any(_names_fake(t) for t in targets)
            stays = not targets and func.__name__ == "to" and any(on_fake)
            args = tree_map(lambda v: "cpu" if _names_fake(v) else _plain(v), args)
            kwargs = tree_map(lambda v: "cpu" if _names_fake(v) else _plain(v), kwargs)
            result = func(*args, **kwargs)
            return tree_map(_to_fake, result) if moves_to_fake or stays else result
        big = [fake for t, fake in zip(tensors, on_fake) if t.dim() > 0]  # 0-d tensors may mix
        if any(big) and not all(big):
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at "
                               f"least two devices, {FAKE} and cpu! ({func.__name__})")
        result = func(*tree_map(_plain, args), **tree_map(_plain, kwargs))
        return tree_map(_to_fake, result) if any(on_fake) and func.__name__ != "item" else result


def place_on_second_device(module):
    """Make ``module`` compute on ``FAKE``: inputs moved there inside its forward, outputs left
    there (``AlignDevicesHook`` without ``io_same_device``). Returns an undo function."""
    forward = module.forward

    def moved_forward(*args, **kwargs):
        return tree_map(_to_fake, forward(*tree_map(_plain, args), **tree_map(_plain, kwargs)))

    module.forward = moved_forward
    return lambda: module.__dict__.pop("forward")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def batches(tiny):
    _, tokenizer = tiny
    batch = tokenizer(["The cat sat on the mat.", "A short one."], return_tensors="pt", padding=True)
    return [dict(batch)]


@pytest.fixture
def split_model(tiny):
    """tiny-llama (4 layers) with layers 2 and 3, the final norm and the LM head on "device 1"."""
    model, _ = tiny
    parts = model_parts(model)
    undo = [place_on_second_device(m) for m in (*parts.layers[2:], parts.final_norm, parts.lm_head)]
    try:
        with SecondDevice():
            yield model
    finally:
        for step in undo:
            step()


def test_the_simulation_catches_cross_device_operations(tiny, batches, split_model):
    plain, fake = torch.ones(2, 3), torch.ones(2, 3).to(FAKE)
    assert fake.device == FAKE and plain.device.type == "cpu"
    with pytest.raises(RuntimeError, match="same device"):
        torch.nn.functional.cosine_similarity(plain, fake, dim=-1)
    assert fake.to(plain.device).device.type == "cpu"
    logits = split_model(**batches[0]).logits
    assert logits.device == FAKE


@pytest.mark.parametrize("measure", [
    block_influence, relative_magnitude, layer_similarity,
    lambda model, batches: angular_distances(model, batches, block_size=2),
])
def test_layer_metrics_compare_states_across_devices(tiny, batches, measure):
    model, _ = tiny
    expected = measure(model, batches)
    parts = model_parts(model)
    undo = [place_on_second_device(m) for m in (*parts.layers[2:], parts.final_norm, parts.lm_head)]
    try:
        with SecondDevice():
            split = measure(model, batches)
    finally:
        for step in undo:
            step()
    if isinstance(expected, dict):
        assert split.keys() == expected.keys()
        assert [split[k] for k in expected] == pytest.approx([expected[k] for k in expected], abs=1e-6)
    else:
        assert torch.allclose(_plain(split), expected, atol=1e-6)


# ---------------------------------------------------------------- CUDA synchronisation


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA reported available and in use; ``synchronize`` calls are recorded as
    ("sync", device) in the returned list instead of made."""
    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", device)))
    return events


def test_each_timed_call_is_bracketed_by_synchronisation(fake_cuda):
    events = fake_cuda

    def clock():
        events.append("clock")
        return float(len(events))

    time_side_by_side({"a": lambda: events.append("run")}, repeats=2, warmup=1, clock=clock,
                      devices=(d for d in ["cuda:0", "cpu"]))  # a generator: read every round
    sync = ("sync", torch.device("cuda:0"))
    assert events == ["run"] + [sync, "clock", "run", sync, "clock"] * 2


def test_synchronisation_targets(fake_cuda):
    synchronize_cuda(["cpu", "cuda:1", 0, torch.device("cuda", 2)])
    assert fake_cuda == [("sync", torch.device("cuda", i)) for i in (1, 0, 2)]
    fake_cuda.clear()
    synchronize_cuda()  # the current device
    assert fake_cuda == [("sync", None)]


def test_no_synchronisation_while_cuda_is_unused(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    time_side_by_side({"a": lambda: None}, repeats=2, warmup=0, devices=["cuda:0"])
    assert fake_cuda == []


def test_cuda_devices_of_cpu_modules_is_empty(tiny):
    assert cuda_devices(tiny[0], torch.nn.Linear(2, 2)) == []


def test_measure_speed_synchronises_the_models_devices(tiny, fake_cuda, monkeypatch):
    from shortlab import speed

    model, _ = tiny
    seen = []
    monkeypatch.setattr(speed, "cuda_devices", lambda *ms: seen.append(ms) or [torch.device("cuda:3")])
    speed.measure_speed({"a": model, "b": model}, prompt_len=4, new_tokens=1, repeats=1, warmup=0)
    assert seen == [(model, model)]
    assert set(fake_cuda) == {("sync", torch.device("cuda:3"))} and len(fake_cuda) == 8


# ---------------------------------------------------------------- dtypes and remote code


@pytest.fixture(scope="module")
def bfloat16_checkpoint(tmp_path_factory):
    model, tokenizer = load_model("tiny-llama", dtype="bfloat16")
    folder = tmp_path_factory.mktemp("bf16")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_auto_dtype_keeps_the_checkpoint_dtype(bfloat16_checkpoint):
    auto, _ = load_model(str(bfloat16_checkpoint), dtype="auto")
    assert {p.dtype for p in auto.parameters()} == {torch.bfloat16}
    default, _ = load_model(str(bfloat16_checkpoint))  # None: float32 whatever is stored
    assert {p.dtype for p in default.parameters()} == {torch.float32}
    cast, _ = load_model(str(bfloat16_checkpoint), dtype="float16")
    assert {p.dtype for p in cast.parameters()} == {torch.float16}


def test_auto_dtype_of_built_models_is_float32():
    model, _ = load_model("tiny-gpt2", dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_auto_dtype_of_the_embedded_model_is_its_cached_float32():
    model, _ = load_model("smollm2-135m", dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_remote_code_is_off_unless_asked_and_logged_when_asked(bfloat16_checkpoint, monkeypatch, caplog):
    import transformers

    seen = []
    for auto_class in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = auto_class.from_pretrained

        def recording(*args, _original=original, _name=auto_class.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(auto_class, "from_pretrained", recording)
    with caplog.at_level(logging.WARNING, logger=models.__name__):
        load_model(str(bfloat16_checkpoint))
        assert {name for name, _ in seen} == {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
        assert {trusted for _, trusted in seen} == {False}
        assert not caplog.records
        seen.clear()
        load_model(str(bfloat16_checkpoint), trust_remote_code=True)
    assert {name for name, _ in seen} == {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    assert {trusted for _, trusted in seen} == {True}
    assert "trust_remote_code=True" in caplog.text


def test_pickled_weights_load_only_with_trust_remote_code(tmp_path):
    # transformers 5 saves safetensors only; a .bin-only checkpoint (as Baichuan2's) is written by hand.
    model, tokenizer = load_model("tiny-llama")
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="no safetensors weights.*trust_remote_code=True"):
        load_model(str(tmp_path))
    loaded, _ = load_model(str(tmp_path), trust_remote_code=True)
    expected = model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())


# ---------------------------------------------------------------- on a real accelerator

TEST_DEVICE = os.environ.get("SHORTLAB_TEST_DEVICE")  # e.g. "cuda"; scripts/gpu_check.sh sets it
on_test_device = pytest.mark.skipif(not TEST_DEVICE, reason="set SHORTLAB_TEST_DEVICE=cuda to run")


@on_test_device
def test_block_influence_on_the_device_matches_the_cpu(tiny, batches):
    model, _ = tiny
    expected = block_influence(model, batches)
    moved, _ = load_model("tiny-llama", device=TEST_DEVICE)
    on_device = [{k: v.to(TEST_DEVICE) for k, v in batch.items()} for batch in batches]
    got = block_influence(moved, on_device)
    assert [got[i] for i in expected] == pytest.approx([expected[i] for i in expected], abs=1e-4)


@on_test_device
def test_packed_vqa_scoring_on_the_device_matches_the_cpu():
    from PIL import Image

    from shortlab import llava_mini

    questions = [["what shape is in the image?", "what color is the shape?"]]
    image = Image.new("RGB", (64, 64), color=(20, 200, 30))
    answers = ["circle", "green", "red"]
    results = []
    for device in ("cpu", TEST_DEVICE):
        model, processor = load_model("tiny-llava", device=device)
        results.append(llava_mini.score_answers(model, processor, [image], questions, answers=answers))
    for (cpu_scores, _), (device_scores, _) in zip(results[0][0], results[1][0]):
        assert [device_scores[a] for a in answers] == pytest.approx([cpu_scores[a] for a in answers], abs=1e-3)


@on_test_device
def test_speed_measurement_runs_on_the_device():
    from shortlab.speed import measure_speed

    model, _ = load_model("tiny-llama", device=TEST_DEVICE, dtype="bfloat16")
    speeds = measure_speed({"tiny": model}, prompt_len=16, new_tokens=4, repeats=2)
    assert speeds["tiny"].prefill_tokens_per_s > 0 and speeds["tiny"].decode_tokens_per_s > 0
