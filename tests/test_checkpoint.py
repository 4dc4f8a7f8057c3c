"""Checkpoints never lose a step: exact resume, preemption, kill -9, other world sizes and stages, HF export.

Real launcher processes throughout; DeepSpeed does the saving, loading and universal conversion. Scenarios are
chained — each launch continues the last one's output dir, through another launcher (DeepSpeed's, torchrun, two
DeepSpeed "nodes" on this machine, `zero-trainer train`) — so a chain of two or three launches checks what used to
take a dozen: exact resume -> another world size -> another stage -> export. Each chain starts from a checkpoint
of the straight run it must reproduce (conftest.engine_runs keeps one every 3 steps); refusals (nothing launches)
go through the CLI in-process.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    BASE,
    REPO,
    STEPS,
    assert_losses_close,
    fork_run,
    free_port,
    launch_ranks,
    read_summary,
    run_cli,
)

from zero_trainer.checkpoint import COMPLETE, newest_complete, step_dirs

pytestmark = pytest.mark.multiproc


def refused(capsys, out, *args) -> str:
    """`zero-trainer train ...` in this process: must exit 2 with one error line and leave `out` untouched."""
    from zero_trainer.cli import main

    listing = sorted((str(p), p.stat().st_mtime_ns) for p in Path(out).rglob("*"))
    capsys.readouterr()
    code = main(["train", "--recipe", "recipes/debug.yaml", "--output-dir", str(out), *BASE, *map(str, args)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert sorted((str(p), p.stat().st_mtime_ns) for p in Path(out).rglob("*")) == listing
    return err


def state_of(ckpt: Path) -> dict:
    return json.loads((ckpt / "zero_trainer_state.json").read_text())


def metrics_steps(out: Path) -> list[int]:
    return [int(r.split(",")[0]) for r in (out / "metrics.csv").read_text().strip().splitlines()[1:]]


SAVE = ["train.save_every=3", "train.keep_last=3"]


def test_zero2_chain_two_nodes_exact_resume_then_world_size_and_stage_export(engine_runs, tmp_path, capsys):
    """From zero2's step-3 checkpoint (2 ranks): resume exactly as two nodes on one machine (two `deepspeed
    --no_ssh --node_rank K` launchers), stopping at 6 -> zero1 on 1 rank (grad_accum 2 keeps the global batch) to
    12: world size and stage change at once, through a universal checkpoint -> export."""
    straight = engine_runs["zero2", 2]["losses"]
    out = fork_run(engine_runs["zero2", 2], 3, tmp_path / "run")

    launch_ranks(out, "zero2", 2, resume=True, overrides=[*SAVE, "train.stop_at_step=6"], launcher="two_nodes")
    assert not (out / "summary.json").exists()  # stopped mid-schedule: a checkpoint, no summary
    state = state_of(newest_complete(out / "checkpoints"))
    assert state["step"] == 6 and len(state["losses"]) == 6 and state["world_size"] == 2
    assert_losses_close(state["losses"], straight[:6], 1e-6)  # exact; the first 3 from before the resume
    assert metrics_steps(out) == list(range(1, 7))

    summary = launch_ranks(out, "zero1", 1, resume=True, overrides=[*SAVE, "train.grad_accum=2"])
    assert summary["ds_config_name"] == "zero1" and summary["world_size"] == 1 and len(summary["losses"]) == STEPS
    assert summary["resumed_from"].endswith("step_00000006")
    assert (out / "checkpoints" / "universal" / "step_00000006").is_dir()
    assert_losses_close(summary["losses"], straight, 1e-3)
    assert metrics_steps(out) == list(range(1, STEPS + 1))
    assert [p.name for p in step_dirs(out / "checkpoints")] == ["step_00000006", "step_00000009", "step_00000012"]

    _export_loads_in_vanilla_transformers(out, tmp_path / "hf", capsys, step=STEPS, stage=1, world_size=1)


def test_zero3_chain_refusals_torchrun_exact_resume_world_sizes_export(engine_runs, tmp_path, capsys):
    """From zero3's step-3 checkpoint: refusals (stage change across ZeRO-3, another model, a fresh run over
    checkpoints) -> exact resume under torchrun to 6 -> 1 rank to 9 -> `zero-trainer train --resume` on 2 ranks
    to 12 (more ranks than saved) -> export of a 2-rank ZeRO-3 checkpoint."""
    straight = engine_runs["zero3", 2]["losses"]
    out = fork_run(engine_runs["zero3", 2], 3, tmp_path / "run")

    # DeepSpeed 0.19.8's universal loader cannot cross the stage-3 layout (zero3 -> zero1 dies in
    # state_dict_factory.check_ckpt_list): one line before launching instead of a rank traceback.
    err = refused(capsys, out, "--ds-config", "zero1", "--resume")
    assert "cannot resume a ZeRO-3 checkpoint at ZeRO-1" in err
    assert "different model" in refused(capsys, out, "--ds-config", "zero3", "--resume", "model.preset=minimind-26m")
    assert "already holds checkpoints" in refused(capsys, out, "--ds-config", "zero3")

    launch_ranks(out, "zero3", 2, resume=True, overrides=[*SAVE, "train.stop_at_step=6"], launcher="torchrun")
    assert_losses_close(state_of(newest_complete(out / "checkpoints"))["losses"], straight[:6], 1e-6)
    launch_ranks(out, "zero3", 1, resume=True, overrides=[*SAVE, "train.grad_accum=2", "train.stop_at_step=9"])
    run_cli("train", "--recipe", "recipes/debug.yaml", "--ds-config", "zero3", "--num-procs", 2, "--output-dir", out,
            "--resume", *BASE, *SAVE)
    two = read_summary(out)
    assert two["world_size"] == 2 and two["resumed_from"].endswith("step_00000009")
    assert_losses_close(two["losses"], straight, 1e-3)

    _export_loads_in_vanilla_transformers(out, tmp_path / "hf", capsys, step=STEPS, stage=3, world_size=2)


def _export_loads_in_vanilla_transformers(out: Path, hf_dir: Path, capsys, step: int, stage: int, world_size: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from zero_trainer.cli import main
    from zero_trainer.export import gather_state_dict
    from zero_trainer.model import build_model, model_config

    assert main(["export", str(out / "checkpoints"), str(hf_dir)]) == 0
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert type(model) is LlamaForCausalLM
    record = json.loads((hf_dir / "export.json").read_text())
    assert record["step"] == step and record["zero_stage"] == stage and record["world_size"] == world_size
    assert "model.safetensors" in record["files_sha256"]
    # the trained model, rebuilt from DeepSpeed's gathered fp32 weights, gives the same logits
    ckpt = newest_complete(out / "checkpoints")
    ours = build_model(model_config("debug"))
    ours.load_state_dict(gather_state_dict(ckpt, stage), strict=False)
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
    capsys.readouterr()
    assert main(["export", str(out / "checkpoints"), str(hf_dir)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in hf_dir.iterdir()} == before
    assert main(["export", str(ckpt), str(hf_dir), "--overwrite"]) == 0
    assert json.loads((hf_dir / "export.json").read_text())["step"] == step


def test_bf16_exact_resume(engine_runs, tmp_path):
    want = engine_runs["zero2_bf16", 2]["losses"]
    out = fork_run(engine_runs["zero2_bf16", 2], 6, tmp_path / "run")
    got = launch_ranks(out, "zero2", 2, resume=True, overrides=["train.precision=bf16", *SAVE])
    assert got["resumed_from"].endswith("step_00000006")
    assert_losses_close(got["losses"], want, 1e-3)


def _start(out, steps=400, env=None, resume=False, overrides=(), cli=False):
    """A long run in the background: through `zero-trainer train` (cli, DeepSpeed's launcher) or torchrun."""
    args = ["--recipe", "recipes/debug.yaml", "--ds-config", "zero2", "--output-dir", str(out),
            *(["--resume"] if resume else []), *BASE, f"train.max_steps={steps}", "data.seq_len=128", *overrides]
    launcher = ([sys.executable, "-m", "zero_trainer", "train", "--num-procs", "2"] if cli else
                [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "2", "--master-port",
                 str(free_port()), "-m", "zero_trainer.train"])
    return subprocess.Popen([*launcher, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def _rank_pids(out) -> list[int]:
    """PIDs of the `python -m zero_trainer.train` ranks writing into `out` (not the launchers)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            is_rank = any(a == b"-m" and b == b"zero_trainer.train" for a, b in zip(cmd, cmd[1:], strict=False))
            if is_rank and str(out).encode() in cmd:
                pids.append(int(proc.name))
    return sorted(pids)


def _wait_for_step(out, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before step %d" % step
        metrics = out / "metrics.csv"
        if metrics.exists() and len(metrics.read_text().strip().splitlines()) > step:
            return
        time.sleep(0.1)
    raise AssertionError(f"run never reached step {step}")


def _stop(proc, victim, sig) -> str:
    os.kill(victim, sig)
    t = time.time()
    log = proc.communicate(timeout=120)[0]
    assert time.time() - t < 60, "processes took too long to stop"
    return log


def test_preemption_chain_sigterm_and_kill_9_lose_nothing(tmp_path):
    """One output dir, four launches: SIGTERM to `zero-trainer train`, then to one rank (each saves the step in
    progress); kill -9 of a rank in the middle of training, while a checkpoint is half written (resume takes the
    last complete one and writes that step again); then the run finishes with the whole history."""
    out = tmp_path / "run"
    logged = lambda: len((out / "metrics.csv").read_text().strip().splitlines()) - 1  # noqa: E731
    history = []
    for target, at in (("launcher", 3), ("one_rank", 2)):
        proc = _start(out, resume=bool(history), overrides=["train.save_every=1000"], cli=target == "launcher")
        _wait_for_step(out, len(history) + at, proc)
        log = _stop(proc, proc.pid if target == "launcher" else _rank_pids(out)[-1], signal.SIGTERM)
        assert not _rank_pids(out), "ranks still running after the launcher returned"
        ckpt = newest_complete(out / "checkpoints")
        assert ckpt is not None, log[-3000:]
        state = state_of(ckpt)
        assert state["step"] == logged() >= len(history) + at, (target, state["step"], logged())
        assert state["losses"][: len(history)] == history  # the resumed run continued the same history
        history = state["losses"]
    sigterm_step = len(history)

    # kill -9 while the next checkpoint is being written: its shards exist, COMPLETE does not
    save = ["train.save_every=4", "train.keep_last=2"]
    proc = _start(out, resume=True, overrides=save, env={"ZERO_TRAINER_TEST_SAVE_DELAY_S": "5"})
    half = out / "checkpoints" / f"step_{(sigterm_step // 4 + 1) * 4:08d}"
    deadline = time.time() + 300
    while not (half / "rng_rank1.pt").exists():
        assert time.time() < deadline and proc.poll() is None, "never reached the save"
        time.sleep(0.1)
    _stop(proc, _rank_pids(out)[-1], signal.SIGKILL)
    assert proc.returncode != 0
    assert newest_complete(out / "checkpoints").name == f"step_{sigterm_step:08d}"
    assert half.is_dir() and not (half / COMPLETE).exists()  # half-written: present, never taken

    # the run resumes from the last complete checkpoint and saves the half-written step again, complete this time
    ckpt = newest_complete(out / "checkpoints")
    summary = launch_ranks(out, "zero2", 2, steps=int(half.name[5:]) + 2, resume=True,
                           overrides=["data.seq_len=128", *save])
    assert summary["resumed_from"].endswith(ckpt.name) and len(summary["losses"]) == int(half.name[5:]) + 2
    assert (half / COMPLETE).exists()
    assert summary["losses"][:sigterm_step] == history
    assert all((p / COMPLETE).exists() for p in step_dirs(out / "checkpoints"))


def test_export_and_resume_refuse_missing_or_incomplete_checkpoints(tmp_path, capsys):
    from zero_trainer.cli import main

    target = tmp_path / "target"
    empty = tmp_path / "empty" / "checkpoints"
    empty.mkdir(parents=True)
    (empty / "step_00000001").mkdir()
    (empty / "step_00000001" / "zero_trainer_state.json").write_text("{}")
    for args, what in (([empty, target], "no complete checkpoint"),
                       ([tmp_path / "missing", target / "x"], "does not exist")):
        capsys.readouterr()
        assert main(["export", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert what in err and len(err.strip().splitlines()) == 1, err
    assert "no complete checkpoint" in refused(capsys, empty.parent, "--resume")
    assert not target.exists() and not (empty.parent / "metrics.csv").exists()
