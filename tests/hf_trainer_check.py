"""Run each given ds_configs JSON, unchanged, through HF Trainer (`TrainingArguments(deepspeed=path)`).

Launched by tests/test_hf_trainer.py under the deepspeed launcher (1 rank). Prints one JSON line per config.
"""

import json
import sys

import torch
from transformers import Trainer, TrainingArguments

from zero_trainer.data import prepare_data
from zero_trainer.model import build_model, model_config


class Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        ids = torch.as_tensor(self.blocks[i], dtype=torch.long)
        return {"input_ids": ids, "labels": ids}


def main(paths, out_dir, cache_dir):
    cfg = model_config("debug")
    data = prepare_data({"max_documents": 300}, vocab_size=cfg.vocab_size, seq_len=64, seed=0, cache_dir=cache_dir)
    for path in paths:
        torch.manual_seed(0)
        args = TrainingArguments(output_dir=f"{out_dir}/{path.split('/')[-1]}", deepspeed=path, max_steps=6,
                                 per_device_train_batch_size=4, learning_rate=3e-3, warmup_steps=1,
                                 logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                 disable_tqdm=True, dataloader_num_workers=0)
        trainer = Trainer(model=build_model(cfg), args=args, train_dataset=Blocks(data.train))
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        stage = trainer.model_wrapped.zero_optimization_stage()
        print("RESULT " + json.dumps({"config": path, "losses": losses, "stage": stage}), flush=True)
        del trainer


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(argv[2:], argv[0], argv[1])
