"""load: host memory and time to load a >=1B pretrained checkpoint at ZeRO-3 on 2 ranks, zero_trainer vs transformers.

The bench writes the checkpoint itself: a Llama of a preset's shape (`1b`: 1.04B parameters), bf16, random weights,
in 1 GiB safetensors shards with an index, as save_pretrained shards. Then, in one run, alternating:

  - zero_trainer: what a run does before deepspeed.initialize (trainer.Run.load_model): the model built under
    deepspeed.zero.Init from the resolved zero3 JSON, then pretrained.load_pretrained, each rank reading its own flat
    partition of every tensor;
  - transformers: `AutoModelForCausalLM.from_pretrained(dir, dtype=bfloat16)` with an HfDeepSpeedConfig of the same
    JSON alive (what HF Trainer and accelerate do at ZeRO-3).

Each arm is a 2-rank torchrun launch; each rank reports its peak RSS (VmHWM: what the process ever had resident, mapped
file pages included), its RSS before the model, the load's wall time, and a checksum of its partitions (the two arms
must hold the same weights). Beside them, the planner's load prediction for this shape, rung and world size
(plan.load_peak_bytes). Goal: rank 0's peak <= 1/2 of transformers', within 15% of the prediction.

    python -m bench.load [--model 1b] [--rounds 2] [--dir DIR]   # writes bench/results/load.json
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, median, run_child, table, write_result

SHARD_BYTES = 2**30
WORLD = 2


def write_checkpoint(preset_or_config, out: Path) -> Path:
    """A Llama of a preset's shape (or a LlamaConfig) in bf16: random N(0, 0.02) weights (norms 1), sharded with an
    index as save_pretrained shards, written one tensor at a time (a 3B checkpoint needs no 12 GB model in RAM)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from zero_trainer.model import model_config

    if (out / "model.safetensors.index.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = (model_config(preset_or_config).to_llama_config() if isinstance(preset_or_config, str)
              else preset_or_config)
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    config.save_pretrained(out)
    torch.manual_seed(0)
    shards, shard, size = [], {}, 0
    names = [n for n, _ in model.named_parameters()]  # tied: the head is the embedding, saved once
    for name in names + [None]:
        if name is None or (shard and size + model.get_parameter(name).numel() * 2 > SHARD_BYTES):
            shards.append(shard)
            shard, size = {}, 0
        if name is None:
            break
        p = model.get_parameter(name)
        shard[name] = (torch.ones(p.shape) if p.dim() == 1 else torch.randn(p.shape) * 0.02).to(torch.bfloat16)
        size += p.numel() * 2
    weight_map = {}
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, out / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in tensors})
    total = sum(t.numel() * 2 for s in shards for t in s.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return out


def zero3_config() -> dict:
    """ds_configs/zero3.json resolved for bf16 at world size 2, as a run would give it to deepspeed.initialize."""
    from zero_trainer.ds_config import load_ds_config, resolve_auto_values
    from zero_trainer.recipe import load_recipe

    recipe = load_recipe("debug", ["train.precision=bf16", "train.micro_batch=1"])
    return resolve_auto_values(load_ds_config("zero3")[1], recipe, world_size=WORLD, hidden_size=2048)


def worker(arm: str, model_dir: str, out: str) -> None:
    """One rank of one arm: load, then report what it took."""
    import deepspeed
    import deepspeed.comm as dist
    import torch

    from zero_trainer.metrics import current_rss_bytes, peak_rss_bytes

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORLD))
    deepspeed.init_distributed()
    rank, rss_before, ds = dist.get_rank(), current_rss_bytes(), zero3_config()
    t = time.time()
    if arm == "zero_trainer":
        from zero_trainer.model import model_config
        from zero_trainer.pretrained import load_pretrained
        from zero_trainer.trainer import build_initialized_model

        model = build_initialized_model(model_config(model_dir), ds, seed=0, initialize=False)
        read = load_pretrained(model, model_dir)["bytes_read"]
    else:
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds)  # noqa: F841 (alive: from_pretrained asks it whether ZeRO-3 is on)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        read = None
    load_s = time.time() - t
    peak = peak_rss_bytes()
    # what this rank holds: its partition of every parameter (both arms partition the same way)
    checksum = sum(float(p.ds_tensor.double().sum()) for p in model.parameters())
    dist.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "peak_rss_bytes": peak, "rss_before_bytes": rss_before, "load_s": load_s,
        "bytes_read": read, "checksum": checksum, "partition_bytes": sum(p.ds_tensor.numel() * 2
                                                                        for p in model.parameters())}))


def launch(arm: str, model_dir: Path, out: Path) -> list[dict]:
    from zero_trainer.hardware import free_port
    from zero_trainer.ops import remove_shm_buffers

    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    try:
        run_child([Path(sys.executable).with_name("torchrun"), "--nproc-per-node", WORLD, "--master-port", port,
                   "-m", "bench.load", "--worker", arm, model_dir, out], cwd=REPO)
    finally:
        remove_shm_buffers(port)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def predicted(model_dir) -> dict:
    """The planner's load peak for this checkpoint's shape at zero3 on WORLD CPU ranks (bf16)."""
    from zero_trainer.hardware import Hardware, physical_memory_bytes
    from zero_trainer.model import model_config
    from zero_trainer.plan import HOST_PROCESS_BYTES, Workload, load_peak_bytes, shape_from_config, sized_rung

    shape = shape_from_config(model_config(str(model_dir)), "1b-llama")
    hw = Hardware(nodes=1, gpus_per_node=WORLD, gpu_mem=None, cpu_mem=physical_memory_bytes())
    workload = Workload(seq_len=2048, micro_batch=1, precision="bf16")
    from zero_trainer.ds_config import load_ds_config

    rung = sized_rung("zero3", load_ds_config("zero3")[1], shape, workload, hw)
    return {"load_peak_bytes": load_peak_bytes(shape, rung, hw, workload), "host_process_bytes": HOST_PROCESS_BYTES,
            "params": shape.params}


def main() -> int:
    if "--worker" in sys.argv:
        i = sys.argv.index("--worker")
        worker(*sys.argv[i + 1: i + 4])
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.load")
    parser.add_argument("--model", default="1b", help="a preset's shape for the checkpoint (default 1b: 1.04B)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating launches of each arm (default 2)")
    parser.add_argument("--dir", help="where to write (and reuse) the checkpoint (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_checkpoint(args.model, Path(args.dir or tmp) / f"llama-{args.model}-bf16")
        size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        print(f"checkpoint: {model_dir} ({size / 2**30:.2f} GiB)", flush=True)
        runs = {"zero_trainer": [], "transformers": []}
        for r in range(args.rounds):
            for arm in (("zero_trainer", "transformers") if r % 2 == 0 else ("transformers", "zero_trainer")):
                ranks = launch(arm, model_dir, Path(tmp) / f"{arm}{r}")
                runs[arm].append(ranks)
                print(f"round {r} {arm}: " + ", ".join(
                    f"rank {x['rank']} peak {x['peak_rss_bytes'] / 2**30:.2f} GiB, {x['load_s']:.1f} s"
                    for x in ranks), flush=True)
        plan = predicted(model_dir)
    gib = 2**30
    summary = {}
    for arm, rounds in runs.items():
        summary[arm] = {f"rank{k}_peak_rss_bytes": [x[k]["peak_rss_bytes"] for x in rounds] for k in range(WORLD)}
        summary[arm]["load_s"] = [max(x[k]["load_s"] for k in range(WORLD)) for x in rounds]
        summary[arm]["checksum"] = [sum(x[k]["checksum"] for k in range(WORLD)) for x in rounds]
    zt0 = median(summary["zero_trainer"]["rank0_peak_rss_bytes"])
    hf0 = median(summary["transformers"]["rank0_peak_rss_bytes"])
    ratios = [a / b for a, b in zip(summary["zero_trainer"]["rank0_peak_rss_bytes"],
                                    summary["transformers"]["rank0_peak_rss_bytes"], strict=True)]
    error = zt0 / plan["load_peak_bytes"] - 1
    same = len({round(c, 3) for arm in summary.values() for c in arm["checksum"]}) == 1
    result = {"model": f"LlamaForCausalLM ({args.model} shape)", "preset": args.model, "params": plan["params"],
              "checkpoint_bytes": size,
              "world_size": WORLD, "ds_config": "zero3", "dtype": "bf16", "rounds": args.rounds, "order": "ABBA",
              "arms": summary, "rank0_peak_ratio": zt0 / hf0, "rank0_peak_ratio_per_round": ratios,
              "goal_ratio": 0.5, "predicted_load_peak_bytes": plan["load_peak_bytes"], "prediction_error": error,
              "goal_prediction_error": 0.15, "same_weights": same}
    path = write_result("load", result)
    rows = [{"arm": arm, **{f"rank {k} peak GiB": " ".join(f"{v / gib:.2f}" for v in s[f"rank{k}_peak_rss_bytes"])
                            for k in range(WORLD)},
             "load s": " ".join(f"{v:.1f}" for v in s["load_s"])} for arm, s in summary.items()]
    print(table(rows, ["arm", "rank 0 peak GiB", "rank 1 peak GiB", "load s"]))
    per_round = ", ".join(f"{r:.3f}" for r in ratios)
    print(f"rank 0 peak, zero_trainer / transformers = {zt0 / hf0:.3f} (per round {per_round};"
          f" goal <= 0.5); planner predicted {plan['load_peak_bytes'] / gib:.2f} GiB, measured "
          f"{zt0 / gib:.2f} GiB ({error:+.1%}; goal within 15%); same weights in both arms: {same} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
