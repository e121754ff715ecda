"""End-to-end speed of granite_nar.py, optionally beside mlx-audio's granite_speech_nar on the same weights.

    python benchmarks/bench.py --model DIR --seconds 5 25 60 --reps 5 [--hyp-tokens K] [--peer]
    python benchmarks/bench.py --model DIR --clips 256 --batch-sizes 1 8 32 128

DIR is a convert.py output (make a full-size one with make_random_checkpoint.py). Each case times
waveform -> text after a warm-up and prints one JSON line. Random weights make the encoder's
hypothesis length arbitrary, so it is computed (as in transcribe) and then replaced by K fixed
tokens (default round(2.8 x seconds), about the real model's rate). Per-stage seconds come from a
separate pass that evaluates after every stage.

peak_mem_gb is the process's: with --peer it includes mlx-audio's copy of the weights.

--clips N switches to throughput: N clips of LibriSpeech-like lengths, transcribed --batch-sizes at a time
(shortest first, as transcribe_stream does); one line per batch size with the real-time factor of a
second pass over all clips (and of the first, which traces each new shape) and its peak memory.

--peer also runs mlx-audio (pip install mlx-audio in a separate environment; it is not a
dependency of this project), converted to its layout in a temporary directory and cast to the
same dtype; it gets the same fixed hypothesis.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import granite_nar as g  # noqa: E402  (loads OpenBLAS before MLX)
from mlx_audio_layout import to_mlx_audio_dir  # noqa: E402
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

STAGES = ("log_mel", "encoder", "projector", "editor", "decode")


def synthetic_audio(seconds, seed=0):
    """Noise bursts at a syllable rate: deterministic, speech-like in level, 16 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * g.SAMPLE_RATE)) / g.SAMPLE_RATE
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    return (0.1 * envelope * rng.standard_normal(t.size)).astype(np.float32)


def ours(model, tokenizer, waveform, hypothesis):
    blank = model.args.blank_token_id
    bpe_logits, audio_embeds = model.encode(g.log_mel(waveform))
    g.ctc_collapse(mx.argmax(bpe_logits, axis=-1), blank)  # the hypothesis transcribe() would use
    text_logits = model.edit(audio_embeds, hypothesis)
    return tokenizer.decode(g.ctc_collapse(mx.argmax(text_logits, axis=-1), blank))


def ours_stages(model, tokenizer, waveform, hypothesis):
    """Seconds per stage, evaluating after each (encoder and projector compiled apart, as encode()
    compiles them together); the second of two passes, so no tracing is timed."""
    blank = model.args.blank_token_id
    encoder, projector = mx.compile(model.encoder), mx.compile(model.projector)
    for _ in range(2):
        seconds, tic = {}, time.perf_counter()

        def done(stage, *arrays):
            nonlocal tic
            mx.eval(*arrays)
            seconds[stage] = time.perf_counter() - tic
            tic = time.perf_counter()

        features = g.log_mel(waveform).astype(model.dtype)
        done("log_mel", features)
        hidden_states, bpe_logits = encoder(features[None])
        g.ctc_collapse(mx.argmax(bpe_logits[0], axis=-1), blank)
        done("encoder", *hidden_states)
        multilayer = mx.concatenate([hidden_states[i] for i in model.args.encoder_layer_indices], axis=-1)
        audio_embeds = projector(multilayer)[0, : features.shape[0] // model.args.projector.downsample_rate]
        audio_embeds = audio_embeds / model.args.editor.embedding_multiplier
        done("projector", audio_embeds)
        text_logits = model.edit(audio_embeds, hypothesis)
        done("editor", text_logits)
        tokenizer.decode(g.ctc_collapse(mx.argmax(text_logits, axis=-1), blank))
        done("decode")
    return seconds


def librispeech_like_lengths(n, seed=0):
    """n clip lengths in seconds, log-normal like LibriSpeech test-clean utterances: 2 to 35 s, mean ~7 s."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(5.5), 0.65, n), 2.0, 35.0).round(2)


def ours_batches(model, tokenizer, waveforms, batch_size):
    """transcribe_stream's work on these clips (shortest first, batch_size at a time), each clip's hypothesis
    replaced by round(2.8 x seconds) fixed tokens as in the batch-1 cases."""
    blank, W = model.args.blank_token_id, model.args.encoder.bpe_pooling_window
    rate = model.args.projector.downsample_rate
    order = sorted(range(len(waveforms)), key=lambda i: len(waveforms[i]))
    for start in range(0, len(order), batch_size):
        batch = [waveforms[i] for i in order[start : start + batch_size]]
        features, lengths = g.log_mel_batch(batch)
        bpe_logits, audio_embeds = model.encode_batch(features, lengths)
        best = np.array(mx.argmax(bpe_logits, axis=-1))
        [g.ctc_collapse(row[: -(-T // W)], blank) for row, T in zip(best, lengths)]  # the hypotheses transcribe would use
        hypotheses = [[1000 + 7 * i % 5000 for i in range(round(2.8 * len(w) / g.SAMPLE_RATE))] for w in batch]
        best = [mx.argmax(logits, axis=-1) for logits in model.edit_batch(audio_embeds, [T // rate for T in lengths], hypotheses)]
        mx.eval(best)
        [tokenizer.decode(g.ctc_collapse(ids, blank)) for ids in best]


def throughput(model, tokenizer, args, common):
    """One JSON line per batch size: the clips' audio seconds over the wall time of a pass over all of them."""
    lengths = librispeech_like_lengths(args.clips)
    waveforms = [synthetic_audio(seconds, seed=i) for i, seconds in enumerate(lengths)]
    for batch_size in args.batch_sizes:
        tic = time.perf_counter()
        ours_batches(model, tokenizer, waveforms, batch_size)  # first pass: traces each new shape
        first = time.perf_counter() - tic
        mx.reset_peak_memory()
        tic = time.perf_counter()
        ours_batches(model, tokenizer, waveforms, batch_size)
        wall = time.perf_counter() - tic
        row = {"impl": "granite_nar", **common, "mode": "throughput", "batch_size": batch_size, "clips": len(waveforms),
               "seconds_audio": round(float(lengths.sum()), 1), "mean_clip_s": round(float(lengths.mean()), 2),
               "wall_s": round(wall, 3), "rtf_x": round(float(lengths.sum()) / wall, 1),
               "first_pass_rtf_x": round(float(lengths.sum()) / first, 1), "peak_mem_gb": round(mx.get_peak_memory() / 1e9, 3)}  # fmt: skip
        print(json.dumps(row), flush=True)


def peer(model, waveform, hypothesis):
    """mlx-audio's Model._transcribe_tokens with its hypothesis replaced by ours (same calls otherwise)."""
    from mlx_audio.stt.models.granite_speech_nar.decoding import add_insertion_slots, ctc_collapse_decode
    from mlx_audio.stt.models.granite_speech_nar.granite_speech_nar import _compute_features

    cfg = model.config
    features = _compute_features(mx.array(waveform))[None].astype(mx.bfloat16)
    enc = model.encoder(features)
    ctc_collapse_decode(mx.argmax(enc.bpe_logits[0], axis=-1).astype(mx.int32), blank_id=cfg.blank_token_id)
    audio_embeds = model.projector(mx.concatenate(enc.hidden_states_for_projector, axis=-1))
    audio_embeds = audio_embeds / cfg.text.embedding_multiplier
    text_ids = add_insertion_slots(mx.array(hypothesis, dtype=mx.int32), blank_id=cfg.blank_token_id, min_len=cfg.min_edit_sequence_length)
    text_embeds = model.editor.embed_tokens(text_ids).astype(audio_embeds.dtype)
    embeds = mx.concatenate([audio_embeds[0], text_embeds], axis=0)[None]
    positions = mx.arange(embeds.shape[1], dtype=mx.int32)
    logits = model.editor(inputs_embeds=embeds, position_ids=positions, logits_start=audio_embeds.shape[1])
    ids = ctc_collapse_decode(mx.argmax(logits[0], axis=-1).astype(mx.int32), blank_id=cfg.blank_token_id)
    return model._tokenizer.decode([int(t) for t in ids.tolist()], skip_special_tokens=True)


def measure(run, reps):
    run()  # warm-up: kernels, compilation, allocator
    mx.reset_peak_memory()
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        run()
        times.append(time.perf_counter() - tic)
    return statistics.median(times), mx.get_peak_memory() / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="convert.py output directory")
    parser.add_argument("--seconds", type=float, nargs="+", default=[5.0, 25.0], help="clip lengths")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per case (median reported)")
    parser.add_argument("--hyp-tokens", type=int, help="hypothesis length (default: round(2.8 x seconds))")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype (default: granite_nar's)")
    parser.add_argument("--peer", action="store_true", help="also time mlx-audio on the same weights")
    parser.add_argument("--clips", type=int, help="time throughput instead, over this many LibriSpeech-like clips (2-35 s, mean ~7 s)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128], help="throughput: the batch sizes to time")
    args = parser.parse_args()

    model, tokenizer = g.load(args.model, getattr(mx, args.dtype) if args.dtype else None)
    weights_gb = round(mx.get_active_memory() / 1e9, 3)  # peak_mem_gb - weights_gb = activations (without --peer)
    quantization = json.loads((args.model / "config.json").read_text()).get("quantization")
    common = {
        "backend": "gpu" if mx.default_device() == mx.gpu else "cpu",
        "dtype": str(model.dtype).split(".")[-1],
        "bits": quantization["bits"] if quantization else None,
        "weights_gb": weights_gb,
    }
    if args.clips:
        return throughput(model, tokenizer, args, common)
    if args.peer:
        from mlx_audio.stt import load as peer_load

        peer_dir = Path(tempfile.mkdtemp(prefix="mlx_audio_layout_"))
        to_mlx_audio_dir(args.model, peer_dir, model.dtype)
        peer_model = peer_load(str(peer_dir))

    for seconds in args.seconds:
        waveform = synthetic_audio(seconds)
        n_tokens = args.hyp_tokens if args.hyp_tokens is not None else round(2.8 * seconds)
        hypothesis = [1000 + 7 * i % 5000 for i in range(n_tokens)]
        case = {**common, "seconds_audio": seconds, "hyp_tokens": n_tokens}
        runs = {"granite_nar": lambda: ours(model, tokenizer, waveform, hypothesis)}
        if args.peer:
            runs["mlx-audio"] = lambda: peer(peer_model, waveform, hypothesis)
        for impl, run in runs.items():
            median, peak = measure(run, args.reps)
            row = {"impl": impl, **case, "median_s": round(median, 4), "rtf_x": round(seconds / median, 1), "peak_mem_gb": round(peak, 3)}
            if impl == "granite_nar":
                row["stages_s"] = {k: round(v, 4) for k, v in ours_stages(model, tokenizer, waveform, hypothesis).items()}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
