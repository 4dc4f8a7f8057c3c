"""zero_trainer.plan with pipeline parallelism: the stages (layers, parameters, the tied embedding's copy), 1F1B's
micro-batches in flight, the bubble, the pp search, `plan --pp`, and the layouts it refuses. All in this process."""

import dataclasses
import json

import pytest

from zero_trainer import plan
from zero_trainer.ds_config import load_ds_config
from zero_trainer.errors import UsageError
from zero_trainer.recipe import load_recipe

GiB = 2**30
# minimind-26m at seq 512 fits here only as a 4-stage pipeline: each rank builds the whole model in fp32 first (the
# heap keeps its small tensors: plan.pipeline_init_retained_bytes), so pp 2 is still too much, as sp is
FOUR_CPU_RANKS = plan.Hardware(1, 4, None, int(3.5 * GiB))


def cli(capsys, *args) -> tuple[int, str, str]:
    from zero_trainer.cli import main

    code = main(["plan", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


# --- pp 1: nothing moves ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, hw", [("minimind-26m", plan.Hardware(1, 2, None, 16 * GiB)),
                                       ("7b", plan.Hardware(1, 8, 80 * GiB, 512 * GiB))])
def test_pp_one_ignores_micro_batches_and_keeps_every_candidate(model, hw):
    shape = plan.model_shape(model)
    base, more = plan.Workload(512, 2, "bf16"), plan.Workload(512, 2, "bf16", pp=1, micro_batches=16)
    assert plan.zero_ranks(hw, more) == hw.world_size and more.pipeline_bubble == 0
    for rung in plan.ladder_rungs(shape, base, hw):
        for ac in (False, True):
            a, b = plan.estimate(shape, rung, hw, base, ac), plan.estimate(shape, rung, hw, more, ac)
            assert (a.device, a.cpu_bytes, a.nvme_bytes, b.stages) == (b.device, b.cpu_bytes, b.nvme_bytes, [])
    p = plan.plan_model(model, hw, 512, 2)
    assert p.pipeline_parallel == 1 and p.stages == [] and p.pipeline_search == []
    summary = p.summary()
    assert (summary["pipeline_parallel"], summary["pipeline_bubble"], summary["stages"]) == (1, 0, [])
    assert "pp" not in p.parallel and "pipeline" not in p.line()


# --- the stages ---------------------------------------------------------------------------------------------------

def test_stage_layers_match_deepspeeds_partition_balanced():
    from deepspeed.runtime.utils import partition_balanced

    for layers in (4, 7, 8, 13, 16, 30):
        for pp in range(1, min(layers, 8) + 1):
            weights = [0] + [1] * layers + [0, 0]  # embedding, decoder layers, final norm, head
            parts = partition_balanced(weights, pp)
            assert plan.stage_layers(layers, pp) == [sum(weights[parts[i]:parts[i + 1]]) for i in range(pp)]


@pytest.mark.parametrize("model, tied", [("1b", True), ("7b", False)])
def test_stage_params_sum_to_the_model_plus_the_tied_copy(model, tied):
    shape = plan.model_shape(model)
    assert shape.tied_embeddings is tied and shape.pipelines
    table, h = shape.vocab * shape.hidden, shape.hidden
    for pp in (2, 4):
        stages = plan.pipeline_stages(shape, pp)
        assert sum(st.params for st in stages) == shape.params + (table if tied else 0)
        assert sum(st.layers for st in stages) == shape.layers
        first, last = stages[0], stages[-1]
        assert first.params == table + first.layers * shape.layer_params  # the embedding
        assert last.params == last.layers * shape.layer_params + h + table  # final norm, head (or the embedding's copy)
        assert all(st.params == st.layers * shape.layer_params for st in stages[1:-1])
        assert sum(st.shape.param_sizes.count(table) for st in stages) == 2


def test_first_and_last_stages_are_the_heaviest():
    shape, hw = plan.model_shape("7b"), plan.Hardware(1, 8, 80 * GiB, 512 * GiB)  # 32 layers: 8 a stage
    wl = plan.Workload(2048, 1, "bf16", pp=4, micro_batches=16)
    rung = {r.name: r for r in plan.ladder_rungs(shape, wl, hw)}["zero1"]
    c = plan.estimate(shape, rung, hw, wl, True)
    params = [st["params"] for st in c.stages]
    assert params[3] == params[0] + shape.hidden and params[0] > params[1] == params[2]  # + the final norm
    peaks = [st["device_bytes"] for st in c.stages]
    assert peaks[0] > peaks[1] > peaks[2] and peaks[3] > peaks[2]  # stage 0: 4 in flight; the last: the loss head
    assert c.device_bytes == max(peaks) and c.device == dict(c.device)
    terms = [plan.pipeline_activation_terms(shape, wl, True, st) for st in plan.pipeline_stages(shape, 4, 16)]
    assert [t["loss"] > 0 for t in terms] == [True] * 4  # rope everywhere
    head = shape.vocab * plan.LOGIT_BYTES * 2048
    assert terms[3]["loss"] > head > terms[0]["loss"]  # the logits on the last stage only


def test_in_flight_micro_batches_follow_1f1b():
    shape = plan.model_shape("7b")
    for m, flight, buffers in ((16, [4, 3, 2, 1], [4, 3, 2, 2]), (2, [2, 2, 2, 1], [2, 2, 2, 2]),
                               (1, [1, 1, 1, 1], [2, 2, 2, 2])):
        stages = plan.pipeline_stages(shape, 4, m)
        assert [st.in_flight for st in stages] == flight and [st.pipe_buffers for st in stages] == buffers
    wl = plan.Workload(1024, 2, "bf16", pp=4)
    one = plan.activation_terms(dataclasses.replace(shape, layers=1), wl, True)["layers"]
    assert one == 2 * 1024 * 2 * shape.hidden  # checkpointed: each layer keeps its input
    for st in plan.pipeline_stages(shape, 4, 16):
        terms = plan.pipeline_activation_terms(shape, wl, True, st)
        assert terms["layers"] == st.in_flight * st.layers * one


def test_cpu_only_sums_every_stages_ranks():
    shape, hw = plan.model_shape("minimind-26m"), plan.Hardware(1, 4, None, 64 * GiB)
    wl = plan.Workload(512, 1, "bf16", pp=2, micro_batches=8)
    for rung in plan.ladder_rungs(shape, wl, hw):
        c = plan.estimate(shape, rung, hw, wl, False)
        assert c.cpu_bytes == 2 * sum(st["device_bytes"] for st in c.stages)  # dp 2 ranks of each stage
        assert plan.zero_ranks(hw, wl) == 2


def test_pipeline_rungs_are_zero0_in_bf16_and_zero1():
    shape, hw = plan.model_shape("minimind-26m"), plan.Hardware(1, 2, None, 64 * GiB)
    names = {p: [r.name for r in plan.ladder_rungs(shape, plan.Workload(256, 1, p, pp=2), hw)]
             for p in ("bf16", "fp16", "fp32")}
    assert names == {"bf16": ["zero0", "zero1"], "fp16": ["zero1"], "fp32": ["zero1"]}


def test_bubble():
    assert plan.Workload(128, 1, pp=4, micro_batches=12).pipeline_bubble == 3 / 15
    assert plan.Workload(128, 1, pp=2, micro_batches=1).pipeline_bubble == 1 / 2
    assert plan.Workload(128, 1, micro_batches=7).pipeline_bubble == 0
    p = plan.plan_model("7b", plan.Hardware(1, 8, 80 * GiB, 512 * GiB), 2048, pp=4, micro_batches=4)
    assert p.summary()["pipeline_bubble"] == round(3 / 7, 4) and p.summary()["micro_batches"] == 4
    assert any(n.startswith("warning: 4 micro-batches") for n in p.notes)  # under 4·pp
    assert not plan.plan_model("7b", plan.Hardware(1, 8, 80 * GiB, 512 * GiB), 2048, pp=4).notes  # default m 16


# --- the pp search --------------------------------------------------------------------------------------------------

def test_search_picks_the_smallest_pp_that_fits_when_nothing_fits_at_pp_1():
    assert plan.plan_model("minimind-26m", FOUR_CPU_RANKS, 512).chosen is None  # pp 1, sp search included
    p = plan.plan_model("minimind-26m", FOUR_CPU_RANKS, 512, pp=None)
    assert p.chosen is not None and p.pipeline_parallel == 4 and p.sequence_parallel == 1
    assert [d for d, _ in p.pipeline_search] == [1, 2]
    assert "the smallest pp that fits (pp 1, 2 do not" in p.reason
    assert p.chosen.name in plan.PIPELINE_LADDER and len(p.stages) == 4
    assert p.predicted_peak_bytes == max(st["predicted_peak_bytes"] for st in p.stages)
    line = p.line()
    assert "pp 4" in line and "bubble 16% at 16 micro-batches" in line
    doc = p.to_json()
    assert (doc["pipeline_parallel"], doc["data_parallel"], doc["zero_partitions"]) == (4, 1, 1)
    assert doc["pipeline_parallel_search"][0]["pipeline_parallel"] == 1
    roomy = plan.plan_model("minimind-26m", plan.Hardware(1, 4, None, 64 * GiB), 512, pp=None)
    assert roomy.pipeline_parallel == 1 and roomy.pipeline_search == []


def test_recipe_auto_searches_pp_with_grad_accum_as_micro_batches():
    overrides = ["model.preset=minimind-26m", "hardware.cpu_mem=3.5", "deepspeed.config=auto", "data.seq_len=512",
                 "train.micro_batch=1", "train.precision=bf16", "train.grad_accum=8"]
    p = plan.plan_recipe(load_recipe("recipes/debug.yaml", overrides), None, 4)
    assert p.pipeline_parallel == 4 and p.workload.micro_batches == 8
    summary = p.summary()
    assert summary["pipeline_parallel"] == 4 and [st["layers"] for st in summary["stages"]] == [2, 2, 2, 2]
    for extra in ("parallel.sp=2", "train.grad_accum=1", "parallel.tiled_loss=true"):  # no search beside a fixed sp,
        with pytest.raises(UsageError):  # with fewer micro-batches than stages, or beside tiling
            plan.plan_recipe(load_recipe("recipes/debug.yaml", [*overrides, extra]), None, 4)


def test_no_search_for_other_models(tmp_path):
    assert not plan.model_shape("minimind-moe").pipelines
    assert plan.pipeline_parallel_degrees(plan.model_shape("minimind-moe"), FOUR_CPU_RANKS) == []
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                                  "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                  "vocab_size": 256, "max_position_embeddings": 128}))
    shape = plan.model_shape(str(config))
    assert shape.model_type == "llama" and not shape.pipelines
    assert plan.pipeline_parallel_degrees(plan.model_shape("debug"), plan.Hardware(1, 8, None, GiB)) == [2, 4]


# --- the command --------------------------------------------------------------------------------------------------

def test_plan_pp_shows_stages_and_bubble(capsys):
    args = ["--model", "7b", "--gpus-per-node", 8, "--gpu-mem", 40, "--cpu-mem", 256, "--pp", 4]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    assert "pipeline parallel 4: as given" in out and "ZeRO partitions over 2 rank(s), data parallel 2" in out
    assert "pipeline: 4 stages, 16 micro-batches a step (1F1B); bubble (pp-1)/(m+pp-1) = 3/19 = 16%" in out
    rows = [line.split() for line in out.split("stage layers")[1].splitlines()[1:5]]
    assert [r[:2] for r in rows] == [["0", "8"], ["1", "8"], ["2", "8"], ["3", "8"]]
    assert [r[3] for r in rows] == ["4", "3", "2", "1"] and "warning" not in out
    code, out, err = cli(capsys, *args, "--grad-accum", 4)
    assert code == 0, err
    assert "bubble (pp-1)/(m+pp-1) = 3/7 = 43%" in out and "warning: 4 micro-batches a step through 4" in out
    code, out, err = cli(capsys, *args, "--json")
    doc = json.loads(out)
    assert (doc["pipeline_parallel"], doc["micro_batches"], doc["pipeline_bubble"]) == (4, 16, round(3 / 19, 4))
    assert [st["layers"] for st in doc["stages"]] == [8, 8, 8, 8]
    assert doc["predicted_peak_bytes"] == max(st["predicted_peak_bytes"] for st in doc["stages"])
    assert all(len(c["stages"]) == 4 for c in doc["candidates"])


def test_plan_searches_pp_when_nothing_else_fits(capsys):
    code, out, err = cli(capsys, "--model", "minimind-26m", "--gpus-per-node", 4, "--cpu-mem", 3.5, "--seq-len", 512)
    assert code == 0, err
    assert "pipeline parallel 4: the smallest pp that fits (pp 1, 2 do not" in out and "stage layers" in out


@pytest.mark.parametrize("args, words", [
    (["--model", "7b", "--gpus-per-node", "8", "--pp", "2", "--tp", "2"], "pp 2 does not combine with tp 2"),
    (["--model", "7b", "--gpus-per-node", "8", "--pp", "2", "--sp", "2"], "pp 2 does not combine with sp 2"),
    (["--model", "7b", "--gpus-per-node", "8", "--pp", "3"], "pp 3 does not divide the world size 8"),
    (["--model", "debug", "--gpus-per-node", "8", "--pp", "8"], "more than the model's 4 decoder layers"),
    (["--model", "minimind-moe", "--gpus-per-node", "2", "--pp", "2"], "a mixture of experts"),
    (["--model", "7b", "--gpus-per-node", "8", "--pp", "0"], "pp 0 is invalid"),
    (["--model", "7b", "--gpus-per-node", "8", "--pp", "2", "--lora-r", "8"], "pp 2 with LoRA"),
])
def test_bad_pipeline_is_one_line_and_exit_2(args, words, capsys):
    code, _, err = cli(capsys, *args, "--cpu-mem", "64")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "(--pp)" in lines[0] and words in lines[0], lines[0]


def test_bad_grad_accum_and_named_rungs_under_pp(capsys):
    for m, words in ((0, "micro batches 0 is invalid"), (3, "3 micro-batch(es) a step is below pp 4")):
        code, _, err = cli(capsys, "--model", "7b", "--gpus-per-node", "8", "--pp", "4", "--grad-accum", m)
        assert code == 2 and "(--grad-accum)" in err and words in err and len(err.strip().splitlines()) == 1, err
    for rung in ("zero3", "zero2_offload", "zero3_nvme"):
        recipe = load_recipe("recipes/debug.yaml", ["parallel.pp=2", f"deepspeed.config={rung}", "train.grad_accum=8"])
        with pytest.raises(UsageError) as bad:
            plan.plan_recipe(recipe, None, 2, ds=load_ds_config(rung))
        assert bad.value.where == "deepspeed.config" and "parallel.pp 2" in str(bad.value)
    for rung in ("zero1", "zero0"):  # zero0 in fp32 (debug.yaml's precision): the runtime judges its clipping
        ok = load_recipe("recipes/debug.yaml", ["parallel.pp=2", f"deepspeed.config={rung}", "train.grad_accum=4"])
        p = plan.plan_recipe(ok, None, 2, ds=load_ds_config(rung))
        assert p.pipeline_parallel == 2 and p.chosen.name == rung and len(p.stages) == 2
