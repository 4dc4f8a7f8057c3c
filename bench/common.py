"""Shared bits of the benchmarks: where results go, what machine made them, running under a launcher."""

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Tests point this elsewhere so they never touch the committed results.
RESULTS = Path(os.environ.get("ZERO_TRAINER_BENCH_RESULTS", REPO / "bench" / "results"))


def machine() -> dict:
    import deepspeed
    import torch
    import transformers

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": datetime.date.today().isoformat()}


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    result = {"name": name, "command": f"python -m bench.{name}", "machine": machine(), **result}
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def median(values) -> float:
    return statistics.median(values)


def ratio_ci95(a: list[float], b: list[float], resamples: int = 4000, seed: int = 0) -> list[float]:
    """95% bootstrap interval of median(a) / median(b) where a[i] and b[i] were measured together (one round or
    one pair of launches): whole pairs are resampled, so what drifts between pairs cancels out."""
    import random

    assert len(a) == len(b) and a, "paired samples"
    rng, n = random.Random(seed), len(a)
    ratios = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        ratios.append(median([a[i] for i in idx]) / median([b[i] for i in idx]))
    ratios.sort()
    return [ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]]


class ChildFailed(RuntimeError):
    """A benchmark's child process exited non-zero; the message ends with its last lines."""


def run_child(cmd: list, tail_lines: int = 40, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run with the output captured; when the child fails, its last lines (stdout, then stderr) are printed
    and ChildFailed raised: a bare CalledProcessError of a captured child says nothing of why."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-tail_lines // 2:] + proc.stderr.splitlines()[-tail_lines:])
        message = f"child exited {proc.returncode}: {' '.join(map(str, cmd))}\n--- its last lines\n{tail}"
        print(message, file=sys.stderr, flush=True)
        raise ChildFailed(message)
    return proc


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ


def relaunch(module: str, args: list[str], num_procs: int = 1) -> int:
    """Run `python -m module --worker args` under DeepSpeed's launcher (1 rank by default)."""
    from zero_trainer.hardware import free_port
    from zero_trainer.launch import deepspeed_launcher
    from zero_trainer.ops import remove_shm_buffers

    port = free_port()
    cmd = [deepspeed_launcher(), "--num_gpus", str(num_procs), "--master_port", str(port), "--module", module,
           "--worker", *args]
    try:
        return subprocess.call(cmd, cwd=REPO)
    finally:
        remove_shm_buffers(port)


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(row) for row in cells)])
