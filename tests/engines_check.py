"""Several real zero_trainer runs, one after another, in one launch (tests/test_runs.py).

    deepspeed --num_gpus N tests/engines_check.py SPEC.json

SPEC.json is a list of {"output_dir", "overrides"[, "resume": true]} (recipe overrides as on the command line; resume:
continue from the newest checkpoint in output_dir, as --resume does, e.g. after an entry that stopped early via
train.stop_at_step). Each entry is a whole
`run_training`: resolve, a fresh model and deepspeed.initialize, the loop, eval, summary.json — what
`python -m zero_trainer.train` does, minus the ~20 s every new process spends importing torch and DeepSpeed.
"""

import json
import sys

from zero_trainer.recipe import load_recipe
from zero_trainer.train import exit_now, shut_down_process_group
from zero_trainer.trainer import run_training


def main(spec_path: str) -> None:
    for entry in json.loads(open(spec_path).read()):
        recipe = load_recipe("debug", [*entry["overrides"], f"output_dir={entry['output_dir']}"])
        run_training(recipe, resume=entry.get("resume", False))
    shut_down_process_group()


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0])
    exit_now(0)  # the runs are written: skip the teardown that once aborted a finished rank (train.exit_now)
