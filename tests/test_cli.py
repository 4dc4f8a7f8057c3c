"""The CLI's contract: every entry point answers --help. Bad input: tests/test_bad_inputs.py."""

import subprocess
import sys

import pytest
from conftest import BIN, REPO


@pytest.mark.parametrize("entry", [[str(BIN / "zero-trainer")], [sys.executable, "-m", "zero_trainer"],
                                   [sys.executable, "-m", "zero_trainer.train"]])
def test_entry_points_answer_help(entry):
    args = ["--help"] if entry[-1] == "zero_trainer.train" else ["train", "--help"]
    proc = subprocess.run([*entry, *args], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "--recipe" in proc.stdout and "--ds-config" in proc.stdout


# Bad inputs (these six among them) live in tests/test_bad_inputs.py's catalog.
