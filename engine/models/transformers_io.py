"""Loading Hugging Face transformers models (the paper-family adapters: backbones, proposers, CLIP) from a local
directory or a hub id, with errors that say what to install or where the weights must be."""

from __future__ import annotations

import os

from ..errors import InputError, ModelError

DTYPES = ("float32", "float16", "bfloat16")


def require(package: str, pip_name: str):
    try:
        return __import__(package)
    except ImportError as error:
        raise ModelError(f"this adapter needs the {package!r} package: pip install {pip_name}") from error


def torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return getattr(torch, dtype)


def load(loader, source: str, what: str, **kwargs):
    try:
        return loader(source, **kwargs)
    except (OSError, ImportError, ValueError) as error:
        raise ModelError(f"cannot load {what} from {source!r} (a local directory with config.json and weights, or "
                         f"a hub id with hub access): {error}") from error


def load_model(cls_name: str, path_or_id: str | os.PathLike, dtype: str, **kwargs):
    """transformers.<cls_name> from a local directory or hub id, in eval mode."""
    transformers = require("transformers", "transformers")
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise ModelError(f"transformers {transformers.__version__} has no {cls_name}; upgrade transformers")
    return load(cls.from_pretrained, os.fspath(path_or_id), cls_name, dtype=torch_dtype(dtype), **kwargs).eval()
