"""zero_trainer.plan with tensor (AutoTP) and sequence (Ulysses) parallelism and tiling: the memory model's terms,
the sp search, the command's flags and JSON, bad layouts, and the ALST case (Llama-3.1-8B, 524288 tokens, 8 GPUs).

All in this process: `plan` launches nothing. The measured tp=2 / sp=2 rows join bench/results later.
"""

import dataclasses
import json
import math

import pytest

from zero_trainer import plan
from zero_trainer.ds_config import load_ds_config
from zero_trainer.errors import UsageError
from zero_trainer.recipe import load_recipe

GiB = 2**30

# Llama-3.1-8B's shape (ALST's model), written as a local config.json
LLAMA_8B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 128256, "max_position_embeddings": 524288, "rope_theta": 500000.0,
            "tie_word_embeddings": False}
ALST_SEQ = 524288
ALST_ARGS = ["--gpus-per-node", "8", "--gpu-mem", "80", "--cpu-mem", "1024", "--seq-len", str(ALST_SEQ)]
H100_NODE = plan.Hardware(1, 8, 80 * GiB, 1024 * GiB)


@pytest.fixture(scope="module")
def llama_8b(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama8b") / "config.json"
    path.write_text(json.dumps(LLAMA_8B))
    return path


@pytest.fixture(scope="module")
def llama_8b_shape(llama_8b):
    return plan.model_shape(str(llama_8b))  # a meta build: once for the module


def cli(capsys, *args) -> tuple[int, str, str]:
    from zero_trainer.cli import main

    code = main(["plan", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


# --- the memory model ---------------------------------------------------------------------------------------

def test_tp_sp_one_is_the_calibrated_model():
    """Defaults change nothing: the closed form of the module docstring (q and the output full width, k and v at
    the key/value heads' width, as sdpa saves them with GQA)."""
    shape = plan.model_shape("1b")
    s, b, w = 2048, 2, 2
    h, f, H, L, V = shape.hidden, shape.ffn, shape.heads, shape.layers, shape.vocab
    kv_width = shape.kv_heads * (h // H)
    layer = s * b * (8 * h + 6 * w * h + 2 * w * kv_width + 4 * w * f + 4 * H)
    head = s * b * (plan.LOGIT_BYTES * V + (4 + 2 * w) * h + 2 * w * (h // H))
    workload = plan.Workload(s, b, "bf16")
    assert plan.activation_bytes(shape, workload, False) == L * layer + head
    # with checkpointing: the loss head's peak, or the recomputed layer's with the gradients its backward makes
    recomputed = int(layer * (1 + plan.RECOMPUTE_GRADIENTS))
    assert plan.activation_bytes(shape, workload, True) == L * w * s * b * h + max(head, recomputed)
    assert plan.tp_rank_shape(shape, 1) is shape


def test_tp_splits_the_projections_and_zero_partitions_over_world_over_tp():
    shape = plan.model_shape("7b")
    h, f, L, V = shape.hidden, shape.ffn, shape.layers, shape.vocab
    held = plan.tp_rank_shape(shape, 2)
    projections = L * (4 * h * h + 3 * h * f)  # 7b: as many kv heads as heads
    assert held.params == shape.params - projections // 2  # embedding, untied head and norms stay whole
    assert held.largest_param == V * h and held.layer_params == (shape.layer_params - 2 * h) // 2 + 2 * h
    hw = plan.Hardware(1, 8, 80 * GiB, 1024 * GiB)
    wl, wl2 = plan.Workload(2048, 1), plan.Workload(2048, 1, tp=2)
    assert plan.zero_ranks(hw, wl) == 8 and plan.zero_ranks(hw, wl2) == 4
    zero1 = {r.name: r for r in plan.ladder_rungs(shape, wl2, hw)}["zero1"]
    c = plan.estimate(shape, zero1, hw, wl2, False)
    assert c.device["optimizer"] == 12 * math.ceil(held.params / 4)  # Adam over the TP rank's share, ÷ dp = 4
    assert c.device["params"] == 2 * held.params


def test_tp_splits_head_and_ffn_activations_not_the_norms_or_the_loss():
    shape = plan.model_shape("7b")
    h, f, H, L = shape.hidden, shape.ffn, shape.heads, shape.layers
    one, two = (plan.activation_terms(shape, plan.Workload(4096, 1, tp=tp), False) for tp in (1, 2))
    assert one["loss"] == two["loss"]
    assert one["layers"] - two["layers"] == L * 4096 * (4 * 2 * h + 4 * H + 4 * 2 * f) // 2


def test_sp_divides_every_activation_and_keeps_zero_over_the_whole_world():
    """Ulysses: each rank holds seq_len/sp tokens of everything (loss head included) plus the all-to-all buffers;
    ZeRO partitions over dp·sp, as plain data parallelism at that world size."""
    shape = plan.model_shape("1b")
    hw = plan.Hardware(1, 8, 80 * GiB, 1024 * GiB)
    plain, split = plan.Workload(2048, 1), plan.Workload(8192, 1, sp=4)
    for ac in (False, True):
        a, b = plan.activation_terms(shape, plain, ac), plan.activation_terms(shape, split, ac)
        assert {k: v for k, v in a.items() if k != "all_to_all"} == {k: v for k, v in b.items() if k != "all_to_all"}
        hd, kv = shape.hidden // shape.heads, max(shape.kv_heads, 4)
        assert a["all_to_all"] == 0 and b["all_to_all"] == 2 * 2 * 2048 * hd * (2 * shape.heads + 2 * kv)
    rungs = {r.name: r for r in plan.ladder_rungs(shape, split, hw)}
    for name in ("zero1", "zero3"):
        c1, c4 = (plan.estimate(shape, rungs[name], hw, wl, True) for wl in (plain, split))
        assert {k: c1.device[k] for k in ("params", "grads", "optimizer")} == \
            {k: c4.device[k] for k in ("params", "grads", "optimizer")}


def test_tiling_keeps_one_tile():
    shape = plan.model_shape("1b")
    s, w, h, f, V, L = 32768, 2, shape.hidden, shape.ffn, shape.vocab, shape.layers
    plain = plan.activation_terms(shape, plan.Workload(s, 1), False)
    loss = plan.activation_terms(shape, plan.Workload(s, 1, tiled_loss=True), False)
    tile = math.ceil(s / plan.loss_tiles(s, V))
    assert 4 * tile * V <= plan.LOSS_TILE_LOGIT_BYTES * 1.01  # about 1 GiB of fp32 logits a tile
    assert plain["loss"] - loss["loss"] == (s - tile) * plan.LOGIT_BYTES * V - w * s * h
    mlp = plan.activation_terms(shape, plan.Workload(s, 1, tiled_mlp=True), False)
    assert plan.mlp_tiles(s, h) == s // h  # ALST's rule: tiles of `hidden` tokens
    assert plain["layers"] - mlp["layers"] == L * s * 4 * w * f  # no layer keeps its ffn-wide tensors
    assert mlp["live"] == h * 4 * w * f + w * s * h  # one tile's, and the gradient of the MLP's input


# --- recipes: fixed degrees, and the sp search under deepspeed.config: auto -----------------------------------

@pytest.mark.parametrize("overrides, rung", [
    (["model.preset=minimind-26m", "parallel.tp=2"], "zero1"),
    (["model.preset=minimind-26m", "parallel.sp=2"], "zero3"),
])
def test_plan_recipe_predicts_tp_and_sp_runs(overrides, rung):
    """What the calibration rows for tp=2 / sp=2 will be compared with (world size 2: one TP or SP group)."""
    recipe = load_recipe("recipes/debug.yaml", [*overrides, f"deepspeed.config={rung}"])
    p = plan.plan_recipe(recipe, None, 2, ds=load_ds_config(rung))
    base = plan.plan_recipe(load_recipe("recipes/debug.yaml", [overrides[0], f"deepspeed.config={rung}"]), None, 2,
                            ds=load_ds_config(rung))
    assert p.chosen.name == rung and 0 < p.predicted_peak_bytes < base.predicted_peak_bytes
    key = "tensor_parallel" if "tp" in overrides[1] else "sequence_parallel"
    assert p.summary()[key] == 2 and p.to_json()[key] == 2


def test_auto_searches_sp_only_when_nothing_fits_at_sp_1():
    recipe = load_recipe("recipes/debug.yaml", ["model.preset=minimind-26m", "data.seq_len=8192", "train.micro_batch=1",
                                                "deepspeed.config=auto", "hardware.cpu_mem=6"])
    p = plan.plan_recipe(recipe, None, 4)
    assert p.sequence_parallel in (2, 4) and p.searched[0][0] == 1 and "comes closest" in p.searched[0][1]
    assert "the smallest sp that fits" in p.reason
    roomy = load_recipe("recipes/debug.yaml", ["model.preset=minimind-26m", "data.seq_len=8192", "train.micro_batch=1",
                                               "deepspeed.config=auto", "hardware.cpu_mem=64"])
    assert plan.plan_recipe(roomy, None, 4).sequence_parallel == 1
    fixed = load_recipe("recipes/debug.yaml", ["model.preset=minimind-26m", "data.seq_len=8192", "train.micro_batch=1",
                                               "deepspeed.config=auto", "hardware.cpu_mem=6", "parallel.tp=2"])
    with pytest.raises(UsageError) as err:  # no search beside AutoTP, and never tp by itself
        plan.plan_recipe(fixed, None, 4)
    assert "sequence parallel" not in err.value.fix


# --- the ALST case ---------------------------------------------------------------------------------------------

def test_alst_8b_at_524288_tokens_on_8_gpus_chooses_sp(llama_8b, capsys):
    code, out, err = cli(capsys, "--model", llama_8b, *ALST_ARGS, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["sequence_parallel"] > 1 and doc["tensor_parallel"] == 1 and doc["chosen"] is not None
    assert doc["activation_checkpointing"] and doc["tiled_loss"] and doc["predicted_peak_bytes"] < 72 * GiB
    assert doc["zero_partitions"] == 8 and doc["data_parallel"] == 8 // doc["sequence_parallel"]
    assert [s["sequence_parallel"] for s in doc["sequence_parallel_search"]][0] == 1
    assert "more memory per GPU" in doc["sequence_parallel_search"][0]["reason"]
    code, out, err = cli(capsys, "--model", llama_8b, *ALST_ARGS)
    assert code == 0, err
    assert f"sequence parallel {doc['sequence_parallel']}: the smallest sp that fits (sp 1" in out
    chosen = next(line for line in out.splitlines() if line.startswith("*"))
    assert " yes loss+mlp " in chosen or " yes loss " in chosen


def test_alst_published_setup_fits_and_sp_1_does_not(llama_8b_shape):
    """ALST (Bekman et al. 2025): Llama-8B, 500k tokens, 8×H100 80GB, sp=8, ZeRO-3 with the optimizer on the CPU,
    activation checkpointing, tiled MLP and loss. Without SP the checkpointed layer inputs alone (32 × 524288 × 4096
    bf16 = 128 GiB a rank) exceed the device."""
    wl = plan.Workload(ALST_SEQ, 1, "bf16", sp=8, tiled_loss=True, tiled_mlp=True)
    rung = {r.name: r for r in plan.ladder_rungs(llama_8b_shape, wl, H100_NODE)}["zero3_offload_optimizer"]
    alst = plan.judged(llama_8b_shape, rung, H100_NODE, wl, True)
    assert alst.fits and alst.device_bytes < 0.6 * 80 * GiB, alst.why
    one = dataclasses.replace(wl, sp=1)
    assert plan.activation_terms(llama_8b_shape, one, True)["layers"] == 128 * GiB
    assert not plan.judged(llama_8b_shape, rung, H100_NODE, one, True).fits
    p = plan.plan_model(llama_8b_shape, H100_NODE, ALST_SEQ, sp=8)
    assert p.chosen is not None and p.sequence_parallel == 8 and p.parallel_reason.startswith("as given")


def test_alst_at_sp_1_refuses_and_says_what_is_missing(llama_8b, capsys):
    code, out, err = cli(capsys, "--model", llama_8b, *ALST_ARGS, "--sp", "1")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "comes closest" in lines[0] and "GiB more memory per GPU" in lines[0], lines[0]
    assert "sequence parallel 1: as given" in out


# --- the command: flags, JSON, bad layouts ----------------------------------------------------------------------

def test_json_has_the_parallel_degrees(capsys):
    code, out, err = cli(capsys, "--model", "7b", "--gpus-per-node", 8, "--gpu-mem", 80, "--cpu-mem", 512, "--tp", 2,
                         "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["tensor_parallel"], doc["sequence_parallel"], doc["zero_partitions"]) == (2, 1, 4)
    assert doc["tiled_mlp"] is False and doc["tiled_loss"] is False
    assert all({"tiled_mlp", "tiled_loss"} <= set(c) for c in doc["candidates"])
    line = plan.plan_model("7b", plan.Hardware(1, 8, 80 * GiB, 512 * GiB), tp=2).line()
    assert "tp 2" in line and "sp" not in line.split("a rank")[1]


@pytest.mark.parametrize("args, flag, words", [
    (["--model", "7b", "--gpus-per-node", "8", "--tp", "3"], "--tp", "does not divide the world size 8"),
    (["--model", "7b", "--gpus-per-node", "8", "--sp", "3"], "--sp", "does not divide the world size 8"),
    (["--model", "7b", "--gpus-per-node", "8", "--tp", "0"], "--tp", "invalid"),
    (["--model", "70b", "--gpus-per-node", "16", "--tp", "16"], "--tp", "8 key/value heads"),
    (["--model", "3b", "--gpus-per-node", "16", "--sp", "16"], "--sp", "24 attention heads"),
    (["--model", "7b", "--gpus-per-node", "8", "--sp", "8", "--seq-len", "1020"], "--sp", "seq_len 1020"),
])
def test_bad_layout_is_one_line_and_exit_2(args, flag, words, capsys):
    code, _, err = cli(capsys, *args, "--cpu-mem", "64")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert f"({flag})" in lines[0] and words in lines[0], lines[0]


def test_sp_degrees_follow_ulysses_rules():
    shape = plan.model_shape("3b")  # 24 heads, 8 kv heads
    hw = plan.Hardware(1, 16, 80 * GiB, 1024 * GiB)
    assert plan.sequence_parallel_degrees(shape, hw, plan.Workload(2048, 1)) == [1, 2, 4, 8]
    assert plan.sequence_parallel_degrees(shape, hw, plan.Workload(2050, 1)) == [1, 2]
    debug = plan.model_shape("debug")  # 4 heads, 2 kv heads: sp 4 replicates each kv head twice
    assert plan.sequence_parallel_degrees(debug, plan.Hardware(1, 4, None, 64 * GiB), plan.Workload(64, 1)) == [1, 2, 4]
