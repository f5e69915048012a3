"""The environment of a run: device, library versions, CPU load. Torch is imported on use only."""

from __future__ import annotations

import datetime
import os
import platform

__all__ = ["allow_many_compiles", "cpu_model", "environment", "load_average", "load_warning", "triton_kernels_on"]


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages, or None where the OS has none."""
    try:
        return os.getloadavg()
    except (OSError, AttributeError):
        return None


def load_warning(threads: int) -> str | None:
    """A sentence when other processes load the CPU (1-minute load above ``threads``, the threads
    this process uses): then timings on it are slower and noisier than on an idle machine."""
    load = load_average()
    if load is None or load[0] <= threads:
        return None
    return (
        f"the CPU is loaded (1-minute load average {load[0]:.2f} for {os.cpu_count()} core(s), "
        f"{threads} thread(s) here): other processes share it, so these timings are slower and noisier "
        f"than on an idle machine; the ratios suffer less, since every variant is timed in turns"
    )


def triton_kernels_on() -> bool:
    """tokenreduce's Triton kernels serve its CUDA operators now."""
    from tokenreduce.ops import triton_kernels_enabled

    return triton_kernels_enabled()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def environment(device: str) -> dict:
    """Date, Python, torch, timm and triton versions, the device and, on a CPU, threads and load."""
    import torch

    import tokenreduce

    dev = torch.device(device)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tokenreduce": tokenreduce.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "triton": _version("triton"),
        "device_type": dev.type,
    }
    if dev.type == "cuda":
        info["device"] = torch.cuda.get_device_name(dev)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        info["cuda"] = torch.version.cuda
        info["triton_kernels"] = triton_kernels_on()
    else:
        info["device"] = cpu_model()
        info["cpu_count"] = os.cpu_count()
        info["cpu_threads"] = torch.get_num_threads()
        info["load_before"] = load_average()
    return info


def allow_many_compiles(limit: int = 64) -> None:
    """Raise Dynamo's recompile limit: a benchmark compiles many variants in one process."""
    import torch

    for name in ("recompile_limit", "cache_size_limit"):  # the name differs across torch versions
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, limit)
