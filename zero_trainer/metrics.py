"""Small logging helpers for the loop: metrics.csv, summary.json, the progress bar, memory readings."""

import csv
import json
import os
import resource

import torch


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_bytes() -> int:
    """Peak of this process: allocated accelerator memory on GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def device_memory_bytes() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else current_rss_bytes()


class MetricsLog:
    """metrics.csv, one row per logged step, flushed at once so a crash keeps what was logged."""

    COLUMNS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "step_s", "mem_bytes", "eval_loss", "time")

    def __init__(self, path, resume_step: int | None = None):
        kept = []
        if resume_step is not None and os.path.exists(path):
            # rows past the checkpoint were trained again after the resume: keep only the ones before it
            with open(path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if row.get("step") and int(row["step"]) <= resume_step]
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.COLUMNS)
        self.writer.writeheader()
        self.writer.writerows({k: row.get(k, "") for k in self.COLUMNS} for row in kept)
        self.file.flush()

    def write(self, row: dict) -> None:
        self.writer.writerow({k: ("" if row.get(k) is None else _plain(row[k])) for k in self.COLUMNS})
        self.file.flush()


def _plain(value):
    return value.item() if isinstance(value, torch.Tensor) else value


def bar_fields(row: dict) -> dict:
    return {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}", "tok/s": f"{row['tokens_per_s']:.0f}",
            "mem": f"{row['mem_bytes'] / 2**20:.0f}MiB"}


def progress_bar(total: int, enabled: bool, initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True,
                mininterval=1.0)


def write_summary(path, summary: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2, default=_plain)
    os.replace(tmp, path)
