"""The accelerator benchmark (run when a GPU / TPU is lent) works end to end: a CPU-sized run."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))

import bench_accelerator  # noqa: E402


def test_tiny_run_reports_every_figure(tmp_path):
    report = bench_accelerator.main(["--tiny", "--repeats", "1", "--out", str(tmp_path / "acc.json")])
    assert report["future_kl"]["2x256"]["fastest"] in ("scan", "associative", "blocked/32", "blocked/128")
    train = report["train"]
    assert train["loss_finite"] and train["tokens_per_second"] > 0 and train["memory"]["planned_update_peak"] > 0
    assert train["mfu"] is None  # a CPU has no known peak; --peak-tflops gives one
    assert all(report["decode"][name]["new_tokens_per_second"] > 0 for name in ("static", "engine"))
    assert (tmp_path / "acc.json").exists()


def test_flops_per_token_of_a_known_shape():
    # Qwen2.5-0.5B: 24 × (896·14·64·2 + 2·896·2·64 + 3·896·4864) + 896·151936 matmul parameters.
    model = bench_accelerator.ModelConfig(**bench_accelerator.plan_lib.KNOWN_MODELS["qwen2.5-0.5b"])
    matmul = 24 * (896 * 14 * 64 * 2 + 2 * 896 * 2 * 64 + 3 * 896 * 4864) + 896 * 151936
    assert bench_accelerator.forward_flops_per_token(model, 1000) == 2 * matmul + 2 * 24 * 14 * 64 * 1000
    assert bench_accelerator.peak_tflops(type("D", (), {"device_kind": "NVIDIA H100 80GB HBM3"})(), None) == 989.0
