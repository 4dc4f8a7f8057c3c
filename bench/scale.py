"""scale: the largest Llama-shaped model this machine can train for >= 2 steps with zero3_nvme and activation
checkpointing (seq_len 128, micro batch 1). Run by hand (`make bench-scale`), never in CI: it needs ~16 bytes
per parameter of free disk under --nvme-path and a quiet machine for an hour or more.

    python -m bench.scale [--hidden 4096 --layers 20 --ffn 11008] [--nvme-path DIR]

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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--nvme-path", default=str(REPO / "runs" / "scale_nvme"))
    args = p.parse_args()

    from zero_trainer.model import ZeroLMConfig, count_params

    config = ZeroLMConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          num_key_value_heads=args.kv_heads, max_position_embeddings=2048, tie_word_embeddings=False)
    params = count_params(config)
    nvme = Path(args.nvme_path)
    free = shutil.disk_usage(nvme.parent if not nvme.exists() else nvme).free
    print(f"{params / 1e9:.2f}B parameters; ~{16 * params / 2**30:.0f} GiB of NVMe needed, {free / 2**30:.0f} GiB free")
    with tempfile.TemporaryDirectory() as tmp:
        config_dir, out = Path(tmp) / "model", Path(tmp) / "run"
        config.to_llama_config().save_pretrained(config_dir)
        log_path = REPO / "bench" / "results" / "scale.log"
        cmd = [sys.executable, "-m", "zero_trainer", "train", "--recipe", "recipes/debug.yaml",
               "--ds-config", "zero3_nvme", "--nvme-path", str(nvme), "--output-dir", str(out),
               "model.preset=null", f"model.config={config_dir}", f"train.max_steps={args.steps}",
               "train.precision=bf16", "train.activation_checkpointing=true", "data.seq_len=128",
               "train.micro_batch=1", "train.grad_accum=1", "train.eval_every=0", "train.eval_batches=1",
               "train.sample_tokens=0", "train.save_every=0", "train.warmup_steps=1"]
        with open(log_path, "w") as log:
            code = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        nvme_bytes = du_bytes(nvme) if nvme.exists() else 0
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
                           "final_loss": summary["final_loss"]})
    print(f"trained {params / 1e9:.2f}B for {summary['steps']} steps: {step_s} s/step, "
          f"peak RSS {summary['peak_mem_bytes'] / 2**30:.1f} GiB, NVMe {nvme_bytes / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
