"""The accelerator benchmark (run when a GPU / TPU is lent) works end to end: a CPU-sized run of
every part, the per-part process driver with its timeouts, and the FLOP formula."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))

import bench_accelerator  # noqa: E402


@pytest.mark.slow
def test_tiny_run_reports_every_figure(tmp_path):
    report = bench_accelerator.main(["--tiny", "--in-process", "--repeats", "1", "--out", str(tmp_path / "acc.json")])
    assert report["future_kl"]["2x256"]["fastest"] in ("scan", "associative", "blocked/32", "blocked/128")
    for part in ("train", "train_7b"):
        train = report[part]
        assert train["loss_finite"] and train["tokens_per_second"] > 0 and train["compile_seconds"] > 0
        assert train["memory"]["planned"] > 0 and train["memory"]["measured_peak_bytes_in_use"] is None  # CPU
        assert train["mfu"] is None  # a CPU has no known peak; --peak-tflops gives one
        assert train["executed_over_model_flops"] >= 0.99 and train["attention"].startswith("xla")
    assert (report["train"]["remat"], report["train_7b"]["remat"]) == ("none", "full")
    assert set(report["train"]["parts_ms"]) == {"old_log_probs", "layers_fwd_bwd", "head_fwd_bwd", "optimizer"}
    assert all(ms > 0 for ms in report["train"]["parts_ms"].values())
    assert all(report["decode"][name]["new_tokens_per_second"] > 0 for name in ("static", "engine"))
    tail = report["engine_long_tail"]
    assert tail["max_over_mean"] > 2 and tail["engine"]["useful_tokens_per_second"] > 0 and tail["engine_gain"] > 0
    assert report["train_fused"] == {"skipped": "no fused attention kernel on cpu", "part_seconds": pytest.approx(
        report["train_fused"]["part_seconds"])}  # cuDNN / splash: only on a GPU / TPU
    for part in set(bench_accelerator.PARTS) - {"train_fused"}:  # where the time goes, from a profiler trace
        ops = report[part]["top_ops"]
        assert 0 < len(ops) <= 10 and all(o["ms"] >= 0 and 0 <= o["share"] <= 1 for o in ops), (part, ops)
        assert ops == sorted(ops, key=lambda o: -o["ms"])
    assert json.loads((tmp_path / "acc.json").read_text())["engine_long_tail"]["slots"] == tail["slots"]


@pytest.mark.slow
def test_parts_run_in_their_own_processes_under_timeouts(tmp_path):
    out = tmp_path / "acc.json"
    report = bench_accelerator.main(["--tiny", "--repeats", "1", "--only", "future_kl,train", "--out", str(out)])
    assert report["future_kl"]["2x256"]["fipo_over_dapo"] > 0 and report["train"]["loss_finite"]
    assert json.loads(out.read_text())["train"]["part_seconds"] > 0
    # A part over its time fails alone, and the report is still written after it.
    report = bench_accelerator.main(["--tiny", "--only", "train,future_kl", "--timeout-scale", "0.005",
                                     "--out", str(out)])
    assert report["train"]["error"].startswith("timed out after") and "error" in report["future_kl"]
    assert set(json.loads(out.read_text())) >= {"train", "future_kl", "device"}


def test_every_part_fits_the_gpu_window():
    assert set(bench_accelerator.PART_TIMEOUT_S) == set(bench_accelerator.PARTS)
    assert sum(bench_accelerator.PART_TIMEOUT_S.values()) <= 8 * 60


def test_flops_per_token_of_a_known_shape():
    # Qwen2.5-0.5B: 24 × (896·14·64·2 + 2·896·2·64 + 3·896·4864) + 896·151936 matmul parameters.
    model = bench_accelerator.model_config("qwen2.5-0.5b")
    matmul = 24 * (896 * 14 * 64 * 2 + 2 * 896 * 2 * 64 + 3 * 896 * 4864) + 896 * 151936
    assert bench_accelerator.forward_flops_per_token(model, 1000) == 2 * matmul + 2 * 24 * 14 * 64 * 1000
    assert bench_accelerator.peak_tflops(type("D", (), {"device_kind": "NVIDIA H100 80GB HBM3"})(), None) == 989.0
