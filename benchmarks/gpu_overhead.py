"""Is a GPU pass bound by the host (building and launching kernels) or by the GPU? For each pass of a
24.9 s clip: the seconds until mx.async_eval returns (the host has built the graph and launched every
kernel) and until the results are ready.

    python benchmarks/gpu_overhead.py FULL_SIZE_MODEL_DIR
"""
import json
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import granite_nar as g  # noqa: E402  (loads OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
from bench import synthetic_audio  # noqa: E402


def split_times(run, reps=20):
    """Median seconds to launch and to finish run()'s outputs, after a warm-up."""
    launched, finished = [], []
    for i in range(reps + 3):
        tic = time.perf_counter()
        outputs = run()
        mx.async_eval(outputs)
        launch = time.perf_counter() - tic
        mx.eval(outputs)
        if i >= 3:
            launched.append(launch)
            finished.append(time.perf_counter() - tic)
    return round(1e3 * statistics.median(launched), 2), round(1e3 * statistics.median(finished), 2)


def main():
    model, _ = g.load(sys.argv[1])
    features = g.log_mel(synthetic_audio(24.9))
    _, audio_embeds = model.encode(features)
    hypothesis = [1000 + 7 * i % 5000 for i in range(70)]
    passes = {
        "log_mel": lambda: g.log_mel(synthetic_audio(24.9)),
        "encode": lambda: model.encode(features),
        "edit": lambda: model.edit(audio_embeds, hypothesis),
    }
    for name, run in passes.items():
        launch_ms, total_ms = split_times(run)
        print(json.dumps({"pass": name, "launch_ms": launch_ms, "total_ms": total_ms}), flush=True)


if __name__ == "__main__":
    main()
