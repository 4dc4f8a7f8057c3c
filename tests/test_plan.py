"""zero_trainer.plan: the memory model, the choice over a grid of clusters, the command, and the calibration proof."""

import importlib
import itertools
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BIN, REPO

from zero_trainer import plan
from zero_trainer.ds_config import available_ds_configs
from zero_trainer.errors import UsageError
from zero_trainer.recipe import RECIPE_DIR, load_recipe

GiB = 2**30


def run_plan(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "zero-trainer"), "plan", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def cluster(gpus: int, gpu_mem: float, cpu_mem: float, nvme: float = 0) -> plan.Hardware:
    nodes, per_node = (gpus // 8, 8) if gpus > 8 else (1, gpus)
    return plan.Hardware(nodes, per_node, int(gpu_mem * GiB), int(cpu_mem * GiB), int(nvme * GiB))


def choose(model: str, hw: plan.Hardware, seq_len=2048, micro_batch=1, precision="bf16") -> plan.Plan:
    return plan.plan_model(model, hw, seq_len, micro_batch, precision)


# --- the model: shapes and activations --------------------------------------------------------------------------

def test_presets_are_data_both_model_and_planner_read():
    from zero_trainer import model, presets

    assert model.PRESETS is presets.PRESETS and plan.PRESETS is presets.PRESETS
    assert all(isinstance(v, (int, float, bool)) for shape in presets.PRESETS.values() for v in shape.values())


@pytest.mark.parametrize("preset", ["debug", "minimind-26m", "minimind-104m", "1b", "3b", "7b", "13b", "70b"])
def test_closed_form_counts_equal_a_meta_build(preset):
    import torch

    from zero_trainer.model import build_model

    with torch.device("meta"):
        model = build_model(preset)
    sizes = [p.numel() for p in model.parameters()]
    shape = plan.model_shape(preset)
    assert shape.params == sum(sizes)
    assert shape.largest_param == max(sizes)
    assert shape.layer_params == sum(p.numel() for p in model.model.layers[0].parameters())
    assert shape.norm_params == sum(n for n in sizes if n == shape.hidden)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_layer_activation_formula_counts_the_saved_tensors(precision):
    """The per-layer activation bytes are the tensors autograd saves, counted on the real model."""
    import torch

    from zero_trainer.model import build_model

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]

    def saved_bytes(layers: int, s: int, b: int) -> int:
        torch.manual_seed(0)
        model = build_model("debug", num_hidden_layers=layers).to(dtype)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randint(0, 2048, (b, s))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=x, labels=x)
        return sum(seen.values())

    shape = plan.model_shape("debug")
    for s, b in ((128, 2), (512, 1)):
        per_layer = (saved_bytes(3, s, b) - saved_bytes(1, s, b)) / 2
        workload = plan.Workload(s, b, precision)
        one = plan.activation_bytes(shape, workload, False) - plan.activation_bytes(
            plan.ModelShape(**{**shape.__dict__, "layers": shape.layers - 1}), workload, False)
        assert abs(one - per_layer) / per_layer < 0.01, (one, per_layer)


def test_checkpointing_and_offload_move_memory_where_they_should():
    hw = cluster(1, 80, 1024)
    p = choose("7b", hw)
    by = {(c.name, c.activation_checkpointing): c for c in p.candidates}
    assert by["zero2", True].device["activations"] < by["zero2", False].device["activations"] / 5
    assert by["zero2_offload", False].device_bytes < by["zero2", False].device_bytes
    assert by["zero2_offload", False].cpu_bytes > by["zero2", False].cpu_bytes
    assert by["zero3_offload", False].device["params"] == 0
    assert by["zero3_nvme", False].nvme_bytes > 16 * plan.model_shape("7b").params


def test_cpu_only_offload_saves_nothing():
    """One RAM: what is offloaded to the CPU stays in the same memory, so no offload rung is lighter."""
    hw = plan.Hardware(1, 2, None, 64 * GiB)
    p = choose("minimind-104m", hw, seq_len=512)
    by = {(c.name, c.activation_checkpointing): c for c in p.candidates}
    for ac in (False, True):
        # the optimizer and the parameters are still in the rank's memory, only elsewhere in it
        assert by["zero2_offload", ac].device["optimizer"] == by["zero2", ac].device["optimizer"] > 0
        assert by["zero3_offload", ac].device["optimizer"] == by["zero3", ac].device["optimizer"] > 0
        assert by["zero3_offload", ac].device["params"] >= by["zero3", ac].device["params"] > 0
    assert all(c.cpu_bytes == 2 * c.device_bytes for c in p.candidates)
    assert p.chosen.name == "zero0"


def test_buffers_come_from_the_json():
    shape = plan.model_shape("7b")
    workload = plan.Workload(2048, 1)
    hw = cluster(8, 80, 1024)
    rungs = {r.name: r for r in plan.ladder_rungs(shape, workload, hw)}
    assert rungs["zero2"].zero["reduce_bucket_size"] == shape.hidden ** 2  # "auto", filled as HF does
    assert rungs["zero3"].zero["stage3_prefetch_bucket_size"] == int(0.9 * shape.hidden ** 2)
    bigger = plan.Rung("zero2", 2, "none", "none", {**rungs["zero2"].zero, "reduce_bucket_size": 10**9})
    assert plan.estimate(shape, bigger, hw, workload, False).device["buffers"] > \
        plan.estimate(shape, rungs["zero2"], hw, workload, False).device["buffers"] + 10**9


# --- decisions over the grid ------------------------------------------------------------------------------------

GRID = list(itertools.product(["1b", "7b", "13b", "70b"], [1, 8, 32], [24, 40, 80], [64, 256, 1024, 2048], [0, 2000]))


@pytest.fixture(scope="module")
def grid():
    return {key: choose(key[0], cluster(*key[1:])) for key in GRID}


@pytest.mark.parametrize("key, expected", [
    (("7b", 8, 80, 256, 0), {"zero1", "zero2"}),
    (("7b", 8, 80, 2048, 2000), {"zero1", "zero2"}),
    (("7b", 1, 24, 256, 0), {"zero3_offload"}),  # stage-3 offload: parameters and optimizer on the CPU
    (("13b", 1, 24, 64, 2000), {"zero3_nvme"}),
])
def test_named_decisions(grid, key, expected):
    p = grid[key]
    assert p.chosen is not None and p.chosen.name in expected, format_plan(p)


def test_minimind_26m_on_one_24gib_device_is_zero0():
    p = choose("minimind-26m", cluster(1, 24, 64))
    assert (p.chosen.name, p.activation_checkpointing) == ("zero0", False)


def test_every_grid_cell_decides_sensibly(grid):
    for key, p in grid.items():
        model, gpus, gpu_mem, cpu_mem, nvme = key
        if p.chosen is None:
            assert "comes closest" in p.reason and "more" in p.reason, (key, p.reason)
            continue
        assert p.chosen.fits and p.chosen.name in available_ds_configs()
        assert nvme or p.chosen.name != "zero3_nvme", key  # NVMe rungs only when NVMe is given
    # sanity at the ends of the grid: a 1B model never needs offload on 8+ GPUs; 70B never fits one 24 GiB GPU
    # without NVMe and a lot of CPU memory
    assert all(grid[("1b", g, m, c, n)].chosen.name in ("zero0", "zero1", "zero2")
               for _, g, m, c, n in GRID if g >= 8)
    assert grid[("70b", 1, 24, 64, 0)].chosen is None


def test_more_memory_never_picks_a_costlier_plan(grid):
    """Monotonic: growing any memory never moves the choice later in the preference order (the order is
    cheapest-first: no offload, CPU offload, NVMe; without activation checkpointing first within each; tiling and a
    searched sequence-parallel degree only when nothing fits without)."""
    def rank(p):
        if p.chosen is None:
            return (99,)
        rungs = {r.name: r for r in plan.ladder_rungs(p.model, p.workload, p.hardware)}
        return plan.preference_key(rungs[p.chosen.name], p.chosen.activation_checkpointing, p.chosen.tiling,
                                   p.sequence_parallel)

    axes = {2: [24, 40, 80], 3: [64, 256, 1024, 2048], 4: [0, 2000]}
    for key, p in grid.items():
        for axis, values in axes.items():
            for more in values[values.index(key[axis]) + 1:]:
                bigger = grid[key[:axis] + (more,) + key[axis + 1:]]
                assert rank(bigger) <= rank(p), (key, more, p.reason, bigger.reason)
    # within a tier (GPU-resident rungs), more device memory never picks a more-sharded rung
    order = {name: i for i, name in enumerate(plan.LADDER)}
    for key, p in grid.items():
        for more in axes[2][axes[2].index(key[2]) + 1:]:
            bigger = grid[key[:2] + (more,) + key[3:]]
            if p.chosen and bigger.chosen and "offload" not in p.chosen.name + bigger.chosen.name \
                    and "nvme" not in p.chosen.name + bigger.chosen.name:
                assert order[bigger.chosen.name] <= order[p.chosen.name], (key, more)


def test_recipe_checkpointing_restricts_the_candidates():
    p = plan.plan_model("7b", cluster(8, 80, 256), 2048, 1, "bf16", checkpointing=True)
    assert p.activation_checkpointing and p.chosen.name in ("zero0", "zero1", "zero2")


def format_plan(p) -> str:
    from zero_trainer.plan_report import format_table

    return format_table(p)


# --- the command ------------------------------------------------------------------------------------------------

def test_table_shows_every_rung_with_and_without_checkpointing():
    proc = run_plan("--model", "7b", "--gpus-per-node", 8, "--gpu-mem", 80, "--cpu-mem", 256)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line[1:].split(" ")[0] in plan.LADDER]
    assert len(rows) == 2 * len([n for n in plan.LADDER if n in available_ds_configs()])
    assert "chosen: zero1" in proc.stdout
    for column in ("params", "grads", "optim", "activ", "buffers", "device", "CPU", "NVMe", "fits"):
        assert column in proc.stdout


def test_json_shape():
    proc = run_plan("--model", "13b", "--gpus-per-node", 1, "--gpu-mem", 24, "--cpu-mem", 64, "--nvme", 2000,
                    "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # one object, nothing else on stdout
    assert out["chosen"] == "zero3_nvme" and isinstance(out["activation_checkpointing"], bool)
    assert out["params"] == plan.model_shape("13b").params
    assert out["chosen"] in available_ds_configs()
    assert len(out["candidates"]) >= 14
    for c in out["candidates"]:
        assert {"name", "activation_checkpointing", "device_bytes", "cpu_bytes", "nvme_bytes", "fits"} <= set(c)
        assert c["name"] in available_ds_configs() and isinstance(c["fits"], bool)
        assert all(isinstance(c[k], int) and c[k] >= 0 for k in ("device_bytes", "cpu_bytes", "nvme_bytes"))


def test_70b_answers_in_under_two_seconds_without_torch():
    code = ("import sys; from zero_trainer.cli import main; main(['plan', '--model', '70b', '--json']); "
            "assert 'torch' not in sys.modules and 'deepspeed' not in sys.modules, 'planner imported torch'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode in (0, 2), proc.stderr  # 2: nothing fits this small machine, which is fine
    assert "planner imported torch" not in proc.stderr
    best = min(_cpu_seconds(run_plan, "--model", "70b") for _ in range(3))  # CPU time: the suite runs 2 workers
    assert best < 2.0, f"plan --model 70b took {best:.2f} s of CPU"


def _cpu_seconds(fn, *args) -> float:
    """CPU seconds the subprocess `fn` runs take (user + system): unlike wall time, not stretched by other work."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    fn(*args)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def test_plot_draws_a_png(tmp_path):
    out = tmp_path / "plan.png"
    proc = run_plan("--model", "7b", "--gpus-per-node", 8, "--gpu-mem", 40, "--cpu-mem", 512, "--plot", out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_this_machine_by_default():
    proc = run_plan("--model", "debug", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    hw = out["hardware"]
    assert hw["cpu_mem_bytes"] == plan.physical_memory_bytes() and hw["gpus_per_node"] >= 1
    assert out["chosen"] == "zero0"


NOT_CAUSAL = {
    "NOT_A_CAUSAL_LM": {"model_type": "vit", "hidden_size": 64, "num_hidden_layers": 2,  # an image encoder
                        "num_attention_heads": 2, "intermediate_size": 128},
    "AN_ENCODER": {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "intermediate_size": 128, "vocab_size": 512},  # BertLMHeadModel would see future tokens
    "AN_ENCODER_DECODER": {"model_type": "t5", "d_model": 64, "num_layers": 2, "num_heads": 2, "d_ff": 128,
                           "vocab_size": 512},
}


def _config_file(tmp_path, name):
    path = tmp_path / name / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(NOT_CAUSAL[name]))
    return path


@pytest.mark.parametrize("args, flag", [
    (["--model", "7c"], "--model"),
    (["--model", "NOT_A_CAUSAL_LM"], "--model"),
    (["--model", "AN_ENCODER"], "--model"),
    (["--model", "AN_ENCODER_DECODER"], "--model"),
    (["--model", "7b", "--gpu-mem", "0"], "--gpu-mem"),
    (["--model", "7b", "--gpu-mem", "-24"], "--gpu-mem"),
    (["--model", "7b", "--cpu-mem", "0"], "--cpu-mem"),
    (["--model", "7b", "--nvme", "-1"], "--nvme"),
    (["--model", "7b", "--gpus-per-node", "0"], "--gpus-per-node"),
    (["--model", "7b", "--nodes", "-2"], "--nodes"),
    (["--model", "debug", "--seq-len", "4096"], "--seq-len"),
    (["--model", "7b", "--micro-batch", "0"], "--micro-batch"),
    (["--model", "7b", "--gpu-mem", "nan"], "--gpu-mem"),
    (["--model", "70b", "--gpus-per-node", "1", "--gpu-mem", "24", "--cpu-mem", "64"], "--gpu-mem"),
])
def test_bad_input_is_one_line_and_exit_2(args, flag, tmp_path, capsys):
    """In this process (`plan` launches nothing); test_bad_inputs.py shows the same path in a real process."""
    from zero_trainer.cli import main

    args = [str(_config_file(tmp_path, a)) if a in NOT_CAUSAL else a for a in args]
    try:
        code = main(["plan", *args])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"({flag})" in lines[0], err
    if args[1].endswith("config.json"):
        assert "causal" in lines[0] or "encoder" in lines[0], lines[0]
    if "--seq-len" in args:  # the config that would allow it, concretely
        assert "max_position_embeddings >= 4096" in lines[0] and "debug preset" in lines[0], lines[0]


def test_nothing_fits_names_the_missing_memory():
    proc = run_plan("--model", "70b", "--gpus-per-node", 1, "--gpu-mem", 24, "--cpu-mem", 64)
    assert proc.returncode == 2
    assert "comes closest" in proc.stderr and "GiB more" in proc.stderr, proc.stderr


# --- recipes and deepspeed.config: auto -------------------------------------------------------------------------

RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_plans(path):
    recipe = load_recipe(str(path))
    model = recipe.model_source
    train = recipe.train
    p = plan.plan_model(model, cluster(32, 80, 2048, 2000), recipe.data.seq_len, train.micro_batch,
                        train.precision, checkpointing=train.activation_checkpointing or None)
    assert p.chosen is not None, p.reason
    # the recipe's own activation checkpointing setting is enough on a large cluster
    assert p.activation_checkpointing == train.activation_checkpointing or not p.activation_checkpointing


def test_large_recipes_ask_for_auto_and_published_hyperparameters():
    for name, lr in (("1b", 4e-4), ("3b", 3e-4), ("7b", 3e-4), ("13b", 3e-4), ("70b", 1.5e-4)):
        recipe = load_recipe(str(RECIPE_DIR / f"{name}.yaml"))
        train = recipe.train
        assert recipe.deepspeed.config == "auto" and recipe.model.preset == name
        assert train.lr == lr and train.warmup_steps == 2000 and train.betas == [0.9, 0.95]
        assert train.weight_decay == 0.1 and train.grad_clip == 1.0 and train.precision == "bf16"
        assert train.activation_checkpointing == (name in ("7b", "13b", "70b"))
        assert recipe.data.seq_len <= plan.model_shape(name).max_positions


def test_auto_on_this_machine_picks_from_the_recipe():
    recipe = load_recipe("recipes/debug.yaml", ["deepspeed.config=auto", "train.precision=bf16"])
    assert plan.plan_recipe(recipe, None, 1).chosen.name == "zero0"
    assert plan.plan_recipe(recipe, None, 2).chosen == plan.plan_recipe(recipe, None, 2).chosen  # deterministic
    p = plan.plan_recipe(recipe, None, 1)
    assert p.chosen.name == "zero0" and p.activation_checkpointing is False and p.workload.seq_len == 128


def test_auto_uses_a_built_config_and_reports_recipe_fields():
    from zero_trainer.model import model_config

    recipe = load_recipe("recipes/7b.yaml", ["data.seq_len=8192"])
    with pytest.raises(UsageError) as err:
        plan.plan_recipe(recipe, model_config("7b"), 1)
    assert err.value.where == "data.seq_len"
    recipe = load_recipe("recipes/70b.yaml")
    with pytest.raises(UsageError) as err:  # 70B on this small machine: nothing fits, and it says so
        plan.plan_recipe(recipe, model_config("70b"), 1)
    assert err.value.where == "deepspeed.config" and "comes closest" in err.value.fix


def test_auto_counts_free_disk_at_nvme_path(tmp_path):
    recipe = load_recipe("recipes/debug.yaml", ["deepspeed.config=auto", f"deepspeed.nvme_path={tmp_path}"])
    hw = plan.recipe_hardware(recipe, 1)
    assert hw.nvme > 0 and hw.nvme % GiB == 0
    recipe = load_recipe("recipes/debug.yaml", ["deepspeed.config=auto"])
    assert plan.recipe_hardware(recipe, 1).nvme == 0


# --- calibration: the proof -------------------------------------------------------------------------------------

def calibration_module():
    sys.path.insert(0, str(REPO)) if str(REPO) not in sys.path else None
    return importlib.import_module("bench.plan_calibration")


def test_committed_calibration_rows_are_within_bound():
    """Every committed row within ±15%, both as committed and as the current plan.py predicts it."""
    cal = calibration_module()
    doc = json.loads(Path(cal.RESULTS).read_text())
    rows = doc["rows"]
    models = {r["model"] for r in rows}
    assert {"debug", "minimind-26m", "minimind-104m"} <= models
    for model in ("debug", "minimind-26m", "minimind-104m"):
        covered = {(r["rung"], r["world_size"]) for r in rows if r["model"] == model and r["precision"] == "bf16"}
        assert covered >= set(itertools.product(cal.RUNGS, cal.WORLD_SIZES)), model
    for r in rows:
        assert abs(r["ratio"] - 1) <= cal.BOUND, r
        predicted = cal.predict(r["model"], r["rung"], r["world_size"], r["precision"], r["activation_checkpointing"],
                                r.get("cpu_mem_bytes"), r.get("sized"), r.get("parallel", ""),
                                r.get("seq_len", cal.SEQ_LEN), r.get("micro_batch", cal.MICRO_BATCH))
        assert abs(predicted / r["measured_bytes"] - 1) <= cal.BOUND, (r, predicted)
    # AutoTP, Ulysses and pipeline rows, measured like the rest
    assert {r.get("parallel") for r in rows} >= {"tp2", "sp2", "pp2"}
    # activation checkpointing where activations dominate: seq 1024, micro-batch 1 to 16
    long = {r["micro_batch"] for r in rows if r.get("seq_len") == 1024 and r["activation_checkpointing"]}
    assert long >= {1, 4, 16}


@pytest.mark.multiproc
def test_calibration_holds_live(engine_runs):
    """Re-measure one small row with a real run (the first of the engine runs at world size 1: debug, zero2, bf16,
    one rank, the calibration's seq_len, micro batch and steps)."""
    from conftest import CALIBRATION_RUN_ARGS

    cal = calibration_module()
    assert CALIBRATION_RUN_ARGS == cal.RUN_ARGS
    summary = engine_runs["calibration", 1]
    row = cal.make_row("debug", "zero2", 1, "bf16", False, "", cal.SEQ_LEN, cal.MICRO_BATCH, summary, None)
    assert abs(row["ratio"] - 1) <= cal.BOUND, row
    # the run reports the step time it measured beside the one its plan predicted from this machine's probe
    # (make install probes the machine; without a cached probe there is no prediction to check)
    from zero_trainer.probe import load_cached

    if load_cached() is not None:
        assert summary["plan"]["predicted_step_s"] > 0 and summary["step_s"] > 0
        assert summary["plan"]["probe"]["device"] == "cpu"


def test_committed_step_times_are_the_model_s_and_within_the_median_bound():
    """The speed columns: every row's predicted step time is what plan.step_time gives now, from the probe stored
    beside the rows (so the committed figures do not move with this machine's noise); median |error| ≤ 15% on both
    measurements, the repeated rows' spread recorded; predicted gaps over 20% order the rungs as measured."""
    from zero_trainer.probe import Probe

    cal = calibration_module()
    doc = json.loads(Path(cal.RESULTS).read_text())
    probe = Probe.from_dict(doc["probe"])
    timed = [r for r in doc["rows"] if "speed_ratio" in r]
    assert len(timed) >= 40 and {r["rung"] for r in timed} >= set(cal.RUNGS)
    for r in timed:
        predicted = cal.predict_speed(r["model"], r["rung"], r["world_size"], r["precision"],
                                      r["activation_checkpointing"], r.get("parallel", ""), r.get("seq_len", 128),
                                      r.get("micro_batch", 4), r.get("sized"), probe)
        assert predicted == pytest.approx(r["predicted_step_s"], abs=1e-4), r
    speed = doc["speed"]
    assert speed["median_abs_error"] <= cal.SPEED_MEDIAN_BOUND
    assert speed["repeat_median_abs_error"] <= cal.SPEED_MEDIAN_BOUND and speed["repeated_rows"] >= 10
    pairs = agree = 0
    for a, b in itertools.combinations([r for r in timed if not r.get("parallel")], 2):
        if (a["model"], a["world_size"], a["activation_checkpointing"]) != (
                b["model"], b["world_size"], b["activation_checkpointing"]):
            continue
        pa, pb = a["predicted_step_s"], b["predicted_step_s"]
        if max(pa, pb) / min(pa, pb) > 1.2:
            mean = lambda r: (r["measured_step_s"] + r.get("measured_step_s_repeat", r["measured_step_s"])) / 2  # noqa
            pairs, agree = pairs + 1, agree + ((pa < pb) == (mean(a) < mean(b)))
    assert pairs >= 20 and agree / pairs >= 0.9, (agree, pairs)
