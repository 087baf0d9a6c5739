"""``miniray worker``: task processes that pull chunks from Redis, and their supervisor.

The command line (``miniray worker ...``, ``python -m miniray.worker ...``): its arguments,
the optional Triton server, signals, and the exit status of the ``Worker`` (supervisor.py):
0 when stopped, 1 after a failure, 2 for a bad configuration, 75 when the server was gone
too long (for a supervisor such as systemd to restart it).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback

from miniray.config import settings
from miniray.errors import MinirayError

from .supervisor import Worker

__all__ = ["main"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="miniray worker", description=__doc__.split("\n")[0])
    p.add_argument("--redis", default=None, help="server URL (default: MINIRAY_REDIS_URL)")
    p.add_argument("--slots", type=int, default=1, help="tasks run at once (default 1)")
    p.add_argument("--gpus", default=None, help="GPUs this worker owns: indices as "
                   "nvidia-smi numbers them, UUIDs or PCI bus ids, e.g. 0,1 (default: those in "
                   "CUDA_VISIBLE_DEVICES, else every GPU NVML lists; 'none' for none)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                   help="memory of each GPU, for packing tasks with Limits(gpu_memory_gb=...) "
                   "(default: NVML's total; a GPU of unknown size takes one packed task)")
    p.add_argument("--triton", action="store_true",
                   help="keep a Triton Inference Server on this node for Limits(triton=True) "
                   "tasks: start one with --triton-models, or use one at --triton-url")
    p.add_argument("--triton-models", default=None, metavar="DIR",
                   help="model repository of the tritonserver this worker starts (on loopback "
                   "ports), restarts when it dies and stops on exit; implies --triton")
    p.add_argument("--triton-lazy", action="store_true",
                   help="load no model at start (default: every model of the repository); "
                   "tasks load what they need with miniray.triton.load_model")
    p.add_argument("--triton-url", default=None, metavar="URL",
                   help="HTTP address of a Triton server already running, e.g. "
                   "http://127.0.0.1:8000; implies --triton")
    p.add_argument("--triton-grpc-url", default=None, metavar="URL",
                   help="its gRPC address, for miniray.triton.client('grpc')")
    p.add_argument("--name", default=None, help="worker name (default HOST-PID)")
    p.add_argument("--namespace", default=None, help="key prefix (default MINIRAY_NAMESPACE)")
    p.add_argument("--cpu-offset", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    url = args.redis or settings().redis_url
    if not url:
        p.error("give --redis URL or set MINIRAY_REDIS_URL")
    if args.parent_pid:
        _die_with_parent()
        if os.getppid() != args.parent_pid:
            return 0
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        triton = None
        if args.triton or args.triton_models or args.triton_url:
            from miniray.triton.server import TritonServer

            triton = TritonServer(models=args.triton_models, url=args.triton_url,
                                  grpc_url=args.triton_grpc_url, lazy=args.triton_lazy)
        worker = Worker(url, slots=args.slots, gpus=args.gpus, name=args.name,
                        namespace=args.namespace, cpu_offset=args.cpu_offset,
                        parent_pid=args.parent_pid, gpu_memory_gb=args.gpu_memory,
                        triton=triton)
    except MinirayError as e:
        print(f"miniray worker: {e}", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, worker.on_signal)
    signal.signal(signal.SIGINT, worker.on_signal)
    try:
        code = worker.run()
    except Exception:
        traceback.print_exc()
        worker.shutdown()
        return 1
    if worker.gave_up:
        print(f"miniray worker: {worker.gave_up}", file=sys.stderr)
    return code


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except Exception:
        pass
