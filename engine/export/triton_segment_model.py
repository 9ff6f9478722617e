"""Triton python-backend model: the whole segmentation in one call.

`moduseg triton-repo --bank BANK` writes `<repo>/moduseg_segment/1/model.py` as a one-line import of this class, so
the model's code is the installed engine's (the server's python environment must hold the engine: scripts/
triton_env.sh for the local server, a packed environment through EXECUTION_ENV_PATH for NGC's container; see
docs/serving.md). Per model instance, `initialize` loads the bank once and makes an Engine whose backbone runs in the
same server's backbone model through BLS (engine.models.bls_runtime); the proposer, pooling, search, vote and NMS run
here: on the instance's CPU threads, or, with config parameter `device` "cuda" (KIND_GPU instances), as the engine's
device pipeline on the instance's GPU (the proposer too, Config.gpu_proposer), the backbone's features taken from BLS
without a host copy where the server hands them over in GPU memory (DLPack), and only the label maps and what the
segment records are made from coming back to the host.

Requests: IMAGE uint8 (B, H, W, 3) RGB, any H and W (the input allows ragged batches, so the dynamic batcher merges
requests of different sizes into one `execute`, and the engine buckets them by padded size for the backbone).
Responses: LABELS (B, H, W) class ids, and SEGMENTS (B, 1) JSON text of each image's `Result.to_dict()` (class,
score, area, box and COCO RLE mask per segment). A bad image fails its own request only; an execution whose
requests are all refused raises, so that the server counts them as failed (see execute).

Config parameters: `backbone_model` (required: the backbone model's name in this server), `bank_dir` (default "bank",
relative to the version directory), `backbone_batch_size` (images per backbone call, at most that model's
max_batch_size), `num_threads` (engine threads; 0 = the libraries' choice), `class_names` (JSON, read by clients),
`max_side` (the backbone model's longest image side; a larger image fails its own request, not its batch),
`device` ("cpu", the default, or "cuda": the Engine on `cuda:<the instance's device id>`; the config then sets
FORCE_CPU_ONLY_INPUT_TENSORS "no", so IMAGE may arrive in GPU memory).
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..batches import Skipped

INPUT = "IMAGE"
LABELS = "LABELS"
SEGMENTS = "SEGMENTS"


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        from engine import Engine, FeatureBank, create_backbone
        from engine.models.bls_runtime import BLSRuntime
        from engine.registry import backbone_spec

        self.pb_utils = pb_utils
        model_config = json.loads(args["model_config"])
        parameters = {key: value.get("string_value", "") for key, value in model_config.get("parameters", {}).items()}
        name = args["model_name"]
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        bank_dir = parameters.get("bank_dir") or "bank"
        bank_dir = bank_dir if os.path.isabs(bank_dir) else os.path.join(version_dir, bank_dir)
        backbone_model = parameters.get("backbone_model")
        if not backbone_model:
            raise pb_utils.TritonModelException(f"{name}: config parameter backbone_model (the backbone model's name "
                                                f"in this server) is required")
        self.device = parameters.get("device") or "cpu"
        if self.device not in ("cpu", "cuda"):
            raise pb_utils.TritonModelException(f"{name}: config parameter device must be 'cpu' or 'cuda', got "
                                                f"{self.device!r}")
        if self.device == "cuda":
            if args.get("model_instance_kind", "GPU") != "GPU":
                raise pb_utils.TritonModelException(f"{name}: device 'cuda' needs KIND_GPU instances, got "
                                                    f"{args['model_instance_kind']}")
            self.device = f"cuda:{args['model_instance_device_id']}"
        bank = FeatureBank.load(bank_dir)
        weights = bank.backbone.get("weights")
        spec = backbone_spec(bank.backbone_name, weights)
        outputs = [spec.feature_output] + ([spec.saliency_output] if spec.saliency_output else [])
        # on a GPU the engine takes the features as CUDA tensors from the BLS response (device_outputs)
        runtime = BLSRuntime(backbone_model, [spec.input_name], outputs, pb_utils,
                             device_outputs=self.device != "cpu", device=self.device)
        num_threads = int(parameters.get("num_threads") or 0)
        config = bank.config.replace(num_threads=num_threads)
        backbone = create_backbone(bank.backbone_name, runtime=runtime, weights=weights,
                                   batch_size=int(parameters.get("backbone_batch_size") or config.batch_size))
        self.engine = Engine(bank, backbone=backbone, config=config, device=self.device)
        self.max_side = int(parameters.get("max_side") or 0)
        types = {o["name"]: o["data_type"] for o in model_config["output"]}
        self.label_dtype = pb_utils.triton_string_to_numpy(types[LABELS])
        if len(bank.class_names) > np.iinfo(self.label_dtype).max + 1:
            raise pb_utils.TritonModelException(f"{name}: {len(bank.class_names)} classes do not fit LABELS of type "
                                                f"{types[LABELS]}; rewrite the config with moduseg triton-repo")

    def execute(self, requests):
        pb = self.pb_utils
        responses = [None] * len(requests)
        images, owners = [], []
        for index, request in enumerate(requests):
            tensor = pb.get_input_tensor_by_name(request, INPUT)
            array = None if tensor is None else self._host_array(tensor)
            if array is None or array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
                got = "nothing" if array is None else f"{array.dtype} {list(array.shape)}"
                responses[index] = _error(pb, f"{INPUT} must be uint8 (B, H, W, 3) RGB images, got {got}")
                continue
            if self.max_side and max(array.shape[1:3]) > self.max_side:
                responses[index] = _error(pb, f"{INPUT} of {array.shape[1]}x{array.shape[2]} is over this model's "
                                              f"max_side {self.max_side}")
                continue
            images += list(array)
            owners += [index] * len(array)
        results = self.engine.segment_batch(images, on_error="skip") if images else []
        per_request: dict[int, list] = {}
        for owner, result in zip(owners, results):
            per_request.setdefault(owner, []).append(result)
        for index, members in per_request.items():
            skipped = [r for r in members if isinstance(r, Skipped)]
            if skipped:
                responses[index] = _error(pb, "; ".join(r.reason for r in skipped))
                continue
            labels = np.stack([r.label_map for r in members]).astype(self.label_dtype)
            records = np.array([[json.dumps(r.to_dict()).encode()] for r in members], dtype=np.object_)
            responses[index] = pb.InferenceResponse(output_tensors=[pb.Tensor(LABELS, labels),
                                                                    pb.Tensor(SEGMENTS, records)])
        if responses and all(response.has_error() for response in responses):
            # the python backend of tritonserver 2.51 counts an error response as a successful request in its
            # statistics and metrics (triton-inference-server/server#7713); an exception fails every request of
            # the execution, counted as failures: right when all of them are refused. Refused requests merged
            # with good ones still count as successes there.
            reasons = list(dict.fromkeys(response.error().message() for response in responses))
            raise pb.TritonModelException("; ".join(reasons))
        return responses

    def _host_array(self, tensor) -> np.ndarray:
        """A request tensor's pixels in host memory. With FORCE_CPU_ONLY_INPUT_TENSORS "no" (device "cuda") the
        python backend may hand them over in GPU memory; they come down here because the engine's input checks read
        host pixels (the device proposer and the refinement after painting take them up again; the features, the
        heavy part, stay on the GPU)."""
        if self.device == "cpu" or tensor.is_cpu():
            return tensor.as_numpy()
        import torch

        return torch.from_dlpack(tensor.to_dlpack()).cpu().numpy()

    def finalize(self):
        self.engine = None


def _error(pb, message: str):
    return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(message))
