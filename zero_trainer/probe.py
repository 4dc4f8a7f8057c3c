"""`zero-trainer probe [--force] [--json]`: this machine's speeds, measured once and cached, for a step-time model.

Matmul FLOP/s per dtype at a few GEMM shapes, memory bandwidth, the optimizer step per parameter (DeepSpeed's
cpu_adam and torch's AdamW), host <-> device copies (GPU only), disk at the aio block size, all_reduce / all_gather
between 2 local ranks on the backend a run would use, and the fixed cost of a step. A full probe takes under a
minute on 2 CPU cores; the result is a JSON under the cache dir, keyed by this machine and install.
"""

import argparse
import contextlib
import dataclasses
import datetime
import errno
import hashlib
import importlib.metadata
import json
import math
import mmap
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .errors import UsageError

FORMAT = 1  # bump when a field changes meaning: older cache files are then measured again
DTYPES = ("fp32", "bf16", "fp16")
# tokens x hidden @ hidden x ffn (4 x hidden) for hidden 512, 1024, 2048: a 2048-token micro batch's MLP GEMM.
DEFAULT_SHAPES = ((2048, 512, 2048), (2048, 1024, 4096), (2048, 2048, 8192))
QUICK_SHAPES = ((256, 256, 1024), (512, 512, 2048))
AIO_BLOCK_BYTES = 2**20  # DeepSpeed's aio block_size (ds_configs' "aio" section)
COLLECTIVE_TIMEOUT_S = 120


@dataclass(frozen=True)
class ProbeSizes:
    memory_bytes: int  # the tensor copied for memory bandwidth
    optimizer_params: int  # fp32 parameters each optimizer steps over
    disk_bytes: int  # the file written then read
    bucket_bytes: int  # fp32 all_reduce / all_gather size for bandwidth: a reduce bucket (4M elements: hidden 2048)
    small_bytes: int  # the size for latency
    reps: int  # timed repetitions (the median is kept)


FULL = ProbeSizes(memory_bytes=256 * 2**20, optimizer_params=4 * 2**20, disk_bytes=256 * 2**20,
                  bucket_bytes=16 * 2**20, small_bytes=4096, reps=5)
QUICK = ProbeSizes(memory_bytes=32 * 2**20, optimizer_params=2**20, disk_bytes=16 * 2**20,
                   bucket_bytes=2**20, small_bytes=4096, reps=3)


class MatmulRate(NamedTuple):
    dtype: str
    m: int
    k: int
    n: int
    flops_per_s: float


@dataclass(frozen=True)
class Probe:
    """What `measure` found, in FLOP/s, bytes/s and seconds. Memory copies count the bytes read + written; host <->
    device copies and disk the bytes moved; collectives the tensor's bytes over the time (nccl-tests' "algbw";
    all_gather: the gathered output)."""

    fingerprint: str  # hash of machine_fingerprint(): the cache file's key
    measured_at: str  # ISO time, UTC
    wall_s: float  # how long the probe took
    quick: bool  # measured at QUICK sizes (noisier)
    device: str  # where matmuls, AdamW and the step ran: "cpu" or the GPU's name
    torch_threads: int
    matmul_flops_per_s: tuple[MatmulRate, ...]  # fp32 and bf16; fp16 on GPU
    host_memory_bytes_per_s: float  # a large tensor copy in RAM
    device_memory_bytes_per_s: float | None  # the same in GPU memory; None on CPU
    cpu_adam_s_per_param: float  # DeepSpeedCPUAdam (the offload optimizer), fp32, host
    adamw_s_per_param: float  # torch.optim.AdamW (its default implementation), fp32, on `device`
    optimizer_params: int
    h2d_pinned_bytes_per_s: float | None  # host -> device copies; None without a GPU
    h2d_pageable_bytes_per_s: float | None
    d2h_pinned_bytes_per_s: float | None
    d2h_pageable_bytes_per_s: float | None
    disk_path: str  # the directory whose file system was timed
    disk_direct_io: bool  # O_DIRECT; else buffered + fsync, and the page cache dropped before reading
    disk_block_bytes: int
    disk_write_bytes_per_s: float
    disk_read_bytes_per_s: float
    collective_backend: str | None  # gloo on CPU, nccl on GPU; None with one GPU (a 1-rank run has no collective)
    collective_ranks: int
    collective_bucket_bytes: int
    collective_small_bytes: int
    allreduce_bytes_per_s: float | None
    allreduce_latency_s: float | None  # one all_reduce of collective_small_bytes
    allgather_bytes_per_s: float | None
    allgather_latency_s: float | None
    step_overhead_s: float  # a tiny forward/backward + AdamW step + zero_grad: what any step costs at least

    def matmul_rate(self, dtype: str, m: int, k: int, n: int) -> float:
        """FLOP/s of an (m x k) @ (k x n) matmul in `dtype`, from the nearest measured shape (log distance)."""
        rows = [r for r in self.matmul_flops_per_s if r.dtype == dtype]
        if not rows:
            measured = sorted({r.dtype for r in self.matmul_flops_per_s})
            raise ValueError(f"no {dtype} matmul was measured on {self.device} (measured: {', '.join(measured)})")

        def distance(r: MatmulRate) -> float:
            return sum(abs(math.log(a / b)) for a, b in ((m, r.m), (k, r.k), (n, r.n)))

        return min(rows, key=distance).flops_per_s

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["matmul_flops_per_s"] = [r._asdict() for r in self.matmul_flops_per_s]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Probe":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        values["matmul_flops_per_s"] = tuple(MatmulRate(**r) for r in d["matmul_flops_per_s"])
        return cls(**values)

    def headline(self) -> str:
        """One line: the numbers a step-time estimate leans on most."""
        mm = ", ".join(f"{dtype} {_si(max(r.flops_per_s for r in self.matmul_flops_per_s if r.dtype == dtype))}"
                       "FLOP/s" for dtype in DTYPES if any(r.dtype == dtype for r in self.matmul_flops_per_s))
        parts = [f"matmul {mm}", f"memory {_si(self.host_memory_bytes_per_s)}B/s",
                 f"cpu_adam {self.cpu_adam_s_per_param * 1e9:.2g} ns/param"]
        if self.allreduce_bytes_per_s:
            parts.append(f"all_reduce {_si(self.allreduce_bytes_per_s)}B/s ({self.collective_backend})")
        if self.h2d_pinned_bytes_per_s:
            parts.append(f"h2d pinned {_si(self.h2d_pinned_bytes_per_s)}B/s")
        return "; ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# the cache


def cache_dir() -> Path:
    """$ZERO_TRAINER_CACHE or ~/.cache/zero_trainer: the rule of recipe.Recipe.cache_dir, without a recipe."""
    return Path(os.environ.get("ZERO_TRAINER_CACHE") or Path.home() / ".cache" / "zero_trainer")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_names() -> list[str]:
    """Cheaply (the planner reads the cache without importing torch): the NVIDIA driver's /proc files; torch only
    where another driver node exists."""
    names = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        with contextlib.suppress(OSError):
            names += [line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                      if line.startswith("Model:")]
    if names or not any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/kfd")):
        return names
    import torch

    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_fingerprint() -> dict:
    """What the speeds depend on: the machine and the install. A change in any of these measures again."""
    return {"hostname": socket.gethostname(), "cpu": _cpu_model(), "cpus": len(os.sched_getaffinity(0)),
            "gpus": _gpu_names(), "torch": _version("torch"), "deepspeed": _version("deepspeed"),
            "python": platform.python_version()}


def _key(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def probe_path(fingerprint: dict | None = None) -> Path:
    """This machine's cache file: <cache dir>/probe/<fingerprint hash>.json."""
    return cache_dir() / "probe" / f"{_key(fingerprint or machine_fingerprint())}.json"


def load_cached(fingerprint: dict | None = None) -> Probe | None:
    """This machine's cached probe, or None (none yet, unreadable, or from an older format). Never measures."""
    path = probe_path(fingerprint)
    try:
        data = json.loads(path.read_text())
        return Probe.from_dict(data["probe"]) if data.get("format") == FORMAT else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _writable_dir(path: Path, what: str, flag: str) -> Path:
    """`path`, created; a one-line UsageError when it cannot be (before a minute of measuring is spent)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UsageError(f"cannot write the {what} {path}: {err.strerror or err}", flag,
                         "choose a writable directory") from None
    return path


def save_probe(probe: Probe, fingerprint: dict | None = None) -> Path:
    """Write `probe` as this machine's cache file, atomically (a reader sees the old file or the new one)."""
    fingerprint = fingerprint or machine_fingerprint()
    path = probe_path(fingerprint)
    _writable_dir(path.parent, "probe cache", "$ZERO_TRAINER_CACHE")
    payload = {"format": FORMAT, "fingerprint": fingerprint, "probe": probe.to_dict()}
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
        json.dump(payload, f, indent=2)
    os.replace(f.name, path)
    return path


def load_or_measure(force: bool = False, *, disk_dir: str | os.PathLike | None = None, quick: bool = False,
                    say=None) -> Probe:
    """The cached probe of this machine and install, or a new measurement written to the cache. A cached probe
    whose disk was another directory than `disk_dir` (when given) is measured again."""
    fingerprint = machine_fingerprint()
    if not force:
        cached = load_cached(fingerprint)
        if cached and (disk_dir is None or Path(cached.disk_path) == Path(disk_dir).expanduser().absolute()):
            return cached
    directory = _writable_dir(probe_path(fingerprint).parent, "probe cache", "$ZERO_TRAINER_CACHE")  # before a minute
    probe = measure(quick=quick, disk_dir=disk_dir or directory, fingerprint=fingerprint, say=say)
    save_probe(probe, fingerprint)
    return probe


# ----------------------------------------------------------------------------------------------------------------
# the measurements


def _seconds_per_call(fn, reps: int, sync=None, min_sample_s: float = 0.01, agree=None) -> float:
    """Median seconds of fn() over `reps` samples, after one warm-up call; a sample repeats fn until it lasts
    min_sample_s (microsecond GPU kernels), so that the timer's resolution and launch gaps do not dominate.
    `agree(count) -> count`: the ranks of a collective settle on one count, or they would wait on each other."""
    sync = sync or (lambda: None)
    fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    inner = max(1, math.ceil(min_sample_s / max(time.perf_counter() - start, 1e-9)))
    inner = agree(inner) if agree else inner
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def _matmuls(torch, device, sync, shapes, reps) -> tuple[MatmulRate, ...]:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if device.type == "cuda":
        dtypes["fp16"] = torch.float16
    rates = []
    for name, dtype in dtypes.items():
        for m, k, n in shapes:
            a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
            seconds = _seconds_per_call(lambda a=a, b=b: torch.mm(a, b), reps, sync)
            rates.append(MatmulRate(name, m, k, n, 2 * m * k * n / seconds))
    return tuple(rates)


def _copy_rate(torch, device, sync, nbytes, reps) -> float:
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _seconds_per_call(lambda: dst.copy_(src), reps, sync)  # read + write


def _optimizer_rates(torch, device, sync, params, reps) -> tuple[float, float]:
    """Seconds per parameter of one step: DeepSpeedCPUAdam on the host, torch AdamW on `device`."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam  # the JIT op cpu_adam, from the torch extensions cache

    host = torch.nn.Parameter(torch.zeros(params))
    host.grad = torch.full_like(host, 1e-3)
    cpu_adam = DeepSpeedCPUAdam([host], lr=1e-4)
    cpu_adam_s = _seconds_per_call(cpu_adam.step, reps)
    on_device = torch.nn.Parameter(torch.zeros(params, device=device))
    on_device.grad = torch.full_like(on_device, 1e-3)
    adamw = torch.optim.AdamW([on_device], lr=1e-4)
    adamw_s = _seconds_per_call(adamw.step, reps, sync)
    return cpu_adam_s / params, adamw_s / params


def _host_device_rates(torch, nbytes, reps) -> dict:
    sync = torch.cuda.synchronize
    gpu = torch.empty(nbytes // 4, device="cuda")
    rates = {}
    for kind, pinned in (("pinned", True), ("pageable", False)):
        host = torch.ones(nbytes // 4, pin_memory=pinned)
        rates[f"h2d_{kind}_bytes_per_s"] = nbytes / _seconds_per_call(
            lambda h=host, p=pinned: gpu.copy_(h, non_blocking=p), reps, sync)
        rates[f"d2h_{kind}_bytes_per_s"] = nbytes / _seconds_per_call(
            lambda h=host, p=pinned: h.copy_(gpu, non_blocking=p), reps, sync)
    return rates


def _disk_rates(directory: Path, nbytes: int, block: int = AIO_BLOCK_BYTES) -> dict:
    """Write then read one file of `nbytes` in `block`-sized requests, as DeepSpeed's aio swaps: with O_DIRECT where
    the file system takes it; else buffered, fsync'ed (counted in the write), and its pages dropped from the page
    cache (POSIX_FADV_DONTNEED) before the read. One sample each."""
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(block))
    path = directory / f".probe-{os.getpid()}.bin"
    count = max(1, nbytes // block)

    def timed(flags, direct, write):
        fd = os.open(path, flags | (os.O_DIRECT if direct else 0), 0o600)
        try:
            if not write and not direct:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            for _ in range(count):
                done = os.write(fd, buf) if write else os.readv(fd, [buf])
                if done != block:
                    raise OSError(f"short {'write' if write else 'read'} of {done} bytes")
            if write:
                os.fsync(fd)
            return time.perf_counter() - start
        finally:
            os.close(fd)

    try:
        write_flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        direct = hasattr(os, "O_DIRECT")
        try:
            write_s = timed(write_flags, direct, write=True)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            direct = False  # this file system (tmpfs, some overlays) refuses O_DIRECT
            write_s = timed(write_flags, direct, write=True)
        if not direct:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        read_s = timed(os.O_RDONLY, direct, write=False)
    finally:
        path.unlink(missing_ok=True)
        buf.close()
    moved = count * block
    return {"disk_direct_io": direct, "disk_block_bytes": block, "disk_write_bytes_per_s": moved / write_s,
            "disk_read_bytes_per_s": moved / read_s}


def _collective_rank(rank, world, init_file, backend, bucket_bytes, small_bytes, reps, out_path):
    """One of the spawned ranks: time all_reduce and all_gather at a bucket and at a small size; rank 0 writes."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))  # as a launcher splits the cores
    device = torch.device("cpu")
    sync = None
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device, sync = torch.device("cuda", rank), torch.cuda.synchronize
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)

    def agree(count: int) -> int:
        most = torch.tensor([count], device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return int(most.item())

    try:
        timings = {}
        for label, nbytes in (("bucket", bucket_bytes), ("small", small_bytes)):
            full = torch.ones(nbytes // 4, device=device)
            gathered = torch.empty(nbytes // 4, device=device)
            part = torch.ones(gathered.numel() // world, device=device)
            for op, fn in (("allreduce", lambda f=full: dist.all_reduce(f)),
                           ("allgather", lambda p=part, g=gathered: dist.all_gather_into_tensor(g, p))):
                dist.barrier()
                timings[f"{op}_{label}_s"] = _seconds_per_call(fn, reps, sync, min_sample_s=0.005, agree=agree)
        if rank == 0:
            Path(out_path).write_text(json.dumps(timings))
    finally:
        dist.destroy_process_group()


def _collective_rates(backend: str, world: int, sizes: ProbeSizes) -> dict:
    # Plain `python -c` processes rather than multiprocessing's spawn, which would re-run the caller's main script
    # in each rank; a FileStore rendezvous: no port to choose, none to race for.
    package_root = str(Path(__file__).resolve().parent.parent)  # the ranks import this very zero_trainer
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="zero_trainer_probe_") as tmp:
        out, ranks = os.path.join(tmp, "timings.json"), []
        for rank in range(world):
            call = (f"from zero_trainer.probe import _collective_rank; _collective_rank({rank}, {world}, "
                    f"{os.path.join(tmp, 'store')!r}, {backend!r}, {sizes.bucket_bytes}, {sizes.small_bytes}, "
                    f"{sizes.reps}, {out!r})")
            with open(os.path.join(tmp, f"rank{rank}.err"), "w") as err:
                ranks.append(subprocess.Popen([sys.executable, "-c", call], stdout=subprocess.DEVNULL, stderr=err,
                                              env=env))
        deadline = time.monotonic() + COLLECTIVE_TIMEOUT_S
        # Until all are done, one fails (the others would wait for it forever), or the time is up.
        while any(p.poll() is None for p in ranks) and not any(p.poll() for p in ranks) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        failed = [rank for rank, proc in enumerate(ranks) if proc.returncode]
        if failed:
            last = Path(tmp, f"rank{failed[0]}.err").read_text().strip().splitlines()[-1:] or ["(nothing on stderr)"]
            raise RuntimeError(f"the {backend} collective probe failed: rank(s) {failed} exited or ran past "
                               f"{COLLECTIVE_TIMEOUT_S} s; rank {failed[0]}: {last[0]}")
        t = json.loads(Path(out).read_text())
    return {"allreduce_bytes_per_s": sizes.bucket_bytes / t["allreduce_bucket_s"],
            "allreduce_latency_s": t["allreduce_small_s"],
            "allgather_bytes_per_s": sizes.bucket_bytes / t["allgather_bucket_s"],
            "allgather_latency_s": t["allgather_small_s"]}


def _step_overhead(torch, device, sync, reps) -> float:
    model = torch.nn.Linear(16, 16, device=device)
    x = torch.randn(4, 16, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()

    return _seconds_per_call(step, max(reps, 5), sync)


def measure(shapes=None, *, quick: bool = False, sizes: ProbeSizes | None = None,
            disk_dir: str | os.PathLike | None = None, fingerprint: dict | None = None, say=None) -> Probe:
    """Measure everything now (under a minute on 2 CPU cores; QUICK sizes: about 10 s). `shapes`: [(m, k, n), ...]
    for the matmuls (default DEFAULT_SHAPES). `disk_dir`: where the disk file goes (default the cache dir)."""
    say = say or (lambda _: None)
    sizes = sizes or (QUICK if quick else FULL)
    shapes = [tuple(s) for s in (shapes or (QUICK_SHAPES if quick else DEFAULT_SHAPES))]
    if not all(len(s) == 3 and all(isinstance(x, int) and x >= 1 for x in s) for s in shapes):
        raise ValueError(f"matmul shapes must be (m, k, n) triples of whole numbers >= 1, not {shapes}")
    disk = _writable_dir(Path(disk_dir or cache_dir()).expanduser().absolute(), "disk probe directory", "--disk-dir")
    free = shutil.disk_usage(disk).free
    if free < 2 * sizes.disk_bytes:
        raise UsageError(f"only {free / 2**20:.0f} MiB free at {disk} for the probe's {sizes.disk_bytes / 2**20:.0f} "
                         "MiB test file", "--disk-dir", "free some space, or time another disk with --disk-dir")
    started = time.perf_counter()
    fingerprint = fingerprint or machine_fingerprint()
    import torch

    gpu = torch.cuda.is_available()
    device = torch.device("cuda") if gpu else torch.device("cpu")
    sync = torch.cuda.synchronize if gpu else None
    say(f"probe: matmuls at {len(shapes)} shape(s) on {device.type}")
    matmuls = _matmuls(torch, device, sync, shapes, sizes.reps)
    say("probe: memory bandwidth")
    host_memory = _copy_rate(torch, torch.device("cpu"), None, sizes.memory_bytes, sizes.reps)
    device_memory = _copy_rate(torch, device, sync, sizes.memory_bytes, sizes.reps) if gpu else None
    say("probe: optimizer steps (cpu_adam, AdamW)")
    cpu_adam, adamw = _optimizer_rates(torch, device, sync, sizes.optimizer_params, sizes.reps)
    copies = dict.fromkeys(("h2d_pinned_bytes_per_s", "h2d_pageable_bytes_per_s", "d2h_pinned_bytes_per_s",
                            "d2h_pageable_bytes_per_s"))
    if gpu:
        say("probe: host <-> device copies")
        copies = _host_device_rates(torch, sizes.memory_bytes, sizes.reps)
    say(f"probe: disk at {disk}")
    disk_rates = _disk_rates(disk, sizes.disk_bytes)
    backend, world = ("nccl", min(2, torch.cuda.device_count())) if gpu else ("gloo", 2)
    collectives = dict.fromkeys(("allreduce_bytes_per_s", "allreduce_latency_s", "allgather_bytes_per_s",
                                 "allgather_latency_s"))
    if world >= 2:
        say(f"probe: all_reduce / all_gather, {world} {backend} ranks")
        collectives = _collective_rates(backend, world, sizes)
    say("probe: per-step overhead")
    overhead = _step_overhead(torch, device, sync, sizes.reps)
    return Probe(
        fingerprint=_key(fingerprint), measured_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        wall_s=time.perf_counter() - started, quick=sizes == QUICK,
        device=torch.cuda.get_device_name(0) if gpu else "cpu", torch_threads=torch.get_num_threads(),
        matmul_flops_per_s=matmuls, host_memory_bytes_per_s=host_memory, device_memory_bytes_per_s=device_memory,
        cpu_adam_s_per_param=cpu_adam, adamw_s_per_param=adamw, optimizer_params=sizes.optimizer_params,
        **copies, disk_path=str(disk), **disk_rates,
        collective_backend=backend if world >= 2 else None, collective_ranks=world,
        collective_bucket_bytes=sizes.bucket_bytes, collective_small_bytes=sizes.small_bytes, **collectives,
        step_overhead_s=overhead)


# ----------------------------------------------------------------------------------------------------------------
# the command


def _si(x: float) -> str:
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {prefix}"
    return f"{x:.3g} "


def _bytes(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def format_table(probe: Probe, path: Path | None = None) -> str:
    rows = [(f"matmul {r.dtype} {r.m}x{r.k} @ {r.k}x{r.n}", f"{_si(r.flops_per_s)}FLOP/s")
            for r in probe.matmul_flops_per_s]
    rows.append(("memory copy, host (read + write)", f"{_si(probe.host_memory_bytes_per_s)}B/s"))
    if probe.device_memory_bytes_per_s:
        rows.append(("memory copy, device (read + write)", f"{_si(probe.device_memory_bytes_per_s)}B/s"))
    per = f"fp32, {probe.optimizer_params / 1e6:.1f}M params"
    rows.append((f"DeepSpeedCPUAdam step ({per})", f"{probe.cpu_adam_s_per_param * 1e9:.3g} ns/param"))
    rows.append((f"torch AdamW step ({per})", f"{probe.adamw_s_per_param * 1e9:.3g} ns/param"))
    if probe.h2d_pinned_bytes_per_s:
        for way in ("h2d", "d2h"):
            pinned, pageable = (getattr(probe, f"{way}_{kind}_bytes_per_s") for kind in ("pinned", "pageable"))
            rows.append((f"{way} copy pinned / pageable", f"{_si(pinned)}B/s / {_si(pageable)}B/s"))
    else:
        rows.append(("host <-> device copy", "none (no GPU)"))
    how = "O_DIRECT" if probe.disk_direct_io else "buffered + fsync, page cache dropped"
    rows.append((f"disk write / read, {_bytes(probe.disk_block_bytes)} blocks",
                 f"{_si(probe.disk_write_bytes_per_s)}B/s / {_si(probe.disk_read_bytes_per_s)}B/s ({how}; "
                 f"{probe.disk_path})"))
    if probe.collective_backend:
        bucket, small = _bytes(probe.collective_bucket_bytes), _bytes(probe.collective_small_bytes)
        for op, name in (("allreduce", "all_reduce"), ("allgather", "all_gather")):
            rate, latency = getattr(probe, f"{op}_bytes_per_s"), getattr(probe, f"{op}_latency_s")
            rows.append((f"{name}, {probe.collective_ranks} {probe.collective_backend} ranks",
                         f"{_si(rate)}B/s at {bucket}; {latency * 1e6:.0f} us at {small}"))
    else:
        rows.append(("collectives", "none (one GPU: its runs have no collective)"))
    rows.append(("per-step overhead (tiny fwd/bwd + AdamW)", f"{probe.step_overhead_s * 1e3:.3g} ms"))
    width = max(len(label) for label, _ in rows) + 2
    mode = ", quick sizes" if probe.quick else ""
    lines = [f"probe of {probe.device} ({probe.torch_threads} torch threads{mode}), measured {probe.measured_at} "
             f"in {probe.wall_s:.1f} s"]
    lines += [f"  {label.ljust(width)}{value}" for label, value in rows]
    if path:
        lines.append(f"cache: {path}")
    return "\n".join(lines)


def add_subcommand(sub) -> None:
    p = sub.add_parser("probe", help="measure this machine's speeds for step-time estimates (cached)",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--force", action="store_true", help="measure again even when this machine's probe is cached")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--disk-dir", metavar="DIR", help="where to time disk writes and reads (default: the cache dir; "
                                                    "give the NVMe swap directory to time that disk)")
    p.set_defaults(func=cmd_probe)


@contextlib.contextmanager
def _stdout_to_stderr():
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def cmd_probe(args: argparse.Namespace) -> int:
    def say(line):
        print(line, file=sys.stderr, flush=True)

    with _stdout_to_stderr():  # DeepSpeed's import and cpu_adam's C++ print to stdout; keep it for the result
        probe = load_or_measure(args.force, disk_dir=args.disk_dir, say=say)
    path = probe_path()
    if args.json:
        print(json.dumps({"path": str(path), **probe.to_dict()}, indent=2))
    else:
        print(format_table(probe, path))
    return 0
