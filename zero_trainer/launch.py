"""Hand ranks to DeepSpeed's own launcher: its command line, a free rendezvous port, signals, the shm sweep.

DeepSpeed is the distributed engine; this module only builds its command and watches the process group.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .hardware import free_port
from .ops import remove_shm_buffers


def deepspeed_launcher() -> str:
    beside = Path(sys.executable).with_name("deepspeed")
    return str(beside) if beside.exists() else "deepspeed"


def launcher_command(num_procs: int | None, master_port: int, rank_args: list[str]) -> list[str]:
    """`deepspeed [--num_gpus N] --master_port P --module zero_trainer.train RANK_ARGS`."""
    import torch

    cmd = [deepspeed_launcher()]
    if not torch.cuda.is_available():
        cmd += ["--num_gpus", str(num_procs or 1)]  # CPU ranks: one unless asked for more
    elif num_procs:
        cmd += ["--num_gpus", str(num_procs)]
    return cmd + ["--master_port", str(master_port), "--module", "zero_trainer.train", *rank_args]


def run_launcher(cmd: list[str]) -> int:
    """Run the deepspeed launcher in its own process group; a SIGTERM/SIGINT to us goes to the whole group.

    DeepSpeed's top-level runner does not forward signals on a single node, so signalling only it would
    orphan the ranks. Each rank catches SIGTERM, checkpoints the current step and exits; we wait for that.
    """
    proc = subprocess.Popen(cmd, start_new_session=True)
    received = []

    def forward(signum, _frame):
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = proc.wait()
    if received:
        deadline = time.time() + 120  # the ranks are writing their checkpoint
        while time.time() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        return 128 + received[0]
    return code


def launch(num_procs: int | None, master_port: int | None, rank_args: list[str]) -> int:
    """Launch the ranks and wait; afterwards remove the shm workspaces killed ranks could not release."""
    port = master_port or free_port()
    cmd = launcher_command(num_procs, port, rank_args)
    print("launching: " + " ".join(cmd), flush=True)
    try:
        return run_launcher(cmd)
    finally:
        remove_shm_buffers(port)
