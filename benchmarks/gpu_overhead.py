"""Is a GPU pass bound by the host (building and launching kernels) or by the GPU, and what does it hold
in memory? First, what one kernel costs the host: chains of 400 dependent kernels of three kinds (tiny
matmuls, which MLX hands to cuBLASLt on a GPU; MLX's own RMS norm; uncompiled adds), microseconds per
kernel until launched and until done. Then per clip: the waveform's copy into MLX memory, alone and with
a first GPU read; and for each pass (log-mel, encode, edit) one JSON line: the milliseconds until
mx.async_eval returns (the host has built the graph and launched every kernel) and until the results
are ready, the primitives in its graph (kernels, views included; matmuls apart), and its peak memory
above what was allocated before it.

    python benchmarks/gpu_overhead.py FULL_SIZE_MODEL_DIR [--seconds 24.9 60]
"""
import argparse
import collections
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import granite_nar as g  # noqa: E402  (loads OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
from bench import synthetic_audio  # noqa: E402

VIEWS = {"Reshape", "Squeeze", "ExpandDims", "Broadcast", "Unflatten", "Flatten", "Split", "Slice", "Transpose"}
MATMULS = {"Matmul", "AddMM"}


def split_times(run, reps=20):
    """Median milliseconds to launch and to finish run()'s outputs, after a warm-up."""
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


def primitives(outputs):
    """Primitive nodes in the graph that computes `outputs`: all, without views, and the most frequent kernels."""
    outputs = [outputs] if isinstance(outputs, mx.array) else outputs
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *outputs)
        labels = re.findall(r'label ="([^"]*)", shape=rectangle', f.read())
    counts = collections.Counter(labels)
    kernels = collections.Counter({name[:60]: n for name, n in counts.items() if name not in VIEWS})
    matmuls = sum(counts[name] for name in MATMULS)
    return sum(counts.values()), sum(kernels.values()), matmuls, dict(kernels.most_common(15))


def kernel_cost(n=400):
    """Host microseconds per kernel, launched and done, for chains of n dependent kernels of each kind."""
    x = mx.random.normal((8, 64)).astype(mx.bfloat16)
    w = (mx.random.normal((64, 64)) / 8).astype(mx.bfloat16)
    scale = mx.ones((64,), mx.bfloat16)

    def chain(step):
        def run(a):
            for _ in range(n):
                a = step(a)
            return a

        return run

    chains = {
        "matmul": mx.compile(chain(lambda a: a @ w)),
        "rms_norm": mx.compile(chain(lambda a: mx.fast.rms_norm(a, scale, 1e-5))),
        "add": chain(lambda a: a + 1),  # not compiled: n Add kernels
    }
    for name, run in chains.items():
        launch_ms, total_ms = split_times(lambda: run(x))
        print(json.dumps({"kernel": name, "chain": n, "launch_us": round(1e3 * launch_ms / n, 2),
                          "total_us": round(1e3 * total_ms / n, 2)}), flush=True)  # fmt: skip


def waveform_copy(waveform):
    """Milliseconds to copy a waveform into an MLX array, and to copy it and read it once on the device."""
    copy = lambda: mx.array(waveform)  # noqa: E731
    read = lambda: mx.array(waveform).sum()  # noqa: E731
    return split_times(copy)[1], split_times(read)[1]


def peak_above(run):
    """GB allocated at the peak of run() beyond what was allocated before it."""
    mx.synchronize()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(run())
    return round((mx.get_peak_memory() - before) / 1e9, 3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--seconds", type=float, nargs="+", default=[24.9])
    args = parser.parse_args()
    model, _ = g.load(args.model)
    kernel_cost()
    for seconds in args.seconds:
        waveform = synthetic_audio(seconds)
        copy_ms, copy_and_read_ms = waveform_copy(waveform)
        print(json.dumps({"waveform": seconds, "bytes": waveform.nbytes, "copy_ms": copy_ms,
                          "copy_and_read_ms": copy_and_read_ms}), flush=True)  # fmt: skip
        features = g.log_mel(waveform)
        _, audio_embeds = model.encode(features)
        hypothesis = [1000 + 7 * i % 5000 for i in range(round(2.8 * seconds))]
        passes = {
            "log_mel": lambda: g.log_mel(waveform),
            "encode": lambda: model.encode(features),
            "edit": lambda: model.edit(audio_embeds, hypothesis),
        }
        for name, run in passes.items():
            launch_ms, total_ms = split_times(run)
            nodes, kernels, matmuls, top = primitives(run())
            row = {"pass": name, "seconds": seconds, "launch_ms": launch_ms, "total_ms": total_ms, "primitives": nodes,
                   "non_view_primitives": kernels, "matmuls": matmuls, "peak_above_gb": peak_above(run), "top": top}  # fmt: skip
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
