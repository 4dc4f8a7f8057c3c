"""sft: minimind's two stages on this machine — pretrain minimind-26m, export it, fine-tune the export on chat data
with recipes/sft-minimind.yaml (full, and LoRA) — and whether the loss on assistant tokens falls.

No download: the pretraining corpus is the Python standard library's sources (the recipes' default), and the chat
data is written here from the same sources (`write_chat`): for a function or class of the standard library, the user
asks what it (or a method of a class) does and the assistant answers with its docstring's first paragraph; half the
conversations about functions go on to ask for the signature. The pretrained model has read those docstrings, so
the fine-tune teaches it the form of an answer and where answers are, not the facts. 5% of the conversations are
held out: the eval loss (assistant tokens of unseen conversations) is measured on the export before the fine-tune
(one step at lr 0) and after. 2 ranks, ZeRO-2, bf16, as the recipes say; the step counts and the SFT micro batch are
the bench's (a CPU box).

    python -m bench.sft [--pretrain-steps 150] [--sft-steps 60] [--dir DIR]   # writes bench/results/sft.json
    python -m bench.sft --write-chat FILE.jsonl                                  # only the chat data
"""

import argparse
import ast
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, run_child, write_result

WORLD = 2


def _doc_answer(doc: str) -> str | None:
    first = doc.strip().split("\n\n")[0]
    text = " ".join(line.strip() for line in first.splitlines()).strip()
    return text if 20 <= len(text) <= 400 else None


def conversations(limit: int | None = None) -> list[dict]:
    """OpenAI-format conversations about the standard library's documented functions and classes, in a fixed
    order (sorted files, source order)."""
    import sysconfig

    from zero_trainer.data import default_corpus_files

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for file in default_corpus_files():
        path = Path(file)
        module = ".".join(path.relative_to(stdlib).with_suffix("").parts).removesuffix(".__init__")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")]
        nodes = [(n, f"{module}.{n.name}") for n in defs]
        nodes += [(sub, f"{module}.{n.name}.{sub.name}") for n in defs if isinstance(n, ast.ClassDef)
                  for sub in n.body if isinstance(sub, ast.FunctionDef) and not sub.name.startswith("_")]
        for node, qualname in nodes:
            answer = _doc_answer(ast.get_docstring(node) or "")
            if answer is None:
                continue
            kind = "class" if isinstance(node, ast.ClassDef) else "method" if qualname.count(".") > \
                module.count(".") + 1 else "function"
            messages = [{"role": "user", "content": f"What does the {kind} {qualname} do?"},
                        {"role": "assistant", "content": answer}]
            if isinstance(node, ast.FunctionDef) and len(out) % 2:
                messages += [{"role": "user", "content": "What is its signature?"},
                             {"role": "assistant", "content": f"{node.name}({ast.unparse(node.args)})"}]
            out.append({"messages": messages})
            if limit is not None and len(out) >= limit:
                return out
    return out


def write_chat(path: Path, limit: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations(limit)))
    return path


def train(out: Path, args: list[str], num_procs: int = WORLD) -> dict:
    """One `zero-trainer train` run; its summary.json and the start lines it printed (plan, data, lora)."""
    t = time.time()
    proc = run_child([sys.executable, "-m", "zero_trainer", "train", "--num-procs", num_procs, "--output-dir", out,
                      *args], cwd=REPO, timeout=3600)
    summary = json.loads((out / "summary.json").read_text())
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("plan:", "data:", "lora:"))]
    return {**summary, "start_lines": lines, "command_wall_s": time.time() - t}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--sft-steps", type=int, default=60)
    p.add_argument("--sft-micro-batch", type=int, default=4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--dir", help="work directory (default: a temporary one, removed after)")
    p.add_argument("--write-chat", metavar="FILE", help="only write the chat data to FILE and stop")
    a = p.parse_args()
    if a.write_chat:
        print(f"wrote {len(conversations())} conversations to {write_chat(Path(a.write_chat))}")
        return 0
    tmp = None if a.dir else tempfile.TemporaryDirectory(prefix="bench-sft-")
    work = Path(a.dir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ZERO_TRAINER_CACHE", str(work / "cache"))

    pretrain = train(work / "pretrain", ["--recipe", "minimind-26m", f"train.max_steps={a.pretrain_steps}",
                                         "data.seq_len=256", "train.micro_batch=8", "train.grad_accum=1",
                                         "train.warmup_steps=20", "train.eval_every=0", "train.sample_tokens=0",
                                         f"train.save_every={a.pretrain_steps}"])
    base = work / "base"
    run_child([sys.executable, "-m", "zero_trainer", "export", work / "pretrain" / "checkpoints", base, "--overwrite"],
              cwd=REPO)
    chat = write_chat(work / "chat.jsonl")
    sft = ["--recipe", "sft-minimind", f"model.pretrained={base}", f"data.path={chat}", "train.sample_tokens=0",
           f"train.micro_batch={a.sft_micro_batch}", "train.eval_every=0", "train.save_every=0"]
    before = train(work / "before", [*sft, "train.lr=0", "train.max_steps=1"])  # the export's eval loss
    full = train(work / "sft", [*sft, f"train.max_steps={a.sft_steps}"])
    lora = train(work / "lora", [*sft, f"train.max_steps={a.sft_steps}", f"lora.r={a.lora_r}",
                                 f"lora.alpha={2 * a.lora_r}", "train.lr=1e-3"])

    def row(s: dict) -> dict:
        return {"steps": s["steps"], "first_loss": s["first_loss"], "final_loss": s["final_loss"],
                "eval_loss": s["eval_loss"], "eval_loss_before": before["eval_loss"],
                "tokens_per_s": s["tokens_per_s"], "wall_s": s["command_wall_s"],
                "trainable_params": s["trainable_params"], "params": s["params"], "data": s["data"],
                "ds_config": s["ds_config_name"], "precision": s["precision"], "losses": s["losses"],
                "peak_mem_bytes": s["peak_mem_bytes"], "predicted_peak_bytes": s["plan"]["predicted_peak_bytes"],
                "start_lines": s["start_lines"]}

    result = {"pretrain": {"steps": pretrain["steps"], "first_loss": pretrain["first_loss"],
                           "final_loss": pretrain["final_loss"], "eval_loss": pretrain["eval_loss"],
                           "tokens_per_s": pretrain["tokens_per_s"], "wall_s": pretrain["command_wall_s"]},
              "sft": row(full), "lora": row(lora), "world_size": WORLD,
              "command": f"python -m bench.sft --pretrain-steps {a.pretrain_steps} --sft-steps {a.sft_steps} "
                         f"--sft-micro-batch {a.sft_micro_batch} --lora-r {a.lora_r}"}
    path = write_result("sft", result)
    for name in ("sft", "lora"):
        r = result[name]
        print(f"{name}: loss on assistant tokens {r['first_loss']:.3f} -> {r['final_loss']:.3f} in {r['steps']} "
              f"steps; held-out eval {r['eval_loss_before']:.3f} -> {r['eval_loss']:.3f}; "
              f"{r['trainable_params']:,} of {r['params']:,} parameters trained")
    print(f"wrote {path}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
