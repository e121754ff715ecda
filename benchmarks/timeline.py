"""Where a throughput pass spends its time on an NVIDIA GPU: MLX's kernels as CUPTI sees them
(through torch.profiler, which records every CUDA launch in the process) against the host.

    python benchmarks/timeline.py --model DIR [--clips 1024] [--batch-size 128]

The pass is bench.py's (--clips N: LibriSpeech-like clips, fixed hypotheses), the third one, once
two have traced every shape and built every kernel. Prints one JSON line: the pass and the time
some kernel ran (`busy_ms`); the time the device waited (`idle_ms`), by the stage whose kernel
ended the wait (an encoder pass, an editor pass) and, of the longest waits, when each began and
for how long; the host's time on the main thread in each stage and, of it, the time inside
mx.async_eval (`queue_ms`: MLX traverses the graph and launches its kernels there, and waits when
the host is 10 command buffers ahead of the device); the kernels that ran longest.
Needs torch with CUDA (not a dependency of this project).
"""

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from bench import FixedEditor, g  # noqa: E402  (granite_nar first: it loads OpenBLAS before MLX)
from clips import librispeech_like_lengths, synthetic_audio  # noqa: E402

STAGES = ["encode_batch", "edit_pass", "collapse_rows"]  # timed on the host, by name
QUEUE = "async_eval"  # mx.async_eval, timed within them
KERNELS = {"kernel", "gpu_memcpy", "gpu_memset"}  # the trace's device events
LAUNCHES = {"cuda_runtime", "cuda_driver"}  # the host calls that queued them
GPU_MARKS = "gpu_user_annotation"  # a record_function's span on the device


def marked(function, name, record_function):
    """function, its calls marked `name` in the trace."""

    def run(*args, **kwargs):
        with record_function(name):
            return function(*args, **kwargs)

    return run


def waits(kernels, start, end):
    """The device's idle spans in [start, end] between kernels (ts, dur, correlation), sorted:
    (when it began, how long, the correlation of the kernel that ended it; None at the end)."""
    spans, busy_until = [], start
    for ts, dur, correlation in kernels:
        if ts > busy_until:
            spans.append((busy_until, ts - busy_until, correlation))
        busy_until = max(busy_until, ts + dur)
    return spans + [(busy_until, end - busy_until, None)]


def analyze(events, top=12):
    """The chrome trace's events -> the summary printed (times in ms)."""
    pass_ = next(e for e in events if e.get("name") == "pass" and e.get("cat") != GPU_MARKS)
    start, end, main = pass_["ts"], pass_["ts"] + pass_["dur"], pass_["tid"]
    kernels = sorted(
        (e["ts"], e["dur"], e.get("args", {}).get("correlation"), e["name"])
        for e in events
        if e.get("cat") in KERNELS
    )
    launched = {
        e["args"]["correlation"]: e["ts"]
        for e in events
        if e.get("cat") in LAUNCHES and "correlation" in e.get("args", {})
    }
    on_main = [e for e in events if e.get("tid") == main and e.get("cat") != GPU_MARKS]
    host = [e for e in on_main if e.get("name") in STAGES]
    queued = [e for e in on_main if e.get("name") == QUEUE]

    def stage_at(ts):  # the stage the main thread was in at host time ts
        inside = [e["name"] for e in host if ts is not None and e["ts"] <= ts <= e["ts"] + e["dur"]]
        return inside[-1] if inside else "other"

    spans = waits([k[:3] for k in kernels], start, end)
    idle = Counter()
    for _, dur, correlation in spans:
        idle[stage_at(launched.get(correlation))] += dur
    ms = lambda us: round(us / 1000, 1)
    waited = sum(dur for _, dur, _ in spans)
    names = Counter()
    for _, dur, _, name in kernels:
        names[name.split("(")[0][:80]] += dur
    return {
        "pass_ms": ms(end - start),
        "busy_ms": ms(end - start - waited),  # some kernels overlap
        "idle_ms": ms(waited),
        "idle_ms_before": {stage: ms(t) for stage, t in idle.items()},
        "longest_waits_ms": [
            [ms(ts - start), ms(dur), stage_at(launched.get(c))]
            for ts, dur, c in sorted(spans, key=lambda s: -s[1])[:top]
        ],
        "host_ms": {s: ms(sum(e["dur"] for e in host if e["name"] == s)) for s in STAGES},
        "queue_ms": {
            s: ms(sum(e["dur"] for e in queued if stage_at(e["ts"]) == s)) for s in STAGES
        },
        "kernels_ms": {name: ms(t) for name, t in names.most_common(top)},
        "kernel_count": len(kernels),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="convert.py output directory")
    parser.add_argument("--clips", type=int, default=1024, help="LibriSpeech-like clips")
    parser.add_argument("--batch-size", type=int, default=128, help="clips in a batch, at most")
    args = parser.parse_args()
    from torch.profiler import ProfilerActivity, profile, record_function  # analyze needs none

    model, tokenizer = g.load(args.model)
    lengths = librispeech_like_lengths(args.clips)
    waveforms = [synthetic_audio(seconds, seed=i) for i, seconds in enumerate(lengths)]
    options = dict(batch_size=args.batch_size, chunk_seconds=max(lengths) + 1)
    for stage in STAGES:
        setattr(g, stage, marked(getattr(g, stage), stage, record_function))
    g.mx.async_eval = marked(g.mx.async_eval, QUEUE, record_function)

    def run():
        tic = time.perf_counter()
        with FixedEditor():
            list(g.transcribe_stream(model, tokenizer, waveforms, **options))
        return time.perf_counter() - tic

    walls = [run(), run()]  # the first traces every shape and builds every kernel
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        with record_function("pass"):
            run()
    with tempfile.TemporaryDirectory() as folder:
        trace.export_chrome_trace(f"{folder}/trace.json")
        events = json.loads(Path(f"{folder}/trace.json").read_text())["traceEvents"]
    row = {"clips": args.clips, "seconds_audio": round(float(lengths.sum()), 1)}
    row.update(unprofiled_pass_ms=round(1000 * walls[1], 1), **analyze(events))
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
