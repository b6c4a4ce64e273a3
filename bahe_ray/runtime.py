"""The process around the work: Ray start-up (its output routed by `bahe_ray.logs`), device and
dtype, memory probes, and the environment record that goes next to every result."""

from __future__ import annotations

import os
import platform
import resource
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bahe_ray import logs
from bahe_ray.config import Config

GB = 1e9

# Ray Serve's throughput mode: HAProxy in place of the Python HTTP proxy actor, forwarding straight to the
# Ingress replica's own HTTP server, and gRPC instead of actor calls between replicas (docs/serve.md, "2 CPU
# cores"). Ray's processes read these when they start. A stopping Ingress replica stays open for the
# draining period so that load balancers can drop it: Serve's default (30 s) is for external ones and made
# serve.shutdown time out with the controller still alive; HAProxy here is told at once by the controller.
SERVE_THROUGHPUT_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}


def use_serve_throughput_mode() -> None:
    """Serve's throughput mode for the Ray instance this process starts (call before `init_ray` and before
    importing ray.serve); a variable already set wins, so `RAY_SERVE_ENABLE_HA_PROXY=0` turns HAProxy off.
    In this process too, a deployment handle then routes on the caller's event loop: call one only from
    async code (`bahe serve` and `bench serve` call none). A cluster that is joined has its own environment:
    set the variables there."""
    for name, value in SERVE_THROUGHPUT_ENV.items():
        os.environ.setdefault(name, value)


def init_ray(cfg: Config) -> None:
    """Join the cluster a job was submitted to, or the configured address, or start a local instance,
    with Ray's own output routed to its session log folder (`bahe_ray.logs`)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logs.before_ray_init()
    options: dict[str, Any] = {"log_to_driver": True}  # filtered, not off: the epochs and errors come this way
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.ray.address, **options)
    else:
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, **options)
    logs.after_ray_init()


# ---- device and dtype ------------------------------------------------------------------------


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str) -> str:
    """"auto" -> this process's best device; anything else as given."""
    return default_device() if device == "auto" else device


def default_dtype(device: str) -> torch.dtype:
    """What the layers compute in when nothing says otherwise: bf16 on GPU, fp32 on CPU."""
    return torch.float32 if device == "cpu" else torch.bfloat16


def setup_device(device: str) -> None:
    """TF32 matmuls on CUDA (fp32 work outside autocast)."""
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def to_device(array: np.ndarray, device: str | torch.device) -> Tensor:
    """A host array on `device`; pinned and asynchronous on CUDA, so it overlaps queued GPU work."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if torch.device(device).type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)



# ---- memory ----------------------------------------------------------------------------------


def reset_peak_memory(device: str | torch.device) -> None:
    """Start a new peak: CUDA allocator stats, or the process peak RSS (Linux clear_refs)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # the peak then covers the process lifetime


def peak_memory_mb(device: str | torch.device) -> float:
    """GPU: max allocated since the last reset; CPU: the process's peak RSS."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 5 ms), bytes."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(0.005)

    def __enter__(self) -> PeakRSS:
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


# ---- the record next to every result ---------------------------------------------------------


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment(device: str | torch.device) -> dict[str, Any]:
    """Date, versions and hardware."""
    import transformers

    env: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        import ray

        env["ray"] = ray.__version__
    except ImportError:
        env["ray"] = None
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"gpu": props.name, "gpu_memory_gb": round(props.total_memory / GB, 1), "cuda": torch.version.cuda}
    return env
