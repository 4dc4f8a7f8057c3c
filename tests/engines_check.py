"""Several real zero_trainer runs, one after another, in one launch (tests/test_runs.py).

    deepspeed --num_gpus N tests/engines_check.py SPEC.json

SPEC.json is a list of {"output_dir", "overrides"[, "resume": true][, "fork": [DIR, STEP]]} (recipe overrides as on the
command line; resume: continue from the newest checkpoint in output_dir, as --resume does, e.g. after an entry that
stopped early via train.stop_at_step; fork: first copy an earlier entry's checkpoint of STEP (and its metrics up to
it) from output dir DIR, then resume from it — another layout resuming that run). Each entry is a whole
`run_training`: resolve, a fresh model and deepspeed.initialize, the loop, eval, summary.json — what
`python -m zero_trainer.train` does, minus the ~20 s every new process spends importing torch and DeepSpeed.
"""

import json
import shutil
import sys
from pathlib import Path

from zero_trainer.recipe import load_recipe
from zero_trainer.train import exit_now, shut_down_process_group
from zero_trainer.trainer import run_training


def fork(src: Path, step: int, out: Path) -> None:
    """What a run stopped at `step` in `src` leaves, copied to `out` (conftest.fork_run, on rank 0)."""
    import deepspeed
    import deepspeed.comm as dist

    deepspeed.init_distributed()
    if dist.get_rank() == 0:
        name = f"step_{step:08d}"
        shutil.copytree(src / "checkpoints" / name, out / "checkpoints" / name)
        rows = (src / "metrics.csv").read_text().splitlines()
        (out / "metrics.csv").write_text("\n".join(rows[: step + 1]) + "\n")
    dist.barrier()


def main(spec_path: str) -> None:
    for entry in json.loads(open(spec_path).read()):
        recipe = load_recipe("debug", [*entry["overrides"], f"output_dir={entry['output_dir']}"])
        if entry.get("fork"):
            fork(Path(entry["fork"][0]), entry["fork"][1], Path(entry["output_dir"]))
        run_training(recipe, resume=entry.get("resume", False) or bool(entry.get("fork")))
    shut_down_process_group()


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0])
    exit_now(0)  # the runs are written: skip the teardown that once aborted a finished rank (train.exit_now)
