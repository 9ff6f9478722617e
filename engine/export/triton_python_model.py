"""Triton python-backend model: runs a backbone's ONNX graph through onnxruntime on CPU.

`moduseg triton-repo` copies this file unchanged to `<model>/1/model.py`. It runs inside tritonserver's python backend
stub, in the server's own environment (numpy<2 and onnxruntime; see scripts/triton_env.sh), so it imports nothing from
the engine. The graph is `<model>/1/model.onnx` unless the config's parameter `onnx_file` names another file (a
path relative to the version directory, or absolute).

Requests that the dynamic batcher hands over together are grouped by their per-image input shape and run through
onnxruntime as one batch per group, then split back per request; only the outputs a request asks for are returned.
Config parameters (all optional): `onnx_file`, `num_threads` (onnxruntime intra-op threads, 0 = onnxruntime's
choice); `min_side` / `max_side` are for the clients; `EXECUTION_ENV_PATH` is the python backend's own: a packed
environment (scripts/pack_triton_env.sh) that brings onnxruntime where the server's Python lacks it (NGC's -py3 image
has the ONNX Runtime *backend*, not the Python package).
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        try:
            import onnxruntime as ort
        except ImportError as error:
            env = self.model_config.get("parameters", {}).get("EXECUTION_ENV_PATH", {}).get("string_value")
            raise pb_utils.TritonModelException(
                f"{args['model_name']}: the python backend's environment cannot import onnxruntime ({error}); "
                + (f"the execution environment {env} lacks it" if env else
                   "give the model a packed environment that has it (scripts/pack_triton_env.sh, then "
                   "`moduseg triton-repo --execution-env ARCHIVE`) or serve the onnx variant instead"))
        parameters = {key: value.get("string_value", "")
                      for key, value in self.model_config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        onnx_file = parameters.get("onnx_file") or "model.onnx"
        self.onnx_path = onnx_file if os.path.isabs(onnx_file) else os.path.join(version_dir, onnx_file)
        if not os.path.isfile(self.onnx_path):
            raise pb_utils.TritonModelException(
                f"{args['model_name']}: no ONNX graph at {self.onnx_path}; fill the repository with "
                f"`moduseg triton-repo --out REPO` (it copies the exported backbone there)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("num_threads") or 0)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(self.onnx_path, options, providers=["CPUExecutionProvider"])
        graph_inputs = [i.name for i in self.session.get_inputs()]
        graph_outputs = [o.name for o in self.session.get_outputs()]
        self.input_names = [i["name"] for i in self.model_config["input"]]
        self.output_names = [o["name"] for o in self.model_config["output"]]
        missing = [n for n in self.input_names if n not in graph_inputs] + \
                  [n for n in self.output_names if n not in graph_outputs]
        if missing:
            raise pb_utils.TritonModelException(
                f"{args['model_name']}: config names {missing} that {self.onnx_path} lacks (graph inputs "
                f"{graph_inputs}, outputs {graph_outputs})")
        self.output_dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"])
                              for o in self.model_config["output"]}

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}
        for index, request in enumerate(requests):
            try:
                arrays = {}
                for name in self.input_names:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is None:
                        raise ValueError(f"missing input {name!r}")
                    arrays[name] = tensor.as_numpy()
                wanted = list(request.requested_output_names()) or self.output_names
            except Exception as error:  # noqa: BLE001 - one bad request must not fail the others
                responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(error)))
                continue
            key = tuple((name, arrays[name].shape[1:], arrays[name].dtype.str) for name in self.input_names)
            groups.setdefault(key, []).append((index, arrays, wanted))
        for members in groups.values():
            try:
                feed = {name: np.ascontiguousarray(np.concatenate([m[1][name] for m in members]))
                        for name in self.input_names}
                wanted_any = [n for n in self.output_names if any(n in m[2] for m in members)]
                results = dict(zip(wanted_any, self.session.run(wanted_any, feed)))
            except Exception as error:  # noqa: BLE001
                shapes = {name: [list(m[1][name].shape) for m in members] for name in self.input_names}
                for member in members:
                    responses[member[0]] = pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(f"onnxruntime failed on inputs {shapes}: {error}"))
                continue
            start = 0
            for index, arrays, wanted in members:
                count = arrays[self.input_names[0]].shape[0]
                tensors = [pb_utils.Tensor(name, np.ascontiguousarray(results[name][start:start + count],
                                                                      dtype=self.output_dtypes[name]))
                           for name in wanted]
                responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += count
        return responses

    def finalize(self):
        self.session = None
