"""Is the planner right? Predicted vs measured peak memory per rank, from real training runs on this CPU machine.

    python -m bench.plan_calibration                        # every row, one run at a time (about an hour on 2 cores)
    python -m bench.plan_calibration --models debug --rungs zero2 --world-sizes 1     # some rows, merged in
    python -m bench.plan_calibration --predict-only    # re-predict the committed measurements (after editing plan.py)

Each row is one `zero-trainer train` of 3 steps (seq_len 128, micro batch 4). Measured = the run's peak RSS minus its
RSS before the model was built (summary.json: peak_mem_bytes - rss_before_model_bytes, max over ranks); predicted =
what zero_trainer.plan says one rank holds on a CPU-only node, minus the same process baseline. The "overhead" rows
train a 4k-parameter model: what is left is the runtime overhead plan.RUNTIME_BYTES stands for, and their
rss_before_model is plan.HOST_PROCESS_BYTES. Results: bench/results/plan_calibration.json (rows: model, rung,
world_size, precision, activation_checkpointing, predicted_bytes, measured_bytes, ratio).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "plan_calibration.json"
MODELS = ("debug", "minimind-26m", "minimind-104m")
RUNGS = ("zero0", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload", "zero3_nvme")
WORLD_SIZES = (1, 2)
BOUND = 0.15  # |predicted / measured - 1| allowed on every row
SPEED_MEDIAN_BOUND, SPEED_WORST_BOUND = 0.15, 0.25  # the step-time model: median and worst |predicted/measured - 1|
SEQ_LEN, MICRO_BATCH = 128, 4
RUN_ARGS = ["train.max_steps=3", "train.eval_batches=1", "train.eval_every=0", "train.sample_tokens=0",
            f"data.seq_len={SEQ_LEN}", "data.max_documents=400", f"train.micro_batch={MICRO_BATCH}",
            "train.warmup_steps=1", "train.log_every=1"]
# The overhead probe: a model too small to matter (4k parameters), so what a run adds is the runtime itself.
OVERHEAD_MODEL = {"model_type": "zero_lm", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 384,
                  "max_position_embeddings": 512, "tie_word_embeddings": True}
OVERHEAD = "overhead-4k"


# Model-parallel rows: "" (none), "tp2" (AutoTP, parallel.tp=2), "sp2" (Ulysses, parallel.sp=2), "pp2" (DeepSpeed's
# pipeline, parallel.pp=2, two micro-batches a step in flight).
PARALLEL = {"": [], "tp2": ["parallel.tp=2"], "sp2": ["parallel.sp=2"], "pp2": ["parallel.pp=2", "train.grad_accum=2"]}


def row_key(row: dict) -> tuple:
    return (row["model"], row["rung"], row["world_size"], row["precision"], row["activation_checkpointing"],
            row.get("parallel", ""), row.get("seq_len", SEQ_LEN), row.get("micro_batch", MICRO_BATCH))


def run_dir(root: Path, model: str, rung: str, world_size: int, precision: str, ac: bool, par: str = "",
            seq: int = SEQ_LEN, micro: int = MICRO_BATCH) -> Path:
    shape = "" if (seq, micro) == (SEQ_LEN, MICRO_BATCH) else f"_s{seq}_m{micro}"
    return root / f"{model}_{rung}_ws{world_size}_{precision}{'_ac' if ac else ''}{'_' + par if par else ''}{shape}"


def model_args(model: str, root: Path) -> list[str]:
    if model != OVERHEAD:
        return [f"model.preset={model}"]
    config = root / OVERHEAD / "config.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(OVERHEAD_MODEL))
    return ["model.preset=null", f"model.config={config}"]


def measure(model: str, rung: str, world_size: int, precision: str, ac: bool, par: str, seq: int, micro: int,
            root: Path, reuse: bool) -> dict:
    """Train one row for real (or reuse its summary.json); returns the summary."""
    out = run_dir(root, model, rung, world_size, precision, ac, par, seq, micro)
    summary = out / "summary.json"
    if reuse and summary.is_file():
        return json.loads(summary.read_text())
    env = {**os.environ, "ZERO_TRAINER_CACHE": os.environ.get("ZERO_TRAINER_CACHE", "/tmp/zt_plan_cache")}
    for attempt in (1, 2):  # one retry: a shared machine can lose a run to a port clash
        cmd = [sys.executable, "-m", "zero_trainer", "train", "--recipe", "recipes/debug.yaml", "--ds-config", rung,
               "--num-procs", str(world_size), "--output-dir", str(out),
               *model_args(model, root), f"train.precision={precision}",
               f"train.activation_checkpointing={str(ac).lower()}", *RUN_ARGS, *PARALLEL[par],
               f"data.seq_len={seq}", f"train.micro_batch={micro}"]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)  # it sweeps its shm itself
        if proc.returncode == 0 and summary.is_file():
            return json.loads(summary.read_text())
        print(f"  attempt {attempt} failed ({proc.returncode}); its last lines:\n"
              + "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:]), flush=True)
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


# The knobs every stage-3 and offload JSON fixed before the planner sized them (rows measured before 2026-11-28
# ran with these; `sized` in a row says what its run used, so it is re-predicted with the same knobs).
FIXED_KNOBS = {"zero_optimization.sub_group_size": 10**9, "zero_optimization.stage3_max_live_parameters": 10**9,
               "zero_optimization.stage3_max_reuse_distance": 10**9,
               "zero_optimization.offload_optimizer.buffer_count": 4,
               "zero_optimization.offload_optimizer.pin_memory": True,
               "zero_optimization.offload_param.buffer_count": 5,
               "zero_optimization.offload_param.buffer_size": 10**8,
               "zero_optimization.offload_param.max_in_cpu": 10**9,
               "zero_optimization.offload_param.pin_memory": True}


def predict(model: str, rung: str, world_size: int, precision: str, ac: bool, cpu_mem: int | None = None,
            knobs: dict | None = None, par: str = "", seq: int = SEQ_LEN, micro: int = MICRO_BATCH) -> int:
    """The planner's per-rank bytes on a CPU-only node with `world_size` ranks and `cpu_mem` of RAM, above the
    process baseline: with the knobs the run used when given (a row's `sized`), else sized for that node."""
    from zero_trainer import plan
    from zero_trainer.ds_config import fill_sized, load_ds_config

    shape = plan.shape_from_config(_config(model), name=model) if model == OVERHEAD else plan.model_shape(model)
    hw = plan.Hardware(nodes=1, gpus_per_node=world_size, gpu_mem=None, cpu_mem=cpu_mem or plan.physical_memory_bytes(),
                       nvme=2**50)  # disk is not what a row measures (the runs had room)
    workload = plan.Workload(seq, micro, precision, tp=2 if par == "tp2" else 1,
                             sp=2 if par == "sp2" else 1,
                             **({"pp": 2, "micro_batches": 2} if par == "pp2" else {}))
    raw = load_ds_config(rung)[1]
    if knobs:
        raw = fill_sized(raw, knobs)[0]
    sized = plan.sized_rung(rung, raw, shape, workload, hw)
    return plan.judged(shape, sized, hw, workload, ac).device_bytes - plan.HOST_PROCESS_BYTES


def _config(model: str):
    from zero_trainer.model import model_config

    return model_config({k: v for k, v in OVERHEAD_MODEL.items() if k != "model_type"}) if model == OVERHEAD else \
        model_config(model)


def physical_memory_bytes() -> int:
    from zero_trainer.hardware import physical_memory_bytes as probe

    return probe()


def predict_speed(model: str, rung: str, world_size: int, precision: str, ac: bool, par: str, seq: int, micro: int,
                  knobs: dict | None, probe) -> float:
    """The planner's seconds per optimizer step for a row's run on this CPU machine, from `probe`."""
    from zero_trainer import plan
    from zero_trainer.ds_config import fill_sized, load_ds_config

    shape = plan.shape_from_config(_config(model), name=model) if model == OVERHEAD else plan.model_shape(model)
    hw = plan.Hardware(nodes=1, gpus_per_node=world_size, gpu_mem=None, cpu_mem=physical_memory_bytes(), nvme=2**50)
    workload = plan.Workload(seq, micro, precision, tp=2 if par == "tp2" else 1, sp=2 if par == "sp2" else 1,
                             **({"pp": 2, "micro_batches": 2} if par == "pp2" else {}))
    raw = load_ds_config(rung)[1]
    if knobs:
        raw = fill_sized(raw, knobs)[0]
    sized = plan.sized_rung(rung, raw, shape, workload, hw)
    return plan.step_time(shape, sized, hw, workload, ac, probe).seconds


def make_row(model, rung, world_size, precision, ac, par, seq, micro, summary: dict | None, old: dict | None,
             probe=None) -> dict:
    if summary is not None:
        measured = summary["peak_mem_bytes"] - summary["rss_before_model_bytes"]
        extra = {"rss_before_model_bytes": summary["rss_before_model_bytes"], "wall_s": round(summary["wall_s"], 1),
                 "params": summary["params"], "measured_on": time.strftime("%Y-%m-%d"),
                 "cpu_mem_bytes": physical_memory_bytes(), "sized": (summary.get("plan") or {}).get("sized", {})}
    else:
        measured, extra = old["measured_bytes"], {k: old[k] for k in ("rss_before_model_bytes", "wall_s", "params",
                                                                       "measured_on", "cpu_mem_bytes", "sized")
                                                  if k in old}
    predicted = predict(model, rung, world_size, precision, ac, extra.get("cpu_mem_bytes"), extra.get("sized"), par,
                        seq, micro)
    shape = {} if (seq, micro) == (SEQ_LEN, MICRO_BATCH) else {"seq_len": seq, "micro_batch": micro}
    speed = {}
    step_s = (summary or {}).get("step_s") or (old or {}).get("measured_step_s")
    if step_s and probe is not None:  # the median step after the first (summary.json step_s)
        predicted_s = predict_speed(model, rung, world_size, precision, ac, par, seq, micro, extra.get("sized"), probe)
        speed = {"predicted_step_s": round(predicted_s, 4), "measured_step_s": round(step_s, 4),
                 "speed_ratio": round(predicted_s / step_s, 4)}
        repeat = (old or {}).get("measured_step_s_repeat") if summary is None else None
        if repeat:  # a second measurement of the same row: the machine's noise beside the model's error
            speed.update(measured_step_s_repeat=repeat, speed_ratio_repeat=round(predicted_s / repeat, 4))
    return {"model": model, "rung": rung, "world_size": world_size, "precision": precision,
            "activation_checkpointing": ac, **({"parallel": par} if par else {}), **shape,
            "predicted_bytes": predicted, "measured_bytes": measured,
            "ratio": round(predicted / measured, 4), **extra, **speed}


def default_rows() -> list[tuple]:
    """bf16 (what the planner assumes) on every model, rung and world size; fp32 and activation checkpointing
    on the largest model; the overhead probe on every rung; the 1b preset on ZeRO-Infinity (bench/scale.py
    checks the planner at 4B)."""
    rows = [(m, r, ws, "bf16", False, "") for m in MODELS for r in RUNGS for ws in WORLD_SIZES]
    rows += [("minimind-104m", r, ws, "fp32", False, "") for r in RUNGS for ws in WORLD_SIZES]
    rows += [("minimind-104m", r, 1, "bf16", True, "") for r in ("zero0", "zero2", "zero3")]
    rows += [(OVERHEAD, r, ws, "bf16", False, "") for r in RUNGS for ws in WORLD_SIZES]
    # long rows: activations (and with checkpointing, the recompute) at micro-batch 1 to 16 of 1024 tokens, where
    # they dominate the peak: the activation-checkpointing term and glibc's heap retention (plan.heap_retained_bytes)
    rows += [("minimind-26m", "zero0", 1, "fp32", True, "", 1024, m) for m in (1, 2, 4, 8, 16)]
    rows += [("minimind-26m", "zero0", 1, "fp32", False, "", 1024, m) for m in (2, 4)]
    # tensor and sequence parallelism at 2 ranks: AutoTP on ZeRO-1, Ulysses on ZeRO-3 (ALST's stage)
    rows += [("minimind-26m", "zero1", 2, "bf16", False, "tp2"), ("minimind-26m", "zero3", 2, "bf16", False, "sp2")]
    # pipeline parallelism at 2 ranks (2 stages, dp 1): ZeRO-1, and ZeRO-0 in bf16 (DeepSpeed's BF16_Optimizer)
    rows += [("minimind-26m", "zero1", 2, "bf16", False, "pp2"), ("minimind-26m", "zero0", 2, "bf16", False, "pp2")]
    # a billion parameters on the rung that holds it here; fp32, because a CPU without AVX-512 multiplies bf16 at
    # ~1 GFLOP/s (a bf16 1b step would take most of an hour)
    rows += [("1b", "zero3_nvme", 1, "fp32", False, "")]
    return [r if len(r) == 8 else (*r, SEQ_LEN, MICRO_BATCH) for r in rows]


def step_probe(old: dict, predict_only: bool):
    """The probe step times are predicted from: the results file's own (re-predicting, so the committed figures
    do not move with this machine's noise), else this machine's cached or newly measured one."""
    from zero_trainer.probe import Probe, load_or_measure

    if predict_only and old.get("probe"):
        return Probe.from_dict(old["probe"])
    return load_or_measure()


def speed_summary(rows: list[dict]) -> dict:
    """The step-time model's errors over the rows that have a measured step time."""
    import statistics

    errors = [abs(r["speed_ratio"] - 1) for r in rows if "speed_ratio" in r]
    if not errors:
        return {}
    repeats = [abs(r["speed_ratio_repeat"] - 1) for r in rows if "speed_ratio_repeat" in r]
    spread = [abs(r["measured_step_s"] / r["measured_step_s_repeat"] - 1) for r in rows if "speed_ratio_repeat" in r]
    return {"rows": len(errors), "median_abs_error": round(statistics.median(errors), 4),
            "worst_abs_error": round(max(errors), 4), "bound_median": SPEED_MEDIAN_BOUND,
            "bound_worst": SPEED_WORST_BOUND,
            **({"repeated_rows": len(repeats), "repeat_median_abs_error": round(statistics.median(repeats), 4),
                "repeat_worst_abs_error": round(max(repeats), 4),
                "measurement_spread_median": round(statistics.median(spread), 4),
                "measurement_spread_worst": round(max(spread), 4)} if repeats else {})}


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':14} {'rung':14} {'ws':>2} {'prec':4} {'AC':3} {'par':3} {'seq×b':>7} {'predicted':>10} "
             f"{'measured':>10} {'ratio':>6}", "-" * 82]
    for r in rows:
        flag = "" if abs(r["ratio"] - 1) <= BOUND else "  <-- outside ±15%"
        shape = f"{r.get('seq_len', SEQ_LEN)}×{r.get('micro_batch', MICRO_BATCH)}"
        lines.append(f"{r['model']:14} {r['rung']:14} {r['world_size']:>2} {r['precision']:4} "
                     f"{'yes' if r['activation_checkpointing'] else 'no':3} {r.get('parallel', ''):3} {shape:>7} "
                     f"{r['predicted_bytes'] / 2**20:8.0f}Mi "
                     f"{r['measured_bytes'] / 2**20:8.0f}Mi {r['ratio']:6.3f}{flag}"
                     + (f"   step {r['predicted_step_s']:.3g} / {r['measured_step_s']:.3g} s ({r['speed_ratio']:.2f})"
                        if "speed_ratio" in r else ""))
    worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
    lines.append(f"worst: {worst['model']} {worst['rung']} ws{worst['world_size']} {worst['precision']} "
                 f"ratio {worst['ratio']:.3f}")
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    """The README's table: one line per model, precision, AC, rung, model parallelism and seq × micro-batch;
    measured / predicted MiB (ratio) per world size."""
    cell = lambda r: (f"{r['measured_bytes'] / 2**20:.0f} / {r['predicted_bytes'] / 2**20:.0f} "  # noqa: E731
                      f"({r['ratio']:.2f})") if r else "—"
    lines = ["| model | precision | AC | rung | parallel | seq × micro-batch | 1 rank: measured / predicted MiB "
             "(predicted ÷ measured) | 2 ranks |", "|---|---|---|---|---|---|---:|---:|"]
    groups: dict[tuple, dict] = {}  # first-seen order; world size -> row
    for r in rows:
        key = (r["model"], r["precision"], r["activation_checkpointing"], r["rung"], r.get("parallel", ""),
               f"{r.get('seq_len', SEQ_LEN)} × {r.get('micro_batch', MICRO_BATCH)}")
        groups.setdefault(key, {})[r["world_size"]] = r
    for key, by_ws in groups.items():
        lines.append(f"| {key[0]} | {key[1]} | {'yes' if key[2] else 'no'} | {key[3]} | {key[4] or '—'} | {key[5]} | "
                     f"{cell(by_ws.get(1))} | {cell(by_ws.get(2))} |")
    return "\n".join(lines)


def write_results(results: Path, rows_by_key: dict, probe=None) -> list[dict]:
    from importlib.metadata import version

    order = {row: i for i, row in enumerate(default_rows())}
    rows = sorted(rows_by_key.values(), key=lambda r: order.get(row_key(r), len(order)))
    overhead = [r for r in rows if r["model"] == OVERHEAD]
    doc = {
        "what": "predicted vs measured peak memory per rank above the process baseline (peak RSS - RSS before the "
                "model is built), zero-trainer train on a CPU-only machine",
        "bound": BOUND, "seq_len": SEQ_LEN, "micro_batch": MICRO_BATCH, "steps": 3,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": version("torch"),
                    "deepspeed": version("deepspeed")},
        "updated": time.strftime("%Y-%m-%d"),
        "overhead": {
            "host_process_bytes_measured": sorted({r["rss_before_model_bytes"] for r in rows
                                                   if "rss_before_model_bytes" in r}),
            "runtime_bytes_measured": {f"{r['rung']} ws{r['world_size']}": r["measured_bytes"] for r in overhead},
        },
        **({"probe": probe.to_dict(), "speed": speed_summary(rows)} if probe is not None else {}),
        "rows": rows,
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(doc, indent=1) + "\n")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plan_calibration", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", help=f"subset of {', '.join(MODELS + (OVERHEAD, '1b'))}")
    p.add_argument("--rungs", nargs="+", choices=RUNGS)
    p.add_argument("--world-sizes", nargs="+", type=int, choices=WORLD_SIZES)
    p.add_argument("--precisions", nargs="+", choices=("bf16", "fp32"))
    p.add_argument("--parallel", nargs="+", choices=("none", "tp2", "sp2", "pp2"), help="model-parallel rows")
    p.add_argument("--predict-only", action="store_true", help="keep the measurements in the results file, re-predict")
    p.add_argument("--reuse", action="store_true", help="reuse summary.json files already under --runs-dir")
    p.add_argument("--runs-dir", default="/tmp/zt_plan_calibration", help="where the runs write")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--markdown", action="store_true", help="also print the README table")
    args = p.parse_args(argv)

    results = Path(args.results)
    old = json.loads(results.read_text()) if results.is_file() else {"rows": []}
    probe = step_probe(old, args.predict_only)
    old_rows = {row_key(r): {"measured_on": old.get("updated"), **r} for r in old["rows"]}
    wanted = [row for row in default_rows()
              if (not args.models or row[0] in args.models) and (not args.rungs or row[1] in args.rungs)
              and (not args.world_sizes or row[2] in args.world_sizes)
              and (not args.precisions or row[3] in args.precisions)
              and (not args.parallel or (row[5] or "none") in args.parallel)]
    root = Path(args.runs_dir)
    new_rows = dict(old_rows)
    for model, rung, ws, precision, ac, par, seq, micro in wanted:
        key = (model, rung, ws, precision, ac, par, seq, micro)
        if args.predict_only:
            if key in old_rows:
                new_rows[key] = make_row(*key, None, old_rows[key], probe)
            continue
        t = time.time()
        print(f"{model} {rung} ws{ws} {precision}{' AC' if ac else ''} {par} seq {seq} micro {micro} ...", end=" ",
              flush=True)
        summary = measure(model, rung, ws, precision, ac, par, seq, micro, root, args.reuse)
        new_rows[key] = make_row(*key, summary, None, probe)
        print(f"measured {new_rows[key]['measured_bytes'] / 2**20:.0f} MiB, predicted "
              f"{new_rows[key]['predicted_bytes'] / 2**20:.0f} MiB ({time.time() - t:.0f} s)", flush=True)
        write_results(results, new_rows, probe)  # after every row: an hour of runs survives an interruption
    rows = write_results(results, new_rows, probe)
    print(format_table(rows))
    if args.markdown:
        print(markdown_table(rows))
    bad = [r for r in rows if abs(r["ratio"] - 1) > BOUND]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
