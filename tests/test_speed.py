"""The step-time model (plan.speed) and `plan --tokens / --objective speed`, on a probe written here: the numbers it
predicts from are fixed, so every assertion is about the model, not this machine's noise. The real runs' predicted
and measured step times are checked in test_runs (summary.json) and the calibration table (test_plan)."""

import json

import pytest

from zero_trainer import plan
from zero_trainer.probe import MatmulRate, Probe

GiB = 2**30


def fake_probe(device: str = "cpu", **over) -> Probe:
    fields = dict(fingerprint="test", measured_at="2026-12-03T00:00:00+00:00", wall_s=1.0, quick=True, device=device,
                  torch_threads=2,
                  matmul_flops_per_s=tuple(MatmulRate(d, m, k, n, r) for d, r in (("fp32", 1e11), ("bf16", 4e11))
                                           for m, k, n in ((2048, 512, 2048), (2048, 2048, 8192))),
                  host_memory_bytes_per_s=2e10, device_memory_bytes_per_s=None, cpu_adam_s_per_param=1e-9,
                  adamw_s_per_param=4e-9, optimizer_params=1_000_000, h2d_pinned_bytes_per_s=None,
                  h2d_pageable_bytes_per_s=None, d2h_pinned_bytes_per_s=None, d2h_pageable_bytes_per_s=None,
                  disk_path="/tmp", disk_direct_io=True, disk_block_bytes=2**20, disk_write_bytes_per_s=1e9,
                  disk_read_bytes_per_s=1e9, collective_backend="gloo", collective_ranks=2,
                  collective_bucket_bytes=2**24, collective_small_bytes=4096, allreduce_bytes_per_s=1e9,
                  allreduce_latency_s=1e-3, allgather_bytes_per_s=1e9, allgather_latency_s=3e-4,
                  step_overhead_s=2e-4)
    return Probe(**{**fields, **over})


def times(model="minimind-26m", ranks=2, seq=512, micro=4, precision="bf16", probe=None):
    shape = plan.model_shape(model)
    hw = plan.Hardware(1, ranks, None, 64 * GiB, 100 * GiB)
    wl = plan.Workload(seq, micro, precision)
    return {(r.name, ac): plan.step_time(shape, r, hw, wl, ac, probe or fake_probe())
            for r in plan.ladder_rungs(shape, wl, hw) for ac in (False, True)}


def test_compute_is_flops_over_the_probed_rate():
    shape, wl = plan.model_shape("minimind-26m"), plan.Workload(512, 4, "bf16")
    t = times(ranks=1)[("zero0", False)]
    want = plan.COEFFICIENTS["compute"] * plan.flops_per_token(shape, 512, False) * 512 * 4 / 4e11
    assert t.terms["compute"] == pytest.approx(want)
    assert t.terms["comm"] == 0  # one rank: nothing to reduce
    ac = times(ranks=1)[("zero0", True)]
    layers = plan.flops_per_token(shape, 512, True) - plan.flops_per_token(shape, 512, False)
    assert 0.2 < layers / plan.flops_per_token(shape, 512, False) < 1 / 3  # the layers' forward again, not the head's
    assert ac.seconds > t.seconds and t.tokens == 512 * 4 and t.tokens_per_s == pytest.approx(t.tokens / t.seconds)
    assert wl.micro_batches == 1


def test_sharding_offload_and_nvme_cost_what_they_move():
    t = times()
    comm = {name: t[(name, False)].terms["comm"] for name in ("zero0", "zero1", "zero2", "zero3")}
    assert 0 < comm["zero0"] < comm["zero1"] < comm["zero3"]  # stage 1 gathers the updated weights, 3 every micro-step
    two, one = t[("zero0", False)], times(ranks=1)[("zero0", False)]
    assert two.terms["compute"] == pytest.approx(2 * one.terms["compute"])  # two ranks split the probe's two threads
    assert t[("zero1", False)].terms["optimizer"] == pytest.approx(t[("zero0", False)].terms["optimizer"] / 2)
    assert t[("zero2_offload", False)].terms["offload"] > 0 == t[("zero2", False)].terms["offload"]
    assert t[("zero3_nvme", False)].terms["nvme"] > 0 and t[("zero3_nvme", False)].seconds > t[("zero3", False)].seconds
    slow_disk = times(probe=fake_probe(disk_read_bytes_per_s=1e8, disk_write_bytes_per_s=1e8))
    assert slow_disk[("zero3_nvme", False)].terms["nvme"] == pytest.approx(10 * t[("zero3_nvme", False)].terms["nvme"])


def test_a_pipeline_pays_its_bubble():
    shape = plan.model_shape("minimind-26m")
    rung = plan.ladder_rungs(shape, plan.Workload(512, 4, "bf16"), plan.Hardware(1, 2, None, 64 * GiB))[1]
    hw = plan.Hardware(1, 2, None, 64 * GiB)
    few, many = (plan.step_time(shape, rung, hw, plan.Workload(512, 4, "bf16", pp=2, micro_batches=m), False,
                                fake_probe()) for m in (2, 16))
    assert few.terms["bubble"] / (few.terms["compute"] + few.terms["elementwise"]) == pytest.approx(1 / 2)
    assert many.terms["bubble"] / (many.terms["compute"] + many.terms["elementwise"]) == pytest.approx(1 / 16)


def cli(capsys, *args):
    from zero_trainer.cli import main

    code = main(["plan", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def write_probe(tmp_path, **over) -> str:
    path = tmp_path / "probe.json"
    path.write_text(json.dumps({"probe": fake_probe(**over).to_dict()}))
    return str(path)


def test_plan_prints_a_time_per_rung_for_the_tokens(capsys, tmp_path):
    code, out, err = cli(capsys, "--model", "minimind-104m", "--gpus-per-node", 2, "--cpu-mem", 64, "--tokens", "1e8",
                         "--probe", write_probe(tmp_path))
    assert code == 0, err
    rows = [line for line in out.splitlines() if line[1:].startswith(("zero", " zero")) and " s " not in line]
    speed = out[out.index("speed (step-time model"):]
    assert "time to 1e+08" in speed and speed.count("\n") >= 8  # every fitting rung, with and without AC
    assert rows


def test_objective_speed_takes_the_most_tokens_per_second(capsys, tmp_path):
    probe = write_probe(tmp_path)
    code, out, err = cli(capsys, "--model", "minimind-26m", "--gpus-per-node", 2, "--cpu-mem", 64,
                         "--objective", "speed", "--probe", probe, "--json")
    assert code == 0, err
    doc = json.loads(out)
    fastest = max((c for s in doc["speed_search"] if s["fits"] for c in [s]), key=lambda s: s["tokens_per_s"])
    assert doc["objective"] == "speed" and doc["predicted_tokens_per_s"] == pytest.approx(fastest["tokens_per_s"])
    assert doc["micro_batch"] == fastest["micro_batch"] and doc["chosen"] == fastest["rung"]
    assert "the most tokens/s that fits" in doc["reason"]
    memory = json.loads(cli(capsys, "--model", "minimind-26m", "--gpus-per-node", 2, "--cpu-mem", 64, "--probe", probe,
                            "--json")[1])
    assert memory["objective"] == "memory" and memory["predicted_tokens_per_s"] <= doc["predicted_tokens_per_s"]


@pytest.mark.parametrize("args, words", [
    (["--tokens", "-5"], "--tokens -5 is not a positive number"),
    (["--gpu-mem", "80", "--objective", "speed", "--probe", "PROBE"], "measured a cpu, but the plan is for GPUs"),
])
def test_speed_inputs_are_one_line(capsys, tmp_path, args, words):
    args = [write_probe(tmp_path) if a == "PROBE" else a for a in args]
    code, out, err = cli(capsys, "--model", "debug", *args)
    assert code == 2 and words in err and err.count("\n") == 1, err


def test_a_gpu_plan_gets_no_times_from_a_cpu_probe():
    assert plan.probe_for(plan.Hardware(1, 8, 80 * GiB, 512 * GiB), fake_probe()) is None
    assert plan.probe_for(plan.Hardware(1, 2, None, 64 * GiB), fake_probe()) is not None
