"""The benchmarks' own code paths, on this CPU machine (timings are not asserted: see bench/results)."""

import pytest

from bench.memory import theory_bytes


@pytest.mark.multiproc
def test_gpu_bench_reports_a_real_run(engine_runs):
    """bench.gpu's result from a real bf16 zero2 run's summary (the launch itself is `zero-trainer train`)."""
    from bench.gpu import result_from_summary

    result = result_from_summary(engine_runs["zero2_bf16", 1], "cpu", "recipes/debug.yaml")
    assert result["device"] == "cpu" and result["ds_config_name"] == "zero2" and result["precision"] == "bf16"
    assert result["tokens_per_s"] > 0 and result["peak_mem_bytes"] > 0 and result["predicted_peak_bytes"] > 0
    assert result["mfu"] == pytest.approx(6 * result["params"] * result["tokens_per_s"] / 989e12)


def test_theory_matches_the_zero_paper():
    psi = 1_000_000
    assert theory_bytes(psi, "zero0", 8, "bf16") == 16 * psi
    assert theory_bytes(psi, "zero1", 8, "bf16") == 4 * psi + 12 * psi / 8
    assert theory_bytes(psi, "zero2", 8, "bf16") == 2 * psi + 14 * psi / 8
    assert theory_bytes(psi, "zero3", 8, "bf16") == 16 * psi / 8


def test_hf_bench_reports_config_differences_but_not_the_monitor():
    from bench.hf_trainer import config_differences

    ours = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 1_000_000}, "csv_monitor": {"enabled": True},
            "steps_per_print": 10**9}
    hf = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 16384}, "steps_per_print": float("inf")}
    assert config_differences(ours, hf) == {"zero_optimization.reduce_bucket_size": [1_000_000, 16384]}


def test_ratio_ci95_is_paired():
    """Pairs drift together (a slow round is slow for both arms): the interval sees the ratio, not the drift."""
    from bench.common import ratio_ci95

    drift = [1.0, 1.6, 1.2, 2.0, 1.1, 1.4, 1.8, 1.3]
    lo, hi = ratio_ci95([1.1 * d for d in drift], drift)
    assert lo == pytest.approx(1.1) and hi == pytest.approx(1.1)
    noisy = [d * (1 + 0.05 * (-1) ** i) for i, d in enumerate(drift)]
    lo, hi = ratio_ci95(noisy, drift)
    assert lo < 1.0 < hi and hi - lo < 0.15


def test_a_failing_child_prints_its_last_lines(capsys):
    """A benchmark's child that fails says why: its last lines, not a bare CalledProcessError."""
    import sys

    from bench.common import ChildFailed, run_child

    script = "import sys; print('step 1 ok'); print('Traceback: the real cause', file=sys.stderr); sys.exit(3)"
    with pytest.raises(ChildFailed) as err:
        run_child([sys.executable, "-c", script])
    printed = capsys.readouterr().err
    for text in ("exited 3", "step 1 ok", "Traceback: the real cause"):
        assert text in printed and text in str(err.value)
