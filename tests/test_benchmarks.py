"""The benchmark scripts run and print what README reads from them (schema only: no timing asserts)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """make_random_checkpoint.py --small -> convert.py: the path the full-size benchmark takes."""
    tmp = tmp_path_factory.mktemp("bench")
    run("benchmarks/make_random_checkpoint.py", "--out", tmp / "ckpt", "--small")
    run("convert.py", "--hf-path", tmp / "ckpt", "--mlx-path", tmp / "mlx")
    return tmp / "mlx"


def test_bench_prints_one_json_line_per_case(small_model):
    lines = run("benchmarks/bench.py", "--model", small_model, "--seconds", "1", "2.5", "--reps", "1").splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["seconds_audio"] for r in rows] == [1.0, 2.5]
    for row in rows:
        assert row["impl"] == "granite_nar" and row["backend"] in ("cpu", "gpu") and row["bits"] is None
        assert row["hyp_tokens"] == round(2.8 * row["seconds_audio"])
        assert row["median_s"] > 0 and row["rtf_x"] > 0 and row["peak_mem_gb"] >= row["weights_gb"] > 0
        assert set(row["stages_s"]) == {"log_mel", "encoder", "projector", "editor", "decode"}


def test_bench_throughput_prints_one_line_per_batch_size(small_model):
    lines = run("benchmarks/bench.py", "--model", small_model, "--clips", "5", "--batch-sizes", "1", "4").splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["batch_size"] for r in rows] == [1, 4] and all(r["mode"] == "throughput" and r["clips"] == 5 for r in rows)
    assert rows[0]["seconds_audio"] == rows[1]["seconds_audio"] > 10  # the same clips, 2 to 35 s each
    for row in rows:
        assert row["rtf_x"] == pytest.approx(row["seconds_audio"] / row["wall_s"], rel=0.01)
        assert row["first_pass_rtf_x"] > 0 and row["peak_mem_gb"] >= row["weights_gb"] > 0


def test_fidelity_reports_granite_nar_exact():
    rows = [json.loads(line) for line in run("benchmarks/fidelity.py").splitlines() if line.startswith("{")]
    ours = [r for r in rows if r["impl"] == "granite_nar"]
    assert len(ours) == 2 and all(r["transcript"] == "identical" for r in ours)
    assert all(float(r[k]) < 1e-4 for r in ours for k in ("input_features", "encoder_bpe_logits", "audio_embeds", "editor_text_logits"))


def test_gpu_overhead_prints_kernel_costs_and_passes(small_model):
    rows = [json.loads(line) for line in run("benchmarks/gpu_overhead.py", small_model, "--seconds", "2").splitlines()]
    assert [r["kernel"] for r in rows[:3]] == ["matmul", "rms_norm", "add"]
    assert all(r["chain"] == 400 and 0 < r["launch_us"] <= r["total_us"] for r in rows[:3])
    assert rows[3]["waveform"] == 2.0 and rows[3]["bytes"] == 2 * 16000 * 4 and 0 <= rows[3]["copy_ms"] <= rows[3]["copy_and_read_ms"]
    passes = {r["pass"]: r for r in rows[4:]}
    assert list(passes) == ["log_mel", "encode", "edit"]
    for row in passes.values():
        assert 0 < row["launch_ms"] <= row["total_ms"] and row["matmuls"] <= row["non_view_primitives"] <= row["primitives"]
    assert passes["log_mel"]["matmuls"] == 1 and passes["edit"]["matmuls"] > 0
