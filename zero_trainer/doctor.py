"""`zero-trainer doctor [--json]`: the environment traps that stall or break DeepSpeed runs, each with its fix.

Versions, accelerator and comm backend, DeepSpeed's JIT ops (built in the torch extensions cache, or buildable
here), stale JIT build locks, /dev/shm, free disk where the run writes, the `deepspeed` launcher, and this
machine's cached `zero-trainer probe` speeds. Exit 0 when all is well, 1 when something is wrong.
"""

import contextlib
import importlib.metadata
import json
import os
import shutil
import sys
from pathlib import Path

from . import ops, probe
from .hardware import free_bytes, unwritable_reason
from .recipe import Recipe, nvme_path_for
from .shipped import REPO_ROOT

PACKAGES = ("torch", "deepspeed", "transformers", "datasets", "accelerate")
# Docker's default /dev/shm is 64 MB: too little for gloo, DeepSpeed's shm all-reduce and data loaders.
MIN_SHM_BYTES = 512 * 2**20
MIN_FREE_BYTES = 2**30
OP_FIXES = {
    "async_io": "apt-get install -y libaio-dev (a C compiler too); only NVMe offload (zero3_nvme) needs it",
}
DEFAULT_OP_FIX = "apt-get install -y g++ python3-dev: DeepSpeed JIT-builds this op with the C++ compiler"


def add_subcommand(sub) -> None:
    d = sub.add_parser("doctor", help="check this machine for the traps that stall or break DeepSpeed runs",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    d.add_argument("--json", action="store_true", help="print one JSON object instead of a report")
    d.add_argument("--output-dir", default=Recipe().output_dir, help="where runs will write (free disk)")
    d.add_argument("--nvme-path", help="NVMe swap directory to check (default OUTPUT_DIR/nvme)")
    d.set_defaults(func=cmd_doctor)


def _pins() -> dict[str, str]:
    pins = {}
    constraints = REPO_ROOT / "constraints.txt"
    if constraints.is_file():
        for line in constraints.read_text().splitlines():
            name, sep, version = line.split("#")[0].strip().partition("==")
            if sep:
                pins[name.strip().lower()] = version.strip()
    return pins


def _versions(problems: list) -> dict:
    versions, pins = {}, _pins()
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
            problems.append({"what": f"{package} is not installed",
                             "fix": "pip install -c constraints.txt -e . (or make install)"})
            continue
        pinned = pins.get(package)
        if pinned and versions[package].split("+")[0] != pinned:
            problems.append({"what": f"{package} {versions[package]} is installed but constraints.txt pins {pinned}",
                             "fix": f"pip install -c constraints.txt {package}=={pinned} (the tested version)"})
    return versions


def _accelerator() -> dict:
    import deepspeed
    import torch

    acc = deepspeed.get_accelerator()
    return {"device": acc.device_name(), "comm_backend": acc.communication_backend_name(),
            "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0}


def _extensions_build_dir(root: Path) -> Path:
    """torch's cpp_extension cache layout: <root>/py311_cpu/<op>/ (py311_cu121 with CUDA)."""
    import torch

    cuda = torch.version.cuda
    device = "cu" + cuda.replace(".", "") if cuda else "cpu"
    return root / f"py{sys.version_info.major}{sys.version_info.minor}_{device}"


def _ops(root: Path, problems: list) -> dict:
    from deepspeed.git_version_info import installed_ops

    build_dir, result = _extensions_build_dir(root), {}
    for builder_name in ops.CPU_OPS + ops.NVME_OPS:
        builder = ops.op_builder(builder_name)
        if builder is None or type(builder).__name__ == "NotImplementedBuilder":
            continue
        so = build_dir / builder.name / f"{builder.name}.so"
        built = so.is_file() or bool(installed_ops.get(builder.name))
        buildable = bool(builder.is_compatible(verbose=False))
        result[builder.name] = {"built": built, "buildable": buildable, "cache": str(so.parent)}
        if not built and not buildable:
            problems.append({"what": f"DeepSpeed op {builder.name} is not built and cannot be built here "
                                     f"({builder_name}.is_compatible() is false)",
                             "fix": OP_FIXES.get(builder.name, DEFAULT_OP_FIX)})
    compiler = os.environ.get("CXX") or "c++"
    if not all(op["built"] for op in result.values()) and not shutil.which(compiler):
        problems.append({"what": f"no C++ compiler ('{compiler}' not found) for the ops DeepSpeed JIT-builds on "
                                 "first use", "fix": "apt-get install -y g++ (or set CXX)"})
    return result


def _locks(root: Path, problems: list) -> list:
    found = []
    for lock in ops.build_locks(root):
        holders = ops.lock_holders(lock)
        found.append({"path": str(lock), "stale": not holders, "holders": holders})
        if not holders:
            problems.append({"what": f"stale JIT build lock {lock}: no process holds it, and the next run that "
                                     f"builds {lock.parent.name} would wait on it forever, printing nothing",
                             "fix": f"remove it: rm {lock} (zero-trainer train also removes stale locks)"})
    return found


def _shm(problems: list) -> dict:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        problems.append({"what": "/dev/shm is missing", "fix": "mount a tmpfs there (docker run --shm-size=8g)"})
        return {"path": str(shm), "total_bytes": None, "free_bytes": None}
    usage = shutil.disk_usage(shm)
    if usage.free < MIN_SHM_BYTES:
        problems.append({"what": f"/dev/shm has only {usage.free / 2**20:.0f} MiB free (total "
                                 f"{usage.total / 2**20:.0f} MiB); process groups and data loaders run out of it",
                         "fix": "docker run --shm-size=8g, or mount -o remount,size=8G /dev/shm"})
    orphans = ops.orphaned_shm_buffers()
    if orphans:
        size = sum(path.stat().st_size for path in orphans)
        problems.append({"what": f"{len(orphans)} DeepSpeed shm all-reduce workspace(s) left in /dev/shm by earlier "
                                 f"runs ({size / 2**20:.0f} MiB of RAM; no live process maps them)",
                         "fix": f"rm {ops.SHM_DIR}/{ops.SHM_BUFFER}_*  (runs launched by zero-trainer remove "
                                "their own)"})
    return {"path": str(shm), "total_bytes": usage.total, "free_bytes": usage.free,
            "orphaned_shm_buffers": [path.name for path in orphans]}


def _disk(label: str, flag: str, path: str, problems: list) -> dict:
    reason = unwritable_reason(path)
    free = free_bytes(path)
    if reason:
        problems.append({"what": f"{label} {path} cannot be written: {reason}",
                         "fix": f"choose a writable directory with {flag}"})
    elif free < MIN_FREE_BYTES:
        problems.append({"what": f"only {free / 2**20:.0f} MiB free at {label} {path}",
                         "fix": f"free some space, or choose another disk with {flag}"})
    return {"path": path, "free_bytes": free, "writable": reason is None}


def _launcher(problems: list) -> str | None:
    beside = Path(sys.executable).with_name("deepspeed")
    found = str(beside) if beside.exists() else shutil.which("deepspeed")
    if not found:
        problems.append({"what": "the deepspeed launcher is neither on PATH nor beside this Python",
                         "fix": "pip install -c constraints.txt deepspeed (into this environment)"})
    return found


def _probe() -> dict:
    """This machine's cached speeds, if `zero-trainer probe` ran here; doctor never measures (it takes a minute)."""
    fingerprint = probe.machine_fingerprint()
    cached = probe.load_cached(fingerprint)
    return {"path": str(probe.probe_path(fingerprint)), "probe": cached.to_dict() if cached else None,
            "headline": cached.headline() if cached else None}


def diagnose(output_dir: str, nvme_dir: str | None = None) -> dict:
    """Every check; returns the report, with `problems` a list of {what, fix} (empty when all is well)."""
    problems: list[dict] = []
    root = ops.torch_extensions_dir()
    nvme_dir = nvme_path_for(output_dir, nvme_dir)
    # DeepSpeed logs to stdout on import; keep stdout for the report (one JSON object with --json).
    with contextlib.redirect_stdout(sys.stderr):
        report = {
            "versions": _versions(problems),
            "accelerator": _accelerator(),
            "torch_extensions_dir": str(root),
            "ops": _ops(root, problems),
            "build_locks": _locks(root, problems),
            "shm": _shm(problems),
            "disk": {"output_dir": _disk("output dir", "--output-dir", output_dir, problems),
                     "nvme_path": _disk("nvme path", "--nvme-path", nvme_dir, problems)},
            "launcher": _launcher(problems),
            "probe": _probe(),
        }
    report["problems"] = problems
    report["ok"] = not problems
    return report


def _gib(n) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def _probe_line(speeds: dict) -> str:
    if not speeds["probe"]:
        return "no speeds cached for this machine: run `zero-trainer probe` (under a minute) for step-time estimates"
    return f"{speeds['headline']}\n             measured {speeds['probe']['measured_at']}, cached in {speeds['path']}"


def format_report(report: dict) -> str:
    acc, shm, disk = report["accelerator"], report["shm"], report["disk"]
    states = {(True, True): "built", (True, False): "built", (False, True): "buildable (JIT-builds on first use)",
              (False, False): "NOT buildable"}
    ops_line = "; ".join(f"{name}: {states[op['built'], op['buildable']]}" for name, op in report["ops"].items())
    locks = report["build_locks"]
    lines = [
        "versions     " + ", ".join(f"{k} {v or 'missing'}" for k, v in report["versions"].items()),
        f"accelerator  {acc['device']} (comm backend {acc['comm_backend']}), CUDA devices: {acc['cuda_devices']}",
        f"ops          {ops_line}",
        f"build locks  {len(locks)} under {report['torch_extensions_dir']}"
        + "".join(f"\n             {lk['path']}: " + ("stale" if lk["stale"] else f"held by pid {lk['holders']}")
                  for lk in locks),
        f"/dev/shm     {_gib(shm['free_bytes'])} free of {_gib(shm['total_bytes'])}",
        "disk         " + "; ".join(f"{d['path']}: {_gib(d['free_bytes'])} free" for d in disk.values()),
        f"launcher     {report['launcher'] or 'not found'}",
        "probe        " + _probe_line(report["probe"]),
    ]
    lines += [f"problem: {p['what']}: {p['fix']}" for p in report["problems"]]
    lines.append("all well" if report["ok"] else f"{len(report['problems'])} problem(s)")
    return "\n".join(lines)


def cmd_doctor(args) -> int:
    report = diagnose(args.output_dir, args.nvme_path)
    print(json.dumps(report, indent=2) if args.json else format_report(report), flush=True)
    return 0 if report["ok"] else 1
