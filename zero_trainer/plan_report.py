"""`zero-trainer plan`: a plan shown as a table, as JSON, or as stacked bars. The memory model is plan/memory.py."""

import json
import sys
from pathlib import Path

from .ds_config import for_hf_tools, load_ds_config, set_nvme_path
from .errors import UsageError
from .hardware import GiB, detect_hardware, local_gpus
from .plan import (
    DEFAULT_SEQ_LEN,
    OBJECTIVES,
    SAFETY_MARGIN,
    Corrections,
    History,
    Plan,
    corrections,
    experts_line,
    human_time,
    make_plan,
    model_shape,
    plan_model,
    probe_for,
    read_history,
    sized_rung,
    zero_ranks,
)
from .recipe import PRECISIONS


def add_subcommand(sub) -> None:
    p = sub.add_parser("plan", help="predict memory on every ZeRO rung and pick the one that fits",
                       description="Predict per-rank memory on every rung of the ZeRO ladder and pick the lightest "
                                   "that fits. Hardware not given is this machine's.")
    p.add_argument("--model", required=True, help="a preset name (debug, 1b, 7b, 70b, ...) or a local config.json")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs (ranks) per node (default: this machine's; 1 on CPU)")
    p.add_argument("--gpu-mem", type=float, metavar="GiB", help="memory per GPU (default: this machine's GPU; "
                   "none on a CPU-only machine, where ranks share the RAM)")
    p.add_argument("--cpu-mem", type=float, metavar="GiB", help="CPU memory per node (default: this machine's)")
    p.add_argument("--nvme", type=float, default=0, metavar="GiB", help="NVMe space per node (default 0: none)")
    p.add_argument("--seq-len", type=int, help=f"tokens per sample (default {DEFAULT_SEQ_LEN} or the model's max)")
    p.add_argument("--micro-batch", type=int, default=1, help="samples per rank per step (default 1)")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16", help="training precision (default bf16)")
    p.add_argument("--tp", type=int, default=1, metavar="N", help="tensor parallel degree (DeepSpeed AutoTP; default "
                   "1): the attention and MLP projections are split over N ranks; never chosen by the planner")
    p.add_argument("--sp", type=int, metavar="N", help="sequence parallel degree (DeepSpeed Ulysses): each rank holds "
                   "seq_len/N tokens. Default: 1, or the smallest degree that fits when nothing fits at 1 (sp search)")
    p.add_argument("--pp", type=int, metavar="N", help="pipeline parallel degree (DeepSpeed's pipeline engine, ZeRO "
                   "0/1; zero_trainer's own dense model): the decoder layers as N stages. Default: 1, or the smallest "
                   "degree that fits when nothing fits at 1 even with the sp search (pp search)")
    p.add_argument("--grad-accum", type=int, metavar="M", help="with a pipeline: micro-batches a step (gradient "
                   "accumulation), those in flight on each stage and the bubble (pp-1)/(M+pp-1) (default 4·pp)")
    p.add_argument("--ep", type=int, default=1, help="a MoE's expert-parallel degree: experts per rank and all-to-all "
                   "buffers in the experts line (default 1)")
    p.add_argument("--lora-r", type=int, default=0, metavar="R", help="plan a LoRA fine-tune of rank R (peft): the "
                   "model's weights frozen, adapters trained (default 0: every weight trains)")
    p.add_argument("--lora-targets", default="all-linear", metavar="NAMES", help="with --lora-r: comma-separated "
                   "module names to adapt (default all-linear)")
    p.add_argument("--tokens", type=float, metavar="N", help="also the time to train N tokens (e.g. 1e8) for every "
                   "rung that fits, from the step-time model and this machine's probe (measured if none is cached)")
    p.add_argument("--objective", choices=OBJECTIVES, default="memory", help="memory (default): the least sharding "
                   "that fits; speed: the most tokens/s that fits, over rungs, activation checkpointing and micro "
                   "batches 1-16 (needs a probe)")
    p.add_argument("--probe", metavar="FILE.json", help="step times from this `zero-trainer probe --json` output (of "
                   "the machine planned for) instead of this machine's cached probe")
    p.add_argument("--history", metavar="DIR", help="correct the memory and step-time predictions by this machine's "
                   "runs: every summary.json under DIR (memory x the largest measured/predicted peak, so no run is "
                   "predicted below what it used; step time x the median measured/predicted)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--ds-config", metavar="NAME_OR_JSON", help="with --write-ds-config: this JSON instead of the "
                   "chosen rung (a ds_configs name or a path)")
    p.add_argument("--write-ds-config", metavar="FILE.json", help="write the chosen rung (or --ds-config) for HF "
                   "Trainer / accelerate: every knob the planner sizes as a number (stage, offload, buckets, stage-3 "
                   'sizes, swap buffers); "auto" stays only for batch, learning rate, clipping and precision, which '
                   "those tools fill. Also prints the settings the plan implies for them")
    p.add_argument("--nvme-path", metavar="DIR", help="with --write-ds-config: the NVMe swap directory to write")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the candidates as stacked bars")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    hw = detect_hardware(args.nodes, args.gpus_per_node, args.gpu_mem, args.cpu_mem, args.nvme)
    trainable = lora_trainable(args)
    layout = {"tp": args.tp, "sp": args.sp, "pp": args.pp, "micro_batches": args.grad_accum}
    if args.tokens is not None and not args.tokens > 0:
        raise UsageError(f"--tokens {args.tokens:g} is not a positive number", "--tokens", "e.g. --tokens 1e8")
    history, corr = learned(args.history, hw) if args.history else (None, None)
    probe = speed_probe(args, hw)
    plan = plan_model(args.model, hw, args.seq_len, args.micro_batch, args.precision, trainable=trainable,
                      probe=probe, objective=args.objective, corrections=corr, **layout)
    if args.plot:
        plot_plan(plan, args.plot)
    if args.json:
        doc = plan.to_json()
        print(json.dumps({**doc, "history": history_json(args.history, history, corr)} if corr else doc, indent=2))
    else:
        if corr is not None:
            print("\n".join(history_lines(args.history, history, corr, hw.cpu_only)))
        print(format_table(plan))
        if probe is not None:
            print("\n".join(speed_table(plan, args.tokens)))
        if trainable is not None:  # the same plan with every weight training: what LoRA changes
            full = plan_model(args.model, hw, args.seq_len, args.micro_batch, args.precision, corrections=corr,
                              **layout)
            verdict = full.reason if full.chosen else "nothing fits: " + full.reason
            print(f"without LoRA (every weight training): {verdict}")
        if plan.model.experts:
            if args.ep < 1 or plan.model.experts % args.ep or plan.hardware.world_size % args.ep:
                raise UsageError(f"--ep {args.ep} must divide the {plan.model.experts} experts and the "
                                 f"{plan.hardware.world_size} ranks", "--ep", "use an ep that divides both")
            print(experts_line(plan.model, args.ep, plan.hardware.world_size, plan.workload))
    if args.write_ds_config:
        write_sized_config(plan, args.ds_config or (plan.chosen.name if plan.chosen else None), args.write_ds_config,
                           args.nvme_path, out=sys.stderr if args.json else None)  # stdout: the JSON alone
    if plan.chosen is None:
        what = f"no ZeRO rung fits {plan.model.name} on {hw.describe()}"
        flag = "--gpu-mem" if not hw.cpu_only else "--cpu-mem"
        raise UsageError(what, flag, plan.reason)
    return 0


def learned(directory: str, hw) -> tuple[History, Corrections]:
    """--history DIR: its runs (those on the kind of hardware planned for: a CPU's RSS says nothing of a GPU's
    allocator) and the corrections they give. UsageError when DIR holds no summary.json."""
    if not Path(directory).is_dir():
        raise UsageError(f"--history {directory} is not a directory", "--history",
                         "give a runs directory: the output dirs of `zero-trainer train`, or a folder above them")
    history = read_history(directory)
    if not history and not history.skipped:
        raise UsageError(f"no summary.json under {directory}", "--history",
                         "give the folder that holds finished runs' output dirs (each writes OUTPUT_DIR/summary.json)")
    return history, corrections([o for o in history if o.cpu_only == hw.cpu_only])


def history_lines(directory: str, history: History, corr: Corrections, cpu_only: bool) -> list[str]:
    """The block `plan --history` prints before the table: runs read, the two scales, errors before and after."""
    other = sum(o.cpu_only != cpu_only for o in history)
    skipped = "; ".join(f"{p}: {why}" for p, why in history.skipped[:2]) + ("; ..." if len(history.skipped) > 2 else "")
    memory = (f"the largest measured/predicted peak of {corr.memory_runs} run(s), so none is predicted below what it "
              "used") if corr.memory_runs else "no run measured a predicted peak"
    speed = f"the median measured/predicted step time of {corr.speed_runs} run(s)" if corr.speed_runs else \
        "no run measured a predicted step time (no probe cached then?)"
    lines = [f"history: {len(history)} run(s) read under {directory}"
             + (f", {len(history.skipped)} skipped ({skipped})" if history.skipped else "")
             + (f"; {other} on {'a GPU' if cpu_only else 'CPU only'} left out (the plan is for "
                f"{'CPU' if cpu_only else 'GPUs'})" if other else ""),
             f"  memory x{corr.memory_scale:.3f}: {memory}", f"  speed  x{corr.speed_scale:.3f}: {speed}"]
    for kind in ("memory", "speed"):
        e = corr.errors(kind)
        if e["before"] is not None:
            lines.append(f"  {kind} error |predicted/measured - 1|: median {e['before']['median']:.1%}, worst "
                         f"{e['before']['worst']:.1%} before; median {e['after']['median']:.1%}, worst "
                         f"{e['after']['worst']:.1%} after")
    return lines


def history_json(directory: str, history: History, corr: Corrections) -> dict:
    """`plan --history --json`'s "history": the runs read, used (those of the plan's kind of hardware) and skipped,
    the scales, the errors before and after, and every run used before and after."""
    return {"directory": directory, "runs_read": len(history), "runs_used": len(corr.rows),
            "skipped": [{"path": p, "why": why} for p, why in history.skipped], **corr.to_json()}


def speed_probe(args, hw):
    """The probe step times come from: --probe FILE, else this machine's cached one when it is the kind of machine
    planned for (measured now when --tokens or --objective speed asks for times and none is cached); else None."""
    from .probe import Probe, load_cached, load_or_measure

    if args.probe:
        try:
            data = json.loads(Path(args.probe).read_text())
            probe = Probe.from_dict(data.get("probe", data))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UsageError(f"--probe {args.probe} is not a `zero-trainer probe --json` output ({err})", "--probe",
                             "write one with `zero-trainer probe --json > FILE.json` on the machine") from None
        if probe_for(hw, probe) is None:
            raise UsageError(f"--probe {args.probe} measured a {probe.device}, but the plan is for "
                             f"{'a CPU-only machine' if hw.cpu_only else 'GPUs'}", "--probe",
                             "pass the probe of the machine the plan is for")
        return probe
    wanted = args.tokens is not None or args.objective == "speed"
    probe = probe_for(hw, load_cached())
    if probe is None and wanted and hw.cpu_only == (not local_gpus()[0]):
        print("probing this machine for step times (once; cached): zero-trainer probe", file=sys.stderr, flush=True)
        probe = probe_for(hw, load_or_measure())
    return probe


def speed_table(plan: Plan, tokens: float | None) -> list[str]:
    """Every fitting candidate's predicted step time and tokens/s (and time to `tokens`), fastest first."""
    probe = plan.probe
    rows = sorted((c for c in plan.candidates if c.fits and c.speed is not None),
                  key=lambda c: -c.speed.tokens_per_s)
    wl = plan.workload
    lines = [f"speed (step-time model on the probe of {probe.device}, {probe.measured_at[:10]}; micro batch "
             f"{wl.micro_batch}, {wl.micro_batches} a step; seconds per optimizer step):",
             f"{'rung':24} {'AC':3} {'tiles':8} {'step s':>8} {'tokens/s':>10} {'compute':>8} {'comm':>7} "
             f"{'optim':>7} {'offload':>7} {'nvme':>7}" + (f" {'time to ' + f'{tokens:.3g}':>14}" if tokens else "")]
    for c in rows:
        sp, t = c.speed, c.speed.terms
        mark = "*" if c is plan.chosen else " "
        tiles = "+".join(k for k, on in (("loss", c.tiled_loss), ("mlp", c.tiled_mlp)) if on) or "-"
        lines.append(f"{mark}{c.name:23} {'yes' if c.activation_checkpointing else 'no':3} {tiles:8} "
                     f"{sp.seconds:8.3g} {sp.tokens_per_s:10,.0f} {t['compute'] + t['elementwise']:8.3g} "
                     f"{t['comm']:7.3g} {t['optimizer']:7.3g} {t['offload']:7.3g} {t['nvme']:7.3g}"
                     + (f" {human_time(sp.time_for(tokens)):>14}" if tokens else ""))
    if not rows:
        lines.append("  (nothing fits)")
    if plan.speed_search:
        tried = ", ".join(f"micro batch {mb}: " + (f"{c.name}{' AC' if c.activation_checkpointing else ''} "
                                                   f"{c.speed.tokens_per_s:,.0f} tokens/s" if c else "nothing fits")
                          for mb, c in plan.speed_search)
        lines.append(f"objective speed: {tried}")
    return lines


def lora_trainable(args) -> int | None:
    """--lora-r/--lora-targets: the adapters' parameters on --model (None: no LoRA)."""
    if args.lora_r < 0:
        raise UsageError(f"--lora-r {args.lora_r} is negative", "--lora-r", "use a rank >= 1, or 0 for no LoRA")
    if args.lora_r == 0:
        return None
    from .lora import trainable_params
    from .model import model_config
    from .recipe import LoraSection

    model_shape(args.model)  # an unknown --model: the planner's own one line first
    names = args.lora_targets.strip()
    targets = names if names == "all-linear" else [n.strip() for n in names.split(",") if n.strip()]
    try:
        cfg = model_config(args.model)
    except (ValueError, OSError) as err:
        raise UsageError(f"--model {args.model}: {err}", "--model",
                         "use a preset name or a local config.json") from None
    return trainable_params(cfg, LoraSection(r=args.lora_r, target_modules=targets), "--lora-targets")


def write_sized_config(plan: Plan, name: str | None, path: str, nvme_path: str | None = None, out=None) -> None:
    """The JSON `name` as HF Trainer and accelerate take it: every knob the planner decides written as a number for
    plan's model and hardware; then what else the plan implies for those tools (to `out`, default stdout)."""
    if name is None:
        raise UsageError("nothing to write: no rung fits", "--write-ds-config", "name one with --ds-config")
    label, raw = load_ds_config(name)
    rung = sized_rung(label, raw, plan.model, plan.workload, plan.hardware)
    own = make_plan(plan.model, plan.hardware, plan.workload, rungs=[rung],  # with AC only if it needs it
                    corrections=plan.corrections)
    candidate = own.chosen or own.candidates[0]
    config = for_hf_tools(raw, candidate.rung.ds, candidate.sized)
    if nvme_path:
        set_nvme_path(config, nvme_path)
    Path(path).write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {path}: {label} sized for {plan.model.name}"
          f"{'' if candidate.fits else ' (it does not fit: ' + candidate.why + ')'}", file=out)
    for line in hf_tool_settings(plan, path, candidate.activation_checkpointing):
        print(line, file=out)


def hf_tool_settings(plan: Plan, path: str, checkpointing: bool) -> list[str]:
    """What the plan implies beyond the JSON, said in each tool's own words."""
    wl, hw = plan.workload, plan.hardware
    precision = {"bf16": "bf16=True", "fp16": "fp16=True", "fp32": None}[wl.precision]
    args = [f'deepspeed="{path}"', f"per_device_train_batch_size={wl.micro_batch}",
            f"gradient_checkpointing={checkpointing}", *([precision] if precision else [])]
    launch = ["accelerate launch --use_deepspeed", f"--deepspeed_config_file {path}",
              f"--num_processes {hw.world_size}", *([f"--num_machines {hw.nodes}"] if hw.nodes > 1 else []),
              f"--mixed_precision {'no' if wl.precision == 'fp32' else wl.precision}", "train.py"]
    return [f"HF Trainer: TrainingArguments({', '.join(args)}, ...); sequences of {wl.seq_len} tokens",
            f"accelerate: {' '.join(launch)}; DataLoader batch_size={wl.micro_batch}, sequences of {wl.seq_len} "
            "tokens" + ("; model.gradient_checkpointing_enable() before accelerator.prepare" if checkpointing
                        else "")]


def format_table(plan: Plan) -> str:
    hw, wl, m = plan.hardware, plan.workload, plan.model
    gib = lambda n: f"{n / GiB:7.1f}"  # noqa: E731
    tp, sp, pp = plan.tensor_parallel, plan.sequence_parallel, plan.pipeline_parallel
    learned = plan.corrections is not None  # a `history` column: what this machine's runs add (plan --history)
    lines = [f"{m.name}: {m.params / 1e9:.3g}B parameters; seq_len {wl.seq_len}, micro batch {wl.micro_batch}, "
             f"{wl.precision}", *([plan.lora] if plan.lora else []),
             f"{hw.describe()}; {SAFETY_MARGIN:.0%} of every memory kept free",
             f"tensor parallel {tp}, sequence parallel {sp}{f', pipeline parallel {pp}' if pp > 1 else ''}: "
             f"{plan.parallel_reason}; ZeRO partitions over {zero_ranks(hw, wl)} rank(s), data parallel "
             f"{hw.world_size // (tp * sp * pp)}"
             + (f"; each rank holds {wl.local_seq_len} tokens of a sequence" if sp > 1 else ""),
             *([f"pipeline parallel search: pp {', '.join(str(d) for d, _ in plan.pipeline_search)} tried, none fits "
                f"(pp {plan.pipeline_search[-1][0]}: {plan.pipeline_search[-1][1]})"]
               if pp == 1 and plan.pipeline_search else []),
             "GiB per rank" + (" (device = its share of the RAM, offload included)" if hw.cpu_only else
                               " on the device") + "; CPU and NVMe per node; tiles: what runs over sequence tiles",
             f"{'rung':24} {'AC':3} {'tiles':8} {'params':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'buffers':>7} "
             + (f"{'history':>7} " if learned else "") + f"{'device':>7} {'CPU':>7} {'NVMe':>7}  fits"]
    for c in plan.candidates:
        d = c.device
        mark = "*" if c is plan.chosen else " "
        tiles = "+".join(k for k, on in (("loss", c.tiled_loss), ("mlp", c.tiled_mlp)) if on) or "-"
        lines.append(f"{mark}{c.name:23} {'yes' if c.activation_checkpointing else 'no':3} {tiles:8} "
                     f"{gib(d['params'])} "
                     f"{gib(d['grads'])} {gib(d['optimizer'])} {gib(d['activations'])} {gib(d['buffers'])} "
                     + (f"{gib(d['history'])} " if learned else "")
                     + f"{gib(c.device_bytes)} {gib(c.cpu_bytes)} {gib(c.nvme_bytes)}  "
                     f"{'yes' if c.fits else 'no: ' + c.why}")
    lines.append(f"chosen: {plan.reason}" if plan.chosen else f"nothing fits: {plan.reason}")
    if plan.chosen:
        where = "host RAM" if hw.cpu_only else "host (CPU) memory"
        lines.append(f"load: {plan.load_peak_bytes / GiB:.1f} GiB of {where} per rank at the peak of building and "
                     f"loading the model (before the engine), beside the step's {plan.chosen.device_bytes / GiB:.1f} "
                     "GiB")
    if plan.sized:
        knobs = (f"{k.removeprefix('zero_optimization.')}={v}" for k, v in plan.sized.items())
        lines.append("sized: " + ", ".join(knobs))
    if pp > 1:
        lines += pipeline_table(plan)
    return "\n".join(lines + plan.notes)


def pipeline_table(plan: Plan) -> list[str]:
    """Each stage of a pipeline plan (of the chosen candidate, else the lightest) and the bubble."""
    pp, micro = plan.pipeline_parallel, plan.workload.micro_batches
    shown = plan.staged
    lines = [f"pipeline: {pp} stages, {micro} micro-batch{'es' if micro > 1 else ''} a step (1F1B); bubble "
             f"(pp-1)/(m+pp-1) = {pp - 1}/{micro + pp - 1} = {plan.pipeline_bubble:.0%} of each step idle",
             f"{'stage':>5} {'layers':>6} {'params':>9} {'in flight':>9} {'predicted GiB a rank':>21}  "
             f"({'chosen' if plan.chosen else 'nothing fits; the lightest'}: {shown.name}"
             f"{' with activation checkpointing' if shown.activation_checkpointing else ''})"]
    for st in plan.stages:
        lines.append(f"{st['stage']:>5} {st['layers']:>6} {st['params'] / 1e6:>8.1f}M {st['in_flight']:>9} "
                     f"{st['predicted_peak_bytes'] / GiB:>21.2f}")
    return lines


def plot_plan(plan: Plan, path: str) -> None:
    """Stacked bars of each candidate's per-rank device bytes against the device limit (and the usable part)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hw, cands = plan.hardware, plan.candidates
    parts = ("params", "grads", "optimizer", "activations", "buffers") + (("history",) if plan.corrections else ())
    labels = [c.name + (" +AC" if c.activation_checkpointing else "") + (" +tiles" if c.tiling else "")
              for c in cands]
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(cands)), 5))
    bottom = [0.0] * len(cands)
    for part in parts:
        values = [c.device[part] / GiB for c in cands]
        ax.bar(labels, values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    limit = (hw.cpu_mem / hw.gpus_per_node if hw.cpu_only else hw.gpu_mem) / GiB
    ax.axhline(limit, color="black", lw=1.5, label=f"{'RAM share' if hw.cpu_only else 'device'} {limit:.1f} GiB")
    ax.axhline(limit * (1 - SAFETY_MARGIN), color="black", ls="--", lw=1, label=f"usable ({1 - SAFETY_MARGIN:.0%})")
    for i, c in enumerate(cands):
        if c is plan.chosen:
            ax.annotate("chosen", (i, bottom[i]), ha="center", va="bottom", fontsize=8, color="green")
        elif not c.fits:
            ax.annotate("×", (i, bottom[i]), ha="center", va="bottom", color="red")
    ax.set_ylim(0, max(limit * 1.3, min(max(bottom), limit * 4)) * 1.05)
    ax.set_ylabel("GiB per rank")
    ax.set_title(f"{plan.model.name} on {hw.describe()}" + (f"; {plan.parallel}" if plan.parallel else ""),
                 fontsize=9)
    ax.tick_params(axis="x", rotation=60, labelsize=8)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
