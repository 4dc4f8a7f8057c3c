"""Small logging helpers for the loop: metrics.csv (and TensorBoard / wandb beside it), summary.json, the progress
bar, memory readings."""

import contextlib
import csv
import ctypes
import importlib.util
import json
import os
import resource
from pathlib import Path

import torch

from .errors import UsageError

# metrics.csv column -> the tag HF Trainer gives the same value (TensorBoard and wandb).
TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
        "mem_bytes": "train/mem_bytes"}
EVAL_TAG = "eval/loss"
_INSTALL = {"tensorboard": "pip install 'zero_trainer[tensorboard]' (or: pip install tensorboard)",
            "wandb": "pip install 'zero_trainer[wandb]' (or: pip install wandb)"}


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_bytes() -> int:
    """Peak of this process: allocated accelerator memory on GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (host memory, on any machine) since it started or since
    reset_peak_rss()."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@contextlib.contextmanager
def heap_trimmed_per_parameter():
    """Within: glibc's malloc_trim after every parameter a module registers. A model built under deepspeed.zero.Init
    creates each tensor whole and frees it once partitioned; glibc keeps those freed pages (below its mmap threshold)
    in the heap, fragmented by the partitions allocated between them: 0.25 GiB of a 1B model's 1.85 GiB load peak on 2
    ranks (bench/results/load.json). Trimming as the build goes gives them back. A no-op without glibc."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        yield
        return
    def trim_heap(*_):
        trim(0)  # and return None: a value returned here would replace the parameter

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(trim_heap)
    try:
        yield
    finally:
        handle.remove()
        trim(0)


def reset_peak_rss() -> None:
    """Start the high-water mark again from the current RSS (Linux: /proc/self/clear_refs "5"), so a peak measured
    afterwards is this phase's, not an earlier run's in the same process (tests run several). Best effort."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def device_memory_bytes() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else current_rss_bytes()


def check_reporters(names: list[str]) -> None:
    """Each of train.report_to is installed (checked before launch: a rank would fail only after the engine)."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise UsageError(f"train.report_to names {name}, which is not installed", "train.report_to",
                             _INSTALL[name])


class Reporters:
    """TensorBoard events under OUT/tensorboard and an offline wandb run under OUT/wandb, with HF's tag names.

    On resume TensorBoard drops the events past the checkpoint (purge_step), as metrics.csv drops its rows."""

    def __init__(self, names: list[str], out: Path, resume_step: int | None = None, config: dict | None = None):
        self.tensorboard = self.wandb = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(out / "tensorboard"),
                                             purge_step=resume_step + 1 if resume_step is not None else None)
        if "wandb" in names:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project="zero_trainer", name=out.name, dir=str(out), mode="offline",
                                    config=config or {})

    def write(self, step: int, values: dict) -> None:
        """values: tag -> number (None skipped)."""
        values = {tag: float(_plain(v)) for tag, v in values.items() if v is not None}
        if self.tensorboard is not None:
            for tag, value in values.items():
                self.tensorboard.add_scalar(tag, value, step)
            self.tensorboard.flush()
        if self.wandb is not None and values:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


class MetricsLog:
    """metrics.csv, one row per logged step, flushed at once so a crash keeps what was logged; the same values
    go to the reporters (train.report_to)."""

    # aux_loss: a MoE's load-balancing loss (summed over layers, before its coefficient), blank for dense models
    COLUMNS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "step_s", "mem_bytes", "eval_loss", "time",
               "aux_loss")

    def __init__(self, path, resume_step: int | None = None, reporters: Reporters | None = None):
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
        self.reporters = reporters

    def write(self, row: dict) -> None:
        self.writer.writerow({k: ("" if row.get(k) is None else _plain(row[k])) for k in self.COLUMNS})
        self.file.flush()
        if self.reporters is not None:
            self.reporters.write(row["step"], {tag: row.get(key) for key, tag in TAGS.items()})

    def eval(self, step: int, loss: float) -> None:
        """An evaluation at `step` (the reporters' eval/loss; metrics.csv carries it in the step's row)."""
        if self.reporters is not None:
            self.reporters.write(step, {EVAL_TAG: loss})

    def close(self) -> None:
        self.file.close()
        if self.reporters is not None:
            self.reporters.close()


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
