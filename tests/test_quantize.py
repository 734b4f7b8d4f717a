import pytest
import torch
from torch import nn

from shortlab.arch import model_parts
from shortlab.models import load_model
from shortlab.pruning import remove_layers
from shortlab.quantize import (
    decoder_weight_modules, int8_parameter_bytes, int8_round_trip, quantize_weights, quantize_weights_int8,
    quantized_parameter_bytes, round_trip,
)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def test_round_trip_lies_on_a_per_channel_grid_within_half_a_step():
    torch.manual_seed(0)
    weight = torch.randn(6, 50) * torch.tensor([0.01, 0.1, 1.0, 10.0, 3.0, 0.5])[:, None]
    weight[4] = 0.0  # an all-zero channel
    out = int8_round_trip(weight)
    assert out.shape == weight.shape and out.dtype == weight.dtype
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    assert torch.equal(out[4], torch.zeros(50))
    rows = [0, 1, 2, 3, 5]
    levels = out[rows] / scale[rows]
    assert torch.allclose(levels, levels.round(), atol=1e-3)  # integer multiples of the scale
    assert levels.abs().max() <= 127 + 1e-3
    assert ((out - weight)[rows].abs() <= scale[rows] / 2 + 1e-7).all()
    # each channel's largest |w| is a grid point, so it survives exactly
    peak = weight.abs().argmax(dim=1)
    assert torch.allclose(out[rows, peak[rows]], weight[rows, peak[rows]], rtol=1e-6)
    # per channel, not per tensor: the small channel keeps its resolution
    assert (out[0] - weight[0]).abs().max() < 1e-3 * weight[3].abs().max()


def test_round_trip_channel_axis_and_dtype():
    weight = torch.randn(50, 6)
    assert torch.equal(int8_round_trip(weight, channel_dim=1), int8_round_trip(weight.T).T)
    half = int8_round_trip(weight.bfloat16())
    assert half.dtype is torch.bfloat16
    with pytest.raises(ValueError, match="2-d weight"):
        int8_round_trip(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="channel_dim"):
        int8_round_trip(weight, channel_dim=2)


def test_quantize_touches_only_decoder_weights_and_not_the_callers_model(tiny):
    model, tokenizer = tiny
    before = {name: p.clone() for name, p in model.state_dict().items()}
    quantized = quantize_weights_int8(model)
    assert quantized is not model
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} of the caller's model changed"
    targets = {f"{name}.weight" for name in decoder_weight_modules(model)}
    assert len(targets) == 4 * 7  # q, k, v, o, gate, up, down in each of 4 layers
    for name, tensor in quantized.state_dict().items():
        if name in targets:
            assert not torch.equal(tensor, before[name]), name
            assert torch.equal(tensor, int8_round_trip(before[name]))
        else:
            assert torch.equal(tensor, before[name]), f"{name} should not be quantised"
    batch = tokenizer(["The quick brown fox jumps over the lazy dog."], return_tensors="pt")
    with torch.inference_mode():
        dense, rounded = model(**batch).logits, quantized(**batch).logits
    assert not torch.equal(dense, rounded)
    assert (rounded - dense).abs().max() < 0.05 * dense.abs().max()


def test_inplace_edits_and_returns_the_model():
    model, _ = load_model("tiny-llama")
    weight = model_parts(model).layers[0].self_attn.q_proj.weight
    original = weight.clone()
    assert quantize_weights_int8(model, inplace=True) is model
    assert torch.equal(weight, int8_round_trip(original))


def test_gpt2_conv1d_weights_use_their_output_axis():
    model, _ = load_model("tiny-gpt2")
    modules = decoder_weight_modules(model)
    assert modules and all(type(m).__name__ == "Conv1D" for m in modules.values())
    name, module = next(iter(modules.items()))
    quantized = quantize_weights_int8(model)
    expected = int8_round_trip(module.weight, channel_dim=1)
    assert torch.equal(quantized.get_submodule(name).weight, expected)


def test_int8_parameter_bytes(tiny):
    model, _ = tiny
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    modules = decoder_weight_modules(model)
    weights = sum(m.weight.numel() for m in modules.values())
    channels = sum(m.weight.shape[0] for m in modules.values())
    assert int8_parameter_bytes(model) == float_bytes - 4 * weights + weights + 4 * channels
    pruned = remove_layers(model, [1, 2])
    assert int8_parameter_bytes(pruned) < int8_parameter_bytes(model)


def test_a_model_without_linear_layers_is_refused(tiny):
    model, _ = tiny
    stripped = remove_layers(model, [])
    for name in decoder_weight_modules(stripped):
        owner, _, attribute = name.rpartition(".")
        setattr(stripped.get_submodule(owner), attribute, nn.Identity())
    with pytest.raises(ValueError, match="no nn.Linear or Conv1D"):
        quantize_weights_int8(stripped)


def test_group_wise_4_bit_uses_15_levels_per_group_within_half_a_step():
    torch.manual_seed(1)
    weight = torch.randn(5, 70)  # 70 = 2 groups of 32 and a short group of 6
    out = round_trip(weight, bits=4, group_size=32)
    assert out.shape == weight.shape and out.dtype == weight.dtype
    for row in range(5):
        for start in (0, 32, 64):
            w, q = weight[row, start:start + 32], out[row, start:start + 32]
            step = w.abs().max() / 7
            levels = torch.round(q / step)
            assert torch.allclose(q, levels * step, atol=1e-6) and levels.abs().max() <= 7
            assert (q - w).abs().max() <= step / 2 + 1e-6
            assert len(torch.unique(levels)) <= 15


def test_grouping_lowers_the_error_and_fewer_bits_raise_it():
    torch.manual_seed(2)
    weight = torch.randn(64, 256) * torch.logspace(-2, 0, 256)  # input channels of very different size
    error = {key: (round_trip(weight, bits=b, group_size=g) - weight).pow(2).mean().item()
             for key, (b, g) in {"8": (8, None), "4": (4, None), "4g32": (4, 32), "3g32": (3, 32)}.items()}
    assert error["8"] < error["4g32"] < error["4"]
    assert error["4g32"] < error["3g32"]


def test_group_size_equal_to_the_width_is_per_channel_and_int8_is_the_8_bit_case():
    torch.manual_seed(3)
    weight = torch.randn(4, 48)
    assert torch.equal(round_trip(weight, bits=4, group_size=48), round_trip(weight, bits=4))
    assert torch.equal(round_trip(weight, bits=4, group_size=1000), round_trip(weight, bits=4))
    assert torch.equal(int8_round_trip(weight), round_trip(weight, bits=8))
    assert torch.equal(round_trip(weight, 1, bits=4, group_size=16), round_trip(weight.T, bits=4, group_size=16).T)


def test_4_bit_model_is_a_copy_and_its_bytes_count_packed_nibbles(tiny):
    model, _ = tiny
    quantized = quantize_weights(model, bits=4, group_size=32)
    modules = decoder_weight_modules(model)
    name, module = next(iter(modules.items()))
    copied = dict(quantized.named_modules())[name]
    assert not torch.equal(copied.weight, module.weight)
    assert torch.equal(copied.weight, round_trip(module.weight, bits=4, group_size=32))
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weights = sum(m.weight.numel() for m in modules.values())
    groups = sum(m.weight.shape[0] * -(-m.weight.shape[1] // 32) for m in modules.values())
    assert quantized_parameter_bytes(model, 4, 32, scale_bytes=2) == float_bytes - 4 * weights + weights // 2 + 2 * groups


@pytest.mark.parametrize("bits, group_size, match", [(1, None, "bits"), (4.0, None, "bits"), (4, 0, "group_size"),
                                                     (True, None, "bits")])
def test_bad_schemes_are_named(tiny, bits, group_size, match):
    model, _ = tiny
    with pytest.raises(ValueError, match=match):
        quantize_weights(model, bits=bits, group_size=group_size)
    with pytest.raises(ValueError, match=match):
        round_trip(torch.ones(2, 2), bits=bits, group_size=group_size)
