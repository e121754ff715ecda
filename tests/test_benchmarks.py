"""The benchmark scripts run and print the rows benchmarks/README.md reads (schema only: no timing
asserts)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, **env):
    environ = {**os.environ, **{k: str(v) for k, v in env.items()}}
    result = subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=environ
    )
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
    lines = run(
        "benchmarks/bench.py", "--model", small_model, "--seconds", "1", "2.5", "--reps", "1"
    ).splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["seconds_audio"] for r in rows] == [1.0, 2.5]
    for row in rows:
        assert (
            row["impl"] == "granite_nar"
            and row["backend"] in ("cpu", "gpu")
            and row["bits"] is None
        )
        assert row["hyp_tokens"] == round(2.8 * row["seconds_audio"])
        assert row["speed"] == pytest.approx(
            row["seconds_audio"] / row["median_ms"] * 1000, rel=0.01
        )
        assert row["peak_mem_gb"] >= row["weights_gb"] > 0
        assert list(row["stages_ms"]) == ["prepare", "encode", "edit", "rest"]
        assert "median_ms_word_timestamps" not in row


def test_bench_word_timestamps_add_a_stage_and_rows(small_model):
    args = ("--model", small_model, "--word-timestamps")
    row = json.loads(run("benchmarks/bench.py", *args, "--seconds", "2", "--reps", "1"))
    assert list(row["stages_ms"]) == [
        "prepare",
        "encode",
        "edit",
        "word_timestamps",
        "alignment",
        "rest",
    ]
    assert row["median_ms_word_timestamps"] > 0
    lines = run("benchmarks/bench.py", *args, "--clips", "3", "--batch-sizes", "2").splitlines()
    assert [json.loads(line)["word_timestamps"] for line in lines] == [False, True]


def test_bench_throughput_prints_one_line_per_batch_size(small_model):
    lines = run(
        "benchmarks/bench.py", "--model", small_model, "--clips", "5", "--batch-sizes", "1", "4"
    ).splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["batch_size"] for r in rows] == [1, 4] and all(r["clips"] == 5 for r in rows)
    assert (
        rows[0]["seconds_audio"] == rows[1]["seconds_audio"] > 10
    )  # the same clips, 2 to 35 s each
    for row in rows:
        assert row["speed"] == pytest.approx(row["seconds_audio"] / row["wall_s"], rel=0.01)
        assert row["first_pass_speed"] > 0 and row["peak_mem_gb"] >= row["weights_gb"] > 0
        assert list(row["stages_ms"]) == ["prepare", "encode", "edit", "rest"]
        assert all(ms >= 0 for ms in row["stages_ms"].values())


def test_bench_clip_seconds_makes_every_clip_that_long(small_model):
    args = ("--model", small_model, "--clips", "3", "--batch-sizes", "2", "--clip-seconds", "2.5")
    row = json.loads(run("benchmarks/bench.py", *args))
    assert row["clip_seconds"] == 2.5 and row["seconds_audio"] == 7.5


def test_bench_keep_quantized(small_model, tmp_path):
    q_dir = tmp_path / "q5"
    ckpt = small_model.parent / "ckpt"
    run("convert.py", "--hf-path", ckpt, "--mlx-path", q_dir, "-q", "--q-group-size", "32")
    args = ("benchmarks/bench.py", "--model", q_dir, "--seconds", "1", "--reps", "1")
    for extra, dequantized in (((), True), (("--keep-quantized",), False)):
        row = json.loads(run(*args, *extra))  # dequantized by default on a CPU
        assert row["bits"] == 5 and row["dequantized"] == dequantized


def test_fidelity_reports_granite_nar_exact_and_cleans_up(tmp_path):
    out = run("benchmarks/fidelity.py", TMPDIR=tmp_path)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    ours = [r for r in rows if r["impl"] == "granite_nar"]
    assert len(ours) == 2 and all(r["transcript"] == "identical" for r in ours)
    stages = ("input_features", "encoder_bpe_logits", "audio_embeds", "editor_text_logits")
    assert all(float(r[k]) < 1e-4 for r in ours for k in stages)
    assert "| golden | granite_nar |" in out
    assert not [
        p for p in tmp_path.iterdir() if p.name.startswith("fidelity_")
    ]  # (mlx/: MLX's kernel cache)


def test_quant_drift_prints_a_row_per_setting(small_model):
    out = run(
        "benchmarks/quant_drift.py",
        "--model",
        small_model,
        "--bits",
        "4",
        "8",
        "--group-sizes",
        "32",
        "--seconds",
        "2",
    )
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["bits"], r["group_size"]) for r in rows] == [(None, None), (4, 32), (8, 32)]
    assert rows[0]["size_gb"] > rows[2]["size_gb"] > rows[1]["size_gb"]  # bf16 > 8 bits > 4 bits
    assert 0 < rows[2]["rel_err"] < rows[1]["rel_err"] < 0.5  # more bits, less drift
    assert "| 8 | 32 |" in out


def test_timeline_splits_the_device_waits_by_the_stage_that_ended_them(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import timeline  # its analysis needs no torch

    host = lambda name, ts, dur, tid=1, cat="user_annotation": dict(
        name=name, ts=ts, dur=dur, tid=tid, cat=cat
    )
    device = lambda ts, dur, c: dict(
        name="k(x)", cat="kernel", ts=ts, dur=dur, args={"correlation": c}
    )
    launch = lambda ts, c: dict(
        name="cudaGraphLaunch", cat="cuda_runtime", ts=ts, args={"correlation": c}
    )
    events = [
        host("pass", 0, 100_000),
        host("encode_batch", 0, 40_000),
        host("encode_batch", 10_000, 30_000, tid=7, cat="gpu_user_annotation"),  # not the host's
        host("edit_pass", 50_000, 20_000),
        host("async_eval", 30_000, 8_000),  # queuing, inside encode_batch
        host("async_eval", 60_000, 5_000),
        host("async_eval", 80_000, 1_000),  # outside any stage
        launch(5_000, 1),
        launch(55_000, 2),
        device(10_000, 30_000, 1),
        device(60_000, 20_000, 2),
    ]
    row = timeline.analyze(events)
    assert (row["pass_ms"], row["busy_ms"], row["idle_ms"]) == (100.0, 50.0, 50.0)
    assert row["idle_ms_before"] == {"encode_batch": 10.0, "edit_pass": 20.0, "other": 20.0}
    assert row["longest_waits_ms"][0] == [40.0, 20.0, "edit_pass"]
    assert row["host_ms"] == {"encode_batch": 40.0, "edit_pass": 20.0, "collapse_rows": 0}
    assert row["queue_ms"] == {"encode_batch": 8.0, "edit_pass": 5.0, "collapse_rows": 0}
    assert row["kernels_ms"] == {"k": 50.0} and row["kernel_count"] == 2
