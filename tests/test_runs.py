"""End-to-end: every shipped ds_configs JSON trains the debug model at world size 1 and 2, in real processes.

ZeRO is an exact transform of data-parallel Adam, so in fp32 every stage (and CPU/NVMe offload) must give the
zero0 run's per-step losses.
"""

import os
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, FAST, REPO, assert_losses_close, free_port, read_summary, train

from zero_trainer.ds_config import available_ds_configs

pytestmark = pytest.mark.multiproc
STEPS = 20
CONFIGS = available_ds_configs()
REQUIRED_SUMMARY = ("params", "world_size", "ds_config_name", "ds_config", "precision", "steps", "tokens",
                    "first_loss", "final_loss", "eval_loss", "tokens_per_s", "peak_mem_bytes", "wall_s", "losses")


@pytest.fixture(scope="module")
def zero0_runs(tmp_path_factory):
    """The reference: zero0 at each world size, run once for the module."""
    return {ws: train(tmp_path_factory.mktemp(f"zero0_ws{ws}"), "zero0", ws, STEPS) for ws in (1, 2)}


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("ds_config", CONFIGS)
def test_every_ds_config_trains_and_matches_zero0(ds_config, world_size, zero0_runs, tmp_path):
    if ds_config == "zero0":
        summary = zero0_runs[world_size]
    else:
        summary = train(tmp_path / "run", ds_config, world_size, STEPS)
    assert all(key in summary for key in REQUIRED_SUMMARY), sorted(set(REQUIRED_SUMMARY) - set(summary))
    assert summary["ds_config_name"] == ds_config and summary["world_size"] == world_size
    assert summary["steps"] == STEPS and len(summary["losses"]) == STEPS
    losses = summary["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, f"loss did not fall: {losses}"
    assert_losses_close(losses, zero0_runs[world_size]["losses"], 1e-4)
    assert summary["peak_mem_bytes"] > 0 and summary["tokens_per_s"] > 0
    if ds_config == "zero3_nvme":
        nvme = Path(summary["ds_config"]["zero_optimization"]["offload_param"]["nvme_path"])
        assert nvme.is_relative_to(tmp_path), nvme  # default: under the output dir
        swap_files = [p for p in nvme.rglob("*") if p.is_file()]
        assert swap_files, f"no swap files under {nvme}"


def test_metrics_csv_has_a_row_per_step(zero0_runs, tmp_path):
    out = tmp_path / "run"
    train(out, "zero2", 1, 6, overrides=["train.eval_every=3"])
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    for column in ("step", "loss", "lr", "grad_norm", "tokens_per_s"):
        assert column in header
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, 7))
    assert (out / "monitor").is_dir()  # DeepSpeed's own csv monitor


def test_bf16_trains(tmp_path):
    summary = train(tmp_path / "run", "zero2", 1, STEPS, overrides=["train.precision=bf16"])
    assert summary["precision"] == "bf16" and summary["ds_config"]["bf16"]["enabled"] is True
    losses = summary["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses


def _launch_module(launcher_args, out, port_env=None):
    return subprocess.Popen(
        [*launcher_args, "--recipe", "recipes/debug.yaml", "--ds-config", "zero2", "--output-dir", str(out),
         f"train.max_steps={STEPS}", "train.precision=fp32", *FAST],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(port_env or {})})


def test_two_nodes_on_one_machine_equal_single_node(zero0_runs, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port, out = free_port(), tmp_path / "run"
    procs = [_launch_module([str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(k),
                             "--master_addr", "127.0.0.1", "--master_port", str(port),
                             "--module", "zero_trainer.train"], out) for k in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    summary = read_summary(out)
    assert summary["world_size"] == 2
    assert_losses_close(summary["losses"], zero0_runs[2]["losses"], 1e-4)


def test_torchrun_runs_the_same_module(zero0_runs, tmp_path):
    out = tmp_path / "run"
    proc = _launch_module([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
                           "-m", "zero_trainer.train"], out)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-4000:]
    assert_losses_close(read_summary(out)["losses"], zero0_runs[2]["losses"], 1e-4)


def test_bare_deepspeed_launcher_leaves_no_shm_workspace(zero0_runs, tmp_path):
    """DeepSpeed's CPU shm all-reduce never unlinks its 64 MiB /dev/shm files; each rank of ours unlinks its own
    once all have mapped them. Launched without zero-trainer's sweep, so only the ranks' own release counts."""
    port, out = free_port(), tmp_path / "run"
    proc = _launch_module([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
                           "--module", "zero_trainer.train"], out)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-4000:]
    assert_losses_close(read_summary(out)["losses"], zero0_runs[2]["losses"], 1e-4)
    assert not sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
