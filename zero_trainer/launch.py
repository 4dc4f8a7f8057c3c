"""Hand ranks to DeepSpeed's own launcher: its command line, a free rendezvous port, signals, the shm sweep.

DeepSpeed is the distributed engine; this module only builds its command and watches the process group.
"""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError, did_you_mean
from .hardware import free_port
from .ops import remove_shm_buffers

# deepspeed.launcher.runner._parse_hostfile's pattern: `hostname slots=N`; a line starting with # is a comment
HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")


@dataclass(frozen=True)
class MultiNode:
    """The nodes a hostfile names and how DeepSpeed's runner starts them: over ssh through `launcher`, or (no_ssh)
    only this node's ranks, as node `node_rank`, meeting the others at `master_addr`."""

    hostfile: Path
    slots: dict  # host -> ranks on it, in the file's order
    launcher: str | None = None
    no_ssh: bool = False
    node_rank: int | None = None
    master_addr: str | None = None

    @property
    def world_size(self) -> int:
        return sum(self.slots.values())

    @property
    def ranks_per_node(self) -> int:
        return next(iter(self.slots.values()))

    def runner_flags(self) -> list[str]:
        flags = ["--hostfile", str(self.hostfile)]
        flags += ["--launcher", self.launcher] if self.launcher else []
        flags += ["--no_ssh", "--node_rank", str(self.node_rank)] if self.no_ssh else []
        return flags + (["--master_addr", self.master_addr] if self.master_addr else [])


def read_hostfile(path) -> dict:
    """host -> slots from a DeepSpeed hostfile, or a UsageError naming the file and line."""
    where = "--hostfile"
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise UsageError(f"hostfile {path} not found", where, "give a file of 'hostname slots=N' lines") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"hostfile {path} cannot be read ({getattr(err, 'strerror', None) or err})", where,
                         "give a readable text file of 'hostname slots=N' lines") from None
    slots = {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        match = HOSTFILE_LINE.match(text)
        if not match:
            raise UsageError(f"{path}:{number} '{text}' is not 'hostname slots=N'", where,
                             "write one host per line, e.g. 'node0 slots=2' (# starts a comment)")
        host, count = match.group(1), int(match.group(2))
        if host in slots:
            raise UsageError(f"{path}:{number} names host {host} twice", where, "list each host once")
        if count < 1:
            raise UsageError(f"{path}:{number} gives {host} slots={count}", where,
                             "give every host slots >= 1, or leave it out")
        slots[host] = count
    if not slots:
        raise UsageError(f"hostfile {path} names no host", where, "add 'hostname slots=N' lines")
    if len(set(slots.values())) > 1:
        listed = ", ".join(f"{h} slots={n}" for h, n in slots.items())
        raise UsageError(f"hostfile {path} gives its hosts different slots ({listed}); the plan assumes the same "
                         "ranks on every node", where, "give every host the same slots=N")
    return slots


def multi_node(args) -> MultiNode | None:
    """`zero-trainer train`'s --hostfile, --launcher, --no-ssh, --node-rank, --master-addr, checked against each
    other as DeepSpeed's runner would take them; None without --hostfile."""
    values = {"--launcher": args.launcher, "--no-ssh": args.no_ssh or None, "--node-rank": args.node_rank,
              "--master-addr": args.master_addr}
    given = [flag for flag, value in values.items() if value is not None]  # --node-rank 0 is given
    if args.hostfile is None:
        if given:
            flag = given[0]
            raise UsageError(f"{flag} needs --hostfile", flag,
                             "add --hostfile H (lines 'hostname slots=N'), or drop it to train on this machine")
        return None
    if args.num_procs is not None:
        raise UsageError("--num-procs and --hostfile both set the ranks", "--num-procs",
                         "drop --num-procs: each host's slots=N in the hostfile are its ranks")
    if args.no_ssh:
        missing = [f for f in ("--node-rank", "--master-addr") if f not in given]
        if args.master_port is None:
            missing.append("--master-port")
        if missing:
            raise UsageError(f"--no-ssh needs {', '.join(missing)}", missing[0],
                             "start each node with --node-rank K (its line in the hostfile, from 0) and the same "
                             "--master-addr (node 0's address) and --master-port")
        if args.launcher is not None:
            raise UsageError(f"--launcher {args.launcher} is unused with --no-ssh (each node starts its own ranks)",
                             "--launcher", "drop --launcher, or drop --no-ssh to start every node from here")
    elif args.node_rank is not None:
        raise UsageError("--node-rank only applies with --no-ssh", "--node-rank",
                         "add --no-ssh to start this node by hand, or drop --node-rank to start every node from here")
    if args.launcher is not None:
        from deepspeed.launcher.runner import LAUNCHER_CLASSES

        if args.launcher.lower() not in LAUNCHER_CLASSES:
            raise UsageError(f"unknown launcher '{args.launcher}'", "--launcher",
                             did_you_mean(args.launcher.lower(), LAUNCHER_CLASSES))
    slots = read_hostfile(args.hostfile)
    if args.no_ssh and not 0 <= args.node_rank < len(slots):
        raise UsageError(f"--node-rank {args.node_rank} is not a host of {args.hostfile} ({len(slots)} hosts)",
                         "--node-rank", f"use 0 to {len(slots) - 1}, the host's line among the hosts")
    return MultiNode(Path(args.hostfile).absolute(), slots, args.launcher, args.no_ssh, args.node_rank,
                     args.master_addr)


def deepspeed_launcher() -> str:
    beside = Path(sys.executable).with_name("deepspeed")
    return str(beside) if beside.exists() else "deepspeed"


def launcher_command(num_procs: int | None, master_port: int, rank_args: list[str],
                     nodes: MultiNode | None = None) -> list[str]:
    """`deepspeed [--num_gpus N | --hostfile H ...] --master_port P --module zero_trainer.train RANK_ARGS`."""
    import torch

    cmd = [deepspeed_launcher()]
    if nodes is not None:  # the slots give the ranks: --num_gpus would replace every host's slots with N
        cmd += nodes.runner_flags()
    elif not torch.cuda.is_available():
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


def launch(num_procs: int | None, master_port: int | None, rank_args: list[str],
           nodes: MultiNode | None = None) -> int:
    """Launch the ranks and wait; afterwards remove the shm workspaces killed ranks could not release."""
    port = master_port or free_port()
    cmd = launcher_command(num_procs, port, rank_args, nodes)
    print("launching: " + " ".join(cmd), flush=True)
    try:
        return run_launcher(cmd)
    finally:
        remove_shm_buffers(port)
