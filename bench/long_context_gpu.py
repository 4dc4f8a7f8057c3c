"""long_context_gpu: what tiling saves at long context on one GPU, beside the planner's activation terms.

    python -m bench.long_context_gpu                       # 1b preset, seq 32768 and 65536, bf16, AC on
    python -m bench.long_context_gpu --model debug --seq-lens 256 --device cpu     # the code path, no numbers

One forward + backward of one sequence per variant — plain, tiled loss, tiled loss + MLP (parallel.tiled_loss /
tiled_mlp, patched by zero_trainer.parallelize exactly as a run patches them) — with activation checkpointing, as a
long-context run trains. Measured = torch.cuda.max_memory_allocated during the step minus what was allocated before
it (weights and their gradients, allocated by a warm-up step); predicted = plan.activation_bytes for the same
workload. No DeepSpeed engine and no optimizer: this isolates the activations, which is what sp and tiling change.
Results: bench/results/long_context_gpu.json.
"""

import argparse
import gc
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {"plain": [], "tiled_loss": ["parallel.tiled_loss=true"],
            "tiled_loss_mlp": ["parallel.tiled_loss=true", "parallel.tiled_mlp=true"]}


def measure(model_name: str, seq_len: int, variant: str, device: str) -> dict:
    from zero_trainer import parallelize, plan
    from zero_trainer.model import build_model
    from zero_trainer.recipe import load_recipe

    recipe = load_recipe("debug", [f"model.preset={model_name}", f"data.seq_len={seq_len}", *VARIANTS[variant]])
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(model_name).to(torch.bfloat16)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    parallelize.apply(model, recipe, micro_batch=1)
    x = torch.randint(model.config.vocab_size, (1, seq_len), device=device)
    positions, targets = torch.arange(seq_len, device=device)[None], F.pad(x[:, 1:], (0, 1), value=-100)

    def step(model) -> float:
        loss = model(input_ids=x, position_ids=positions, shift_labels=targets).loss
        loss.backward()
        return loss.item()

    step(model)  # allocates the gradients: what remains allocated is weights + gradients
    on_gpu = device == "cuda"
    gc.collect()  # the previous variant's model (its patched methods hold cycles) must not be freed mid-step
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    loss = step(model)
    if on_gpu:
        torch.cuda.synchronize()
    step_s = time.time() - t
    measured = torch.cuda.max_memory_allocated() - before if on_gpu else None
    shape = plan.model_shape(model_name)
    workload = plan.Workload(seq_len, 1, "bf16", tiled_mlp="tiled_mlp=true" in " ".join(VARIANTS[variant]),
                             tiled_loss="tiled_loss=true" in " ".join(VARIANTS[variant]))
    terms = plan.activation_terms(shape, workload, checkpointing=True)
    predicted = sum(terms.values())
    states = sum(p.numel() * p.element_size() * 2 for p in model.parameters())  # weights + gradients
    del model
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return {"allocated_before_bytes": before if on_gpu else None, "weights_and_grads_bytes": states,
            "model": model_name, "seq_len": seq_len, "variant": variant, "loss": round(loss, 4),
            "step_s": round(step_s, 3), "tokens_per_s": round(seq_len / step_s),
            "measured_bytes": measured, "predicted_bytes": predicted,
            "predicted_terms": terms, "ratio": round(predicted / measured, 3) if measured else None}


def gib(b) -> str:
    return f"{b / 2**30:.2f}" if b is not None else "-"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.long_context_gpu", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="1b")
    p.add_argument("--seq-lens", nargs="+", type=int, default=[32768, 65536])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "long_context_gpu.json"))
    args = p.parse_args(argv)
    rows = []
    for seq_len in args.seq_lens:
        for variant in VARIANTS:
            row = measure(args.model, seq_len, variant, args.device)
            rows.append(row)
            print(f"{args.model} seq {seq_len:>6} {variant:<15} loss {row['loss']:.4f}  {row['tokens_per_s']:>7} tok/s "
                  f"measured {gib(row['measured_bytes'])} GiB  predicted {gib(row['predicted_bytes'])} GiB  "
                  f"ratio {row['ratio']}", flush=True)
    if args.device == "cuda":
        doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
               "measured_on": time.strftime("%Y-%m-%d")}
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
