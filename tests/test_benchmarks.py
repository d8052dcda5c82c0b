"""The benchmark scripts still run end to end (shrunk: few tokens, one round) and report what the
issues ask for. Their figures are not checked here; benchmarks/RESULTS.md holds those."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: int = 600) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_decode_benchmark_compares_with_transformers(tmp_path):
    pytest.importorskip("transformers")
    out = _run(["benchmarks/decode.py", "--quick", "--prompt", "24", "--new", "6", "--rounds", "1",
                "--ckpt", str(tmp_path / "bench"), "--quiet-timeout", "0", "--json", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    (case,) = report["cases"]
    assert case["identical_rows"] == "1/1"  # greedy tokens equal transformers' (fp32)
    kv = case["kv_bytes_per_token"]
    assert kv["nanoseek"] == kv["latent"] == 3456  # 6 layers x (128 + 16) x 4 bytes
    assert case["nanoseek"]["decode_tok_s"] > 0 and case["transformers"]["decode_tok_s"] > 0
    assert "bandwidth floor" in out and "| fp32 | 1 | 24 |" in out
    mtp = report["mtp"]["results"]
    assert all(mtp[f"T=0.0 k={k}"]["identical"] for k in (1, 2))  # speculative greedy = plain greedy


def test_serve_benchmark_runs_the_real_server(tmp_path):
    pytest.importorskip("fastapi")
    out = _run(["benchmarks/serve.py", "--concurrency", "1", "3", "--max-tokens", "3", "--prompt-len", "8",
                "--rounds", "1", "--json", str(tmp_path / "r.json")])
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["concurrency"] for r in rows] == [1, 3]
    for r in rows:
        assert r["errors"] == 0 and r["output_tokens"] == 3 * r["requests"] and r["tokens_per_s"] > 0
        assert 0 < r["ttft_p50_s"] <= r["latency_p50_s"]
    assert "| 3 |" in out and "x c=1" in out


def test_gpu_decode_benchmark(tmp_path):
    """On a GPU: graphs vs eager vs transformers, every case reported; without one, a clear skip."""
    import torch

    pytest.importorskip("transformers")
    args = ["benchmarks/gpu_decode.py", "--batches", "1", "2", "--prompt", "24", "--new", "6", "--rounds", "1",
            "--ckpt", str(tmp_path / "bench"), "--json", str(tmp_path / "r.json")]
    out = _run(args)
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in out and not (tmp_path / "r.json").exists()
        return
    report = json.loads((tmp_path / "r.json").read_text())
    assert [c["batch"] for c in report["cases"]] == [1, 2] and report["fp32_identical"]
    assert all(c[name] > 0 for c in report["cases"] for name in ("graphs", "plain", "transformers"))


def test_prefill_rows_benchmark_compares_padded_and_exact_row_counts():
    out = _run(["benchmarks/prefill_rows.py", "--preset", "tiny", "--rounds", "1", "--lengths", "4", "--threads", "1"])
    assert "| bucket |" in out and "| exact |" in out and "exact / padded time" in out


def test_prefix_hit_cost_benchmark_reports_the_rule_beside_the_timings():
    out = _run(["benchmarks/prefix_hit_cost.py", "--preset", "tiny", "--lengths", "64", "--shares", "0.5",
                "--rounds", "1", "--threads", "1"])
    assert "| 64 | 50% |" in out and "forced / cold" in out and "| no cache |" in out


@pytest.mark.parametrize("flags, message", [(["--device", "bogus"], "unknown device"),
                                            (["--dtype", "bogus"], "unknown dtype"),
                                            (["--preset", "nonesuch"], "no model directory")])
def test_prefix_hit_cost_benchmark_refuses_a_bad_device_dtype_or_preset(flags, message):
    proc = subprocess.run([sys.executable, "benchmarks/prefix_hit_cost.py", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
