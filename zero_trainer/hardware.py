"""The hardware a run has: GPUs (or none), RAM, disk — probed from this machine or given as flags.

Probing never imports torch when there is no GPU driver to ask (`zero-trainer plan` stays under a second).
"""

import math
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

GiB = 2**30


@dataclass(frozen=True)
class Hardware:
    nodes: int
    gpus_per_node: int  # ranks per node
    gpu_mem: int | None  # bytes per device; None: no accelerator, the ranks share the CPU's RAM
    cpu_mem: int  # bytes per node
    nvme: int = 0  # bytes per node

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def cpu_only(self) -> bool:
        return self.gpu_mem is None

    def describe(self) -> str:
        nvme = f", {self.nvme / GiB:.0f} GiB NVMe" if self.nvme else ", no NVMe"
        if self.cpu_only:
            return (f"{self.nodes} node(s) × {self.gpus_per_node} CPU rank(s) sharing {self.cpu_mem / GiB:.1f} GiB RAM "
                    f"(no GPU){nvme} per node")
        return (f"{self.nodes} node(s) × {self.gpus_per_node} GPU(s) of {self.gpu_mem / GiB:.1f} GiB, "
                f"{self.cpu_mem / GiB:.1f} GiB CPU{nvme} per node")


def physical_memory_bytes() -> int:
    """This machine's RAM, or the cgroup's limit when a container has one below it."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            return int(text)
    return total


def _accelerator_visible() -> bool:
    """Cheap test before importing torch (a second): without a driver node there is no GPU to ask about."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/proc/driver/nvidia"))


def local_gpus() -> tuple[int, int]:
    """(count, bytes of the smallest) of this machine's GPUs via torch; (0, 0) without any."""
    if not _accelerator_visible():
        return 0, 0
    import torch

    if not torch.cuda.is_available():
        return 0, 0
    count = torch.cuda.device_count()
    return count, min(torch.cuda.get_device_properties(i).total_memory for i in range(count))


def detect_hardware(nodes: int = 1, gpus_per_node: int | None = None, gpu_mem: float | None = None,
                    cpu_mem: float | None = None, nvme: float = 0) -> Hardware:
    """Hardware from flags (memory in GiB); what is not given comes from this machine."""
    for value, flag, allow_zero in ((nodes, "--nodes", False), (gpus_per_node, "--gpus-per-node", False),
                                    (gpu_mem, "--gpu-mem", False), (cpu_mem, "--cpu-mem", False),
                                    (nvme, "--nvme", True)):
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                or value < 0 or (value == 0 and not allow_zero):
            unit = "a whole number >= 1" if flag in ("--nodes", "--gpus-per-node") else \
                "a size in GiB >= 0 (0: none)" if allow_zero else "a size in GiB > 0"
            raise UsageError(f"{flag} {value} is invalid", flag, f"use {unit}")
    count, device_bytes = (0, 0) if gpu_mem is not None else local_gpus()
    if gpu_mem is not None:
        device = int(gpu_mem * GiB)
        ranks = gpus_per_node or count or 1
    elif count:
        device, ranks = device_bytes, gpus_per_node or count
    else:
        device, ranks = None, gpus_per_node or 1
    cpu = int(cpu_mem * GiB) if cpu_mem is not None else physical_memory_bytes()
    return Hardware(nodes=nodes, gpus_per_node=ranks, gpu_mem=device, cpu_mem=cpu, nvme=int(nvme * GiB))


def unwritable_reason(path) -> str | None:
    """Why this user cannot write (or create) directory `path`; None when it can. Creates nothing."""
    target = Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir():
        return f"{target} exists and is not a directory"
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, so {target} cannot be created"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable (permissions or a read-only file system)"
    return None


def free_bytes(path) -> int:
    """Free space on the file system that holds `path` (or would, once created)."""
    existing = Path(path).expanduser().absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing if existing.is_dir() else existing.parent).free


def local_world_size() -> int:
    """Ranks on this node as the launcher set them (deepspeed: LOCAL_SIZE; torchrun: LOCAL_WORLD_SIZE); 0 if unset."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 0)


def filesystem_type(path: str) -> str:
    """The type of the filesystem holding `path` (or its nearest existing parent), from /proc/mounts; "" unknown."""
    target = Path(path).absolute()
    while not target.exists() and target != target.parent:
        target = target.parent
    target = target.resolve()
    best, kind = "", ""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        if (str(target) == mount or str(target).startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
