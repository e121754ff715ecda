"""Where a batch's time goes on the GPU: B clips of 7 s (the LibriSpeech-like mean), each pass timed alone.

    python benchmarks/profile_batch.py FULL_SIZE_MODEL_DIR [B ...]
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


def ms(run, reps=5):
    mx.eval(run())
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        mx.eval(run())
        times.append(time.perf_counter() - tic)
    return round(1e3 * statistics.median(times), 1)


def main():
    model, _ = g.load(sys.argv[1])
    encoder = mx.compile(lambda f: model.encoder(f)[0][-1])  # hidden states only: no BPE head
    for B in map(int, sys.argv[2:] or ["32", "128"]):
        clips = [synthetic_audio(7.0, seed=i) for i in range(B)]
        features, lengths = g.log_mel_batch(clips)
        bpe_logits, audio_embeds = model.encode_batch(features, lengths)
        rate = model.args.projector.downsample_rate
        hypotheses = [[1000 + 7 * i % 5000 for i in range(20)] for _ in range(B)]
        row = {
            "batch": B, "seconds_audio": 7.0 * B,
            "log_mel_ms": ms(lambda: g.log_mel_batch(clips)[0]),
            "encoder_layers_ms": ms(lambda: encoder(features.astype(model.dtype))),
            "encode_ms": ms(lambda: model.encode_batch(features, lengths)),
            "bpe_argmax_ms": ms(lambda: mx.argmax(model.encode_batch(features, lengths)[0], axis=-1)),
            "edit_ms": ms(lambda: model.edit_batch(audio_embeds, [T // rate for T in lengths], hypotheses)),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
