"""accelerate as a launcher, and no launcher at all: the per-rank module trains the same under each, and
`accelerate launch`'s own flags are honoured or refused with one line.

The runs compare with conftest.engine_runs (the same debug recipe through torchrun): fp32 losses must be equal.
"""

import subprocess

import pytest
from conftest import BIN, REPO, assert_losses_close, launch_ranks

from zero_trainer.errors import UsageError
from zero_trainer.train import ACCELERATE_ZERO, accelerate_flags


@pytest.mark.multiproc
def test_accelerate_multi_gpu_trains_like_zero_trainer(engine_runs, tmp_path):
    summary = launch_ranks(tmp_path / "acc", "zero2", 2, launcher="accelerate", launcher_args=["--multi_gpu"])
    assert summary["world_size"] == 2 and summary["ds_config_name"] == "zero2"
    assert_losses_close(summary["losses"], engine_runs["zero2", 2]["losses"], 1e-5)


@pytest.mark.multiproc
def test_no_launcher_trains_one_rank(engine_runs, tmp_path):
    summary = launch_ranks(tmp_path / "plain", "zero2", 1, launcher="none")
    assert summary["world_size"] == 1
    assert_losses_close(summary["losses"], engine_runs["zero2", 1]["losses"], 1e-5)


@pytest.mark.multiproc
def test_accelerate_single_process_honours_mixed_precision(engine_runs, tmp_path):
    """Without --multi_gpu accelerate starts one plain process; its --mixed_precision sets train.precision (the
    recipe overrides said fp32)."""
    summary = launch_ranks(tmp_path / "bf16", "zero2", 1, launcher="accelerate",
                           launcher_args=["--mixed_precision", "bf16"])
    assert summary["world_size"] == 1 and summary["precision"] == "bf16"
    assert summary["ds_config"]["bf16"]["enabled"] is True
    assert_losses_close(summary["losses"], engine_runs["zero2_bf16", 1]["losses"], 1e-5)


@pytest.mark.multiproc
def test_accelerate_deepspeed_config_file_is_the_ds_config(engine_runs, tmp_path):
    summary = launch_ranks(tmp_path / "z3", None, 2, launcher="accelerate", launcher_args=[
        "--use_deepspeed", "--deepspeed_config_file", str(REPO / "ds_configs" / "zero3.json")])
    assert summary["ds_config_name"] == "zero3" and summary["zero_stage"] == 3 and summary["world_size"] == 2
    assert_losses_close(summary["losses"], engine_runs["zero3", 2]["losses"], 1e-5)


@pytest.mark.multiproc
def test_accelerate_flag_refused_in_one_line(tmp_path):
    """A real `accelerate launch` with a flag zero_trainer cannot honour: the rank stops with one line, before
    anything is built."""
    out = tmp_path / "fsdp"
    proc = subprocess.run([str(BIN / "accelerate"), "launch", "--use_fsdp", "--num_processes", "1", "-m",
                           "zero_trainer.train", "--recipe", "debug", "--output-dir", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "--use_fsdp" in errors[0] and "DeepSpeed" in errors[0]
    assert not out.exists()


@pytest.mark.parametrize("env, field, value", [
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, "train.precision", "fp16"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
      "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"},
     "deepspeed.config", "zero3_offload"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, "train.grad_accum", 4),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_GRADIENT_CLIPPING": "0.5"}, "train.grad_clip", 0.5),
])
def test_accelerate_flags_set_recipe_fields(env, field, value):
    assert accelerate_flags({"ACCELERATE_MIXED_PRECISION": "no", **env})[field][0] == value
    assert accelerate_flags({"ACCELERATE_MIXED_PRECISION": "no"}) == {}  # "no" is also accelerate's default


def test_every_accelerate_zero_mapping_names_a_shipped_config():
    from zero_trainer.ds_config import available_ds_configs, load_ds_config, offload_device, zero_stage

    assert sorted(ACCELERATE_ZERO.values()) == available_ds_configs()
    for (stage, opt, param), name in ACCELERATE_ZERO.items():
        ds = load_ds_config(name)[1]
        assert (str(zero_stage(ds)), offload_device(ds, "optimizer"), offload_device(ds, "param")) == \
            (stage, opt, param)


@pytest.mark.parametrize("env, flag", [
    ({"ACCELERATE_MIXED_PRECISION": "fp8"}, "--mixed_precision"),
    ({"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, "--dynamo_backend"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1",
      "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "nvme"}, "--zero_stage"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false"}, "--zero3_init_flag"),
])
def test_accelerate_flags_refused(env, flag):
    with pytest.raises(UsageError) as err:
        accelerate_flags(env)
    assert flag in err.value.line() and "\n" not in err.value.line()


def test_ds_config_given_twice_disagreeing_is_refused(tmp_path, monkeypatch):
    """--ds-config and accelerate's --deepspeed_config_file naming different files: one line from the preflight
    (`zero-trainer train` in this process, its environment as accelerate would set it)."""
    from test_bad_inputs import run_in_process

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds_configs/zero3.json")
    code, _, stderr = run_in_process(["--recipe", "debug", "--ds-config", "zero2", "--output-dir", str(tmp_path / "x")])
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert "--deepspeed_config_file" in stderr and "--ds-config" in stderr
    assert not (tmp_path / "x").exists()
