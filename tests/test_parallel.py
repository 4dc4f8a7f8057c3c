"""Tensor parallelism (AutoTP) and Ulysses sequence parallelism: real 2-rank runs (conftest.PARALLEL_RUNS, one
launch) against the 1-rank runs that read the same batches, plus the layout rules in this process."""

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import STEPS, assert_losses_close, assert_resumed_exactly, fork_run, run_cli

from zero_trainer.errors import UsageError
from zero_trainer.parallelize import Layout, sequence_slice
from zero_trainer.recipe import load_recipe


def grad_norms(summary: dict) -> list[float]:
    rows = csv.DictReader(open(Path(summary["recipe"]["output_dir"]) / "metrics.csv"))
    return [float(r["grad_norm"]) for r in rows]


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["tp2_zero1", "tp2_zero1_whole", "tp2_zero3"])
def test_tensor_parallel_follows_the_one_rank_run(name, engine_runs):
    run, ref = engine_runs[name, "parallel"], engine_runs["zero0", 1]
    assert (run["tensor_parallel"], run["sequence_parallel"], run["world_size"]) == (2, 1, 2)
    assert len(run["losses"]) == STEPS
    assert_losses_close(run["losses"], ref["losses"], 1e-3)
    assert run["tokens"] == ref["tokens"]  # one data-parallel rank: the 1-rank run's tokens, not twice them


@pytest.mark.multiproc
def test_tensor_parallel_resume_is_exact(engine_runs):
    resumed, whole = engine_runs["tp2_zero1", "parallel"], engine_runs["tp2_zero1_whole", "parallel"]
    assert_resumed_exactly(resumed, whole, 6)


@pytest.mark.multiproc
def test_tensor_parallel_export_is_the_plain_llama(engine_runs, tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    tp_run, ref = engine_runs["tp2_zero1_whole", "parallel"], engine_runs["zero0", 1]
    for name, summary in (("tp", tp_run), ("ref", ref)):
        run_cli("export", Path(summary["recipe"]["output_dir"]) / "checkpoints", tmp_path / name)
    assert json.loads((tmp_path / "tp" / "export.json").read_text())["tensor_parallel"] == 2
    got, want = load_file(tmp_path / "tp" / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert got.keys() == want.keys()
    worst = max((got[k] - want[k]).abs().max().item() for k in got)
    assert worst <= 1e-3, worst
    model = LlamaForCausalLM.from_pretrained(tmp_path / "tp")
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (128, 128)  # whole again, not a rank's half


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["sp2_zero3", "sp2_zero1", "sp2_zero3_tiled"])
def test_sequence_parallel_follows_the_one_rank_run(name, engine_runs):
    run, ref = engine_runs[name, "parallel"], engine_runs["seq256", 1]
    assert (run["sequence_parallel"], run["tensor_parallel"]) == (2, 1)
    assert_losses_close(run["losses"], ref["losses"], 1e-3)
    # Adam and clipping hide a gradient off by a constant factor from the losses; the norms do not
    assert grad_norms(run) == pytest.approx(grad_norms(ref), rel=1e-3)
    assert abs(run["eval_loss"] - ref["eval_loss"]) <= 1e-3


@pytest.mark.multiproc
def test_tiled_mlp_and_loss_follow_the_untiled_run(engine_runs):
    run, ref = engine_runs["tiled", 1], engine_runs["seq256", 1]
    assert run["recipe"]["parallel"]["tiled_mlp"] and run["recipe"]["parallel"]["tiled_loss"]
    assert_losses_close(run["losses"], ref["losses"], 1e-4)
    assert grad_norms(run) == pytest.approx(grad_norms(ref), rel=1e-4)


@pytest.mark.multiproc
def test_resume_across_a_different_tp_is_one_line(engine_runs, tmp_path):
    from zero_trainer.resolve import resolve

    out = fork_run(engine_runs["tp2_zero1_whole", "parallel"], 6, tmp_path / "run")
    recipe = load_recipe("debug", [f"output_dir={out}", "deepspeed.config=zero1", "data.seq_len=64"])
    with pytest.raises(UsageError, match="cannot resume step_00000006 .parallel.tp 2, 2 ranks. at parallel.tp 1"):
        resolve(recipe, 2, resume=True)


def test_sequence_slice_keeps_each_token_its_target_and_position():
    import numpy as np

    from zero_trainer.data import next_token_targets

    x = torch.arange(16).view(2, 8)
    batch = (x, torch.arange(8).expand(2, 8), torch.from_numpy(next_token_targets(x.numpy())))
    whole_ids, whole_pos, whole_targets = sequence_slice(batch, Layout(1, 1, 1, 0, 0))
    assert np.array_equal(whole_targets[:, :-1].numpy(), x[:, 1:].numpy())
    parts = [sequence_slice(batch, Layout(1, 2, 1, 0, r)) for r in (0, 1)]
    assert torch.equal(torch.cat([p[0] for p in parts], 1), whole_ids)
    assert torch.equal(torch.cat([p[1] for p in parts], 1), whole_pos)
    assert torch.equal(torch.cat([p[2] for p in parts], 1), whole_targets)
    assert parts[0][2][0, -1] == x[0, 4]  # the slice's last token predicts the next slice's first
    assert (whole_targets[:, -1] == -100).all()


def test_layout_groups_consecutive_ranks():
    recipe = load_recipe("debug", ["parallel.tp=2"])
    assert [Layout.of(recipe, r, 4).dp_rank for r in range(4)] == [0, 0, 1, 1]
    recipe = load_recipe("debug", ["parallel.sp=2"])
    assert [(Layout.of(recipe, r, 4).dp_rank, Layout.of(recipe, r, 4).sp_rank) for r in range(4)] == [
        (0, 0), (0, 1), (1, 0), (1, 1)]


def test_long_context_recipe_loads_and_plans_on_one_node():
    """The shipped long-context recipe (ALST's case): on 8 x 80 GiB with 1 TiB of RAM its sp=8 with tiling fits;
    the same sequence on one rank does not fit, whatever the rung."""
    from zero_trainer import plan
    from zero_trainer.hardware import GiB, Hardware

    recipe = load_recipe("long-context")
    p, train = recipe.parallel, recipe.train
    assert recipe.model.preset == "llama3-8b-512k" and recipe.data.seq_len >= 32768
    assert p.sp > 1 and p.tiled_mlp and p.tiled_loss and train.activation_checkpointing
    assert recipe.data.seq_len <= plan.model_shape(recipe.model_source).max_positions
    node = Hardware(nodes=1, gpus_per_node=8, gpu_mem=80 * GiB, cpu_mem=1024 * GiB, nvme=0)

    def planned(sp):
        return plan.plan_model(recipe.model_source, node, recipe.data.seq_len, train.micro_batch, train.precision,
                               checkpointing=True, sp=sp, tiled_mlp=p.tiled_mlp, tiled_loss=p.tiled_loss)

    chosen = planned(p.sp)
    assert chosen.chosen is not None, chosen.reason
    assert (chosen.sequence_parallel, chosen.tiled_loss, chosen.tiled_mlp) == (8, True, True)
    assert planned(1).chosen is None
