"""`zero-trainer doctor`: a planted stale JIT lock, a lock a live build holds, and async_io that cannot be built."""

import json
import subprocess
import sys

import pytest
from conftest import run_cli


@pytest.fixture
def extensions(tmp_path, monkeypatch):
    """An empty torch extensions cache of our own (torch's layout: <dir>/py311_cpu/<op>/)."""
    root = tmp_path / "torch_extensions"
    (root / f"py{sys.version_info.major}{sys.version_info.minor}_cpu").mkdir(parents=True)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    return root


def plant_lock(extensions, op: str):
    lock = extensions / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / op / "lock"
    lock.parent.mkdir()
    return lock


def test_stale_lock_is_reported_with_its_fix(extensions, tmp_path, capsys):
    from zero_trainer.cli import main

    lock = plant_lock(extensions, "fake_op")
    lock.touch()  # what a JIT build killed midway leaves behind
    assert main(["doctor", "--output-dir", str(tmp_path / "out")]) == 1
    stdout = capsys.readouterr().out
    problems = [line for line in stdout.splitlines() if line.startswith("problem: ")]
    stale = [line for line in problems if str(lock) in line]
    assert len(stale) == 1, stdout
    assert "stale JIT build lock" in stale[0] and f"remove it: rm {lock}" in stale[0]
    assert lock.exists(), "doctor reports; it does not remove"
    assert not (tmp_path / "out").exists(), "doctor creates nothing"


def test_lock_held_by_a_live_build_is_not_stale(extensions, tmp_path):
    from zero_trainer.doctor import diagnose

    lock = plant_lock(extensions, "live_op")
    # torch's FileBaton: the builder creates the lock with O_EXCL and keeps the descriptor open until done.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL | os.O_RDWR)\nprint('held', flush=True)\ntime.sleep(300)",
         str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        report = diagnose(str(tmp_path / "out"))
    finally:
        holder.kill()
        holder.wait()
    [entry] = report["build_locks"]
    assert entry == {"path": str(lock), "stale": False, "holders": [holder.pid]}
    assert not [p for p in report["problems"] if str(lock) in p["what"]]


def test_async_io_unbuildable_is_reported(extensions, tmp_path):
    """DeepSpeed decides by compiling and linking a call to libaio's io_submit with distutils, which honours $CC.
    A CC that does not exist fails that probe exactly as on a machine without a compiler or libaio: a real
    AsyncIOBuilder().is_compatible() answering False, nothing mocked."""
    proc = run_cli("doctor", "--json", "--output-dir", tmp_path / "out", check=False, timeout=300,
                   env={"TORCH_EXTENSIONS_DIR": str(extensions), "CC": str(tmp_path / "no-such-cc")})
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)  # --json: stdout is exactly one object
    cache = extensions / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / "async_io"
    assert report["ops"]["async_io"] == {"built": False, "buildable": False, "cache": str(cache)}
    assert report["ops"]["cpu_adam"]["buildable"]
    [problem] = [p for p in report["problems"] if "async_io" in p["what"]]
    assert "libaio-dev" in problem["fix"] and not report["ok"]


def test_report_has_every_section(extensions, tmp_path):
    from zero_trainer.doctor import diagnose, format_report

    report = diagnose(str(tmp_path / "out"), str(tmp_path / "nvme"))
    assert set(report["versions"]) == {"torch", "deepspeed", "transformers", "datasets", "accelerate"}
    assert report["accelerator"]["device"] and report["accelerator"]["comm_backend"]
    assert {"cpu_adam", "fused_adam", "async_io"} <= set(report["ops"])
    assert report["torch_extensions_dir"] == str(extensions) and report["build_locks"] == []
    assert report["shm"]["total_bytes"] and report["disk"]["output_dir"]["writable"]
    assert report["ok"] == (not report["problems"])
    text = format_report(report)
    assert ("all well" in text) == report["ok"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "nvme").exists()


def test_shm_workspaces_orphaned_are_found_and_swept():
    """DeepSpeed's shm all-reduce files: one nobody maps is an orphan, one a live process maps is not; the
    launcher's sweep removes exactly its own port's files."""
    import mmap
    import os

    from zero_trainer import ops

    port = f"zt{os.getpid()}"
    orphan, live = (ops.SHM_DIR / f"{ops.SHM_BUFFER}_{os.getuid()}_127.0.0.1_{port}_{r}" for r in (0, 1))
    other = ops.SHM_DIR / f"{ops.SHM_BUFFER}_{os.getuid()}_127.0.0.1_{port}9_0"
    try:
        for path in (orphan, live, other):
            path.write_bytes(b"\0" * 4096)
        with open(live, "r+b") as f, mmap.mmap(f.fileno(), 4096):
            found = ops.orphaned_shm_buffers()
            assert orphan in found and other in found and live not in found
            assert sorted(ops.remove_shm_buffers(port)) == sorted([orphan, live])
        assert not orphan.exists() and not live.exists() and other.exists()
    finally:
        for path in (orphan, live, other):
            path.unlink(missing_ok=True)
