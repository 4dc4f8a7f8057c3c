"""`zero-trainer report`: real runs (conftest.engine_runs) drawn side by side; bad input is one line, exit 2, and
no picture."""

import contextlib
import io
from pathlib import Path

import matplotlib.image
import pytest

from zero_trainer.cli import main


def report(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["report", *map(str, args)])
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.multiproc
def test_report_overlays_rungs(engine_runs, tmp_path):
    dirs = [Path(engine_runs[name, 2]["recipe"]["output_dir"]) for name in ("zero2", "zero3_offload")]
    picture = tmp_path / "zero2_vs_zero3_offload.png"
    code, stdout, stderr = report(*dirs, "-o", picture)
    assert code == 0, stderr
    assert "zero2 · 2 ranks · fp32" in stdout and "zero3_offload · 2 ranks · fp32" in stdout
    pixels = matplotlib.image.imread(picture)
    assert pixels.shape[0] > 500 and pixels.shape[1] > 800 and pixels.std() > 0.05  # drawn, not blank


def _run_dir(root: Path, metrics: str | None) -> Path:
    root.mkdir(parents=True)
    if metrics is not None:
        (root / "metrics.csv").write_text(metrics)
    return root


@pytest.mark.parametrize("case, make, expected", [
    ("missing run dir", lambda t: [t / "nope", "-o", t / "r.png"], "does not exist"),
    ("no metrics.csv", lambda t: [_run_dir(t / "empty", None), "-o", t / "r.png"], "has no metrics.csv"),
    ("metrics.csv not ours", lambda t: [_run_dir(t / "junk", "step,loss\n1,abc\n"), "-o", t / "r.png"],
     "not a metrics.csv"),
    ("no steps logged", lambda t: [_run_dir(t / "none", "step,loss\n"), "-o", t / "r.png"], "no logged steps"),
    ("unknown picture format", lambda t: [_run_dir(t / "ok", "step,loss\n1,7.5\n"), "-o", t / "r.jpgx"],
     ".png, .svg or .pdf"),
    ("picture dir missing", lambda t: [_run_dir(t / "ok", "step,loss\n1,7.5\n"), "-o", t / "no" / "r.png"],
     "does not exist"),
])
def test_report_bad_input_is_one_line(case, make, expected, tmp_path):
    code, stdout, stderr = report(*make(tmp_path))
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (case, stderr)
    assert not list(tmp_path.rglob("r.*")), case
