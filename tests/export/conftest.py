"""Shared by the export tests: a stand-in for tritonserver's python-backend utilities (`triton_python_backend_utils`)
for every test of a python-backend model (the backbone's model.py, the whole-segmentation model) and of BLSRuntime,
and a small VOC bank with the local backbone it was built with."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest


class FakeBackend:
    """The parts of triton_python_backend_utils the generated models and BLSRuntime use, with the real one's
    methods (has_error(), error().message(), inputs(), requested_output_names()).

    backbone: what BLS requests (InferenceRequest.exec) run: an object whose `runtime.run(arrays, outputs)` answers.
    outputs_on: None gives BLS outputs in host memory; a torch device gives them as tensors the backend calls GPU
        memory (is_cpu() False, DLPack only), held on that device ("cpu" stands in for a GPU here).
    calls / options: the model name and the keyword options of every BLS request.
    """

    def __init__(self, backbone=None, outputs_on=None):
        self.backbone, self.outputs_on, self.calls, self.options = backbone, outputs_on, [], []
        backend = self

        class Tensor:
            def __init__(self, name, array, device=None):
                # device None: host memory (a NumPy array); else a torch tensor in what the backend calls GPU memory
                self._name, self._device = name, device
                self._array = np.asarray(array) if device is None else array

            def name(self):
                return self._name

            def is_cpu(self):
                return self._device is None

            def as_numpy(self):
                if self._device is not None:  # as the python backend does
                    raise RuntimeError("Tensor is stored in GPU and cannot be converted to NumPy.")
                return self._array

            def to_dlpack(self):
                import torch
                from torch.utils.dlpack import to_dlpack

                return to_dlpack(self._array if self._device is not None else torch.from_numpy(self._array))

        class TritonError:
            def __init__(self, message):
                self._message = message

            def message(self):
                return self._message

        class InferenceResponse:
            def __init__(self, output_tensors, error=None):
                self.output_tensors, self._error = output_tensors, error

            def has_error(self):
                return self._error is not None

            def error(self):
                return self._error

        class InferenceRequest:
            """A request the server hands to execute(), or a BLS request the model sends (exec())."""

            def __init__(self, model_name="", inputs=(), requested_output_names=(), **options):
                self.model_name, self._inputs, self._outputs = model_name, list(inputs), list(requested_output_names)
                if model_name:
                    backend.options.append(options)

            def inputs(self):
                return self._inputs

            def requested_output_names(self):
                return self._outputs

            def exec(self):
                backend.calls.append(self.model_name)
                arrays = {t.name(): t.as_numpy() for t in self._inputs}
                results = backend.backbone.runtime.run(arrays, self._outputs)
                if backend.outputs_on is None:
                    return InferenceResponse([Tensor(n, results[n]) for n in self._outputs])
                import torch

                return InferenceResponse([Tensor(n, torch.from_numpy(np.ascontiguousarray(results[n]))
                                                 .to(backend.outputs_on), device=backend.outputs_on)
                                          for n in self._outputs])

        def tensor_by_name(tensors, name):
            return next((t for t in tensors if t.name() == name), None)

        self.module = types.SimpleNamespace(
            Tensor=Tensor, InferenceResponse=InferenceResponse, TritonError=TritonError,
            InferenceRequest=InferenceRequest, TritonModelException=RuntimeError,
            get_input_tensor_by_name=lambda request, name: tensor_by_name(request.inputs(), name),
            get_output_tensor_by_name=lambda response, name: tensor_by_name(response.output_tensors, name),
            triton_string_to_numpy=lambda text: {"TYPE_FP32": np.float32, "TYPE_UINT8": np.uint8,
                                                 "TYPE_INT32": np.int32}[text])

    def request(self, **arrays):
        """A request as the server hands it to execute(): one input tensor per keyword."""
        return self.module.InferenceRequest(inputs=[self.module.Tensor(name, a) for name, a in arrays.items()])


@pytest.fixture
def pb_utils(monkeypatch) -> FakeBackend:
    """A FakeBackend installed as `triton_python_backend_utils` for the test; set its backbone for BLS calls."""
    fake = FakeBackend()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake.module)
    return fake


@pytest.fixture(scope="module")
def voc_bank(voc_root, backbone_factory):
    """(bank of 12 VOC train images, the local default backbone that built it, 6 VOC val samples)."""
    from engine import FeatureBank
    from engine.data import VOCDataset
    from engine.registry import DEFAULT_BACKBONE

    train = VOCDataset(voc_root, "train")
    local = backbone_factory(DEFAULT_BACKBONE)
    bank = FeatureBank.build([train[i] for i in range(12)], local, train.class_names, progress=False)
    val = VOCDataset(voc_root, "val")
    return bank, local, [val[i] for i in range(6)]
