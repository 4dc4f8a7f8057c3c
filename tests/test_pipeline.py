"""Pipeline parallelism (parallel.pp): real 2-rank runs in the model-parallel launch (conftest.pipeline_runs) and a
4-rank pp 2 × dp 2 launch, against the 1-rank runs that read the same 4 rows a step; the refusals in this process."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import PP_SHORT, STEPS, assert_losses_close, assert_resumed_exactly, run_cli

from zero_trainer.errors import UsageError
from zero_trainer.parallelize import Layout
from zero_trainer.pipeline import alias_universal, hf_names, to_hf_name
from zero_trainer.recipe import load_recipe
from zero_trainer.resolve import resolve

TOL = 1e-5  # fp32: the same sums in another order


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["pp2", "pp2_whole"])
def test_two_stages_train_as_one_rank_does(name, engine_runs):
    run, ref = engine_runs[name, "parallel"], engine_runs["zero1", 1]
    assert (run["pipeline_parallel"], run["world_size"], run["zero_stage"]) == (2, 2, 1)
    assert len(run["losses"]) == STEPS
    assert_losses_close(run["losses"], ref["losses"], TOL)
    assert abs(run["eval_loss"] - ref["eval_loss"]) <= TOL
    assert run["tokens"] == ref["tokens"]  # one data-parallel rank: the 1-rank run's tokens


@pytest.mark.multiproc
def test_pipeline_resume_is_exact(engine_runs):
    resumed, whole = engine_runs["pp2", "parallel"], engine_runs["pp2_whole", "parallel"]
    assert_resumed_exactly(resumed, whole, 6)
    layers = sorted(p.name for p in (Path(whole["recipe"]["output_dir"]) / "checkpoints" / "step_00000012").glob(
        "layer_*-model_states.pt"))
    assert layers == [f"layer_{i:02d}-model_states.pt" for i in range(6)]  # embedding, 4 layers, norm (tied head)


@pytest.mark.multiproc
def test_pipeline_with_activation_checkpointing_and_an_untied_head(engine_runs):
    ac, whole = engine_runs["pp2_ac", "parallel"], engine_runs["pp2_whole", "parallel"]
    assert ac["activation_checkpointing"] is True
    assert_losses_close(ac["losses"], whole["losses"][:PP_SHORT], TOL)
    untied, ref = engine_runs["pp2_untied", "parallel"], engine_runs["pp1_untied", "parallel"]
    assert (untied["pipeline_parallel"], ref["pipeline_parallel"]) == (2, 1)
    assert untied["recipe"]["model"]["pretrained"] is not None
    assert_losses_close(untied["losses"], ref["losses"], TOL)
    assert abs(untied["eval_loss"] - ref["eval_loss"]) <= TOL
    bf16 = engine_runs["pp2_bf16_zero0", "parallel"]
    assert bf16["zero_stage"] == 0 and bf16["losses"][-1] < bf16["losses"][0]


@pytest.mark.multiproc
def test_pipeline_checkpoint_resumes_without_the_pipeline_and_exports_the_same_model(engine_runs, tmp_path):
    """pp2's step-6 checkpoint resumed at pp 1 on both ranks (dp 2) through the universal checkpoint, with the
    pipeline's layer names linked to the model's; its step-12 export equals the pipeline run's export."""
    from transformers import LlamaForCausalLM

    moved, whole = engine_runs["pp2_to_dp2", "parallel"], engine_runs["pp2_whole", "parallel"]
    assert moved["resumed_from"].endswith("step_00000006") and moved["pipeline_parallel"] == 1
    assert_losses_close(moved["losses"], whole["losses"], TOL)
    assert abs(moved["eval_loss"] - whole["eval_loss"]) <= TOL
    universal = Path(moved["recipe"]["output_dir"]) / "checkpoints" / "universal" / "step_00000006" / "zero"
    assert (universal / "model.layers.0.self_attn.q_proj.weight").is_symlink()
    logits = {}
    ids = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(0))
    for name, summary in (("pp", whole), ("dp", moved)):
        run_cli("export", Path(summary["recipe"]["output_dir"]) / "checkpoints", tmp_path / name)
        logits[name] = LlamaForCausalLM.from_pretrained(tmp_path / name)(ids).logits
    assert json.loads((tmp_path / "pp" / "export.json").read_text())["pipeline_parallel"] == 2
    assert (logits["pp"] - logits["dp"]).abs().max().item() <= 1e-4


@pytest.mark.multiproc
def test_two_stages_times_two_data_parallel_ranks(engine_runs):
    run, ref = engine_runs["pp2_dp2", "pipeline4"], engine_runs["zero1", 1]
    assert (run["pipeline_parallel"], run["world_size"]) == (2, 4)
    assert_losses_close(run["losses"], ref["losses"][:PP_SHORT], TOL)


# ---------------------------------------------------------------------------------------------------------------
# in this process


def test_layout_deals_batches_by_data_parallel_index():
    recipe = load_recipe("debug", ["parallel.pp=2"])
    assert [Layout.of(recipe, r, 4).dp_rank for r in range(4)] == [0, 1, 0, 1]  # ranks [0, dp) are stage 0
    assert Layout.of(recipe, 3, 4).dp == 2


def test_names_map_between_the_pipeline_and_the_model(tmp_path):
    assert to_hf_name("tied_modules.embed.weight", 4, True) == "model.embed_tokens.weight"
    assert to_hf_name("3.mlp.up_proj.weight", 4, True) == "model.layers.2.mlp.up_proj.weight"
    assert to_hf_name("5.weight", 4, False) == "model.norm.weight"
    assert to_hf_name("6.weight", 4, False) == "lm_head.weight"
    assert "6.weight" not in hf_names(4, True)  # tied: the last stage's head is the embedding's copy
    # a universal checkpoint saved without the pipeline gets the pipeline's names too
    from zero_trainer.model import model_config

    zero = tmp_path / "zero"
    for name in ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight"):
        (zero / name).mkdir(parents=True)
    alias_universal(tmp_path, model_config("debug"))
    assert (zero / "tied_modules.embed.weight").resolve() == (zero / "model.embed_tokens.weight").resolve()
    assert (zero / "1.input_layernorm.weight").is_symlink() and (zero / "5.weight").is_symlink()


def _all(*parts: str) -> str:
    """A regex matching a line that holds every part (the planner or the runtime may word it)."""
    return "".join(f"(?=.*{re.escape(p)})" for p in parts)


REFUSED = {
    "zero2": (["deepspeed.config=zero2"], _all("stage 2", "parallel.pp 2")),
    "zero3": (["deepspeed.config=zero3"], _all("stage 3", "parallel.pp 2")),
    "nvme": (["deepspeed.config=zero3_nvme"], _all("parallel.pp 2")),
    "fp32_zero0_clipping": (["deepspeed.config=zero0"], _all("fp32 ZeRO-0 with gradient clipping", "train.grad_clip")),
    "accumulation": (["train.grad_accum=1"], _all("below pp 2", "train.grad_accum")),
    "layers": (["parallel.pp=8", "train.grad_accum=8", "world_size=8"], _all("pp 8", "4 decoder layers")),
    "world": (["parallel.tp=2"], _all("parallel.tp 2 x parallel.pp 2 = 4 does not divide the world size 2")),
    "moe": (["model.preset=debug-moe"], _all("pp 2", "mixture")),
    "lora": (["lora.r=4"], _all("pp 2 with LoRA")),
    "tiling": (["parallel.tiled_loss=true"], _all("pp 2 with tiling")),
}


def test_fp32_zero0_without_clipping_runs_under_a_pipeline(tmp_path):
    recipe = load_recipe("debug", ["parallel.pp=2", "train.grad_accum=2", "deepspeed.config=zero0",
                                   "train.grad_clip=0", f"output_dir={tmp_path}", "data.max_documents=50"])
    r = resolve(recipe, world_size=2)
    assert r.zero_stage == 0 and r.recipe.parallel.pp == 2 and r.plan.pipeline_parallel == 2


@pytest.mark.parametrize("case", REFUSED)
def test_pipeline_refusals_are_one_line(case, tmp_path):
    overrides, pattern = REFUSED[case]
    world = [int(o.split("=")[1]) for o in overrides if o.startswith("world_size=")] or [2]
    recipe = load_recipe("debug", ["parallel.pp=2", "train.grad_accum=2", "deepspeed.config=zero1",
                                   f"output_dir={tmp_path}", "data.max_documents=50",
                                   *(o for o in overrides if not o.startswith("world_size="))])
    with pytest.raises(UsageError, match=pattern) as err:
        resolve(recipe, world_size=world[0])
    assert "\n" not in str(err.value)


def test_a_transformers_family_is_refused(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=2048).save_pretrained(tmp_path / "llama")
    recipe = load_recipe("debug", ["parallel.pp=2", "train.grad_accum=2", "deepspeed.config=zero1",
                                   "model.preset=null", f"model.config={tmp_path / 'llama'}",
                                   f"output_dir={tmp_path / 'out'}", "data.max_documents=50"])
    with pytest.raises(UsageError, match=_all("pp 2", "zero_trainer's own dense model")):
        resolve(recipe, world_size=2)
