"""scale: the largest Llama-shaped model this machine can train for >= 2 steps with zero3_nvme and activation
checkpointing (seq_len 128, micro batch 1). Run by hand (`make bench-scale`), never in CI: it needs ~18 bytes
per parameter of free disk under --nvme-path (70 GiB for the default 4.16B), ~17 GiB of RAM and a quiet machine
for about 15 minutes. Its swap files go in a fresh folder under --nvme-path, removed at the end.

    python -m bench.scale [--hidden 4096 --layers 22 --ffn 11008] [--nvme-path DIR]

writes bench/results/scale.json (params, steps, ds_config_name, step_s, peak_rss_bytes, nvme_bytes) and
bench/results/scale.log (the run's output; the README quotes its last lines).
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def du_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tuned_nvme_config(sub_group_size: int) -> tuple[dict, dict]:
    """ds_configs/zero3_nvme.json with the sizes a multi-billion model needs in 24 GiB of RAM (the trainer itself
    raises offload_param.buffer_size to the largest tensor): the optimizer swaps buffer_count sub-groups of
    fp32, and a 1e9 max_in_cpu would keep GBs of bf16 weights in RAM. Every swapped-in
    tensor holds one whole param buffer while it is live: with a long reuse distance the second step's prefetch
    keeps more tensors live than there are buffers (DeepSpeed asserts "Not enough buffers 0 for swapping 1"), so
    weights are released right after use and there are 8 buffers."""
    ds = json.loads((REPO / "ds_configs" / "zero3_nvme.json").read_text())
    z = ds["zero_optimization"]
    overrides = {"sub_group_size": sub_group_size, "stage3_max_live_parameters": 300_000_000,
                 "stage3_max_reuse_distance": 0, "offload_param.buffer_count": 8, "offload_param.max_in_cpu": 0}
    for key, value in overrides.items():
        block, _, name = key.rpartition(".")
        (z[block] if block else z)[name] = value
    return ds, overrides


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=3, help="3: the warm-up keeps the lr at 0 for steps 1-2")
    p.add_argument("--nvme-path", default=str(REPO / "runs" / "scale_nvme"))
    p.add_argument("--sub-group-size", type=int, default=100_000_000,
                   help="optimizer sub-group (4 bytes each x buffer_count swap buffers in RAM)")
    args = p.parse_args()

    from zero_trainer.model import ZeroLMConfig, count_params

    config = ZeroLMConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          num_key_value_heads=args.kv_heads, max_position_embeddings=2048, tie_word_embeddings=False)
    params = count_params(config)
    nvme = Path(args.nvme_path)
    nvme.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(nvme).free
    nvme = Path(tempfile.mkdtemp(prefix="scale_", dir=nvme))  # ours alone: measured, then removed
    print(f"{params / 1e9:.2f}B parameters; ~{18 * params / 2**30:.0f} GiB of NVMe needed "
          f"(16 optimizer + 2 weight bytes a parameter), {free / 2**30:.0f} GiB free")
    with tempfile.TemporaryDirectory() as tmp:
        config_dir, out = Path(tmp) / "model", Path(tmp) / "run"
        config.to_llama_config().save_pretrained(config_dir)
        ds_dir = Path(tmp) / "ds"
        ds_dir.mkdir()
        ds_json, overrides = tuned_nvme_config(args.sub_group_size)
        (ds_dir / "zero3_nvme.json").write_text(json.dumps(ds_json, indent=1))
        log_path = REPO / "bench" / "results" / "scale.log"
        cmd = [sys.executable, "-m", "zero_trainer", "train", "--recipe", "recipes/debug.yaml",
               "--ds-config", str(ds_dir / "zero3_nvme.json"), "--nvme-path", str(nvme), "--output-dir", str(out),
               "model.preset=null", f"model.config={config_dir}", f"train.max_steps={args.steps}",
               "train.precision=bf16", "train.activation_checkpointing=true", "data.seq_len=128",
               "train.micro_batch=1", "train.grad_accum=1", "train.eval_every=0", "train.eval_batches=1",
               "train.sample_tokens=0", "train.save_every=0", "train.warmup_steps=1", "train.log_every=1"]
        with open(log_path, "w") as log:
            code = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        nvme_bytes = du_bytes(nvme) if nvme.exists() else 0
        shutil.rmtree(nvme, ignore_errors=True)
        if code != 0:
            print(f"run failed ({code}); see {log_path}")
            return code
        summary = json.loads((out / "summary.json").read_text())
        rows = (out / "metrics.csv").read_text().strip().splitlines()[1:]
    step_s = [float(r.split(",")[5]) for r in rows]
    from bench.common import write_result

    write_result("scale", {"params": params, "steps": summary["steps"], "ds_config_name": summary["ds_config_name"],
                           "step_s": step_s, "peak_rss_bytes": summary["peak_mem_bytes"], "nvme_bytes": nvme_bytes,
                           "shape": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers",
                                                                      "num_attention_heads", "num_key_value_heads",
                                                                      "intermediate_size", "vocab_size")},
                           "final_loss": summary["final_loss"], "ds_config_overrides": overrides,
                           "nvme_free_bytes_before": free})
    print(f"trained {params / 1e9:.2f}B for {summary['steps']} steps: {step_s} s/step, "
          f"peak RSS {summary['peak_mem_bytes'] / 2**30:.1f} GiB, NVMe {nvme_bytes / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
