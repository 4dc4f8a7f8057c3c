"""scale: the largest Llama-shaped model this machine can train for >= 2 steps, planned by `--ds-config auto` with no
DeepSpeed override (seq_len 128, micro batch 1). Run by hand (`make bench-scale`), never in CI: it needs ~18 bytes
per parameter of free disk under --nvme-path (72 GiB for the default 4.03B), ~16 GiB of RAM and a quiet machine
for about 15 minutes. Its swap files go in a fresh folder under --nvme-path, removed at the end.

    python -m bench.scale [--hidden 4096 --layers 22 --ffn 11008] [--nvme-path DIR]

writes bench/results/scale.json (params, steps, ds_config_name, plan, predicted_peak_bytes, peak_rss_bytes,
rss_before_model_bytes, nvme_bytes, step_s, the disk bound, ds_config_overrides) and bench/results/scale.log.

The disk bound: ZeRO-Infinity moves per step, per parameter, the fp32 gradients out (4 bytes) and, for the
optimizer, master weights + two moments + gradients in (16) and master + moments out (12), the updated bf16
weights out (2), and bf16 weights in for the forward, the backward and (with activation checkpointing) the
recomputation (2 each). Divided by this disk's O_DIRECT read and write bandwidth (measured here with dd before
the run), that is the fastest a step can be when the disk is the bottleneck.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import run_child

REPO = Path(__file__).resolve().parent.parent


def du_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def disk_bandwidth(folder: Path, size_mib: int = 2048) -> dict:
    """O_DIRECT sequential write then read of one file (bytes/s), the way aio reads and writes swap files."""
    path = folder / "bandwidth.probe"
    rates = {}
    for what, cmd in (("write", ["dd", "if=/dev/zero", f"of={path}", "bs=8M", f"count={size_mib // 8}",
                                  "oflag=direct", "conv=fsync"]),
                      ("read", ["dd", f"if={path}", "of=/dev/null", "bs=8M", "iflag=direct"])):
        t = time.time()
        run_child(cmd)
        rates[what] = size_mib * 2**20 / (time.time() - t)
    path.unlink()
    return rates


def disk_bound_s(params: int, checkpointing: bool, rates: dict) -> dict:
    read = params * (16 + 2 * (3 if checkpointing else 2))  # optimizer in; weights for forward, backward (+recompute)
    written = params * (4 + 12 + 2)  # fp32 gradients; master and moments; updated bf16 weights
    return {"read_bytes": read, "written_bytes": written, "read_bytes_per_s": rates["read"],
            "write_bytes_per_s": rates["write"], "bound_s": read / rates["read"] + written / rates["write"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--untied", action="store_true", help="a separate LM head (+vocab x hidden parameters)")
    p.add_argument("--steps", type=int, default=4, help="4: WarmupCosineLR with one warm-up step (DeepSpeed's least) "
                   "keeps the lr at 0 for steps 1 and 2")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per step (a CPU without AVX-512 computes bf16 at "
                   "~1 GFLOP/s: use a few tokens there, so the step measures the swap path, not the matmuls)")
    p.add_argument("--nvme-path", default=str(REPO / "runs" / "scale_nvme"))
    p.add_argument("--pretrained", action="store_true", help="fine-tune a bf16 checkpoint of this shape, written by "
                   "the bench (model.pretrained; writes bench/results/scale_pretrained.json) instead of a random init")
    args = p.parse_args()

    from zero_trainer.hardware import physical_memory_bytes
    from zero_trainer.model import ZeroLMConfig, count_params

    config = ZeroLMConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          num_key_value_heads=args.kv_heads, max_position_embeddings=2048,
                          tie_word_embeddings=not args.untied)
    params = count_params(config)
    nvme = Path(args.nvme_path)
    nvme.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(nvme).free
    nvme = Path(tempfile.mkdtemp(prefix="scale_", dir=nvme))  # ours alone: measured, then removed
    rates = disk_bandwidth(nvme)
    print(f"{params / 1e9:.2f}B parameters; ~{18 * params / 2**30:.0f} GiB of NVMe needed "
          f"(16 optimizer + 2 weight bytes a parameter), {free / 2**30:.0f} GiB free; disk "
          f"{rates['read'] / 1e9:.2f} GB/s read, {rates['write'] / 1e9:.2f} GB/s write", flush=True)
    name = "scale_pretrained" if args.pretrained else "scale"
    with tempfile.TemporaryDirectory() as tmp:
        config_dir, out = Path(tmp) / "model", Path(tmp) / "run"
        if args.pretrained:
            from bench.load import write_checkpoint
            from zero_trainer.data import _train_bpe, load_documents

            t = time.time()
            write_checkpoint(config.to_llama_config(), config_dir)
            _train_bpe(load_documents(None).select(range(200)), 512).save_pretrained(config_dir)
            print(f"wrote a {du_bytes(config_dir) / 2**30:.1f} GiB bf16 checkpoint in {time.time() - t:.0f} s",
                  flush=True)
            model_arg = f"model.pretrained={config_dir}"
        else:
            config.to_llama_config().save_pretrained(config_dir)
            model_arg = f"model.config={config_dir}"
        log_path = REPO / "bench" / "results" / f"{name}.log"
        cmd = [sys.executable, "-m", "zero_trainer", "train", "--recipe", "recipes/debug.yaml",
               "--ds-config", "auto", "--nvme-path", str(nvme), "--output-dir", str(out),
               "model.preset=null", model_arg, f"train.max_steps={args.steps}",
               "train.precision=bf16", f"data.seq_len={args.seq_len}",
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
        rows = (out / "metrics.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    records = [dict(zip(header, r.split(","), strict=True)) for r in rows[1:]]
    step_s = [float(r["step_s"]) for r in records]
    lrs = [float(r["lr"]) for r in records]
    plan = summary["plan"]
    measured = summary["peak_mem_bytes"] - summary["rss_before_model_bytes"]
    bound = disk_bound_s(params, summary["activation_checkpointing"], rates)
    from bench.common import write_result

    extra = {"load_peak_bytes": summary["load_peak_bytes"], "load_s": summary["load_s"],
             "predicted_load_peak_bytes": plan.get("predicted_load_peak_bytes"),
             "load_bytes_per_rank": summary["load_bytes_per_rank"], "first_loss": summary["first_loss"],
             "losses": summary["losses"], "command": "python -m bench.scale " + " ".join(sys.argv[1:])
             } if args.pretrained else {}
    write_result(name, {**extra,
        "params": params, "steps": summary["steps"], "ds_config_name": summary["ds_config_name"], "plan": plan,
        "activation_checkpointing": summary["activation_checkpointing"],
        "predicted_peak_bytes": plan["predicted_peak_bytes"], "peak_rss_bytes": summary["peak_mem_bytes"],
        "rss_before_model_bytes": summary["rss_before_model_bytes"], "measured_peak_bytes": measured,
        "prediction_ratio": round(plan["predicted_peak_bytes"] / measured, 4), "nvme_bytes": nvme_bytes,
        "step_s": step_s, "lr": lrs, "disk": bound,
        "steady_step_over_disk_bound": round(min(step_s[1:] or step_s) / bound["bound_s"], 3),
        "shape": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "num_key_value_heads", "intermediate_size", "vocab_size",
                                                   "tie_word_embeddings")},
        "final_loss": summary["final_loss"], "ds_config_overrides": {}, "nvme_free_bytes_before": free,
        "cpu_mem_bytes": physical_memory_bytes(),
        "seq_len": args.seq_len, "micro_batch": 1})
    print(f"trained {params / 1e9:.2f}B for {summary['steps']} steps on {summary['ds_config_name']}: {step_s} s/step "
          f"(disk bound {bound['bound_s']:.0f} s), peak {measured / 2**30:.2f} GiB above the process, predicted "
          f"{plan['predicted_peak_bytes'] / 2**30:.2f} GiB, NVMe {nvme_bytes / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
