"""memory: per-rank peak memory of every ds_configs rung at world size 1 and 2, beside ZeRO theory and the
planner's prediction, for minimind-26m and minimind-104m.

The measurements are the planner calibration's real runs (bench/plan_calibration.py; one `zero-trainer train`
per row, peak RSS minus the RSS before the model was built), so the two benchmarks never disagree about
what was measured. Theory counts model states only (Rajbhandari et al. 2020, mixed-precision Adam:
16Ψ, 4Ψ+12Ψ/N, 2Ψ+14Ψ/N, 16Ψ/N bytes for stages 0-3; fp32 Adam: 16Ψ, 8Ψ+8Ψ/N, 4Ψ+12Ψ/N, 16Ψ/N). On a
CPU-only machine "offloading" to the CPU moves bytes within the same RAM, so its theory is its stage's.

    python -m bench.memory      # writes bench/results/memory.json and memory.png, prints a table
"""

import json
import sys

from bench.common import RESULTS, table, write_result

MODELS = ("minimind-26m", "minimind-104m")
STAGE = {"zero0": 0, "zero1": 1, "zero2": 2, "zero2_offload": 2, "zero3": 3, "zero3_offload": 3, "zero3_nvme": 3}


def theory_bytes(params: int, rung: str, world_size: int, precision: str) -> float:
    """Model-state bytes per rank: weights + grads + optimizer, as each ZeRO stage shards them."""
    weight, grad, optim = (4, 4, 8) if precision == "fp32" else (2, 2, 12)
    n, stage = world_size, STAGE[rung]
    if rung == "zero3_nvme":  # parameters and optimizer live on NVMe; only working copies stay in RAM
        return (weight + grad) * params / n
    optim /= n if stage >= 1 else 1
    grad /= n if stage >= 2 else 1
    weight /= n if stage >= 3 else 1
    return (weight + grad + optim) * params


def main() -> int:
    from zero_trainer.model import count_params

    calibration = json.loads((RESULTS / "plan_calibration.json").read_text())
    rows = []
    for row in calibration["rows"]:
        if row["model"] not in MODELS or row.get("activation_checkpointing"):
            continue
        params = count_params(row["model"])
        rows.append({"model": row["model"], "rung": row["rung"], "world_size": row["world_size"],
                     "precision": row["precision"], "params": params,
                     "measured_bytes": row["measured_bytes"], "planner_bytes": row["predicted_bytes"],
                     "theory_model_states_bytes": int(theory_bytes(params, row["rung"], row["world_size"],
                                                                   row["precision"]))})
    if not rows:
        print("no minimind rows in plan_calibration.json: run `python -m bench.plan_calibration` first")
        return 1
    write_result("memory", {"source": "bench/results/plan_calibration.json", "rows": rows})
    plot(rows)
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    columns = ["model", "precision", "rung", "ws", "measured MiB", "planner MiB", "theory MiB"]
    print(table([{"model": r["model"], "precision": r["precision"], "rung": r["rung"], "ws": r["world_size"],
                  "measured MiB": mib(r["measured_bytes"]), "planner MiB": mib(r["planner_bytes"]),
                  "theory MiB": mib(r["theory_model_states_bytes"])} for r in rows], columns))
    return 0


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, p) for m in MODELS for p in ("bf16", "fp32")
              if any(r["model"] == m and r["precision"] == p for r in rows)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 4 * len(panels)), squeeze=False)
    for ax, (model, precision) in zip(axes[:, 0], panels, strict=True):
        sub = [r for r in rows if r["model"] == model and r["precision"] == precision]
        labels = [f"{r['rung'].replace('_', chr(10))}\nws{r['world_size']}" for r in sub]
        x = range(len(sub))
        for i, (key, name) in enumerate((("measured_bytes", "measured"), ("planner_bytes", "planner"),
                                         ("theory_model_states_bytes", "theory (model states)"))):
            ax.bar([j + (i - 1) * 0.27 for j in x], [r[key] / 2**20 for r in sub], width=0.27, label=name)
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_ylabel("MiB per rank")
        ax.set_title(f"{model} {precision}: peak memory per rank above the process baseline")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "memory.png", dpi=100)


if __name__ == "__main__":
    sys.exit(main())
