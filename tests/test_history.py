"""`plan --history DIR` (plan/history.py): summary.json files written here with known predictions and measurements,
the scales they give (memory: the max measured/predicted, speed: the median), the plan they correct, the CLI."""

import json
import math
import statistics

import pytest
from test_speed import cli, write_probe

from zero_trainer import plan

GiB, MiB = 2**30, 2**20
BEFORE = 450 * MiB  # rss_before_model_bytes: a CPU run's peak is measured above it


def write_run(root, name, predicted=None, measured=None, step=None, step_s=None, cpu_only=True, rung="zero2",
              ac=False):
    """A run's summary.json in the trainer's shape: plan.predicted_* beside peak_mem_bytes / step_s."""
    summary = {"plan": {"rung": rung, "activation_checkpointing": ac, "cpu_only": cpu_only,
                        "predicted_peak_bytes": predicted, **({"predicted_step_s": step} if step else {})},
               "peak_mem_bytes": (measured + (BEFORE if cpu_only else 0)) if measured else None,
               "rss_before_model_bytes": BEFORE, "step_s": step_s}
    (root / name).mkdir(parents=True)
    (root / name / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def runs(tmp_path):
    """Three CPU runs (memory 1.1, 0.95, 1.2 times the prediction; steps 1.2 and 1.5 times), a GPU run, a corrupt
    file and a run that measured nothing."""
    root = tmp_path / "runs"
    write_run(root, "a", 100 * MiB, 110 * MiB, 0.1, 0.12)
    write_run(root, "b", 200 * MiB, 190 * MiB, 0.2, 0.3, rung="zero3", ac=True)
    write_run(root, "deep/c", 50 * MiB, 60 * MiB)  # nested; no step time
    write_run(root, "gpu", 10 * GiB, 30 * GiB, 1.0, 9.0, cpu_only=False)
    (root / "broken").mkdir()
    (root / "broken" / "summary.json").write_text('{"plan": {"rung": ')
    write_run(root, "failed", 100 * MiB)  # predicted, never measured
    return root


def test_history_reads_every_summary_and_skips_the_bad_ones(runs):
    history = plan.read_history(runs)
    assert [o.run.removeprefix(str(runs) + "/") for o in history] == ["a", "b", "deep/c", "gpu"]
    assert sorted(p.removeprefix(str(runs) + "/") for p, _ in history.skipped) == [
        "broken/summary.json", "failed/summary.json"]
    a, gpu = history[0], history[3]
    assert a.measured_peak_bytes == 110 * MiB and a.predicted_step_s == 0.1 and a.rung == "zero2"
    assert gpu.measured_peak_bytes == 30 * GiB  # a GPU's peak is the device's, not above the process's RSS
    assert history[2].speed_ratio is None and history[1].activation_checkpointing


def test_a_summary_from_before_plan_cpu_only_is_told_by_its_probe():
    summary = {"plan": {"rung": "zero1", "predicted_peak_bytes": 100, "probe": {"device": "cpu"}},
               "peak_mem_bytes": BEFORE + 120, "rss_before_model_bytes": BEFORE, "step_s": None}
    assert plan.history.observation(summary, "old").memory_ratio == pytest.approx(1.2)
    del summary["plan"]["probe"]
    with pytest.raises(ValueError, match="CPU or GPU"):
        plan.history.observation(summary, "older")


def test_memory_takes_the_max_and_speed_the_median(runs):
    cpu = [o for o in plan.read_history(runs) if o.cpu_only]
    c = plan.corrections(cpu)
    assert c.memory_scale == pytest.approx(1.2) and c.memory_runs == 3
    assert c.speed_scale == pytest.approx(statistics.median([1.2, 1.5])) and c.speed_runs == 2
    for row in c.rows:  # never below: every run's corrected prediction holds what it used
        assert row.corrected_peak_bytes >= row.measured_peak_bytes
    errors = c.errors("memory")
    before, after = [abs(p / m - 1) for p, m in ((100, 110), (200, 190), (50, 60))], \
        [abs(1.2 * p / m - 1) for p, m in ((100, 110), (200, 190), (50, 60))]
    assert errors["before"]["median"] == pytest.approx(statistics.median(before))
    assert errors["before"]["worst"] == pytest.approx(max(before))
    assert errors["after"]["median"] == pytest.approx(statistics.median(after), abs=1e-6)
    assert errors["after"]["worst"] == pytest.approx(max(after), abs=1e-6)
    speed = c.errors("speed")
    assert speed["before"]["worst"] == pytest.approx(1 - 0.2 / 0.3)
    assert speed["after"]["worst"] == pytest.approx(max(abs(0.1 * 1.35 / 0.12 - 1), abs(0.2 * 1.35 / 0.3 - 1)))
    assert plan.corrections([]) == plan.Corrections()  # no run: both scales 1


def test_never_below_holds_at_awkward_ratios():
    obs = [plan.Observation(str(i), "zero1", False, True, p, m, None, None)
           for i, (p, m) in enumerate([(3, 7), (999_999_937, 1_234_567_891), (123_456_789_013, 123_456_789_017)])]
    c = plan.corrections(obs)
    assert all(r.corrected_peak_bytes >= r.measured_peak_bytes for r in c.rows)


def _gpu_plan(**kw):
    return plan.plan_model("minimind-104m", plan.Hardware(1, 1, 4 * GiB, 64 * GiB), seq_len=1024, micro_batch=4, **kw)


def test_a_memory_scale_can_flip_a_candidate_to_not_fitting():
    base = _gpu_plan()
    chosen = base.chosen
    above = chosen.device_bytes - plan.DEVICE_RUNTIME_BYTES
    usable = int(4 * GiB * (1 - plan.SAFETY_MARGIN)) - plan.DEVICE_RUNTIME_BYTES
    scale = usable / above * 1.05  # 5% more than the room the chosen one has
    fixed = _gpu_plan(corrections=plan.Corrections(memory_scale=scale))
    same = next(c for c in fixed.candidates if (c.name, c.activation_checkpointing, c.tiling) ==
                (chosen.name, chosen.activation_checkpointing, chosen.tiling))
    assert not same.fits and same.device["history"] == math.ceil(above * scale) - above
    assert same.device_bytes == chosen.device_bytes + same.device["history"]
    assert fixed.chosen is not None and fixed.chosen is not same
    assert fixed.predicted_peak_bytes == fixed.chosen.device_bytes - plan.DEVICE_RUNTIME_BYTES
    assert fixed.to_json()["candidates"][0]["device_split"]["history"] == fixed.candidates[0].device["history"]


def test_on_a_cpu_the_node_ram_carries_the_correction_too():
    hw = plan.Hardware(1, 2, None, 64 * GiB)
    base = plan.plan_model("debug", hw, seq_len=128)
    fixed = plan.plan_model("debug", hw, seq_len=128, corrections=plan.Corrections(memory_scale=2.0))
    for b, f in zip(base.candidates, fixed.candidates, strict=True):
        assert f.device_bytes - plan.HOST_PROCESS_BYTES == 2 * (b.device_bytes - plan.HOST_PROCESS_BYTES)
        assert f.cpu_bytes == b.cpu_bytes + 2 * f.device["history"]
    assert fixed.predicted_peak_bytes == 2 * base.predicted_peak_bytes


def test_a_pipeline_s_stages_are_corrected():
    hw = plan.Hardware(1, 4, None, 256 * GiB)
    base = plan.plan_model("debug", hw, seq_len=128, pp=2)
    fixed = plan.plan_model("debug", hw, seq_len=128, pp=2, corrections=plan.Corrections(memory_scale=1.5))
    b, f = base.candidates[0], fixed.candidates[0]
    assert [st["predicted_peak_bytes"] for st in f.stages] == [math.ceil(1.5 * st["predicted_peak_bytes"])
                                                              for st in b.stages]
    assert f.device_bytes == max(st["device_bytes"] for st in f.stages)
    assert f.cpu_bytes == 2 * sum(st["device_bytes"] for st in f.stages)  # 4 ranks: 2 a stage, one node


def test_speed_scales_every_step_time(tmp_path):
    from test_speed import fake_probe

    hw = plan.Hardware(1, 2, None, 64 * GiB)
    base = plan.plan_model("debug", hw, seq_len=128, probe=fake_probe())
    fixed = plan.plan_model("debug", hw, seq_len=128, probe=fake_probe(), corrections=plan.Corrections(speed_scale=1.5))
    timed = [(b.speed, f.speed) for b, f in zip(base.candidates, fixed.candidates, strict=True) if b.speed]
    assert timed
    for b, f in timed:
        assert f.seconds == pytest.approx(1.5 * b.seconds) and f.tokens == b.tokens
        assert f.terms == pytest.approx({k: 1.5 * v for k, v in b.terms.items()})
    assert fixed.summary()["predicted_step_s"] == pytest.approx(1.5 * base.chosen.speed.seconds, abs=1e-4)


def test_plan_history_prints_the_block_and_the_corrected_table(runs, tmp_path, capsys):
    args = ["--model", "debug", "--seq-len", 128, "--gpus-per-node", 1, "--cpu-mem", 64,
            "--probe", write_probe(tmp_path)]
    code, out, err = cli(capsys, *args, "--history", runs)
    assert code == 0, err
    block = out[:out.index("debug: ")].splitlines()
    assert block[0].startswith(f"history: 4 run(s) read under {runs}, 2 skipped (")
    assert "1 on a GPU left out" in block[0]
    assert "memory x1.200" in block[1] and "of 3 run(s)" in block[1]
    assert "speed  x1.350" in block[2] and "of 2 run(s)" in block[2]
    assert block[3].startswith("  memory error |predicted/measured - 1|: median 9.1%, worst 16.7% before; median")
    assert block[4].startswith("  speed error") and len(block) == 5
    assert " history " in out.splitlines()[len(block) + 4]  # the table's header has the column
    code, doc, err = cli(capsys, *args, "--history", runs, "--json")
    doc = json.loads(doc)
    h = doc["history"]
    assert (h["runs_read"], h["runs_used"], len(h["skipped"])) == (4, 3, 2)
    assert h["memory_scale"] == pytest.approx(1.2) and h["speed_scale"] == pytest.approx(1.35)
    assert h["errors"]["memory"]["before"]["worst"] == pytest.approx(1 - 50 / 60, abs=1e-6)
    assert all(r["corrected_peak_bytes"] >= r["measured_peak_bytes"] for r in h["runs"])
    plain = json.loads(cli(capsys, *args, "--json")[1])
    assert "history" not in plain and "history" not in plain["candidates"][0]["device_split"]
    assert doc["predicted_step_s"] == pytest.approx(1.35 * plain["predicted_step_s"], abs=1e-3)


@pytest.mark.parametrize("where, words", [
    ("missing", "is not a directory"),
    ("empty", "no summary.json under"),
])
def test_bad_history_is_one_line_and_exit_2(tmp_path, capsys, where, words):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "metrics.csv").write_text("step,loss\n")
    code, out, err = cli(capsys, "--model", "debug", "--history", tmp_path / where)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "(--history)" in err, err
    assert words in err
