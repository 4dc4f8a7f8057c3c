"""`zero-trainer probe`: one real measurement (quick sizes) checks every field, the cache and the command; the cache
rules, doctor's line and the bad inputs run on a made-up Probe."""

import dataclasses
import errno
import json
import os
from pathlib import Path

import pytest

from zero_trainer import probe
from zero_trainer.cli import main
from zero_trainer.probe import MatmulRate


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ZERO_TRAINER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def made_up(**changes) -> probe.Probe:
    rates = (MatmulRate("fp32", 2048, 512, 2048, 1.0e11), MatmulRate("fp32", 2048, 2048, 8192, 0.8e11),
             MatmulRate("bf16", 2048, 512, 2048, 3.0e11))
    values = {f.name: 1.0 for f in dataclasses.fields(probe.Probe)}
    values.update(fingerprint="f", measured_at="2026-01-01T00:00:00+00:00", quick=True, device="cpu", torch_threads=2,
                  matmul_flops_per_s=rates, optimizer_params=2**20, disk_path="/tmp", disk_direct_io=True,
                  disk_block_bytes=2**20, collective_backend="gloo", collective_ranks=2, collective_bucket_bytes=2**20,
                  collective_small_bytes=4096, device_memory_bytes_per_s=None, h2d_pinned_bytes_per_s=None,
                  h2d_pageable_bytes_per_s=None, d2h_pinned_bytes_per_s=None, d2h_pageable_bytes_per_s=None)
    return dataclasses.replace(probe.Probe(**values), **changes)


def counting_measure(monkeypatch) -> list:
    calls = []

    def measure(**kwargs):
        calls.append(kwargs)
        return made_up(disk_path=str(kwargs["disk_dir"]))

    monkeypatch.setattr(probe, "measure", measure)
    return calls


def test_a_real_quick_probe_is_plausible_cached_and_reused(cache, monkeypatch, capsys):
    measured = probe.load_or_measure(quick=True)
    assert measured.quick and measured.device == "cpu" and measured.wall_s < 60
    assert {r.dtype for r in measured.matmul_flops_per_s} == {"fp32", "bf16"}
    assert [(r.m, r.k, r.n) for r in measured.matmul_flops_per_s if r.dtype == "fp32"] == list(probe.QUICK_SHAPES)
    for r in measured.matmul_flops_per_s:
        assert (1e8 if r.dtype == "fp32" else 1e7) < r.flops_per_s < 1e13, r
    assert 1e8 < measured.host_memory_bytes_per_s < 1e12
    assert 1e-12 < measured.cpu_adam_s_per_param < 1e-6 and 1e-12 < measured.adamw_s_per_param < 1e-6
    assert 1e6 < measured.disk_write_bytes_per_s < 1e11 and 1e6 < measured.disk_read_bytes_per_s < 1e11
    assert Path(measured.disk_path) == probe.probe_path().parent and not list(cache.rglob(".probe-*"))
    assert measured.collective_backend == "gloo" and measured.collective_ranks == 2
    assert 1e6 < measured.allreduce_bytes_per_s < 1e12 and 1e6 < measured.allgather_bytes_per_s < 1e12
    assert 1e-7 < measured.allreduce_latency_s < 1 and 1e-7 < measured.allgather_latency_s < 1
    assert 1e-7 < measured.step_overhead_s < 1
    assert measured.device_memory_bytes_per_s is None and measured.h2d_pinned_bytes_per_s is None  # no GPU
    for field in dataclasses.fields(measured):
        value = getattr(measured, field.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert value > 0, field.name

    path = probe.probe_path()
    saved = json.loads(path.read_text())
    assert saved["fingerprint"] == probe.machine_fingerprint() and probe.Probe.from_dict(saved["probe"]) == measured
    mtime = path.stat().st_mtime_ns
    monkeypatch.setattr(probe, "measure", lambda **_: pytest.fail("a cached probe was measured again"))
    assert probe.load_or_measure() == measured and path.stat().st_mtime_ns == mtime

    capsys.readouterr()  # DeepSpeed's import logged to stdout while measuring, outside the command
    assert main(["probe", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)  # stdout is exactly one JSON object
    assert printed == {"path": str(path), **json.loads(json.dumps(measured.to_dict()))}
    assert main(["probe"]) == 0
    table = capsys.readouterr().out
    assert "matmul fp32 256x256 @ 256x1024" in table and "all_reduce, 2 gloo ranks" in table
    assert f"cache: {path}" in table and path.stat().st_mtime_ns == mtime


def test_matmul_rate_takes_the_nearest_measured_shape():
    p = made_up()
    assert p.matmul_rate("fp32", 2048, 512, 2048) == 1.0e11
    assert p.matmul_rate("fp32", 4096, 1536, 6144) == 0.8e11  # nearer 2048x2048x8192 in log distance
    assert p.matmul_rate("bf16", 1, 1, 1) == 3.0e11
    with pytest.raises(ValueError, match="no fp16 matmul was measured on cpu .measured: bf16, fp32"):
        p.matmul_rate("fp16", 2048, 512, 2048)


def test_a_changed_fingerprint_forced_or_other_disk_measures_again(cache, monkeypatch):
    calls = counting_measure(monkeypatch)
    first = probe.load_or_measure()
    assert probe.load_or_measure() == first and len(calls) == 1
    probe.load_or_measure(force=True)
    assert len(calls) == 2
    probe.load_or_measure(disk_dir=cache / "elsewhere")
    assert len(calls) == 3 and calls[-1]["disk_dir"] == cache / "elsewhere"
    probe.load_or_measure(disk_dir=cache / "elsewhere")
    assert len(calls) == 3

    real = probe.machine_fingerprint()
    monkeypatch.setattr(probe, "machine_fingerprint", lambda: {**real, "torch": "9.9.9"})
    probe.load_or_measure()
    assert len(calls) == 4
    assert len(list((cache / "probe").glob("*.json"))) == 2  # each install its own file


def test_an_unreadable_or_older_cache_counts_as_none(cache):
    path = probe.save_probe(made_up())
    assert probe.load_cached() == made_up()
    path.write_text("{not json")
    assert probe.load_cached() is None
    path.write_text(json.dumps({"format": probe.FORMAT - 1, "probe": made_up().to_dict()}))
    assert probe.load_cached() is None


def test_doctor_shows_the_cached_probe_or_says_how_to_get_one(cache, tmp_path):
    from zero_trainer.doctor import diagnose, format_report

    report = diagnose(str(tmp_path / "out"))
    assert report["probe"]["probe"] is None
    [line] = [x for x in format_report(report).splitlines() if x.startswith("probe ")]
    assert "run `zero-trainer probe`" in line

    path = probe.save_probe(made_up())
    report = diagnose(str(tmp_path / "out"))
    text = format_report(report)
    assert report["probe"]["path"] == str(path) and report["probe"]["probe"]["measured_at"] == made_up().measured_at
    assert "matmul fp32 100 GFLOP/s, bf16 300 GFLOP/s; memory 1 B/s" in text and str(path) in text
    assert not (tmp_path / "out").exists()


def test_an_unwritable_cache_is_one_line_exit_2_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(probe, "measure", lambda **_: pytest.fail("measured although the cache cannot be written"))
    (tmp_path / "a_file").write_text("not a directory")
    monkeypatch.setenv("ZERO_TRAINER_CACHE", str(tmp_path / "a_file"))
    assert main(["probe"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write the probe cache") and "($ZERO_TRAINER_CACHE)" in err
    assert len(err.splitlines()) == 1


def test_an_unwritable_disk_dir_is_one_line_exit_2(cache, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a directory")
    assert main(["probe", "--disk-dir", str(tmp_path / "a_file" / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write the disk probe directory") and "(--disk-dir)" in err
    assert len(err.splitlines()) == 1 and not probe.probe_path().exists()


def test_disk_without_o_direct_falls_back_to_buffered_reads_past_the_page_cache(tmp_path, monkeypatch):
    real_open = os.open

    def refuse_direct(path, flags, *args):  # as tmpfs before Linux 6.6 and some overlays answer
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    rates = probe._disk_rates(tmp_path, 4 * 2**20)
    assert rates["disk_direct_io"] is False and rates["disk_read_bytes_per_s"] > 0 and not os.listdir(tmp_path)


def test_the_command_keeps_stdout_for_its_result(capfd):
    with probe._stdout_to_stderr():
        os.write(1, b"Adam Optimizer #0 is created\n")  # as cpu_adam's C++ prints
        print("DeepSpeed's logger")
    print("{}")
    out, err = capfd.readouterr()
    assert out == "{}\n" and "Adam Optimizer" in err and "DeepSpeed's logger" in err
