"""overhead: zero_trainer's training loop vs a hand-written raw DeepSpeed loop (and plain PyTorch AdamW).

One rank, one process, the same model (minimind-26m, fp32, seq 128 × micro batch 4), the same resolved JSON. After
a warm-up, ROUNDS rounds of four single steps in ABBA order (zero_trainer, raw, raw, zero_trainer; the next round
BAAB): each round gives both arms two steps taken within a few seconds of each other, so the machine's drift (step
times swing 1.5× over minutes on this VM) hits both alike. `ratio` per row = median raw step time / median
zero_trainer step time, with `ratio_ci95` a bootstrap over whole rounds (bench.common.ratio_ci95). The committed
`ratio` is the lower of zero0 and zero3. PyTorch AdamW is timed after the rounds, alternating with raw DeepSpeed
(`ratio_vs_pytorch`, informative). `loop_ms` times, call by call, everything the loop does besides the engine's
forward/backward/step (N calls each), so the loop's own cost per step is a sum of measured parts, not a difference
of two noisy step times.

    python -m bench.overhead [--rounds N]   # writes bench/results/overhead.json and prints a table
"""

import sys
import tempfile
import time

ROUNDS, WARMUP, PYTORCH_STEPS, CALLS = 40, 3, 8, 200
CONFIGS = ("zero0", "zero3")
SEQ, MICRO = 128, 4
OVERRIDES = ["model.preset=minimind-26m", "train.precision=fp32", f"data.seq_len={SEQ}", f"train.micro_batch={MICRO}",
             "train.grad_accum=1", "train.eval_every=0", "train.sample_tokens=0", "train.save_every=0",
             "train.max_steps=100000", "data.max_documents=400", "train.log_every=1"]


def raw_deepspeed_step(engine, batch):
    """The same forward as zero_trainer's (one batch: ids, document positions, targets), with nothing around it."""
    from zero_trainer.model import next_token_loss

    ids, positions, targets = batch
    loss = next_token_loss(engine, ids, targets, positions).loss
    engine.backward(loss)
    engine.step()


def pytorch_step(model, optimizer, batch, clip):
    import torch

    from zero_trainer.model import next_token_loss

    ids, positions, targets = batch
    loss = next_token_loss(model, ids, targets, positions).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def loop_costs(run, log) -> dict:
    """Milliseconds per call of each thing train_until does around train_step, CALLS calls each."""
    import os

    from tqdm import tqdm

    from zero_trainer import metrics

    row = {"step": 1, "loss": 7.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1e3, "step_s": 0.5,
           "mem_bytes": 1 << 30, "eval_loss": None, "time": time.time()}
    devnull = open(os.devnull, "w")
    bar = tqdm(total=10**9, file=devnull, mininterval=1.0, dynamic_ncols=True)  # rank 0's bar, drawn nowhere
    parts = {
        "all_reduce of loss and stop flag": lambda: run.reduce_over_ranks([7.0, 0.0]),
        "engine.get_lr": run.engine.get_lr,
        "engine.get_global_grad_norm": run.engine.get_global_grad_norm,
        "memory probe (/proc/self/statm)": metrics.device_memory_bytes,
        "metrics.csv row (written, flushed)": lambda: log.write(row),
        "progress bar update": lambda: (bar.set_postfix(metrics.bar_fields(row), refresh=False), bar.update(1)),
        "batch building (sampler, numpy -> tensor)": lambda: run.batch("train", run.sampler.indices_at(0)),
    }
    costs = {}
    for name, call in parts.items():
        t = time.perf_counter()
        for _ in range(CALLS):
            call()
        costs[name] = (time.perf_counter() - t) / CALLS * 1e3
    bar.close()
    devnull.close()
    return costs


def measure(ds_name: str, workdir: str, rounds: int) -> dict:
    import deepspeed
    import torch

    from bench.common import median, ratio_ci95
    from zero_trainer import metrics
    from zero_trainer.data import BatchSampler
    from zero_trainer.model import build_model
    from zero_trainer.recipe import load_recipe
    from zero_trainer.trainer import Run, StopRequest, build_initialized_model, train_until

    recipe = load_recipe("recipes/debug.yaml", [*OVERRIDES, f"deepspeed.config={ds_name}",
                                                f"output_dir={workdir}/{ds_name}"])
    run = Run(recipe)
    train = recipe.train
    stop, bar = StopRequest(), metrics.progress_bar(train.max_steps, enabled=False)
    log = metrics.MetricsLog(run.out / "metrics.csv")
    sampler = BatchSampler(len(run.data.train), train.micro_batch, 0, 1, train.seed)
    x = run.batch("train", sampler.indices(0))

    model = build_initialized_model(run.model_cfg, run.ds_config, train.seed)
    raw, *_ = deepspeed.initialize(model=model, config=run.ds_config, model_parameters=list(model.parameters()))
    torch.manual_seed(train.seed)
    plain = build_model(run.model_cfg)
    optimizer = torch.optim.AdamW(plain.parameters(), lr=train.lr, betas=tuple(train.betas),
                                  eps=train.eps, weight_decay=train.weight_decay)
    arms = {
        "zero_trainer": lambda: train_until(run, run.state["step"] + 1, stop, log, bar),
        "raw_deepspeed": lambda: raw_deepspeed_step(raw, x),
        "pytorch_adamw": lambda: pytorch_step(plain, optimizer, x, train.grad_clip),
    }

    def timed(name: str) -> float:
        t = time.perf_counter()
        arms[name]()
        return time.perf_counter() - t

    for name in arms:
        for _ in range(WARMUP):
            arms[name]()
    step_s = {"zero_trainer": [], "raw_deepspeed": []}
    for r in range(rounds):
        a, b = ("zero_trainer", "raw_deepspeed") if r % 2 == 0 else ("raw_deepspeed", "zero_trainer")
        ta1, tb1, tb2, ta2 = timed(a), timed(b), timed(b), timed(a)
        step_s[a].append((ta1 + ta2) / 2)
        step_s[b].append((tb1 + tb2) / 2)
    torch_s = {"pytorch_adamw": [], "raw_deepspeed": []}
    for _ in range(PYTORCH_STEPS):
        for name in torch_s:
            torch_s[name].append(timed(name))
    costs = loop_costs(run, log)
    zt, raw_t = median(step_s["zero_trainer"]), median(step_s["raw_deepspeed"])
    tokens = run.tokens_per_step
    return {"ds_config": ds_name, "params": run.params, "tokens_per_step": tokens, "rounds": rounds,
            "tokens_per_s": {"zero_trainer": tokens / zt, "raw_deepspeed": tokens / raw_t,
                             "pytorch_adamw": tokens / median(torch_s["pytorch_adamw"])},
            "ratio": raw_t / zt, "ratio_ci95": ratio_ci95(step_s["raw_deepspeed"], step_s["zero_trainer"]),
            "ratio_vs_pytorch": median(torch_s["pytorch_adamw"]) / median(torch_s["raw_deepspeed"]) * raw_t / zt,
            "loop_ms": costs, "loop_ms_total": sum(costs.values()),
            "loop_share_of_step": sum(costs.values()) / 1e3 / zt,
            "step_s": step_s, "pytorch_block_step_s": torch_s}


def worker(rounds: int) -> None:
    from bench.common import write_result

    with tempfile.TemporaryDirectory() as workdir:
        rows = [measure(name, workdir, rounds) for name in CONFIGS]
    lowest = min(rows, key=lambda r: r["ratio"])
    write_result("overhead", {"ratio": lowest["ratio"], "ratio_ci95": lowest["ratio_ci95"], "goal": 0.98,
                              "rounds": rounds, "order": "ABBA", "model": "minimind-26m", "precision": "fp32",
                              "seq_len": SEQ, "micro_batch": MICRO, "world_size": 1, "rows": rows})


def main() -> int:
    from bench.common import RESULTS, relaunch, table, under_launcher

    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else ROUNDS
    if "--worker" in sys.argv or under_launcher():
        worker(rounds)
        return 0
    code = relaunch("bench.overhead", ["--rounds", str(rounds)])
    if code:
        return code
    import json

    result = json.loads((RESULTS / "overhead.json").read_text())
    rows = [{"ds_config": r["ds_config"], **{f"{k} tok/s": f"{v:.0f}" for k, v in r["tokens_per_s"].items()},
             "ratio vs raw DS [95% CI]": f"{r['ratio']:.3f} [{r['ratio_ci95'][0]:.3f}, {r['ratio_ci95'][1]:.3f}]",
             "vs PyTorch": f"{r['ratio_vs_pytorch']:.3f}",
             "loop ms/step": f"{r['loop_ms_total']:.2f} ({r['loop_share_of_step']:.2%})"} for r in result["rows"]]
    print(table(rows, list(rows[0])))
    for r in result["rows"]:
        print(f"{r['ds_config']} loop, ms per step: " + ", ".join(f"{k} {v:.3f}" for k, v in r["loop_ms"].items()))
    lo, hi = result["ratio_ci95"]
    print(f"ratio (min over configs) = {result['ratio']:.3f} [{lo:.3f}, {hi:.3f}] (goal >= {result['goal']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
