"""HF Trainer and accelerate users take zero_trainer's JSONs unchanged: every shipped ds_configs JSON, and one that
`zero-trainer plan --write-ds-config` wrote for a bigger model, trains the debug model in HF Trainer
(`TrainingArguments(deepspeed=path)`, 1 rank) and in accelerate (`accelerate launch --use_deepspeed
--deepspeed_config_file path --num_processes 2`, with the script shapes of accelerate's DeepSpeed guide).
"""

import json
import os
import subprocess

import pytest
from conftest import BIN, REPO, free_port, run_cli
from test_auto_plan import ACCELERATE_FILLS, _get

from zero_trainer.ds_config import (
    DS_CONFIG_DIR,
    MODEL_AUTO_KEYS,
    SIZED_KEYS,
    auto_keys,
    available_ds_configs,
    zero_stage,
)
from zero_trainer.ops import remove_shm_buffers

# "auto" both tools fill: batch, learning rate and schedule, weight decay, clipping, precision (the shipped files also
# leave the hidden-size bucket sizes to them; a written file has numbers there).
TOOL_FILLED = ACCELERATE_FILLS - set(MODEL_AUTO_KEYS)


def _results(proc) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return {row["config"]: row for row in rows}


def write_for_bigger_model(tmp_path, model="1b", ds_config="zero3_nvme", *flags) -> tuple[str, dict, str]:
    path = tmp_path / f"{model}_{ds_config}.json"
    proc = run_cli("plan", "--model", model, "--ds-config", ds_config, "--write-ds-config", path, *flags)
    return str(path), json.loads(path.read_text()), proc.stdout


@pytest.mark.multiproc
def test_every_shipped_json_trains_unchanged_in_hf_trainer_and_accelerate(tmp_path):
    shipped = [str(DS_CONFIG_DIR / f"{name}.json") for name in available_ds_configs()]
    big, _, _ = write_for_bigger_model(tmp_path, "1b", "zero3_nvme", "--cpu-mem", "23", "--nvme", "100",
                                       "--nvme-path", tmp_path / "nvme")
    no_optimizer = tmp_path / "zero2_torch_optimizer.json"  # accelerate's other shape: the script's own optimizer
    ds = json.loads((DS_CONFIG_DIR / "zero2.json").read_text())
    del ds["optimizer"], ds["scheduler"]
    no_optimizer.write_text(json.dumps(ds))
    cache = os.environ["ZERO_TRAINER_CACHE"]
    # One launch after the other: the shipped zero3_nvme.json swaps to one fixed path in both.
    port = free_port()
    try:
        hf = subprocess.run([str(BIN / "deepspeed"), "--num_gpus", "1", "--master_port", str(port),
                             "tests/hf_trainer_check.py", str(tmp_path / "hf"), cache, *shipped, big],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    finally:
        remove_shm_buffers(port)  # HF Trainer's ranks do not go through zero_trainer's release
    port = free_port()
    try:
        acc = subprocess.run([str(BIN / "accelerate"), "launch", "--use_deepspeed", "--deepspeed_config_file",
                              shipped[0], "--num_processes", "2", "--main_process_port", str(port),
                              "tests/accelerate_check.py", str(tmp_path / "acc"), cache, *shipped, str(no_optimizer),
                              big], cwd=REPO, capture_output=True, text=True, timeout=900)
    finally:
        remove_shm_buffers(port)
    for tool, proc, paths in (("hf", hf, [*shipped, big]), ("accelerate", acc, [*shipped, str(no_optimizer), big])):
        results = _results(proc)
        assert sorted(results) == sorted(paths), (tool, sorted(results))
        for path, result in results.items():
            name = (tool, os.path.basename(path))
            assert result["stage"] == zero_stage(json.loads(open(path).read())), name
            losses = result["losses"]
            assert len(losses) == 6 and losses[-1] < losses[0], (name, losses)
            if tool == "accelerate":
                assert result["world_size"] == 2 and result["dummy_optim"] == (path != str(no_optimizer)), name
    assert (tmp_path / "nvme").is_dir()  # the written JSON's swap path, as --nvme-path said


def test_written_json_has_numbers_for_everything_the_planner_decides(tmp_path):
    """7b on 8 × 80 GiB at seq 4096, micro batch 4: zero1 only with activation checkpointing, which the command
    says in HF Trainer's and accelerate's words."""
    path, ds, out = write_for_bigger_model(tmp_path, "7b", "zero1", "--gpus-per-node", "8", "--gpu-mem", "80",
                                           "--cpu-mem", "1024", "--seq-len", "4096", "--micro-batch", "4")
    assert set(auto_keys(ds)) <= TOOL_FILLED, set(auto_keys(ds)) - TOOL_FILLED
    assert isinstance(ds["zero_optimization"]["reduce_bucket_size"], int)
    assert "gradient_checkpointing=True" in out and "per_device_train_batch_size=4" in out and "bf16=True" in out
    assert f"--deepspeed_config_file {path} --num_processes 8 --mixed_precision bf16" in out
    assert "model.gradient_checkpointing_enable()" in out

    path, ds, out = write_for_bigger_model(tmp_path, "3b", "zero3_nvme", "--cpu-mem", "23", "--nvme", "70",
                                           "--seq-len", "128")
    assert set(auto_keys(ds)) <= TOOL_FILLED, set(auto_keys(ds)) - TOOL_FILLED
    for key in SIZED_KEYS[:-1]:  # every stage-3 and swap knob is a number (aio keeps the shipped one)
        assert isinstance(_get(ds, key), (int, bool)), key
    assert "gradient_checkpointing=False" in out


def test_write_with_json_keeps_stdout_one_json_document(tmp_path):
    proc = run_cli("plan", "--model", "debug", "--json", "--write-ds-config", tmp_path / "d.json")
    assert json.loads(proc.stdout)["chosen"] and "HF Trainer: TrainingArguments(" in proc.stderr
