"""End-to-end speed of granite_nar.py, optionally beside mlx-audio's granite_speech_nar on the same weights.

    python benchmarks/bench.py --model DIR --seconds 5 25 60 --reps 5 [--hyp-tokens K] [--peer]

DIR is a convert.py output (make a full-size one with make_random_checkpoint.py). Each case times
waveform -> text after a warm-up and prints one JSON line. Random weights make the encoder's
hypothesis length arbitrary, so it is computed (as in transcribe) and then replaced by K fixed
tokens (default round(2.8 x seconds), about the real model's rate). Per-stage seconds come from a
separate pass that evaluates after every stage.

peak_mem_gb is the process's: with --peer it includes mlx-audio's copy of the weights.

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
