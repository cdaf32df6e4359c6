"""benchmarks/gpu_check.py's CPU dry run: the script the GPU machine runs, exercised here on a tiny model so a
broken step is found before device time is spent. TensorRT rows must be reported as skipped with the reason."""

from __future__ import annotations

import torch


def test_gpu_check_cpu_dry_run_reports_every_backend(tmp_path, capsys):
    from benchmarks.gpu_check import check_model

    rows = check_model("vit_tiny", "cpu", 1, tmp_path, False, ["fp16"])
    torch.set_num_threads(1)
    by_backend = {r["backend"]: r for r in rows}
    assert {"torch fp32 (cpu)", "onnxruntime CPU", "tensorrt fp16"} <= set(by_backend)
    ort = by_backend["onnxruntime CPU"]
    assert ort["max_logit_err"] < 1e-3 and ort["mask_mismatch"] < 1e-3 and ort["end_to_end_ms"] > 0
    skipped = by_backend["tensorrt fp16"]["skipped"]
    assert "CUDA GPU" in skipped or "not installed" in skipped
