"""hf_trainer: zero_trainer vs HF Trainer, same DeepSpeed JSON, same tiny Llama, same data and batch, 1 rank.

The model is transformers' own LlamaForCausalLM (the class `zero-trainer export` produces), given to both as
a local config.json. Both log every step. Steady-state tokens/s = tokens of steps WARMUP+1..STEPS divided by
the wall time between those steps' ends (zero_trainer: metrics.csv `time`; HF: a callback's on_step_end).
Each launch trains STEPS steps (a steady window of ~20 s: 35-step windows of ~4 s swung 7.8k-11.7k tokens/s from
launch to launch). The arms run as PAIRS pairs of launches, in ABBA order across pairs; `ratio` = median zero_trainer /
median HF, `ratio_ci95` a bootstrap over whole pairs (bench.common.ratio_ci95).

    python -m bench.hf_trainer [--pairs N]   # writes bench/results/hf_trainer.json and prints a table
"""

import json
import os
import sys
import tempfile
from pathlib import Path

from bench.common import REPO, run_child

STEPS, WARMUP, PAIRS = 200, 10, 6
DS_CONFIG = "zero2"
SEQ, MICRO = 128, 8
COMMON = [f"train.max_steps={STEPS}", "train.precision=fp32", f"data.seq_len={SEQ}", f"train.micro_batch={MICRO}",
          "train.grad_accum=1", "train.eval_every=0", "train.sample_tokens=0", "train.save_every=0",
          "train.eval_batches=1", "data.max_documents=400", "train.lr=1e-3", "train.warmup_steps=2"]


def steady_tokens_per_s(times: list[float]) -> float:
    """times[i] = wall clock at the end of step i+1."""
    span = times[STEPS - 1] - times[WARMUP - 1]
    return (STEPS - WARMUP) * SEQ * MICRO / span


def llama_config_dir(workdir: Path) -> Path:
    from zero_trainer.model import model_config

    path = workdir / "llama"
    model_config("debug").to_llama_config().save_pretrained(path)
    return path


def run_zero_trainer(config_dir: Path, out: Path) -> float:
    cmd = [sys.executable, "-m", "zero_trainer", "train", "--recipe", "recipes/debug.yaml", "--ds-config", DS_CONFIG,
           "--output-dir", str(out), "model.preset=null", f"model.config={config_dir}", *COMMON]
    run_child(cmd, cwd=REPO)
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    times = [float(r.split(",")[header.index("time")]) for r in rows[1:]]
    losses = [float(r.split(",")[header.index("loss")]) for r in rows[1:]]
    (out / "losses.json").write_text(json.dumps(losses))
    return steady_tokens_per_s(times)


def run_hf(config_dir: Path, out: Path) -> float:
    from zero_trainer.hardware import free_port
    from zero_trainer.ops import remove_shm_buffers

    port = free_port()
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "1", "--master_port", str(port),
           "--module", "bench.hf_trainer", "--worker-hf", str(config_dir), str(out)]
    try:
        run_child(cmd, cwd=REPO)
    finally:
        remove_shm_buffers(port)
    return steady_tokens_per_s(json.loads((out / "hf_times.json").read_text()))


def hf_worker(config_dir: str, out: str) -> None:
    """HF Trainer with TrainingArguments(deepspeed=ds_configs/zero2.json), the same blocks and batch."""
    import time

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from zero_trainer.ds_config import DS_CONFIG_DIR
    from zero_trainer.recipe import load_recipe
    from zero_trainer.resolve import load_data

    recipe = load_recipe("recipes/debug.yaml", ["model.preset=null", f"model.config={config_dir}", *COMMON])
    config = AutoConfig.from_pretrained(config_dir)
    data = load_data(recipe, config.vocab_size)

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(data.train)

        def __getitem__(self, i):
            ids = torch.as_tensor(data.train[i], dtype=torch.long)
            return {"input_ids": ids, "labels": ids}

    times = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.time())

    train = recipe.train
    torch.manual_seed(train.seed)
    # The shipped JSON leaves Adam's betas/eps to the trainer: "auto" here so HF takes them from its arguments
    # (the recipe's), as zero_trainer takes them from the recipe.
    ds = json.loads((DS_CONFIG_DIR / f"{DS_CONFIG}.json").read_text())
    ds["optimizer"]["params"].update(betas="auto", eps="auto")
    args = TrainingArguments(output_dir=out, deepspeed=ds, max_steps=STEPS, adam_epsilon=train.eps,
                             per_device_train_batch_size=MICRO, learning_rate=train.lr,
                             warmup_steps=train.warmup_steps, weight_decay=train.weight_decay,
                             adam_beta1=train.betas[0], adam_beta2=train.betas[1], max_grad_norm=1.0,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0, seed=train.seed)
    model = AutoModelForCausalLM.from_config(config)
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[StepClock()])
    trainer.train()
    Path(out, "hf_times.json").write_text(json.dumps(times))
    # the JSON as HF resolved it: main() records where it differs from ours (ds_config_differences)
    Path(out, "hf_ds_config.json").write_text(json.dumps(trainer.model_wrapped._config._param_dict, default=str))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    Path(out, "hf_losses.json").write_text(json.dumps(losses))


def config_differences(ours: dict, hf: dict) -> dict:
    """Resolved-JSON keys whose values differ between the two engines (dotted key -> [ours, HF's])."""
    def flat(d, prefix=""):
        out = {}
        for key, value in d.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return out

    a, b = flat(ours), flat(hf)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith("csv_monitor") and k != "steps_per_print"}


def plot_losses(losses: dict) -> None:
    """bench/results/loss_curve.png: both trainers' per-step training loss (first repetition)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.common import RESULTS

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, values in losses.items():
        ax.plot(range(1, len(values) + 1), values, label=name.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"debug-shape Llama, {DS_CONFIG}, fp32, seq {SEQ} x micro batch {MICRO}, 1 rank\n"
                 "(same data and seed; each trainer initialises and shuffles its own way)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "loss_curve.png", dpi=100)


def main() -> int:
    if "--worker-hf" in sys.argv:
        i = sys.argv.index("--worker-hf")
        hf_worker(sys.argv[i + 1], sys.argv[i + 2])
        return 0
    from bench.common import median, ratio_ci95, table, write_result

    pairs = int(sys.argv[sys.argv.index("--pairs") + 1]) if "--pairs" in sys.argv else PAIRS
    tps = {"zero_trainer": [], "hf_trainer": []}
    arms = {"zero_trainer": run_zero_trainer, "hf_trainer": run_hf}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        config_dir = llama_config_dir(workdir)
        for rep in range(pairs):
            for name in (("zero_trainer", "hf_trainer") if rep % 2 == 0 else ("hf_trainer", "zero_trainer")):
                tps[name].append(arms[name](config_dir, workdir / f"{name[:2]}{rep}"))
        losses = {"zero_trainer": json.loads((workdir / "ze0" / "losses.json").read_text()),
                  "hf_trainer": json.loads((workdir / "hf0" / "hf_losses.json").read_text())}
        differences = config_differences(json.loads((workdir / "ze0" / "summary.json").read_text())["ds_config"],
                                         json.loads((workdir / "hf0" / "hf_ds_config.json").read_text()))
    medians = {k: median(v) for k, v in tps.items()}
    ratio = medians["zero_trainer"] / medians["hf_trainer"]
    ci = ratio_ci95(tps["zero_trainer"], tps["hf_trainer"])
    write_result("hf_trainer", {
        "ratio": ratio, "ratio_ci95": ci, "goal": 1.1, "ds_config": DS_CONFIG,
        "model": "LlamaForCausalLM (debug shape)", "seq_len": SEQ, "micro_batch": MICRO, "steps": STEPS,
        "warmup_steps_excluded": WARMUP, "pairs": pairs, "order": "ABBA",
        "tokens_per_s": medians, "tokens_per_s_all": tps, "threads": os.cpu_count(), "losses_first_rep": losses,
        "ds_config_differences": differences})
    plot_losses(losses)
    print(table([{"arm": k, "median tok/s": f"{medians[k]:.0f}", "all": " ".join(f"{x:.0f}" for x in v)}
                 for k, v in tps.items()], ["arm", "median tok/s", "all"]))
    print(f"ratio zero_trainer / HF Trainer = {ratio:.3f} [95% CI {ci[0]:.3f}, {ci[1]:.3f}] (goal >= 1.1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
