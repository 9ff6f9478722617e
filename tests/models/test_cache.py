"""engine.models.cache: the model cache directory, files built once under a lock and rebuilt when missing, corrupt
or from another export version, and ONNX verification against torch."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from engine.errors import ModelError
from engine.models.cache import CACHE_ENV, cache_dir, cached_file, verify_onnx
from engine.registry import EXPORT_VERSION


def test_cache_builds_once_rebuilds_corrupt_and_locks(tmp_path):
    builds = []

    def build(path: Path) -> dict:
        builds.append(path)
        path.write_bytes(b"model bytes" * 1000)
        return {"note": "test"}

    target = tmp_path / "model.onnx"
    threads = [threading.Thread(target=cached_file, args=(target, build)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and target.read_bytes() == b"model bytes" * 1000
    meta = json.loads(target.with_name("model.onnx.json").read_text())
    assert meta["export_version"] == EXPORT_VERSION and meta["size"] == 11000 and meta["note"] == "test"
    assert cached_file(target, build) == target and len(builds) == 1
    target.write_bytes(b"model bytes" * 500)  # truncated
    cached_file(target, build)
    assert len(builds) == 2 and target.stat().st_size == 11000
    data = bytearray(target.read_bytes())
    data[5] ^= 0xFF  # same size, other bytes
    target.write_bytes(bytes(data))
    cached_file(target, build)
    assert len(builds) == 3 and target.read_bytes() == b"model bytes" * 1000
    meta["export_version"] = EXPORT_VERSION - 1  # built by an older export
    target.with_name("model.onnx.json").write_text(json.dumps(meta))
    cached_file(target, build)
    assert len(builds) == 4
    target.unlink()  # missing
    cached_file(target, build)
    assert len(builds) == 5 and sorted(p.name for p in tmp_path.iterdir()) == [
        "model.onnx", "model.onnx.json", "model.onnx.lock"]


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    def build(path: Path) -> dict:
        path.write_bytes(b"half")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        cached_file(tmp_path / "model.onnx", build)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx.lock"]


def test_cache_dir_from_argument_environment_and_home(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert CACHE_ENV == "MODUSEG_CACHE"
    assert cache_dir() == tmp_path / "cache" and (tmp_path / "cache").is_dir()
    assert cache_dir(tmp_path / "other") == tmp_path / "other"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "moduseg"
    (tmp_path / "file").write_text("")
    with pytest.raises(ModelError, match="cannot create the model cache directory"):
        cache_dir(tmp_path / "file" / "cache")


def test_verify_onnx_bounds_the_difference_by_the_output_scale(rng):
    torch = pytest.importorskip("torch")
    graph = helper.make_graph([helper.make_node("Mul", ["images", "k"], ["out"])], "scale",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 4])],
                              [helper.make_tensor("k", TensorProto.FLOAT, [], [100.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
    samples = [rng.standard_normal((2, 4)).astype(np.float32) for _ in range(2)]

    class Times(torch.nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = k

        def forward(self, x):
            return x * self.k

    assert verify_onnx(model, Times(100.0), "images", samples, 1e-6) == 0.0
    # off by 1e-4 relative: within a 1e-3 bound scaled by the output (~100s), beyond a 1e-5 one
    assert 0 < verify_onnx(model, Times(100.01), "images", samples, 1e-3) < 0.1
    with pytest.raises(ModelError, match="differs from torch"):
        verify_onnx(model, Times(100.01), "images", samples, 1e-5)

    class Wider(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x, x], 1)

    with pytest.raises(ModelError, match="gives shape"):
        verify_onnx(model, Wider(), "images", samples, 1e-3)
