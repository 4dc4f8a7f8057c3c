"""model.pretrained: a local Hugging Face model directory in (zero_trainer/pretrained.py).

Unit tests read tiny checkpoints written by transformers (tests/hf_families.py): the index from the headers, sharded
or not; every parameter's pieces, Mixtral's per-expert layout included; flat ranges as ZeRO-3 partitions read them.
The multiproc tests read conftest.pretrained_runs (in the 1- and 2-rank engine launches): lr-0 round trips that export
the source bit for bit, and fine-tunes from the same weights at ZeRO-2, ZeRO-3 + CPU offload (stopped and resumed,
without reading the weights again) and ZeRO-3 + NVMe, which must agree.
"""

from pathlib import Path

import pytest
import torch
from conftest import PRETRAINED_STEPS, assert_losses_close
from hf_families import write_all

from zero_trainer import pretrained as P
from zero_trainer.errors import UsageError
from zero_trainer.model import build_model, model_config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return write_all(tmp_path_factory.mktemp("checkpoints"))


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("name", ["llama", "mixtral", "gemma2", "phi3", "zero_lm_tied", "zero_lm_untied"])
def test_load_equals_from_pretrained(name, checkpoints):
    """Tensor by tensor into a plain model: exactly the weights transformers' from_pretrained loads."""
    cfg = model_config(str(checkpoints[name]))
    model = build_model(cfg)
    for p in model.parameters():
        p.data.fill_(float("nan"))
    stats = P.load_pretrained(model, checkpoints[name])
    want = _hf(checkpoints[name]).state_dict()
    got = model.state_dict()
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key].to(got[key].dtype)), key
    index = P.read_index(checkpoints[name])
    assert stats["bytes_read"] == sum(t.numel * t.itemsize for t in index.values())


def test_sharded_checkpoint_reads_like_one_file(checkpoints, tmp_path):
    sharded = tmp_path / "sharded"
    _hf(checkpoints["llama"]).save_pretrained(sharded, max_shard_size="60KB")
    assert (sharded / P.INDEX_FILE).is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    a, b = P.read_index(checkpoints["llama"]), P.read_index(sharded)
    assert {k: (t.dtype, t.shape) for k, t in a.items()} == {k: (t.dtype, t.shape) for k, t in b.items()}
    model = build_model(model_config(str(checkpoints["llama"])))
    P.load_pretrained(model, sharded)
    for key, value in _hf(checkpoints["llama"]).state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_mixtral_experts_come_from_per_expert_tensors(checkpoints):
    """transformers saves Mixtral's experts one tensor each (w1, w3, w2); the model fuses them (gate_up_proj,
    down_proj). The source of a fused tensor is those tensors' pieces in its flat order."""
    model = build_model(model_config(str(checkpoints["mixtral"])))
    sources, unexpected = P.weight_sources(model, P.read_index(checkpoints["mixtral"]))
    assert not unexpected
    gate_up = sources["model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.shape == (4, 256, 64)
    assert gate_up.keys[:3] == ["model.layers.0.block_sparse_moe.experts.0.w1.weight",
                                "model.layers.0.block_sparse_moe.experts.0.w3.weight",
                                "model.layers.0.block_sparse_moe.experts.1.w1.weight"]


@pytest.mark.parametrize("ranks", [2, 3, 7])
def test_partitions_reassemble_every_tensor(ranks, checkpoints):
    """What each ZeRO-3 rank reads ([r·p, r·p + p) of the flat tensor, p = ceil(numel / ranks)) concatenates to the
    whole tensor, for plain and fused (Mixtral) sources alike, with reads smaller than any tensor."""
    model = build_model(model_config(str(checkpoints["mixtral"])))
    index = P.read_index(checkpoints["mixtral"])
    sources = P.check_against(model, index, checkpoints["mixtral"])
    whole = _hf(checkpoints["mixtral"]).state_dict()
    with P.Reader(chunk_bytes=4096) as reader:
        for name, src in sources.items():
            numel = whole[name].numel()
            size = -(-numel // ranks)
            parts = []
            for r in range(ranks):
                out = torch.empty(max(0, min(size, numel - r * size)))
                reader.read(src, r * size, out)
                parts.append(out)
            assert torch.equal(torch.cat(parts), whole[name].flatten()), name


def test_preflight_reports_the_first_problem_in_one_line(checkpoints, tmp_path):
    cfg = model_config(str(checkpoints["llama"]))
    P.preflight(checkpoints["llama"], cfg)  # the checkpoint as written: fine
    other = model_config(str(checkpoints["llama"]))
    other.num_hidden_layers = 3
    with pytest.raises(UsageError) as err:
        P.preflight(checkpoints["llama"], other)
    assert "model.layers.2." in err.value.line() and "is missing from" in err.value.line()
    assert "\n" not in err.value.line()


def test_fingerprint_tells_checkpoints_apart(checkpoints, tmp_path):
    a = P.fingerprint(P.read_index(checkpoints["zero_lm_tied"]))
    assert a == P.fingerprint(P.read_index(checkpoints["zero_lm_tied"]))
    assert a != P.fingerprint(P.read_index(checkpoints["zero_lm_untied"]))


def test_recipe_pretrained_replaces_the_files_preset_and_brings_its_tokenizer(checkpoints):
    from zero_trainer.recipe import load_recipe

    recipe = load_recipe("debug", [f"model.pretrained={checkpoints['llama']}"])
    assert recipe.model.preset is None and recipe.model_field == "model.pretrained"
    assert recipe.tokenizer_path == str(checkpoints["llama"])
    assert load_recipe("debug", [f"model.pretrained={checkpoints['llama']}", "data.tokenizer=t"]).tokenizer_path == "t"


def test_load_bench_meets_the_issue(tmp_path):
    """bench/results/load.json: a >= 1B checkpoint loaded at ZeRO-3 on 2 ranks, rank 0's peak at most half of
    transformers' (every round), the same weights in both arms, and the planner within 15% of the measured peak, as
    committed and as plan.py predicts it now (for the same shape)."""
    import json

    from bench.load import predicted
    from zero_trainer.model import model_config

    doc = json.loads((Path(__file__).resolve().parent.parent / "bench" / "results" / "load.json").read_text())
    assert doc["params"] >= 1e9 and doc["world_size"] == 2 and doc["ds_config"] == "zero3" and doc["same_weights"]
    assert max(doc["rank0_peak_ratio_per_round"]) <= 0.5, doc["rank0_peak_ratio_per_round"]
    assert abs(doc["prediction_error"]) <= 0.15
    config = tmp_path / "config"
    model_config(doc["preset"]).to_llama_config().save_pretrained(config)
    now = predicted(config)["load_peak_bytes"]
    for measured in doc["arms"]["zero_trainer"]["rank0_peak_rss_bytes"]:
        assert abs(measured / now - 1) <= 0.15, (measured, now)


def test_scale_pretrained_meets_the_stretch():
    """bench/results/scale_pretrained.json: a >= 3B bf16 checkpoint fine-tuned here through --ds-config auto with no
    DeepSpeed override (the planner chose NVMe), >= 2 steps with a non-zero learning rate; the step peak within 15% as
    committed and re-predicted now, the load peak within 15% as plan.py predicts it now."""
    import json

    from zero_trainer import plan
    from zero_trainer.hardware import GiB, Hardware

    results = Path(__file__).resolve().parent.parent / "bench" / "results"
    doc = json.loads((results / "scale_pretrained.json").read_text())
    assert doc["params"] >= 3e9 and doc["ds_config_overrides"] == {} and doc["ds_config_name"] == "zero3_nvme"
    assert sum(lr > 0 for lr in doc["lr"]) >= 2 and len(doc["losses"]) == doc["steps"]
    assert abs(doc["prediction_ratio"] - 1) <= 0.15
    shape = plan._llama_shape("scale", doc["shape"])
    hw = Hardware(1, 1, None, doc["cpu_mem_bytes"], doc["nvme_free_bytes_before"] // GiB * GiB)
    now = plan.make_plan(shape, hw, plan.Workload(doc["seq_len"], doc["micro_batch"], "bf16"))
    assert now.chosen.name == doc["ds_config_name"]
    assert abs(now.predicted_peak_bytes / doc["measured_peak_bytes"] - 1) <= 0.15
    assert abs(now.load_peak_bytes / doc["load_peak_bytes"] - 1) <= 0.15, (now.load_peak_bytes, doc["load_peak_bytes"])


# --------------------------------------------------------------------------------------------------------------
# real runs (conftest.pretrained_runs)


def _export(summary: dict, out: Path) -> Path:
    from zero_trainer.export import export

    return export(Path(summary["recipe"]["output_dir"]) / "checkpoints", out)


@pytest.mark.multiproc
@pytest.mark.parametrize("key", [("pretrained_zero0", 1), ("pretrained_zero3", 1), ("pretrained_zero0", 2)],
                         ids=["zero0-1rank", "zero3-1rank", "zero0-2ranks"])
def test_round_trip_exports_the_source_bit_for_bit(key, engine_runs, tmp_path):
    """lr 0 for a step, then export: every tensor as the source has it (dtype, bytes); the logits of the export are
    those of from_pretrained(source). ZeRO-3 at 2 ranks: every family's, in test_families."""
    from safetensors.torch import load_file

    summary = engine_runs[key]
    source = Path(summary["pretrained"]["path"])
    out = _export(summary, tmp_path / "export")
    want, got = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(got) == sorted(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(_hf(out).eval()(ids).logits, _hf(source).eval()(ids).logits)
    assert summary["load_bytes_per_rank"][0] > 0


@pytest.mark.multiproc
def test_fine_tunes_agree_across_rungs_and_resume_reads_no_weights(engine_runs):
    """The same pretrained weights at ZeRO-2 (tensor by tensor), ZeRO-3 + CPU offload and ZeRO-3 + NVMe (partition by
    partition, NVMe's swapped in and out): the same fp32 losses. The offload run stopped at step 2 and resumed: its
    second half read nothing from the pretrained files (the checkpoint holds the weights)."""
    z2, offload, nvme = (engine_runs[n, 2] for n in ("pretrained_zero2", "pretrained_offload", "pretrained_nvme"))
    assert z2["steps"] == PRETRAINED_STEPS and z2["losses"][-1] < z2["losses"][0]
    assert_losses_close(offload["losses"], z2["losses"], 1e-4)
    assert_losses_close(nvme["losses"], z2["losses"], 1e-4)
    assert offload["resumed_from"] and offload["load_bytes_per_rank"] == [0, 0]
    assert nvme["pretrained"] == z2["pretrained"] and min(nvme["load_bytes_per_rank"]) > 0


@pytest.mark.multiproc
@pytest.mark.parametrize("name, ref", [("tp2_pretrained", "pretrained_ref"),
                                       ("sp2_pretrained", "pretrained_ref_llama")])
def test_model_parallel_from_pretrained_weights_follows_the_one_rank_run(name, ref, engine_runs):
    """tp=2 (AutoTP, our model, ZeRO-1) and sp=2 (Ulysses, transformers' Llama, ZeRO-3) from the same pretrained
    weights as a 1-rank run reading the same batches: the same losses (as test_parallel's random-init runs)."""
    run, one = engine_runs[name, "parallel"], engine_runs[ref, 1]
    assert run["pretrained"] == one["pretrained"] and run["world_size"] == 2
    assert_losses_close(run["losses"], one["losses"], 1e-3)
