"""Train through accelerate with DeepSpeed, the way accelerate's DeepSpeed guide writes a script.

Launched by tests/test_hf_trainer.py:

    accelerate launch --use_deepspeed --deepspeed_config_file FIRST.json --num_processes 2 \\
        tests/accelerate_check.py OUT_DIR CACHE_DIR FIRST.json [MORE.json ...]

The first JSON is the one the launcher was given (the script never names it); the others run in the same processes,
one after another, each handed to accelerate the same way (ACCELERATE_DEEPSPEED_CONFIG_FILE, which is what the flag
sets) after the previous one's state is dropped: one launch instead of one per file. A JSON with an optimizer
(scheduler) block gets DummyOptim (DummyScheduler), one without gets a torch optimizer (scheduler). Rank 0 prints one
`RESULT {json}` line per file.
"""

import json
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DummyOptim, DummyScheduler, InitProcessGroupKwargs

from zero_trainer.data import prepare_data
from zero_trainer.model import build_model, model_config

STEPS, MICRO_BATCH, LR = 6, 4, 3e-3


def train_one(path: str, blocks, cfg) -> dict:
    # No GPU: accelerate would start every rank alone unless told to use gloo (../shared/DEEPSPEED_NOTES.md).
    handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    accelerator = Accelerator(kwargs_handlers=handlers)
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    torch.manual_seed(0)
    model = build_model(cfg)
    if "optimizer" in ds:
        optimizer = DummyOptim(model.parameters(), lr=LR, weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    if "scheduler" in ds:
        scheduler = DummyScheduler(optimizer, total_num_steps=STEPS * accelerator.num_processes, warmup_num_steps=1)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 2))
    loader = torch.utils.data.DataLoader(torch.as_tensor(blocks[: STEPS * MICRO_BATCH * accelerator.num_processes]),
                                         batch_size=MICRO_BATCH, shuffle=False)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    model.train()
    losses = []
    for ids in loader:
        with accelerator.accumulate(model):
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        losses.append(accelerator.gather(loss.detach()[None]).mean().item())
    result = {"config": path, "losses": losses, "stage": model.zero_optimization_stage(),
              "world_size": accelerator.num_processes, "dummy_optim": "optimizer" in ds}
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return result


def main(out_dir: str, cache_dir: str, paths: list[str]) -> None:
    cfg = model_config("debug")
    data = prepare_data({"max_documents": 300}, vocab_size=cfg.vocab_size, seq_len=64, seed=0, cache_dir=cache_dir)
    blocks = [list(map(int, b)) for b in data.train]
    for i, path in enumerate(paths):
        if i:  # what `--deepspeed_config_file path` would have set, for a fresh Accelerator in these processes
            AcceleratorState._reset_state(reset_partial_state=True)
            os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = path
        result = train_one(path, blocks, cfg)
        if int(os.environ.get("RANK", 0)) == 0:
            print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
