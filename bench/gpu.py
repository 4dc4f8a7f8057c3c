"""gpu: the 1b recipe with zero2 in bf16 for 30 steps on one GPU — tokens/s, MFU and peak memory beside the
planner's prediction. On a machine without a GPU the same path runs the debug model for a few steps (tested).

    python -m bench.gpu            # writes bench/results/gpu.json (GPU) or bench/results/gpu_cpu.json (CPU)

MFU = 6 · params · tokens/s ÷ 989e12 (an H100 SXM's dense bf16 peak). On a GPU machine without deepspeed,
bench/gpu.sh installs a carried wheel first (build it with `pip wheel --no-deps deepspeed==0.19.8 -w .whl`).
"""

import json
import sys
import tempfile
from pathlib import Path

from bench.common import run_child

H100_BF16_PEAK = 989e12
REPO = Path(__file__).resolve().parent.parent


def settings(on_gpu: bool) -> dict:
    if on_gpu:
        return {"recipe": "recipes/1b.yaml", "steps": 30, "overrides": ["data.seq_len=2048", "train.micro_batch=4"]}
    return {"recipe": "recipes/debug.yaml", "steps": 4,
            "overrides": ["data.seq_len=64", "train.micro_batch=4", "data.max_documents=300"]}


def predicted_peak_bytes(summary: dict) -> int:
    """The planner's per-device prediction for the rung and settings this run used."""
    from zero_trainer.hardware import detect_hardware
    from zero_trainer.plan import plan_model

    recipe = summary["recipe"]
    plan = plan_model(summary["model"], detect_hardware(gpus_per_node=summary["world_size"]),
                      seq_len=recipe["data"]["seq_len"], micro_batch=recipe["train"]["micro_batch"],
                      precision=summary["precision"], tp=summary.get("tensor_parallel", 1),
                      sp=summary.get("sequence_parallel", 1))  # the run's degrees (sp=None would search)
    ac = recipe["train"]["activation_checkpointing"]
    return next(c.device_bytes for c in plan.candidates
                if c.name == summary["ds_config_name"] and c.activation_checkpointing == ac)


def result_from_summary(summary: dict, device: str, recipe: str) -> dict:
    """What the benchmark reports for one run's summary.json."""
    tps, params = summary["tokens_per_s"], summary["params"]
    return {
        "device": device, "recipe": recipe,
        "ds_config_name": summary["ds_config_name"], "precision": summary["precision"], "steps": summary["steps"],
        "params": params, "tokens_per_s": tps, "mfu": 6 * params * tps / H100_BF16_PEAK,
        "peak_mem_bytes": summary["peak_mem_bytes"], "predicted_peak_bytes": predicted_peak_bytes(summary),
        "final_loss": summary["final_loss"],
    }


def main() -> int:
    import torch

    on_gpu = torch.cuda.is_available()
    cfg = settings(on_gpu)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "zero_trainer", "train", "--recipe", cfg["recipe"], "--ds-config", "zero2",
               "--output-dir", str(out), f"train.max_steps={cfg['steps']}", "train.precision=bf16",
               "train.eval_every=0", "train.eval_batches=1", "train.sample_tokens=0", "train.save_every=0",
               *cfg["overrides"]]
        run_child(cmd, cwd=REPO)
        summary = json.loads((out / "summary.json").read_text())
    result = result_from_summary(summary, torch.cuda.get_device_name(0) if on_gpu else "cpu", cfg["recipe"])
    from bench.common import write_result

    path = write_result("gpu" if on_gpu else "gpu_cpu", result)
    pred, tps, params = result["predicted_peak_bytes"], result["tokens_per_s"], result["params"]
    print(f"{result['device']}: {params / 1e6:.1f}M params, {tps:.0f} tokens/s, MFU {result['mfu']:.2%} "
          f"(of {H100_BF16_PEAK / 1e12:.0f} TFLOP/s), peak {result['peak_mem_bytes'] / 2**30:.2f} GiB, planner "
          f"{pred / 2**30:.2f} GiB -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
