"""Checkpoints never lose a step: exact resume, preemption, kill -9, other world sizes and stages, HF export.

Real launcher processes throughout; DeepSpeed does the saving, loading and universal conversion.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, REPO, assert_losses_close, read_summary, run_cli

from zero_trainer.checkpoint import COMPLETE, newest_complete, step_dirs

pytestmark = pytest.mark.multiproc
CKPT = ["train.save_every=5", "train.keep_last=3"]


def train(out, ds_config="zero2", num_procs=2, steps=20, extra=(), overrides=(), check=True):
    proc = run_cli("train", "--recipe", "recipes/debug.yaml", "--ds-config", ds_config, "--num-procs", num_procs,
                   "--output-dir", out, *extra, f"train.max_steps={steps}", "train.precision=fp32", *FAST, *CKPT,
                   *overrides, check=check)
    if not check:
        return proc
    return read_summary(out) if (Path(out) / "summary.json").exists() else None  # none when stopped early


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """20 uninterrupted steps per stage at world size 2: the curves every resume must reproduce."""
    return {stage: train(tmp_path_factory.mktemp(f"straight_{stage}"), stage)["losses"] for stage in ("zero2", "zero3")}


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_exact_resume(stage, straight, tmp_path):
    out = tmp_path / "run"
    train(out, stage, steps=20, overrides=["train.stop_at_step=10"])  # the schedule is 20 steps long
    assert not (out / "summary.json").exists() and newest_complete(out / "checkpoints").name == "step_00000010"
    resumed = train(out, stage, steps=20, extra=["--resume"])
    assert resumed["resumed_from"].endswith("step_00000010")
    assert len(resumed["losses"]) == 20  # the whole history, before and after the resume
    assert_losses_close(resumed["losses"], straight[stage], 1e-6)
    rows = (out / "metrics.csv").read_text().strip().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 21))


def test_exact_resume_bf16(tmp_path):
    bf16 = ["train.precision=bf16"]
    want = train(tmp_path / "straight", steps=12, overrides=bf16)["losses"]
    train(tmp_path / "run", steps=12, overrides=[*bf16, "train.save_every=3", "train.stop_at_step=6"])
    got = train(tmp_path / "run", steps=12, extra=["--resume"], overrides=[*bf16, "train.save_every=3"])["losses"]
    assert_losses_close(got, want, 1e-3)


def _start(out, steps, env=None):
    cmd = [sys.executable, "-m", "zero_trainer", "train", "--recipe", "recipes/debug.yaml", "--ds-config", "zero2",
           "--num-procs", "2", "--output-dir", str(out), f"train.max_steps={steps}", "train.precision=fp32", *FAST,
           "train.save_every=1000", "data.seq_len=128"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def _rank_pids(out) -> list[int]:
    """PIDs of the zero_trainer.train ranks writing into `out`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"zero_trainer.train" in cmd and str(out).encode() in cmd:
                pids.append(int(proc.name))
    return sorted(pids)


def _wait_for_step(out, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = out / "metrics.csv"
        if metrics.exists() and len(metrics.read_text().strip().splitlines()) > step:
            return
        time.sleep(0.2)
    raise AssertionError(f"run never reached step {step}")


@pytest.mark.parametrize("target", ["launcher", "one_rank"])
def test_sigterm_checkpoints_current_step_and_resume_loses_nothing(target, tmp_path):
    out = tmp_path / "run"
    proc = _start(out, steps=400)
    _wait_for_step(out, 3)
    victim = proc.pid if target == "launcher" else _rank_pids(out)[-1]
    os.kill(victim, signal.SIGTERM)
    t = time.time()
    log = proc.communicate(timeout=120)[0]
    assert time.time() - t < 60, "processes took too long to stop"
    assert not _rank_pids(out), "ranks still running after the launcher returned"
    ckpt = newest_complete(out / "checkpoints")
    assert ckpt is not None, log[-3000:]
    state = json.loads((ckpt / "zero_trainer_state.json").read_text())
    logged = len((out / "metrics.csv").read_text().strip().splitlines()) - 1
    assert state["step"] == logged >= 3, (state["step"], logged)  # the step in progress was saved
    summary = train(out, steps=state["step"] + 2, extra=["--resume"], overrides=["data.seq_len=128"])
    assert len(summary["losses"]) == state["step"] + 2
    assert summary["losses"][: state["step"]] == state["losses"]


@pytest.mark.parametrize("when", ["training", "saving"])
def test_kill_9_one_rank_resumes_from_last_complete(when, tmp_path):
    out = tmp_path / "run"
    env = {"ZERO_TRAINER_TEST_SAVE_DELAY_S": "30"} if when == "saving" else {}
    proc = subprocess.Popen(
        [sys.executable, "-m", "zero_trainer", "train", "--recipe", "recipes/debug.yaml", "--ds-config", "zero2",
         "--num-procs", "2", "--output-dir", str(out), "train.max_steps=400", "train.precision=fp32", *FAST,
         "train.save_every=4", "train.keep_last=2"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **env})
    if when == "saving":  # kill while the second checkpoint is being written (its shards exist, no COMPLETE)
        deadline = time.time() + 300
        while not (out / "checkpoints" / "step_00000008" / "rng_rank1.pt").exists():
            assert time.time() < deadline and proc.poll() is None, "never reached the second save"
            time.sleep(0.1)
    else:
        import random

        _wait_for_step(out, random.randint(5, 11))
    os.kill(_rank_pids(out)[-1], signal.SIGKILL)
    proc.communicate(timeout=180)
    assert proc.returncode != 0
    ckpt = newest_complete(out / "checkpoints")
    assert ckpt is not None
    if when == "saving":
        assert ckpt.name == "step_00000004"
        half = out / "checkpoints" / "step_00000008"
        assert half.is_dir() and not (half / COMPLETE).exists()  # half-written: present, never taken
    step = json.loads((ckpt / "zero_trainer_state.json").read_text())["step"]
    summary = train(out, steps=step + 4, extra=["--resume"], overrides=["train.save_every=4", "train.keep_last=2"])
    assert summary["resumed_from"].endswith(ckpt.name) and len(summary["losses"]) == step + 4
    assert all(p.name != "step_00000008" or (p / COMPLETE).exists() for p in step_dirs(out / "checkpoints"))


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_resume_on_another_world_size(stage, straight, tmp_path):
    """2 ranks -> 1 (grad_accum 2 keeps the global batch) -> 2 again, through universal checkpoints."""
    out = tmp_path / "run"
    train(out, stage, num_procs=2, steps=20, overrides=["train.stop_at_step=10"])
    train(out, stage, num_procs=1, steps=20, extra=["--resume"],
          overrides=["train.grad_accum=2", "train.stop_at_step=15"])
    state = json.loads((newest_complete(out / "checkpoints") / "zero_trainer_state.json").read_text())
    assert state["step"] == 15 and state["world_size"] == 1
    assert (out / "checkpoints" / "universal" / "step_00000010").is_dir()
    two = train(out, stage, num_procs=2, steps=20, extra=["--resume"])
    assert two["world_size"] == 2 and two["resumed_from"].endswith("step_00000015")
    assert_losses_close(two["losses"], straight[stage], 1e-3)


def test_resume_with_another_stage(straight, tmp_path):
    """zero2 -> zero1 goes through a universal checkpoint and continues the same curve."""
    out = tmp_path / "run"
    train(out, "zero2", steps=20, overrides=["train.stop_at_step=10"])
    summary = train(out, "zero1", steps=20, extra=["--resume"])
    assert summary["ds_config_name"] == "zero1" and len(summary["losses"]) == 20
    assert (out / "checkpoints" / "universal" / "step_00000010").is_dir()
    assert_losses_close(summary["losses"], straight["zero2"], 1e-3)


def test_stage_change_across_zero3_is_refused_before_launch(tmp_path):
    """DeepSpeed 0.19.8's universal loader cannot cross the stage-3 layout (zero3 -> zero1 and zero1 -> zero3
    both die in state_dict_factory.check_ckpt_list); we say so in one line instead of a rank traceback."""
    out = tmp_path / "run"
    train(out, "zero3", steps=20, overrides=["train.stop_at_step=5"])
    listing = sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*"))
    proc = train(out, "zero1", steps=20, extra=["--resume"], check=False)
    assert proc.returncode == 2 and "cannot resume a ZeRO-3 checkpoint at ZeRO-1" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*")) == listing


def test_export_zero3_two_ranks_loads_in_vanilla_transformers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from zero_trainer.checkpoint import newest_complete
    from zero_trainer.export import gather_state_dict
    from zero_trainer.model import build_model, model_config

    out = tmp_path / "run"
    train(out, "zero3", steps=10)
    hf_dir = tmp_path / "hf"
    run_cli("export", out / "checkpoints", hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert type(model) is LlamaForCausalLM
    record = json.loads((hf_dir / "export.json").read_text())
    assert record["step"] == 10 and record["zero_stage"] == 3 and record["world_size"] == 2
    assert "model.safetensors" in record["files_sha256"]
    # the trained model, rebuilt from DeepSpeed's gathered fp32 weights, gives the same logits
    ckpt = newest_complete(out / "checkpoints")
    ours = build_model(model_config("debug"))
    ours.load_state_dict(gather_state_dict(ckpt, 3), strict=False)
    ours.tie_weights()
    x = torch.randint(0, 2048, (2, 32))
    with torch.no_grad():
        diff = (model(x).logits - ours(x).logits).abs().max().item()
    assert diff <= 1e-4, diff
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    ids = tokenizer("def main():", return_tensors="pt").input_ids
    text = tokenizer.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0])
    assert text.startswith("def main():") and len(text) > len("def main():")

    # bad input: an existing export target is refused unless --overwrite; nothing in it changes
    before = {p.name: p.stat().st_mtime_ns for p in hf_dir.iterdir()}
    proc = run_cli("export", out / "checkpoints", hf_dir, check=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in hf_dir.iterdir()} == before
    run_cli("export", ckpt, hf_dir, "--overwrite")
    assert json.loads((hf_dir / "export.json").read_text())["step"] == 10

    # bad input: resuming into another model shape, starting fresh over checkpoints
    for extra, overrides, what in ((["--resume"], ["model.preset=minimind-26m"], "different model"),
                                   ([], [], "already holds checkpoints")):
        listing = sorted(str(p) for p in out.rglob("*"))
        proc = train(out, "zero3", steps=12, extra=extra, overrides=overrides, check=False)
        assert proc.returncode == 2 and what in proc.stderr, proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1
        assert sorted(str(p) for p in out.rglob("*")) == listing


def test_export_and_resume_refuse_missing_or_incomplete_checkpoints(tmp_path):
    target = tmp_path / "target"
    empty = tmp_path / "empty" / "checkpoints"
    empty.mkdir(parents=True)
    for args, what in (([empty, target / "x"], "no complete checkpoint"),
                       ([tmp_path / "missing", target / "x"], "does not exist")):
        proc = run_cli("export", *args, check=False)
        assert proc.returncode == 2 and what in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    (empty / "step_00000001").mkdir()
    (empty / "step_00000001" / "zero_trainer_state.json").write_text("{}")
    proc = run_cli("export", empty, target, check=False)
    assert proc.returncode == 2 and "no complete checkpoint" in proc.stderr
    proc = train(empty.parent, steps=4, extra=["--resume"], check=False)
    assert proc.returncode == 2 and "no complete checkpoint" in proc.stderr, proc.stderr[-2000:]
    assert not target.exists() and not (empty.parent / "metrics.csv").exists()
