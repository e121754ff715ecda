"""The measurements behind two GPU choices in granite_nar.py, one JSON line each:

- the depthwise convolution runs as MLX's grouped conv there, not as 15 shifted multiply-adds (the CPU's way);
- encoder frames are padded to whole attention blocks (context_size), not to whole seconds or not at all.

Encode passes are timed at batch 1 (5 and 24.9 s) and at batch 128 over the shortest and the longest 128 of
1024 LibriSpeech-like clips (the first and last batches of bench.py --clips 1024 --batch-sizes 128).

    python benchmarks/gpu_choices.py FULL_SIZE_MODEL_DIR
"""
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import granite_nar as g  # noqa: E402  (loads OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
from bench import librispeech_like_lengths, synthetic_audio  # noqa: E402
from gpu_overhead import split_times  # noqa: E402


def depthwise(batch, frames, channels=2048, K=15):
    x = mx.random.normal((batch, frames, channels)).astype(mx.bfloat16)
    w = mx.random.normal((channels, K, 1)).astype(mx.bfloat16)
    grouped = lambda: mx.conv_general(x, w, padding=([K // 2], [K // 2]), groups=channels)  # noqa: E731
    shifted = lambda: g._shifted_sum(mx.pad(x, [(0, 0), (K // 2, K // 2), (0, 0)]), w)  # noqa: E731
    return {"test": "depthwise_conv", "batch": batch, "frames": frames,
            "grouped_conv_ms": split_times(grouped)[1], "shifted_sum_ms": split_times(shifted)[1]}  # fmt: skip


def frame_padding(model, name, lengths):
    """Encode one batch with frames padded to whole blocks (as granite_nar does), whole seconds, or not at all."""
    features, T = g.log_mel_batch([synthetic_audio(s, seed=i) for i, s in enumerate(lengths)])
    block, gpu_step = model.args.encoder.context_size, g._step
    row = {"test": "frame_padding", "batch": name, "clips": len(lengths), "longest_s": float(max(lengths))}
    for label, step in (("block", block), ("second", g.SAMPLE_RATE // g.SAMPLES_PER_FRAME), ("none", 1)):
        g._step = lambda s, step=step: step if s == block else gpu_step(s)  # encode_batch's frame step, replaced
        row[f"{label}_ms"] = split_times(lambda: model.encode_batch(features, T), reps=5)[1]
    g._step = gpu_step
    return row


def main():
    model, _ = g.load(sys.argv[1])
    for batch, frames in ((1, 1400), (128, 200), (128, 1800)):
        print(json.dumps(depthwise(batch, frames)), flush=True)
    clips = sorted(librispeech_like_lengths(1024))
    for name, lengths in (("5 s", [5.0]), ("24.9 s", [24.9]), ("shortest 128", clips[:128]), ("longest 128", clips[-128:])):
        print(json.dumps(frame_padding(model, name, lengths)), flush=True)


if __name__ == "__main__":
    main()
