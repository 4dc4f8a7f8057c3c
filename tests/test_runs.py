"""End-to-end: every shipped ds_configs JSON trains the debug model at world size 1 and 2 in real DeepSpeed engines
(several engines per launch: conftest.engine_runs), and a wheel trains by name. The other launchers (torchrun, two
nodes on one machine) run resume chains in test_checkpoint.py, where their losses must equal these runs'.

ZeRO is an exact transform of data-parallel Adam, so in fp32 every stage (and CPU/NVMe offload) must give the
zero0 run's per-step losses.
"""

import csv
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import FAST, REPO, STEPS, assert_losses_close, free_port, wandb_history

from zero_trainer.ds_config import available_ds_configs

pytestmark = pytest.mark.multiproc
CONFIGS = available_ds_configs()
REQUIRED_SUMMARY = ("params", "world_size", "ds_config_name", "ds_config", "precision", "steps", "tokens",
                    "first_loss", "final_loss", "eval_loss", "tokens_per_s", "peak_mem_bytes", "wall_s", "losses",
                    "activation_checkpointing")


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("ds_config", CONFIGS)
def test_every_ds_config_trains_and_matches_zero0(ds_config, world_size, engine_runs):
    summary = engine_runs[ds_config, world_size]
    assert all(key in summary for key in REQUIRED_SUMMARY), sorted(set(REQUIRED_SUMMARY) - set(summary))
    assert summary["ds_config_name"] == ds_config and summary["world_size"] == world_size
    assert summary["steps"] == STEPS and len(summary["losses"]) == STEPS
    losses = summary["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, f"loss did not fall: {losses}"
    assert_losses_close(losses, engine_runs["zero0", world_size]["losses"], 1e-4)
    assert summary["peak_mem_bytes"] > 0 and summary["tokens_per_s"] > 0
    if ds_config == "zero3_nvme":
        out = Path(summary["recipe"]["output_dir"])
        nvme = Path(summary["ds_config"]["zero_optimization"]["offload_param"]["nvme_path"])
        assert nvme.is_relative_to(out.resolve()), nvme  # default: under the output dir
        assert [p for p in nvme.rglob("*") if p.is_file()], f"no swap files under {nvme}"


def test_metrics_csv_has_a_row_per_step(engine_runs):
    out = Path(engine_runs["zero2", 1]["recipe"]["output_dir"])
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    for column in ("step", "loss", "lr", "grad_norm", "tokens_per_s"):
        assert column in header
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, STEPS + 1))
    assert (out / "monitor").is_dir()  # DeepSpeed's own csv monitor


def test_report_to_tensorboard_and_wandb_carry_metrics_csv(engine_runs):
    """The 2-rank zero2 run had train.report_to=[tensorboard,wandb]: rank 0 wrote one TensorBoard log and one
    offline wandb run, with HF Trainer's tag names and metrics.csv's values, and the final eval loss."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from zero_trainer.metrics import EVAL_TAG, TAGS

    summary = engine_runs["zero2", 2]
    out = Path(summary["recipe"]["output_dir"])
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    history = wandb_history(runs[0])
    def same(got: list[tuple], want: list[tuple], what: str):
        assert [s for s, _ in got] == [s for s, _ in want], what
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), what  # TensorBoard: float32

    for column, tag in TAGS.items():
        want = [(int(r["step"]), float(r[column])) for r in rows]
        same([(e.step, e.value) for e in events.Scalars(tag)], want, f"tensorboard {tag}")
        same([(h["_step"], h[tag]) for h in history if tag in h], want, f"wandb {tag}")
    final = [(STEPS, summary["eval_loss"])]
    same([(e.step, e.value) for e in events.Scalars(EVAL_TAG)], final, "tensorboard eval")
    same([(h["_step"], h[EVAL_TAG]) for h in history if EVAL_TAG in h], final, "wandb eval")


def test_bf16_trains(engine_runs):
    summary = engine_runs["zero2_bf16", 1]
    assert summary["precision"] == "bf16" and summary["ds_config"]["bf16"]["enabled"] is True
    losses = summary["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses


def test_wheel_trains_by_name_from_another_directory(engine_runs, tmp_path):
    """`pip wheel .` carries recipes/ and ds_configs/ as package data: unpacked on the path, with the checkout
    nowhere in sight, `python -m zero_trainer train --recipe debug --ds-config zero2` trains."""
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("zero_trainer-*.whl")
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    assert "zero_trainer/recipes/debug.yaml" in names and "zero_trainer/ds_configs/zero3_nvme.json" in names
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "zero_trainer", "train", "--recipe", "debug", "--ds-config", "zero2",
                           "--output-dir", "run", "--master-port", str(port), f"train.max_steps={STEPS}",
                           "train.precision=fp32", *FAST], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((elsewhere / "run" / "summary.json").read_text())
    assert Path(summary["recipe"]["recipe_path"]).resolve() == (site / "zero_trainer" / "recipes" / "debug.yaml")
    assert summary["ds_config_name"] == "zero2"
    assert_losses_close(summary["losses"], engine_runs["zero2", 1]["losses"], 1e-4)
