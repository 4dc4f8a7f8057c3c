"""Shared helpers: launch real zero-trainer runs (real processes, real DeepSpeed engines, gloo on CPU)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Small and fast, but a real corpus, tokenizer and model: the debug preset on the stdlib sources.
FAST = ["data.seq_len=64", "data.max_documents=300", "train.micro_batch=4", "train.eval_batches=1",
        "train.eval_every=0", "train.sample_tokens=4", "train.warmup_steps=2", "train.lr=3e-3"]


@pytest.fixture(scope="session", autouse=True)
def _test_cache(tmp_path_factory):
    """One tokenizer/token cache for the whole session, so CI starts clean but pays for it once."""
    if "ZERO_TRAINER_CACHE" not in os.environ:
        os.environ["ZERO_TRAINER_CACHE"] = str(tmp_path_factory.mktemp("zt_cache"))
    yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args, timeout=900, check=True, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "zero_trainer", *map(str, args)], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"zero-trainer {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def train(out: Path, ds_config="zero0", num_procs=1, steps=20, overrides=(), recipe="recipes/debug.yaml",
          extra=()) -> dict:
    """`zero-trainer train` end to end; returns summary.json. Also checks the run left no DeepSpeed shm
    all-reduce workspace behind in /dev/shm (RAM)."""
    port = free_port()
    run_cli("train", "--recipe", recipe, "--ds-config", ds_config, "--num-procs", num_procs, "--output-dir", out,
            "--master-port", port, *extra, f"train.max_steps={steps}", "train.precision=fp32", *FAST, *overrides)
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"the run left {[p.name for p in left]} in /dev/shm"
    return json.loads((out / "summary.json").read_text())


def read_summary(out: Path) -> dict:
    return json.loads((Path(out) / "summary.json").read_text())


def assert_losses_close(got, want, tol):
    assert len(got) == len(want), (len(got), len(want))
    worst = max(abs(a - b) for a, b in zip(got, want, strict=True))
    assert worst <= tol, f"max per-step loss difference {worst:.3g} > {tol}\n got {got}\nwant {want}"
