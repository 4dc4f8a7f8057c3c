"""Shared helpers: launch real zero-trainer runs (real processes, real DeepSpeed engines, gloo on CPU)."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from zero_trainer.hardware import free_port  # noqa: F401  (tests import it from here)

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


def run_cli(*args, timeout=900, check=True, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "zero_trainer", *map(str, args)], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"zero-trainer {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def launch_engines(root: Path, world_size: int, runs: dict[str, list[str] | dict],
                   env: dict | None = None) -> dict[str, dict]:
    """Several whole runs (name -> recipe overrides) one after another in one `torchrun` launch of
    tests/engines_check.py; returns name -> summary.json. Checks no shm workspace was left behind."""
    spec = [{"output_dir": str(root / run.get("dir", name)), "overrides": list(run["overrides"]),
             "resume": run.get("resume", False),
             "fork": [str(root / run["fork"][0]), run["fork"][1]] if run.get("fork") else None}
            for name, run in ((n, r if isinstance(r, dict) else {"overrides": r}) for n, r in runs.items())]
    (root / "spec.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "spec.json").write_text(json.dumps(spec))
    port = free_port()
    proc = subprocess.run([str(BIN / "torchrun"), "--nproc-per-node", str(world_size), "--master-port", str(port),
                           "tests/engines_check.py", str(root / "spec.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=1200, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"the launch left {[p.name for p in left]} in /dev/shm"
    return {name: read_summary(root / (run.get("dir", name) if isinstance(run, dict) else name))
            for name, run in runs.items()}


# Every shipped JSON at world size 1 and 2, plus bf16, each a whole run of the debug recipe.
STEPS = 12
BASE = ["train.precision=fp32", f"train.max_steps={STEPS}", *FAST]
SAVED = ["train.save_every=3", "train.keep_last=10"]  # checkpoints the resume tests start from
# bench/plan_calibration.py's RUN_ARGS (seq_len 128, micro batch 4, 3 steps): test_plan's live calibration row.
CALIBRATION_RUN_ARGS = ["train.max_steps=3", "train.eval_batches=1", "train.eval_every=0", "train.sample_tokens=0",
                        "data.seq_len=128", "data.max_documents=400", "train.micro_batch=4", "train.warmup_steps=1",
                        "train.log_every=1"]


class EngineRuns:
    """(name, launch) -> summary of a whole run: every ds_configs JSON in fp32, and `zero2_bf16`, at world size
    1 and 2 (and `calibration`, `seq256`, `tiled` at 1), and the model-parallel runs (launch "parallel": 2 ranks,
    PARALLEL_RUNS). Each launch is made the first time one of its runs is asked for, once per test session: under
    pytest-xdist the first worker to ask launches it while holding a file lock and the other reads its summaries.
    At world size 2, zero2, zero3 and zero2_bf16 keep a checkpoint every 3 steps, for the resume tests; at world
    size 1 zero0 does, for the tensor-parallel export test."""

    def __init__(self, root: Path):
        self.root, self.by_world_size = root, {}

    def __getitem__(self, key: tuple[str, int]) -> dict:
        name, ws = key
        if ws not in self.by_world_size:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.root / f"ws{ws}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be launching it now
                done = self.root / f"ws{ws}.json"
                if not done.exists():
                    done.write_text(json.dumps(self._launch(ws)))
                self.by_world_size[ws] = json.loads(done.read_text())
        return self.by_world_size[ws][name]

    def _launch(self, ws) -> dict[str, dict]:
        from zero_trainer.ds_config import available_ds_configs

        if ws == "parallel":
            runs = {**PARALLEL_RUNS, **pretrained_runs(self.root / "checkpoints", ws),
                    **pipeline_runs(self.root / "checkpoints")}
            return launch_engines(self.root / "parallel", 2, runs, env=SMALL_LOSS_TILES)
        if ws == "pipeline4":  # pp 2 × dp 2
            return launch_engines(self.root / "pipeline4", 4, {"pp2_dp2": [*PP, "train.micro_batch=1",
                                                                           f"train.max_steps={PP_SHORT}"]})
        if ws == "families":
            return launch_engines(self.root / "families", 2, family_runs(self.root / "checkpoints"))
        named = {n: [*BASE, f"deepspeed.config={n}"] for n in available_ds_configs()}
        named["zero2_bf16"] = [*BASE, "deepspeed.config=zero2", "train.precision=bf16"]
        if ws == 1:  # first in its process, so its peak RSS is its own: the planner's live calibration row
            named = {"calibration": [*BASE, "deepspeed.config=zero2", "train.precision=bf16",
                                     *CALIBRATION_RUN_ARGS], **named}
            _warm_data_cache(named["calibration"])
            named["zero0"] += SAVED
            named["seq256"] = [*BASE, "deepspeed.config=zero1", *SEQ256]  # the model-parallel runs' reference
            named["tiled"] = [*BASE, "deepspeed.config=zero1", *SEQ256, *TILED]
            named.update(pretrained_runs(self.root / "checkpoints", ws))
            named.update(sft_runs(self.root / "checkpoints", ws))
            return launch_engines(self.root / f"ws{ws}", ws, named, env=SMALL_LOSS_TILES)
        else:
            for n in ("zero2", "zero3", "zero2_bf16"):
                named[n] += SAVED
            named["zero2"].append("train.report_to=[tensorboard,wandb]")  # test_runs reads what rank 0 wrote
            named.update(pretrained_runs(self.root / "checkpoints", ws))
            named.update(sft_runs(self.root / "checkpoints", ws))
            named.update({f"peer_{p.stem}": [*BASE, f"deepspeed.config={p}", "train.precision=bf16",
                                              "train.max_steps=3"] for p in PEER_CONFIGS})
        return launch_engines(self.root / f"ws{ws}", ws, named)


# DeepSpeed JSONs LLaMA-Factory and Axolotl ship (tests/peer_configs), trained as they are at world size 2 in bf16
PEER_CONFIGS = sorted((Path(__file__).resolve().parent / "peer_configs").glob("*.json"))

# Model parallelism (tests/test_parallel.py), 2 ranks in one launch: tp=2 and sp=2 each put both ranks in one
# group (dp = 1), so every run reads the 1-rank runs' batches. tp2_zero1 stops at step 6 and resumes to 12 in the
# same output dir; tp2_zero1_whole trains the same 12 steps without stopping.
SEQ256 = ["data.seq_len=256", "data.packing=false"]  # sp needs whole rows in attention: documents padded, not packed
TILED = ["parallel.tiled_mlp=true", "parallel.tiled_loss=true"]
SMALL_LOSS_TILES = {"ZERO_TRAINER_TEST_LOSS_TILE_BYTES": str(2 * 2**20)}  # a debug micro-batch: 4 loss tiles at seq 256
TP = [*BASE, "parallel.tp=2", "deepspeed.config=zero1", *SAVED]
PARALLEL_RUNS = {
    "tp2_zero1_stopped": {"overrides": [*TP, "train.stop_at_step=6"], "dir": "tp2_zero1"},
    "tp2_zero1": {"overrides": TP, "resume": True},
    "tp2_zero1_whole": TP,
    "tp2_zero3": [*BASE, "parallel.tp=2", "deepspeed.config=zero3"],
    "sp2_zero3": [*BASE, "parallel.sp=2", "deepspeed.config=zero3", *SEQ256],
    "sp2_zero1": [*BASE, "parallel.sp=2", "deepspeed.config=zero1", *SEQ256],
    "sp2_zero3_tiled": [*BASE, "parallel.sp=2", "deepspeed.config=zero3", *SEQ256, *TILED],
}


# Pipeline parallelism (tests/test_pipeline.py), in the model-parallel launch (2 ranks: pp 2 × dp 1, micro-batch 2 ×
# 2 in flight, the 1-rank runs' 4 rows a step): pp2 stopped at 6 and resumed to 12, pp2_whole without stopping;
# with activation checkpointing; pp2's step-6 checkpoint resumed without the pipeline on both ranks (dp 2, through
# the universal checkpoint); an untied head from its pretrained weights beside the same run without the pipeline;
# bf16 at ZeRO-0. And pp 2 × dp 2 on 4 ranks (launch "pipeline4").
PP = [*BASE, "parallel.pp=2", "deepspeed.config=zero1", "train.micro_batch=2", "train.grad_accum=2",
      "train.eval_batches=2"]  # the 4 held-out rows the 1-rank runs' one batch of 4 reads
PP_SHORT = 4


def pipeline_runs(checkpoints: Path) -> dict:
    from hf_families import write_all

    untied = f"model.pretrained={write_all(checkpoints, ('zero_lm_untied',))['zero_lm_untied']}"
    short = f"train.max_steps={PP_SHORT}"
    return {"pp2_stopped": {"overrides": [*PP, *SAVED, "train.stop_at_step=6"], "dir": "pp2"},
            "pp2": {"overrides": [*PP, *SAVED], "resume": True},
            "pp2_whole": [*PP, *SAVED],
            "pp2_ac": [*PP, short, "train.activation_checkpointing=true"],
            "pp2_to_dp2": {"overrides": [*BASE, "deepspeed.config=zero1", "train.micro_batch=2", *SAVED],
                           "fork": ("pp2", 6)},
            "pp2_untied": [*PP, short, untied],
            "pp1_untied": [*BASE, short, untied, "deepspeed.config=zero1", "train.micro_batch=2"],
            "pp2_bf16_zero0": [*PP, short, "deepspeed.config=zero0", "train.precision=bf16"]}


# transformers' own model classes (tests/hf_families.py), 2 ranks in one launch, per family: a random init from its
# config.json at ZeRO-2; the same at ZeRO-3, stopped at step 2 and resumed; its saved weights (model.pretrained) at
# ZeRO-3 with lr 0, for the round trip. One tokenizer for all, so one token stream.
FAMILY_STEPS = 4
FAMILY = ["train.precision=fp32", f"train.max_steps={FAMILY_STEPS}", *FAST, "train.save_every=2", "train.keep_last=4"]


def family_runs(checkpoints: Path) -> dict:
    from hf_families import FAMILIES, write_all

    runs = {}
    for family, ckpt in write_all(checkpoints, FAMILIES).items():
        config = [*FAMILY, "model.preset=null", f"model.config={ckpt / 'config.json'}", f"data.tokenizer={ckpt}"]
        runs[f"{family}_zero2"] = [*config, "deepspeed.config=zero2"]
        runs[f"{family}_zero3_stopped"] = {"overrides": [*config, "deepspeed.config=zero3", "train.stop_at_step=2"],
                                           "dir": f"{family}_zero3"}
        runs[f"{family}_zero3"] = {"overrides": [*config, "deepspeed.config=zero3"], "resume": True}
        runs[f"{family}_pretrained_zero3"] = [*FAMILY, f"model.pretrained={ckpt}", "deepspeed.config=zero3",
                                              "train.lr=0", "train.max_steps=1", "train.save_every=1"]
    return runs


# model.pretrained on zero_trainer's own model (tests/hf_families.py: zero_lm, tied and untied) and transformers' Llama
# (tests/test_pretrained.py): lr-0 round trips at ZeRO-0 and ZeRO-3 (1 rank) and ZeRO-0 (2 ranks; ZeRO-3 at 2 ranks is
# every family's in family_runs); 4-step fine-tunes at 2 ranks on zero2, zero3_offload (stopped at 2 and resumed)
# and zero3_nvme, which start from the same weights and so must give the same losses.
PRETRAINED_STEPS = 4
ROUND_TRIP = ["train.lr=0", "train.max_steps=1", "train.save_every=1"]


def pretrained_runs(checkpoints: Path, ws: int) -> dict:
    from hf_families import write_all

    ckpt = write_all(checkpoints, ("llama", "zero_lm_tied", "zero_lm_untied"))
    base = [*BASE, f"train.max_steps={PRETRAINED_STEPS}", "train.save_every=2"]
    tied, untied, llama = (f"model.pretrained={ckpt[n]}" for n in ("zero_lm_tied", "zero_lm_untied", "llama"))
    if ws == 1:  # and the 1-rank references of the model-parallel launch's pretrained runs
        return {"pretrained_zero0": [*base, tied, "deepspeed.config=zero0", *ROUND_TRIP],
                "pretrained_zero3": [*base, llama, "deepspeed.config=zero3", *ROUND_TRIP],
                "pretrained_ref": [*base, tied, "deepspeed.config=zero1"],
                "pretrained_ref_llama": [*base, llama, "deepspeed.config=zero1", "data.packing=false"]}
    if ws == "parallel":  # tp on our model, sp on transformers' Llama, from their weights
        return {"tp2_pretrained": [*base, tied, "parallel.tp=2", "deepspeed.config=zero1"],
                "sp2_pretrained": [*base, llama, "parallel.sp=2", "deepspeed.config=zero3", "data.packing=false"]}
    return {"pretrained_zero0": [*base, untied, "deepspeed.config=zero0", *ROUND_TRIP],
            "pretrained_zero2": [*base, tied, "deepspeed.config=zero2"],
            "pretrained_offload_stopped": {"overrides": [*base, tied, "deepspeed.config=zero3_offload",
                                                         "train.stop_at_step=2"], "dir": "pretrained_offload"},
            "pretrained_offload": {"overrides": [*base, tied, "deepspeed.config=zero3_offload"], "resume": True},
            "pretrained_nvme": [*base, tied, "deepspeed.config=zero3_nvme"]}


# Supervised fine-tuning (tests/test_sft.py): the same chat conversations (tests/chat_data.py), 4 rows a step, from
# the same pretrained weights. Full fine-tunes: 1 rank micro 4 and micro 2 x accumulation 2, 2 ranks at ZeRO-0 and
# ZeRO-3. LoRA (r 4 on every linear layer): our tied model at 1 rank ZeRO-0 and 2 ranks ZeRO-2 and ZeRO-3 + CPU
# offload (stopped at step 3 and resumed); transformers' Llama at 1 rank ZeRO-0 and 2 ranks ZeRO-3; a random init's.
SFT_STEPS = 6
CHAT_CONVERSATIONS = 48


def sft_runs(checkpoints: Path, ws: int) -> dict:
    from chat_data import write_chat
    from hf_families import write_all

    ckpt = write_all(checkpoints, ("llama", "zero_lm_tied"))
    chat = write_chat(checkpoints / "chat" / "train.jsonl", CHAT_CONVERSATIONS)
    sft = [*BASE, f"train.max_steps={SFT_STEPS}", "data.format=chat", f"data.path={chat}", "data.chat_template=chatml",
           "data.seq_len=256", "train.lr=1e-2", "train.warmup_steps=1"]
    tied, llama = f"model.pretrained={ckpt['zero_lm_tied']}", f"model.pretrained={ckpt['llama']}"
    lora = [*sft, "lora.r=4", "lora.alpha=8", "train.save_every=3"]  # checkpoints: the base weights, the exports
    if ws == 1:
        return {"sft_micro4": [*sft, tied, "deepspeed.config=zero0", "train.micro_batch=4"],
                "sft_accum2": [*sft, tied, "deepspeed.config=zero0", "train.micro_batch=2", "train.grad_accum=2"],
                "lora_zero0": [*lora, tied, "deepspeed.config=zero0", "train.micro_batch=4"],
                "lora_llama_zero0": [*lora, llama, "deepspeed.config=zero0", "train.micro_batch=4"],
                "lora_random": [*BASE, "train.max_steps=3", "train.save_every=3", "train.lr=1e-2",
                                "train.warmup_steps=0", "lora.r=4", "deepspeed.config=zero0"]}
    two = [*lora, "train.micro_batch=2"]
    return {"sft_zero0": [*sft, tied, "deepspeed.config=zero0", "train.micro_batch=2"],
            "sft_zero3": [*sft, tied, "deepspeed.config=zero3", "train.micro_batch=2", f"train.save_every={SFT_STEPS}"],
            "lora_zero2": [*two, tied, "deepspeed.config=zero2"],
            "lora_offload_stopped": {"overrides": [*two, tied, "deepspeed.config=zero3_offload",
                                                   "train.stop_at_step=3"], "dir": "lora_offload"},
            "lora_offload": {"overrides": [*two, tied, "deepspeed.config=zero3_offload"], "resume": True},
            "lora_llama_zero3": [*two, llama, "deepspeed.config=zero3"]}


def _warm_data_cache(overrides: list[str]) -> None:
    """Tokenize a run's corpus here, as `zero-trainer train` does before it launches: training a tokenizer inside
    the rank would count in its peak memory."""
    from zero_trainer.model import model_config
    from zero_trainer.recipe import load_recipe
    from zero_trainer.resolve import load_data

    recipe = load_recipe("debug", overrides)
    load_data(recipe, model_config(recipe.model_source).vocab_size)


@pytest.fixture(scope="session")
def engine_runs(tmp_path_factory) -> EngineRuns:
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # set by pytest-xdist, the same in every worker of a run
    shared = tmp_path_factory.getbasetemp().parent / f"engines-{run_id}" if run_id else None
    return EngineRuns(shared or tmp_path_factory.mktemp("engines"))


def fork_run(summary: dict, step: int, out: Path) -> Path:
    """A new output dir holding one checkpoint (and the metrics up to it) of an engine_runs run: what a run stopped
    at `step` leaves, without launching one."""
    src = Path(summary["recipe"]["output_dir"])
    name = f"step_{step:08d}"
    shutil.copytree(src / "checkpoints" / name, out / "checkpoints" / name)
    rows = (src / "metrics.csv").read_text().splitlines()
    (out / "metrics.csv").write_text("\n".join(rows[: step + 1]) + "\n")
    return out


def launch_ranks(out: Path, ds_config: str | None, num_procs: int, steps: int = STEPS, resume: bool = False,
                 overrides=(), recipe: str = "recipes/debug.yaml", launcher: str = "torchrun",
                 launcher_args=()) -> dict | None:
    """The ranks through a real launcher, without zero-trainer's preflight (two_nodes aside): they resolve, check and
    train by themselves. launcher: "torchrun" (the lightest: ~6 s a launch less than DeepSpeed's two launcher
    processes), "deepspeed" (`deepspeed --num_gpus N --module zero_trainer.train`), or
    "two_nodes" (two `zero-trainer train --hostfile H --no-ssh --node-rank K --master-addr 127.0.0.1` on this
    machine, one rank each: the preflight, then DeepSpeed's runner),
    "accelerate" (`accelerate launch [launcher_args] --num_processes N -m zero_trainer.train`; add --multi_gpu for
    more than one process) or "none" (`python -m zero_trainer.train`, one rank). ds_config None: no --ds-config.
    Returns summary.json, or None when the run stopped early. No launcher but zero-trainer (two_nodes) sweeps
    /dev/shm afterwards, so this also checks every rank released its DeepSpeed shm all-reduce workspace itself."""
    port = free_port()
    rank_args = ["--recipe", recipe, *(["--ds-config", ds_config] if ds_config else []), "--output-dir", str(out),
                 *(["--resume"] if resume else []), *BASE, f"train.max_steps={steps}", *overrides]
    deepspeed = [str(BIN / "deepspeed"), "--master_port", str(port)]
    if launcher == "torchrun":
        cmds = [[str(BIN / "torchrun"), "--nproc-per-node", str(num_procs), "--master-port", str(port),
                 "-m", "zero_trainer.train", *rank_args]]
    elif launcher == "two_nodes":  # each node through zero-trainer's preflight, then DeepSpeed's runner
        assert num_procs == 2
        hostfile = out.parent / f"{out.name}.hostfile"
        hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
        cmds = [[sys.executable, "-m", "zero_trainer", "train", "--hostfile", str(hostfile), "--no-ssh", "--node-rank",
                 str(k), "--master-addr", "127.0.0.1", "--master-port", str(port), *rank_args] for k in (0, 1)]
    elif launcher == "accelerate":
        cmds = [[str(BIN / "accelerate"), "launch", *launcher_args, "--num_processes", str(num_procs),
                 "--main_process_port", str(port), "-m", "zero_trainer.train", *rank_args]]
    elif launcher == "none":
        assert num_procs == 1
        cmds = [[sys.executable, "-m", "zero_trainer.train", *rank_args]]
    else:
        cmds = [[*deepspeed, "--num_gpus", str(num_procs), "--module", "zero_trainer.train", *rank_args]]
    env = {**os.environ, "MASTER_PORT": str(port)} if launcher == "none" else None  # the port the shm check reads
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for cmd in cmds]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-4000:] for log in logs)
    assert not sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return read_summary(out) if (out / "summary.json").exists() else None


def wandb_history(run_file: Path) -> list[dict]:
    """The logged rows of an offline wandb run file (run-ID.wandb): LevelDB-log records of wandb's protobuf
    Record, after a 7-byte ":W&B" header. wandb 0.31 has no Python reader of its own any more."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending, rows = run_file.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, size, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + size], pos + 7 + size
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def read_summary(out: Path) -> dict:
    return json.loads((Path(out) / "summary.json").read_text())


def assert_resumed_exactly(resumed: dict, whole: dict, step: int) -> None:
    """A run stopped at `step` and resumed equals the same run without stopping: bit for bit."""
    assert resumed["resumed_from"].endswith(f"step_{step:08d}")
    assert resumed["losses"] == whole["losses"]
    assert resumed["eval_loss"] == whole["eval_loss"]


def assert_losses_close(got, want, tol):
    assert len(got) == len(want), (len(got), len(want))
    worst = max(abs(a - b) for a, b in zip(got, want, strict=True))
    assert worst <= tol, f"max per-step loss difference {worst:.3g} > {tol}\n got {got}\nwant {want}"
