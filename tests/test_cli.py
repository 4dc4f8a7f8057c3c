"""The CLI's contract: entry points, and one clear line with exit 2 for bad input (nothing launched)."""

import subprocess
import sys

import pytest
from conftest import BIN, REPO, run_cli


@pytest.mark.parametrize("entry", [[str(BIN / "zero-trainer")], [sys.executable, "-m", "zero_trainer"],
                                   [sys.executable, "-m", "zero_trainer.train"]])
def test_entry_points_answer_help(entry):
    args = ["--help"] if entry[-1] == "zero_trainer.train" else ["train", "--help"]
    proc = subprocess.run([*entry, *args], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "--recipe" in proc.stdout and "--ds-config" in proc.stdout


BAD = {
    "missing recipe": (["--recipe", "recipes/nope.yaml"], "recipe file", "--recipe"),
    "unknown preset": (["--recipe", "recipes/debug.yaml", "model.preset=gpt9"], "unknown model preset", "model.preset"),
    "unknown ds_config": (["--recipe", "recipes/debug.yaml", "--ds-config", "zero4"], "unknown ds_config",
                          "deepspeed.config"),
    "unknown field": (["--recipe", "recipes/debug.yaml", "train.max_stepz=3"], "unknown recipe field",
                      "train.max_steps"),
    "bad value": (["--recipe", "recipes/debug.yaml", "train.max_steps=-1"], "train.max_steps", "whole number"),
    "not key=value": (["--recipe", "recipes/debug.yaml", "train.max_steps"], "KEY=VALUE", "command line"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_nothing_created(case, tmp_path):
    args, what, hint = BAD[case]
    out = tmp_path / "out"
    proc = run_cli("train", *args, "--output-dir", out, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and what in lines[0] and hint in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and not out.exists()
