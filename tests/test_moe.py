"""Mixture of experts end to end: experts split over ranks (deepspeed.moe, ZeRO-2), the plain MoE block at ZeRO-1/2
and as a ZeRO-3 leaf module, exact resume, export to MixtralForCausalLM; refusals in-process.

One 2-rank launch trains debug-moe four ways (ep=1 zero2, ep=2 zero2, ep=1 zero3, and ep=2 zero2 in bf16), 12 steps
each, the fp32 ones with checkpoints every 3 steps; a second launch resumes three of them from step 6. The three
fp32 runs must give the same per-step losses: the same initial weights, the same routing (softmax, top-k,
renormalised, no token dropped) and the same data; only the placement of experts and the reductions differ. The
bf16 run (4 steps: bf16 matmuls are slow on CPU) stays near them.
"""

import csv
import fcntl
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import BASE, BIN, REPO, STEPS, assert_losses_close, fork_run, free_port, launch_engines, read_summary

from zero_trainer.checkpoint import newest_complete

MOE = ["model.preset=debug-moe", "train.save_every=3", "train.keep_last=10"]
RUNS = {"ep1_zero2": [*BASE, *MOE, "deepspeed.config=zero2"],
        "ep2_zero2": [*BASE, *MOE, "deepspeed.config=zero2", "parallel.ep=2"],
        "ep1_zero3": [*BASE, *MOE, "deepspeed.config=zero3"],
        "ep2_zero2_bf16": [*BASE, "model.preset=debug-moe", "deepspeed.config=zero2", "parallel.ep=2",
                           "train.precision=bf16", "train.max_steps=4"]}  # bf16 matmuls are slow on CPU


@pytest.fixture(scope="session")
def moe_runs(tmp_path_factory) -> dict[str, dict]:
    """The three runs, launched once per test session (under pytest-xdist by the first worker that asks)."""
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    root = tmp_path_factory.getbasetemp().parent / f"moe-{run_id}" if run_id else tmp_path_factory.mktemp("moe")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "launch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / "summaries.json"
        if not done.exists():
            done.write_text(json.dumps(launch_engines(root, 2, RUNS)))
        return json.loads(done.read_text())


def refused(capsys, out, flags, overrides) -> str:
    """`zero-trainer train` in this process: exit 2, one `error:` line, nothing written under `out`."""
    from zero_trainer.cli import main

    listing = sorted((str(p), p.stat().st_mtime_ns) for p in Path(out).rglob("*"))
    capsys.readouterr()
    code = main(["train", "--recipe", "recipes/debug.yaml", "--output-dir", str(out), *flags, *BASE, *overrides])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert sorted((str(p), p.stat().st_mtime_ns) for p in Path(out).rglob("*")) == listing
    return err


def _metrics(summary: dict) -> list[dict]:
    with open(Path(summary["recipe"]["output_dir"]) / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.multiproc
def test_moe_ep2_and_zero3_leaf_module_train_like_ep1(moe_runs):
    from zero_trainer.model import count_active_params, count_params

    ep1, ep2, z3, bf16 = (moe_runs[n] for n in ("ep1_zero2", "ep2_zero2", "ep1_zero3", "ep2_zero2_bf16"))
    losses = ep1["losses"]
    assert len(losses) == STEPS and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert_losses_close(ep2["losses"], losses, 1e-4)
    assert_losses_close(z3["losses"], losses, 1e-4)
    assert_losses_close(bf16["losses"][:3], losses[:3], 0.02)  # bf16 weights and activations, fp32 routing
    aux = {name: [float(r["aux_loss"]) for r in _metrics(s)] for name, s in moe_runs.items()}
    assert all(1.0 <= a <= 4 * 4.0 for a in aux["ep1_zero2"]), aux  # 4 layers, each between 1 (balanced) and 4
    assert_losses_close(aux["ep2_zero2"], aux["ep1_zero2"], 1e-3)
    assert_losses_close(aux["ep1_zero3"], aux["ep1_zero2"], 1e-3)
    for s in (ep1, ep2, z3, bf16):
        assert s["params"] == count_params("debug-moe") and s["active_params"] == count_active_params("debug-moe")
        assert s["active_params"] < s["params"]
    # ZeRO-3 ran the plain block as a leaf module; ep=2 saved one file per expert and per layer
    assert ep2["experts"]["experts_per_rank"] == 2 and ep1["experts"]["experts_per_rank"] == 4
    assert "zero_trainer.model.SparseMoeBlock" in z3["ds_config"]["zero_optimization"]["leaf_module"]["classes"]
    ckpt = newest_complete(Path(ep2["recipe"]["output_dir"]) / "checkpoints")
    assert len(list(ckpt.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))) == 4 * 4


@pytest.mark.multiproc
def test_moe_resume_exact_at_ep2_and_zero3_through_universal_at_ep1_and_refusals(moe_runs, tmp_path, capsys):
    """From step 6 of each run, in one 2-rank launch: ep=2 resumes exactly; the ZeRO-3 leaf-module run resumes
    exactly; the ep=1 ZeRO-2 run resumes at ZeRO-1 (a stage change: DeepSpeed's universal checkpoint, as for dense
    models). An expert-parallel checkpoint at another ep or world size is refused before launching."""
    forks = {name: fork_run(moe_runs[name], 6, tmp_path / name) for name in ("ep2_zero2", "ep1_zero3", "ep1_zero2")}
    resume = ["--ds-config", "zero2", "--resume", "--num-procs"]
    err = refused(capsys, forks["ep2_zero2"], [*resume, "2"], [*MOE, "parallel.ep=1"])
    assert "saved at parallel.ep=2 with parallel.ep=1" in err
    err = refused(capsys, forks["ep2_zero2"], [*resume, "4"], [*MOE, "parallel.ep=2"])
    assert "checkpoint of 2 ranks on 4" in err

    spec = [{"output_dir": str(forks["ep2_zero2"]), "overrides": RUNS["ep2_zero2"], "resume": True},
            {"output_dir": str(forks["ep1_zero3"]), "overrides": RUNS["ep1_zero3"], "resume": True},
            {"output_dir": str(forks["ep1_zero2"]), "resume": True,
             "overrides": [*RUNS["ep1_zero2"], "deepspeed.config=zero1"]}]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    port = free_port()
    proc = subprocess.run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(port),
                           "tests/engines_check.py", str(tmp_path / "spec.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for name, tol in (("ep2_zero2", 1e-6), ("ep1_zero3", 1e-6), ("ep1_zero2", 1e-5)):
        summary = read_summary(forks[name])
        assert summary["resumed_from"].endswith("step_00000006"), name
        assert_losses_close(summary["losses"], moe_runs[name]["losses"], tol)
    assert (forks["ep1_zero2"] / "checkpoints" / "universal" / "step_00000006").is_dir()


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["ep2_zero2", "ep1_zero3"])
def test_moe_export_is_mixtral_computing_the_trained_function(moe_runs, name, tmp_path, capsys):
    """The exported MixtralForCausalLM recomputes what the trained engine computed at its last step: its eval loss
    (cross-entropy + coefficient x load-balancing loss, per rank on that rank's eval blocks) and its greedy sample."""
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    from zero_trainer.cli import main
    from zero_trainer.export import gather_state_dict
    from zero_trainer.model import build_model, load_balancing_loss
    from zero_trainer.recipe import load_recipe
    from zero_trainer.resolve import load_data

    summary = moe_runs[name]
    ckpt = newest_complete(Path(summary["recipe"]["output_dir"]) / "checkpoints")
    assert main(["export", str(ckpt), str(tmp_path / "hf")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(model) is MixtralForCausalLM and model.config.num_local_experts == 4

    recipe = load_recipe("debug", RUNS[name])
    data = load_data(recipe, model.config.vocab_size)
    micro, coef = recipe.train.micro_batch, model.config.router_aux_loss_coef
    per_rank = []
    with torch.no_grad():
        for rank in range(summary["world_size"]):  # trainer.evaluate with eval_batches=1
            x, positions, targets = (torch.from_numpy(a) for a in data.batch(
                "eval", range(rank * micro, (rank + 1) * micro)))
            out = model(input_ids=x, position_ids=positions, output_router_logits=True, use_cache=False)
            aux = sum(load_balancing_loss(r.float().softmax(-1), r.topk(model.config.num_experts_per_tok).indices, 4)
                      for r in out.router_logits)
            ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
            per_rank.append(((ce + coef * aux).item(), int((targets != -100).sum())))
        weighted = sum(loss * n for loss, n in per_rank) / sum(n for _, n in per_rank)  # evaluate's token weighting
        assert abs(weighted - summary["eval_loss"]) <= 1e-5, (per_rank, summary["eval_loss"])
        prompt = torch.from_numpy(data.eval[:1, :16].astype("int64"))
        ids = model.generate(prompt, max_new_tokens=recipe.train.sample_tokens, do_sample=False)
    text = data.tokenizer.decode(prompt[0].tolist()) + " ⟶ " + data.tokenizer.decode(ids[0, 16:].tolist())
    assert text == summary["sample"]
    if name == "ep1_zero3":  # the plain block's names are Mixtral's: DeepSpeed's zero_to_fp32 weights load as they are
        ours = build_model("debug-moe").eval()
        ours.load_state_dict(gather_state_dict(ckpt, 3), strict=False)
        ours.tie_weights()
        with torch.no_grad():
            assert (ours(x).logits - model(x).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("config,procs,overrides,message", [
    ("zero3", 2, ["model.preset=debug-moe", "parallel.ep=2"], "needs ZeRO stage 1 or 2, not 3"),
    ("zero2", 3, ["model.preset=debug-moe", "parallel.ep=3"], "does not divide the model's 4 experts"),
    ("zero2", 1, ["model.preset=debug-moe", "parallel.ep=2"], "does not divide the world size 1"),
    ("zero2", 2, ["model.preset=debug", "parallel.ep=2"], "is a dense model"),
], ids=["zero3", "experts", "world-size", "dense"])
def test_expert_parallel_refusals(config, procs, overrides, message, tmp_path, capsys):
    flags = ["--ds-config", config, "--num-procs", str(procs)]
    assert message in refused(capsys, tmp_path / "run", flags, overrides)


def test_planner_counts_experts():
    """Exact counts of the MoE presets (the meta build's tensors, in order), total vs active parameters, experts per
    rank at ep, and the MoE layers' extra activations in the plan."""
    from zero_trainer import plan
    from zero_trainer.model import count_active_params, param_sizes

    for name in ("debug-moe", "minimind-moe"):
        shape = plan.model_shape(name)
        assert list(shape.param_sizes) == param_sizes(name) and shape.params == sum(param_sizes(name))
        assert plan.active_params(shape) == count_active_params(name) < shape.params
    shape, workload = plan.model_shape("minimind-moe"), plan.Workload(512, 16, "bf16")
    assert plan.expert_params(shape) == 8 * 4 * 3 * 512 * 1408
    one, two = (plan.expert_parallel_split(shape, ep, 2, workload) for ep in (1, 2))
    assert two["experts_per_rank"] == 2 and two["expert_params_per_rank"] * 2 == one["expert_params_per_rank"]
    assert one["all_to_all_bytes_per_layer"] == 0 and two["all_to_all_bytes_per_layer"] == 2 * 512 * 16 * 512 * 2
    dense = plan.model_shape("minimind-26m")
    assert plan.moe_activation_bytes(dense, workload, False) == 0 < plan.moe_activation_bytes(shape, workload, False)
    line = plan.experts_line(shape, 2, 2, workload)
    assert "77.75M parameters, 25.85M active per token" in line and "2 experts a rank (34.60M" in line
    assert "all-to-all 16.0 MiB a MoE layer when balanced, up to 64.0 MiB" in line
    # ZeRO-3 gathers the whole MoE block (a leaf module) at once: the planner's layer is the block
    assert shape.layer_params - dense.layer_params == 4 * 512 + 3 * 3 * 512 * 1408


def test_plan_command_shows_experts_and_refuses_a_bad_ep(capsys):
    from zero_trainer.cli import main

    hw = ["plan", "--model", "minimind-moe", "--gpus-per-node", "2", "--gpu-mem", "24", "--cpu-mem", "64"]
    assert main([*hw, "--ep", "2"]) == 0
    assert "at ep=2 2 experts a rank" in capsys.readouterr().out
    assert main([*hw, "--ep", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --ep 3 must divide the 4 experts") and len(err.strip().splitlines()) == 1


def test_zero3_config_makes_the_moe_block_a_leaf_module():
    """The class path resolve writes into zero_optimization.leaf_module is one DeepSpeed resolves to our block."""
    from deepspeed.runtime.zero.leaf_module_config import DeepSpeedZeroLeafModuleConfig
    from deepspeed.utils.z3_leaf_module import apply_zero_leaf_module_config, z3_leaf_module

    from zero_trainer.ds_config import load_ds_config
    from zero_trainer.model import build_model
    from zero_trainer.recipe import load_recipe
    from zero_trainer.resolve import check_experts

    model = build_model("debug-moe")
    recipe = load_recipe("debug", ["model.preset=debug-moe"])
    ds = check_experts(recipe, model.config, 2, load_ds_config("zero3")[1])
    apply_zero_leaf_module_config(model, DeepSpeedZeroLeafModuleConfig(**ds["zero_optimization"]["leaf_module"]))
    assert all(z3_leaf_module(layer.mlp) for layer in model.model.layers)
    assert "leaf_module" not in check_experts(recipe, model.config, 2, load_ds_config("zero2")[1])["zero_optimization"]
