"""DeepSpeed's JIT-built C++ ops on this machine: build them once, and never hang on a stale build lock.

torch's cpp_extension guards each build with `<extensions dir>/<op>/lock`, created with O_EXCL and held open
by the building process until it finishes. A build killed midway leaves the file behind and every later run
waits on it forever, printing nothing. A lock that no live process holds open is therefore stale.
"""

import contextlib
import os
import sys
from pathlib import Path

# The ops zero_trainer's configs use on a CPU-only machine: the optimizers, the shm all-reduce every rank loads at
# start-up, and the pinned-memory op of offload; async_io only for NVMe offload (needs libaio). Built at install, so
# no test or first run pays a minute of compiling.
CPU_OPS = ("FusedAdamBuilder", "CPUAdamBuilder", "ShareMemCommBuilder", "PinMemoryBuilder")
NVME_OPS = ("AsyncIOBuilder",)


# DeepSpeed's CPU all-reduce (ops/csrc/cpu/comm/shm.cpp) creates one 64 MiB POSIX shared-memory workspace per rank
# when every rank is on one machine, named below, and never unlinks it: each run would leave its files in /dev/shm,
# which is RAM. A CI run of ~100 launches leaked 10 GiB before we removed them.
SHM_DIR = Path("/dev/shm")
SHM_BUFFER = "deepspeed_allreduce_buffer"


def shm_buffer_path(rank: int) -> Path:
    """This run's workspace for `rank`: <name>_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (shm.cpp's format)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"{SHM_BUFFER}_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_buffer(rank: int) -> None:
    """Unlink our workspace's name once every rank has mapped it (call after a barrier that follows
    init_distributed): the mappings live on, and the kernel frees the memory when the last rank exits."""
    shm_buffer_path(rank).unlink(missing_ok=True)


def remove_shm_buffers(port: int | str) -> list[Path]:
    """The launcher's sweep after its ranks are gone (killed ranks never reach release_shm_buffer)."""
    found = sorted(SHM_DIR.glob(f"{SHM_BUFFER}_{os.getuid()}_*_{port}_*")) if SHM_DIR.is_dir() else []
    for path in found:
        path.unlink(missing_ok=True)
    return found


def orphaned_shm_buffers() -> list[Path]:
    """Workspaces in /dev/shm that no live process has mapped (/proc/*/maps names mapped shm files)."""
    found = sorted(SHM_DIR.glob(f"{SHM_BUFFER}_*")) if SHM_DIR.is_dir() else []
    if not found:
        return []
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(line.split(maxsplit=5)[-1].strip() for line in maps.read_text().splitlines()
                          if SHM_BUFFER in line)
        except OSError:  # the process ended, or is not ours to read
            continue
    return [path for path in found if str(path) not in mapped and f"{path} (deleted)" not in mapped]


def torch_extensions_dir() -> Path:
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "torch_extensions"


def build_locks(root: Path | None = None) -> list[Path]:
    root = root or torch_extensions_dir()
    if not root.is_dir():
        return []
    return sorted(set(root.glob("*/lock")) | set(root.glob("*/*/lock")))


def lock_holders(lock: Path) -> list[int]:
    """PIDs of live processes that hold `lock` open (the builder keeps its O_EXCL fd until done)."""
    target, pids = str(lock.resolve()), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) == target:
                    pids.append(int(proc.name))
                    break
        except OSError:  # the process ended, or is not ours to read
            continue
    return pids


def stale_locks(root: Path | None = None) -> list[Path]:
    return [lock for lock in build_locks(root) if not lock_holders(lock)]


def clear_stale_locks(root: Path | None = None, say=print) -> list[Path]:
    removed = []
    for lock in stale_locks(root):
        try:
            lock.unlink()
        except FileNotFoundError:
            continue
        say(f"removed stale JIT build lock {lock} (no process was building)")
        removed.append(lock)
    return removed


def libaio_available() -> bool:
    # DeepSpeed's probe compiles a test program and silences it through the real stdout/stderr file descriptors:
    # under a redirected sys.stdout (a StringIO, as when the CLI runs in-process) it would report "no libaio".
    with contextlib.redirect_stdout(sys.__stdout__), contextlib.redirect_stderr(sys.__stderr__):
        return bool(op_builder("AsyncIOBuilder").is_compatible(verbose=False))


def op_builder(name: str):
    """DeepSpeed's builder of op `name` for this machine's accelerator (the CPU has builders of its own)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().create_op_builder(name)


def build_ops(nvme: bool = True, say=print) -> dict[str, str]:
    """JIT-build (or load from cache) the ops our configs use. Returns {op: 'ok' | reason}."""
    clear_stale_locks(say=say)
    results = {}
    for name in CPU_OPS + (NVME_OPS if nvme else ()):
        builder = op_builder(name)
        if builder is None or type(builder).__name__ == "NotImplementedBuilder":
            continue  # not an op on this accelerator
        if not builder.is_compatible(verbose=False):
            results[builder.name] = "not buildable here (missing system library?)"
            continue
        try:
            builder.load(verbose=False)
            results[builder.name] = "ok"
        except Exception as err:  # report, don't crash: the runs that need the op will say more
            results[builder.name] = f"build failed: {str(err).splitlines()[0][:200]}"
        say(f"{builder.name}: {results[builder.name]}")
    return results


if __name__ == "__main__":
    import sys

    status = build_ops(nvme="--no-nvme" not in sys.argv)
    sys.exit(0 if all(v == "ok" for v in status.values()) else 1)
