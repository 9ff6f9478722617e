"""JPEG decoding on the GPU (nvJPEG through torchvision.io.decode_jpeg), for the engine on a CUDA device.

Decoding a VOC-sized JPEG costs the host about 3 ms, as much as the whole host budget of an image when the GPU runs
everything else (docs/performance.md). Here the host only reads the file and its header; the GPU decodes the batch
in one call, upright (EXIF orientation applied), and the pixels come down once, together, for the host's proposer
(they go up again to the backbone; both copies are a fraction of a millisecond). Anything nvJPEG does not take — not
a JPEG, CMYK or 16-bit, a bomb, a file it fails on — is decoded on the host by `load_image`, which raises the same
errors as the CPU engine. nvJPEG's pixels can differ from libjpeg's by a level or two (its IDCT and chroma
upsampling), so label maps from files may differ slightly between devices; from arrays they do not.
"""

from __future__ import annotations

import os
from typing import Sequence

from PIL import Image

from ..arrays import host_all
from .voc import load_image


def gpu_decoder_available(device: str) -> bool:
    """Whether JPEGs can be decoded on `device`: torch sees the GPU and torchvision has decode_jpeg."""
    if not str(device).startswith("cuda"):
        return False
    try:
        import torch
        import torchvision.io  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() and hasattr(torchvision.io, "decode_jpeg")


def _jpeg_for_gpu(path, max_pixels: int | None) -> bool:
    """The header says an 8-bit RGB or grayscale JPEG within the size limit (no pixel is decoded here)."""
    try:
        with Image.open(path) as image:
            return (image.format == "JPEG" and image.mode in ("RGB", "L")
                    and (max_pixels is None or image.width * image.height <= max_pixels))
    except (OSError, ValueError, Image.DecompressionBombError):
        return False  # the host decoder says what is wrong


def load_images(paths: Sequence, device: str, max_pixels: int | None = None) -> list:
    """HxWx3 uint8 RGB arrays of image files: JPEGs decoded on `device` in one batch, the rest (and any JPEG nvJPEG
    refuses) by load_image on the host. An unreadable file gives its InputError in its place (not raised), so the
    caller decides per item."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list = [None] * len(paths)
    on_gpu = [i for i, path in enumerate(paths) if _jpeg_for_gpu(path, max_pixels)]
    if on_gpu:
        data = [torch.frombuffer(bytearray(open(os.fspath(paths[i]), "rb").read()), dtype=torch.uint8)
                for i in on_gpu]
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
        except RuntimeError:
            decoded = None  # one bad file fails the whole call: every file goes to the host decoder instead
        if decoded is not None:
            for i, pixels in zip(on_gpu, host_all([image.permute(1, 2, 0).contiguous() for image in decoded])):
                out[i] = pixels
    for i, path in enumerate(paths):
        if out[i] is None:
            try:
                out[i] = load_image(path)
            except Exception as error:  # an InputError from the host decoder, kept for the caller
                out[i] = error
    return out
