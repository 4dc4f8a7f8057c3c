"""`zero-trainer report RUN_DIR [RUN_DIR ...] -o FILE.png`: runs drawn side by side from what every run writes
(metrics.csv, and summary.json once it finished): loss and eval loss, tokens/s and memory per step, each run labelled
by rung, world size and precision."""

import csv
import json
import math
from pathlib import Path

from .errors import UsageError
from .hardware import GiB


def add_subcommand(sub) -> None:
    p = sub.add_parser("report", help="draw runs side by side: loss, eval loss, tokens/s, memory per step",
                       description="Overlay runs (their metrics.csv and summary.json) in one picture: loss and eval "
                                   "loss, tokens/s and memory per step, labelled by rung, world size and precision.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output dirs of runs (each has a metrics.csv)")
    p.add_argument("-o", "--output", required=True, metavar="FILE.png", help="the picture to write")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    out = Path(args.output)
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UsageError(f"cannot tell the picture format of '{out}'", "-o", "end the name in .png, .svg or .pdf")
    if not out.resolve().parent.is_dir():
        raise UsageError(f"the directory of '{out}' does not exist", "-o", "create it first or write elsewhere")
    runs = [read_run(path) for path in args.runs]
    draw(runs, out)
    print(f"wrote {out}: {len(runs)} run(s): " + "; ".join(r["label"] for r in runs))
    return 0


def read_run(path: str) -> dict:
    """One run's rows (numbers per metrics.csv column) and its label."""
    run_dir = Path(path)
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        why = "does not exist" if not run_dir.exists() else "has no metrics.csv"
        raise UsageError(f"run dir '{path}' {why}", "RUN_DIR", "give the output dir of a zero_trainer run")
    try:
        with open(metrics, newline="") as f:
            rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    except (csv.Error, UnicodeDecodeError, ValueError) as err:
        raise UsageError(f"{metrics} is not a metrics.csv zero_trainer wrote ({err})", "RUN_DIR",
                         "give the output dir of a zero_trainer run") from None
    if not rows or "step" not in rows[0] or "loss" not in rows[0]:
        raise UsageError(f"{metrics} has no logged steps", "RUN_DIR", "give a run that trained at least one step")
    summary = {}
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    return {"dir": run_dir, "rows": rows, "summary": summary, "label": label(run_dir, summary)}


def _number(text):
    return None if text in ("", None) else float(text)  # a metrics.csv holds numbers only


def label(run_dir: Path, summary: dict) -> str:
    """'zero3_offload · 2 ranks · bf16 (+AC)', or the dir name of a run that has not finished."""
    if not summary:
        return f"{run_dir.name} (unfinished)"
    ranks = summary.get("world_size", "?")
    text = (f"{summary.get('ds_config_name', '?')} · {ranks} rank{'s' if ranks != 1 else ''} · "
            f"{summary.get('precision', '?')}")
    return text + (" +AC" if summary.get("activation_checkpointing") else "")


def draw(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    same = [r["label"] for r in runs]
    labels = [f"{r['label']} [{r['dir'].name}]" if same.count(r["label"]) > 1 else r["label"] for r in runs]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    (loss_ax, eval_ax), (speed_ax, mem_ax) = axes
    for r, name in zip(runs, labels, strict=True):
        rows = r["rows"]
        steps = [row["step"] for row in rows]
        line, = loss_ax.plot(steps, [row["loss"] for row in rows], lw=1.2, label=name)
        color = line.get_color()
        evals = _eval_points(rows, r["summary"])
        if evals:
            eval_ax.plot(*zip(*evals, strict=True), marker="o", color=color, label=name)
        speed_ax.plot(steps, [row.get("tokens_per_s") for row in rows], lw=1.0, color=color, label=name)
        mem_ax.plot(steps, [_gib(row.get("mem_bytes")) for row in rows], lw=1.0, color=color, label=name)
        peak = r["summary"].get("peak_mem_bytes")
        if peak:
            mem_ax.axhline(peak / GiB, color=color, ls=":", lw=0.8)
    for ax, title, unit in ((loss_ax, "train loss", "loss"), (eval_ax, "eval loss", "loss"),
                            (speed_ax, "throughput", "tokens/s"), (mem_ax, "memory per rank (dotted: peak)", "GiB")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    if not eval_ax.lines:
        eval_ax.text(0.5, 0.5, "no eval loss logged", ha="center", va="center", transform=eval_ax.transAxes)
    loss_ax.legend(fontsize=8)
    fig.suptitle("zero_trainer runs: " + ", ".join(str(r["dir"]) for r in runs)[:160], fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _eval_points(rows: list[dict], summary: dict) -> list[tuple]:
    """(step, eval loss) at each step where metrics.csv's eval_loss changed, and the final one from summary.json."""
    points, last = [], None
    for row in rows:
        value = row.get("eval_loss")
        if value is not None and not math.isnan(value) and value != last:
            points.append((row["step"], value))
            last = value
    if summary.get("eval_loss") is not None:
        points.append((rows[-1]["step"], summary["eval_loss"]))  # the final evaluation, after the last step
    return points


def _gib(value):
    return None if value is None else value / GiB
