"""The serving commands of `moduseg`: triton-repo (a Triton model repository), serve (a local tritonserver over
it) and triton-env (that server's venv)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_args import gpu_ids, usage_error
from .registry import DEFAULT_BACKBONE


def cmd_triton_repo(args) -> int:
    from .export.triton import DEFAULT_PLAN_CCS, plan_records, plan_version_problems, write_repository

    bank_backbone = None
    if args.bank is not None:
        from .bank import FeatureBank

        if args.segment_backbone not in args.variants:
            usage_error("triton-repo", f"--segment-backbone {args.segment_backbone} is not among --variants "
                                       f"{' '.join(args.variants)}")
        bank_backbone = FeatureBank.load(args.bank).backbone_name
        if args.backbone not in (None, bank_backbone):
            usage_error("triton-repo", f"--backbone {args.backbone} differs from the bank's backbone "
                                       f"{bank_backbone}: leave it out, or give a bank built with it")
    written = write_repository(args.out, backbone=args.backbone or bank_backbone, variants=args.variants,
                               with_models=not args.configs_only, onnx_path=args.onnx, plan_path=args.plan,
                               plan_cc=args.plan_cc, max_batch_size=args.max_batch_size, instances=args.instances,
                               num_threads=args.num_threads, queue_delay_us=args.queue_delay_us, gpus=args.gpus,
                               warmup=args.warmup, max_side=args.max_side,
                               compute_capabilities=args.compute_capabilities or DEFAULT_PLAN_CCS,
                               execution_env=args.execution_env)
    for name, path in written.items():
        files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
        print(f"{path}: {', '.join(files)}")
        for plan, record in plan_records(path).items():
            if record is None or not record.get("tensorrt"):
                print(f"  {plan}: TensorRT version unknown (no build record): it must equal the server's")
            else:
                print(f"  {plan}: TensorRT {record['tensorrt']}, built on {record.get('gpu')} (compute capability "
                      f"{record.get('compute_capability')}); sides {record.get('min_side')}..{record.get('max_side')}, "
                      f"batch <= {record.get('max_batch')}")
    if args.bank is not None:
        from .export.triton_segment import write_segment_model
        from .registry import triton_model_name

        model_dir = write_segment_model(
            args.out, args.bank, triton_model_name(bank_backbone, args.segment_backbone),
            max_batch_size=args.max_batch_size, instances=args.segment_instances, queue_delay_us=args.queue_delay_us,
            num_threads=args.num_threads, backbone_batch_size=args.max_batch_size,
            execution_env=args.execution_env, device=args.segment_device,
            gpus=args.gpus if args.segment_device == "cuda" else None)
        print(f"{model_dir}: whole segmentation (calls {triton_model_name(bank_backbone, args.segment_backbone)}), "
              f"bank {args.bank}")
    if args.server_tensorrt:
        problems = [p for path in written.values() for p in plan_version_problems(path, args.server_tensorrt)]
        for problem in problems:
            print(f"moduseg triton-repo: {problem}", file=sys.stderr)
        return 1 if problems else 0
    return 0


def cmd_serve(args) -> int:
    from .serving.server import LocalServer
    from .serving.server_env import SERVER_LAUNCHER, default_env_dir, ensure_server_env

    import signal

    env = Path(args.env) if args.env else default_env_dir()
    if not (env / SERVER_LAUNCHER).is_file():
        print(f"making the Triton server environment {env} (once; a minute or two, about 600 MB)", file=sys.stderr,
              flush=True)
    ensure_server_env(env)
    # SIGTERM (kill, timeout, a service manager) must stop the server too: it runs in its own session
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    server = LocalServer(args.repo, http_port=args.http_port, grpc_port=args.grpc_port,
                         metrics_port=args.metrics_port, models=args.models, env_dir=env, log_path=args.log,
                         extra_args=args.server_arg or (), max_request_bytes=args.max_request_bytes)
    server.start(timeout=args.start_timeout)
    try:  # a SIGTERM may arrive as soon as the addresses are out, even before print returns
        print(f"tritonserver (pid {server.process.pid}) serving {', '.join(server.models)} from {server.repo}\n"
              f"  HTTP    {server.http_url}\n  gRPC    {server.grpc_url}\n  metrics {server.metrics_url}\n"
              f"  log     {server.log_path}\n"
              f"use: create_backbone(NAME, runtime='triton', url='{server.grpc_url}', protocol='grpc'), or "
              f"RemoteEngine(url) for moduseg_segment; Ctrl-C stops", flush=True)
        server.process.wait()
        print(f"tritonserver exited with code {server.process.returncode}:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


def cmd_triton_env(args) -> int:
    from .serving.server_env import default_env_dir, ensure_server_env

    env = Path(args.env) if args.env else default_env_dir()
    print(f"Triton server environment {env}: checking (making it takes a minute or two the first time)", flush=True)
    launcher = ensure_server_env(env)
    print(f"ready: {launcher} (moduseg serve --env {env}, or set MODUSEG_TRITON_ENV)")
    return 0


def add_parsers(commands) -> None:
    """triton-repo, serve and triton-env."""
    from .serving.guard import DEFAULT_MAX_REQUEST_BYTES

    repo = commands.add_parser("triton-repo", help="write a Triton model repository serving a backbone")
    repo.add_argument("--out", required=True, help="repository directory (created or refreshed)")
    repo.add_argument("--backbone", default=None, help=f"default: the --bank's backbone, else {DEFAULT_BACKBONE}")
    repo.add_argument("--bank", default=None,
                      help="also write the whole-segmentation model moduseg_segment with this bank (python backend; "
                           "calls the --segment-backbone variant of the bank's backbone through BLS)")
    repo.add_argument("--segment-backbone", choices=("python", "onnx", "tensorrt"), default="python",
                      help="with --bank: the backbone variant the segmentation model calls (default python; onnx or "
                           "tensorrt on NGC's GPU server)")
    repo.add_argument("--segment-instances", type=int, default=1,
                      help="with --bank: segmentation model instances (per GPU with --segment-device cuda; each "
                           "holds the bank in memory)")
    repo.add_argument("--segment-device", choices=("cpu", "cuda"), default="cpu",
                      help="with --bank: where the segmentation model runs the engine: cpu (KIND_CPU instances, the "
                           "default) or cuda (KIND_GPU instances on --gpus, the device pipeline on each instance's "
                           "GPU, tensors kept there: FORCE_CPU_ONLY_INPUT_TENSORS \"no\")")
    repo.add_argument("--variants", nargs="+", default=["python", "onnx", "tensorrt"],
                      choices=("python", "onnx", "tensorrt"),
                      help="python: onnxruntime on CPU in the python backend; onnx / tensorrt: GPU platforms")
    repo.add_argument("--configs-only", action="store_true", help="config.pbtxt and model.py only, no model files")
    repo.add_argument("--onnx", default=None, help="ONNX file to serve (default: the cached export)")
    repo.add_argument("--plan", action="append", default=None, metavar="PLAN",
                      help="a TensorRT plan built elsewhere, placed as model.smXY.plan with its record PLAN.json "
                           "(repeatable; default: one built here for this GPU if TensorRT and a GPU exist, else none)")
    repo.add_argument("--plan-cc", action="append", default=None, metavar="X.Y",
                      help="compute capability each --plan was built for, in order (e.g. 8.6; default: from PLAN.json)")
    repo.add_argument("--compute-capabilities", nargs="+", default=None, metavar="X.Y",
                      help="GPUs the tensorrt config maps to plan files (cc_model_filenames; default 7.5 8.0 8.6 8.9 "
                           "9.0, plus those of the plans present)")
    repo.add_argument("--max-batch-size", type=int, default=8, help="largest batch per execution (default 8)")
    repo.add_argument("--instances", type=int, default=1, help="model instances (per GPU for GPU variants)")
    repo.add_argument("--num-threads", type=int, default=0,
                      help="intra-op threads per instance (python: onnxruntime; onnx: intra_op_thread_count; 0: the "
                           "runtime's choice)")
    repo.add_argument("--queue-delay-us", type=int, default=2000,
                      help="how long the dynamic batcher may hold a request to fill a batch (default 2000)")
    repo.add_argument("--gpus", type=gpu_ids, default=None, metavar="0,1",
                      help="GPU ids of the GPU variants' instances, and of the segmentation model's with "
                           "--segment-device cuda (default: every GPU the server sees)")
    repo.add_argument("--max-side", type=int, default=None,
                      help="largest padded image side: the TensorRT profile's (default 1024), and stated as a limit "
                           "for the python and onnx variants too when given")
    repo.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                      help="model_warmup at load: 512x512 images, batch 1 and --max-batch-size (default on)")
    repo.add_argument("--server-tensorrt", default=None, metavar="VERSION",
                      help="the TensorRT version of the server that will load the plans (NGC release notes of its "
                           "yy.mm): exit 1 naming every plan built by another version, or of unknown version")
    repo.add_argument("--execution-env", default=None, metavar="ARCHIVE",
                      help="python variant: a packed environment with onnxruntime (scripts/pack_triton_env.sh) for a "
                           "server without it (NGC's -py3 image): a local archive is placed in the model directory; "
                           "'$$TRITON_MODEL_DIRECTORY/FILE' (single quotes) or an absolute server path is written as is")
    repo.set_defaults(run=cmd_triton_repo)

    serve = commands.add_parser("serve", help="run a local tritonserver (python backend) over a model repository")
    serve.add_argument("--repo", required=True, help="the model repository (written by moduseg triton-repo)")
    serve.add_argument("--http-port", type=int, default=8000, help="the server's HTTP port (default 8000)")
    serve.add_argument("--grpc-port", type=int, default=8001, help="the server's gRPC port (default 8001)")
    serve.add_argument("--metrics-port", type=int, default=8002,
                       help="the server's Prometheus metrics port (default 8002)")
    serve.add_argument("--models", nargs="+", default=None, help="models to load (default: the python-backend ones)")
    serve.add_argument("--env", default=None,
                       help="the server's venv (default: $MODUSEG_TRITON_ENV, else the checkout's .triton-venv when "
                            "the engine runs from one, else ~/.cache/moduseg/triton-venv; made when missing, as "
                            "`moduseg triton-env` does)")
    serve.add_argument("--log", default=None, help="server log file (default: a temporary file)")
    serve.add_argument("--start-timeout", type=float, default=120.0,
                       help="seconds to wait for the server and its models to be ready (default 120)")
    serve.add_argument("--server-arg", action="append", default=None, metavar="ARG",
                       help="one more tritonserver argument, e.g. --server-arg=--log-verbose=1 or "
                            "--server-arg=--backend-config=python,shm-default-byte-size=16777216 (repeatable; "
                            "paths absolute: the server runs in a folder of its own)")
    serve.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, metavar="N",
                       help="the largest HTTP request body the server's front accepts (default 1 GiB); it also "
                            "refuses JSON tensors that declare more values than they carry, which abort "
                            "tritonserver 2.51")
    serve.set_defaults(run=cmd_serve)

    env = commands.add_parser("triton-env", help="make (or check) the local Triton server's venv")
    env.add_argument("--env", default=None,
                     help="where (default: $MODUSEG_TRITON_ENV, else the checkout's .triton-venv when the engine "
                          "runs from one, else ~/.cache/moduseg/triton-venv); PYTHON=... picks its interpreter")
    env.set_defaults(run=cmd_triton_env)
