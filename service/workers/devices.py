"""Which worker processes to start: one list entry per worker, naming its device.

``--devices auto`` is every CUDA device when there is one, else ``cpu``. A GPU gets one
worker by default (its kernels queue on the device anyway); the CPU one per two cores, since
each worker's torch uses the cores it is given and more processes would only fight over them.
One core is kept for the API process.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from service.errors import SpecError


@dataclass(frozen=True)
class Layout:
    devices: tuple[str, ...]  # one per worker, in worker order
    threads: int  # torch intra-op threads per CPU worker

    @property
    def size(self) -> int:
        return len(self.devices)


def cuda_count() -> int:
    # Without an NVIDIA device node there is nothing to ask torch (and the API process, which
    # never computes, is spared importing it). device_count() asks NVML, creating no context.
    if not glob.glob("/dev/nvidia[0-9]*"):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def layout(devices: str, per_device: int | None) -> Layout:
    """The workers for ``--devices``/``--workers-per-device``."""
    names = _expand(devices)
    cores = os.cpu_count() or 1
    cpu_default = max(1, cores // 2)
    workers: list[str] = []
    for name in names:
        count = per_device or (cpu_default if name == "cpu" else 1)
        workers.extend([name] * count)
    cpu_workers = sum(1 for w in workers if w == "cpu") or 1
    # One core is left to the API process (HTTP, JSON, validation): torch's threads spin while
    # they wait for each other, so a thread that has to share its core stalls all the others.
    return Layout(tuple(workers), max(1, (cores - 1) // cpu_workers))


def _expand(devices: str) -> list[str]:
    count = cuda_count()
    if devices == "auto":
        return [f"cuda:{i}" for i in range(count)] or ["cpu"]
    names: list[str] = []
    for name in devices.split(","):
        if name == "cuda":
            name = "cuda:0"
        if name.startswith("cuda") and int(name.partition(":")[2]) >= count:
            raise ValueError(f"--devices names {name}, but this machine has {count} CUDA devices")
        if name not in names:
            names.append(name)
    return names


def session_device(requested: str, worker_device: str) -> str:
    """A session's device, resolved when it is made: ``auto`` is the worker's own device,
    ``cuda`` the worker's GPU (or the first one); a device this machine lacks is a 422."""
    count = cuda_count()
    if requested == "auto":
        return worker_device
    if requested == "cpu":
        return "cpu"
    if count == 0:
        raise SpecError("this server has no CUDA device; use device cpu or auto", loc=("device",))
    if requested == "cuda":
        return worker_device if worker_device.startswith("cuda") else "cuda:0"
    index = int(requested.partition(":")[2])
    if index >= count:
        raise SpecError(f"this server has no device {requested}", loc=("device",))
    return requested
