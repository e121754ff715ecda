"""Speed of granite_nar.py, optionally beside mlx-audio's granite_speech_nar on the same weights.

    python benchmarks/bench.py --model DIR --seconds 5 24.9 60 --reps 10 [--peer]
    python benchmarks/bench.py --model DIR --clips 1024 --batch-sizes 32 128

DIR is a convert.py output (make a full-size one with make_random_checkpoint.py). One JSON line
per case; `speed` is audio seconds per processing second (x real time).

Batch 1 (--seconds): waveform -> text (g.transcribe_waveforms) after a warm-up, median of --reps.
Random weights make the encoder's hypothesis arbitrary, so it is computed and then replaced by K
fixed tokens (default round(2.8 x seconds), about the real model's rate). `stages_ms` comes from
a separate pass that waits after every stage. --peer also runs mlx-audio (pip install mlx-audio;
not a dependency of this project) on the same weights in its layout, cast to the same dtype, with
the same hypothesis: beside granite_nar, the two taking turns rep by rep, where both fit in half
the memory ("beside": true), else alone once granite_nar's weights are freed.

Throughput (--clips N): g.transcribe_stream over N clips of LibriSpeech-like lengths (2-35 s,
mean ~7 s, each one window), batches of at most --batch-sizes clips and --batch-seconds of
padded audio, with fixed hypotheses; the speed of a second pass over all clips (the first also
traces each new shape), the peak memory, and a third pass that waits after each stage.
--clip-seconds S makes every clip S s long: at 8 s (400 frames, two attention blocks) a batch
carries no padding, the bound that padding work can approach.

--word-timestamps adds word timestamps (g.word_times: ctc_align of the fixed hypotheses on the
batch's BPE CTC logits): stages `word_timestamps` (their log-softmax columns, on the device) and
`alignment` (ctc_align and words, on the host: in transcribe_stream a thread beside the rest) in
stages_ms, at batch 1 the median of passes with them (`median_ms_word_timestamps`, taking turns
with the others), and throughput rows with them.

Live (--live S): g.transcribe_live over S s of audio fed at real-time pace (see live()).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import granite_nar as g  # noqa: E402  (first: it loads OpenBLAS before MLX)

# isort: split
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from clips import fixed_hypothesis, librispeech_like_lengths, synthetic_audio  # noqa: E402
from mlx_audio_layout import to_mlx_audio_dir  # noqa: E402


def ours(model, tokenizer, waveforms, n_tokens=None, timed=False, times=None):
    """g.transcribe_waveforms over one batch (with word timestamps if timed), its editor reading
    fixed hypotheses (FixedEditor); with `times`, waiting after each stage."""
    with FixedEditor(times, n_tokens):
        return g.transcribe_waveforms(model, tokenizer, waveforms, word_timestamps=timed)


def stages_ms(model, tokenizer, waveforms, n_tokens, timed, passes=2):
    """Milliseconds per stage of a batch (the last of `passes`: the first warms up), waiting for
    the device after each (FixedEditor); "rest" is the remainder (CTC collapse, decoding)."""
    for _ in range(passes):
        times, tic = {}, time.perf_counter()
        ours(model, tokenizer, waveforms, n_tokens, timed, times)
        times["rest"] = time.perf_counter() - tic - sum(times.values())
    return {stage: round(1000 * t, 2) for stage, t in times.items()}


def peer(model, waveform, hypothesis):
    """mlx-audio's Model._transcribe_tokens with its hypothesis replaced (its calls otherwise)."""
    from mlx_audio.stt.models.granite_speech_nar.decoding import (
        add_insertion_slots,
        ctc_collapse_decode,
    )
    from mlx_audio.stt.models.granite_speech_nar.granite_speech_nar import _compute_features

    cfg = model.config
    features = _compute_features(mx.array(waveform))[None].astype(mx.bfloat16)
    enc = model.encoder(features)
    ctc_collapse_decode(
        mx.argmax(enc.bpe_logits[0], axis=-1).astype(mx.int32), blank_id=cfg.blank_token_id
    )
    audio_embeds = model.projector(mx.concatenate(enc.hidden_states_for_projector, axis=-1))
    audio_embeds = audio_embeds / cfg.text.embedding_multiplier
    hyp = mx.array(hypothesis, dtype=mx.int32)
    text_ids = add_insertion_slots(
        hyp, blank_id=cfg.blank_token_id, min_len=cfg.min_edit_sequence_length
    )
    text_embeds = model.editor.embed_tokens(text_ids).astype(audio_embeds.dtype)
    embeds = mx.concatenate([audio_embeds[0], text_embeds], axis=0)[None]
    positions = mx.arange(embeds.shape[1], dtype=mx.int32)
    logits = model.editor(
        inputs_embeds=embeds, position_ids=positions, logits_start=audio_embeds.shape[1]
    )
    ids = ctc_collapse_decode(
        mx.argmax(logits[0], axis=-1).astype(mx.int32), blank_id=cfg.blank_token_id
    )
    return model._tokenizer.decode([int(t) for t in ids.tolist()], skip_special_tokens=True)


def measure(runs, reps):
    """{name: run} -> {name: (median seconds, peak GB)}: a warm-up of each, then `reps` rounds in
    which the runs take turns, so that each sees the machine as the others do."""
    for run in runs.values():
        run()  # kernels, compilation, allocator
    times, peaks = {name: [] for name in runs}, dict.fromkeys(runs, 0.0)
    for _ in range(reps):
        for name, run in runs.items():
            mx.reset_peak_memory()
            tic = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - tic)
            peaks[name] = max(peaks[name], mx.get_peak_memory() / 1e9)
    return {name: (statistics.median(t), peaks[name]) for name, t in times.items()}


STAGES = {"stft_input": "prepare", "encode_batch": "encode", "edit_pass": "edit"}
STAGES.update(token_log_probs="word_timestamps", word_times="alignment")
THREADS = ("prepare", "alignment")  # transcribe_stream's stages run in threads beside the rest


class FixedEditor:
    """Within it, g.edit_pass edits fixed hypotheses of round(2.8 x seconds) tokens (or n_tokens)
    instead of the encoder's, and returns as the editor's tokens their own slots (which collapse
    back to them) once its pass is done: random weights make the edited ids arbitrary, so the
    next steps, decoding and word timestamps read the fixed hypotheses. With `times`, each stage
    of g.transcribe_waveforms (STAGES) also waits for the device and adds its seconds there, and
    the stages run one at a time but for THREADS."""

    def __init__(self, times=None, n_tokens=None):
        self.times, self.n_tokens = times, n_tokens
        self.functions = {name: getattr(g, name) for name in STAGES}

    def __enter__(self):
        for name in STAGES if self.times is not None else ["edit_pass"]:
            setattr(g, name, self.wrap(name))

    def __exit__(self, *exc):
        for name, function in self.functions.items():
            setattr(g, name, function)

    def wrap(self, name):
        def run(*args):
            tic = time.perf_counter()
            if name == "edit_pass":  # an encoder row is 0.1 s of audio
                model, audio_embeds, audio_lengths, _, step = args
                vocab, blank = model.args.editor.vocab_size, model.args.blank_token_id
                fixed = [
                    fixed_hypothesis(n / 10, self.n_tokens, vocab) for n in audio_lengths.tolist()
                ]
                inputs = model, audio_embeds, audio_lengths, fixed, step
                tokens, slots = self.functions[name](*inputs)
                own = g.slot_batch(fixed, blank, model.args.min_edit_sequence_length, step)[0]
                result = mx.depends(own, tokens), slots
                mx.async_eval(result[0])  # queued here: another thread reads it
            else:
                result = self.functions[name](*args)
            if self.times is not None:
                outputs = result if isinstance(result, tuple) else (result,)
                outputs = vars(result).values() if isinstance(result, g.Encoded) else outputs
                mx.eval([x for x in outputs if isinstance(x, mx.array)])
                stage = STAGES[name]
                self.times[stage] = self.times.get(stage, 0) + time.perf_counter() - tic
            return result

        return run


def throughput(model, tokenizer, args, common):
    """g.transcribe_stream over the clips as arrays, with fixed hypotheses (FixedEditor)."""
    if args.clip_seconds:  # every clip as long: no padding at 8 s, two attention blocks
        lengths = np.full(args.clips, args.clip_seconds)
    else:
        lengths = librispeech_like_lengths(args.clips)
    waveforms = [synthetic_audio(seconds, seed=i) for i, seconds in enumerate(lengths)]
    seconds = float(lengths.sum())
    sizes = [(b, s) for b in args.batch_sizes for s in args.batch_seconds]
    cases = [(*size, False) for size in sizes]
    cases += [(*size, True) for size in sizes if args.word_timestamps]
    for batch_size, batch_seconds, timed in cases:
        options = dict(
            batch_size=batch_size,
            chunk_seconds=max(lengths) + 1,
            word_timestamps=timed,
            batch_seconds=batch_seconds,
        )
        walls = []
        for _ in range(2):  # the first pass also traces each new shape
            mx.reset_peak_memory()
            tic = time.perf_counter()
            with FixedEditor():
                list(g.transcribe_stream(model, tokenizer, waveforms, **options))
            walls.append(time.perf_counter() - tic)
        peak = mx.get_peak_memory() / 1e9
        times = {}  # a third pass, waiting after each stage: where the time goes
        tic = time.perf_counter()
        with FixedEditor(times):
            list(g.transcribe_stream(model, tokenizer, waveforms, **options))
        # the rest: decoding, batching, and waiting for the threads, which prepare the next batch
        # (reading, padding, copying to the device) and align word times during this one
        busy = sum(t for stage, t in times.items() if stage not in THREADS)
        times["rest"] = time.perf_counter() - tic - busy
        row = {
            "impl": "granite_nar",
            **common,
            "word_timestamps": timed,
            "batch_size": batch_size,
            "batch_seconds": batch_seconds,
            "clips": args.clips,
            "clip_seconds": args.clip_seconds,
            "seconds_audio": round(seconds, 1),
            "wall_s": round(walls[1], 4),  # a GPU pass over a few clips: tens of ms
            "speed": round(seconds / walls[1], 1),
            "first_pass_speed": round(seconds / walls[0], 1),
            "peak_mem_gb": round(peak, 3),
            "stages_ms": {stage: round(1000 * t, 1) for stage, t in times.items()},
        }
        print(json.dumps(row), flush=True)


def live(model, tokenizer, args, common):
    """g.transcribe_live over --live seconds of audio fed at real-time pace in 0.1 s blocks,
    with fixed hypotheses (FixedEditor). A final's delay runs from the arrival of the sample that
    lets its cut be decided (window_cut: the search range and a frame after it) to the event, a
    partial's from the arrival of its newest sample; skipped: the partials a pass that always
    kept up would have made (one per update_seconds of each window) that did not come."""
    x, block = synthetic_audio(args.live, seed=0), g.SAMPLE_RATE // 10
    arrivals = []  # the time each block was handed over

    def paced():
        start = time.perf_counter()
        for i in range(0, len(x), block):
            time.sleep(max(0.0, start + i / g.SAMPLE_RATE - time.perf_counter()))
            arrivals.append(time.perf_counter())
            yield x[i : i + block]

    arrived = lambda seconds: arrivals[min(len(arrivals), -(-round(seconds * 10))) - 1]
    delays, expected = {True: [], False: []}, 0
    margin = min(g.CUT_SEARCH_SECONDS, args.chunk_seconds / 4) + 0.02  # window_cut's reach
    options = dict(chunk_seconds=args.chunk_seconds, update_seconds=args.update_seconds)
    with FixedEditor():
        for event in g.transcribe_live(model, tokenizer, paced(), **options):
            now, decided = time.perf_counter(), event.start + args.chunk_seconds + margin
            newest = min(decided, args.live) if event.final else event.end
            delays[event.final].append(now - arrived(newest))
            if event.final:  # the partials of a window whose passes all kept up
                opened = min(decided, args.live) - event.start
                expected += int(opened / args.update_seconds)
    ms = lambda values, q: round(1000 * float(np.percentile(values, q)), 1) if values else None
    row = {"impl": "granite_nar", **common, "live": True, "seconds_audio": args.live}
    row.update(chunk_seconds=args.chunk_seconds, update_seconds=args.update_seconds)
    row.update(finals=len(delays[True]), partials=len(delays[False]))
    row["final_delay_ms"] = {"p50": ms(delays[True], 50), "p95": ms(delays[True], 95)}
    row["partial_delay_ms"] = {"p50": ms(delays[False], 50), "p95": ms(delays[False], 95)}
    row["partials_skipped"] = round(max(0.0, 1 - len(delays[False]) / max(1, expected)), 3)
    print(json.dumps(row), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--model", type=Path, required=True, help="convert.py output directory")
    add("--seconds", type=float, nargs="+", default=[5.0, 24.9], help="clip lengths, batch 1")
    add("--reps", type=int, default=5, help="timed repetitions per case (median reported)")
    add("--hyp-tokens", type=int, help="hypothesis length (default: round(2.8 x seconds))")
    add(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="compute dtype (default: granite_nar's)",
    )
    add(
        "--keep-quantized",
        action="store_true",
        help="keep quantized layers quantized (g.load(..., dequantize=False))",
    )
    add("--peer", action="store_true", help="also time mlx-audio on the same weights")
    add("--clips", type=int, help="time throughput instead, over this many LibriSpeech-like clips")
    add("--batch-sizes", type=int, nargs="+", default=[32, 128], help="throughput: batch sizes")
    add("--clip-seconds", type=float, help="throughput: every clip this long (default: 2 to 35 s)")
    add(
        "--batch-seconds",
        type=float,
        nargs="+",
        default=[g.BATCH_SECONDS],
        help="throughput: padded audio in a batch, at most (each with each size)",
    )
    add("--word-timestamps", action="store_true", help="also time word timestamps (ctc_align)")
    add("--live", type=float, metavar="S", help="time transcribe_live instead, on S s of audio")
    add("--chunk-seconds", type=float, default=g.CHUNK_SECONDS, help="--live: window length")
    add("--update-seconds", type=float, default=1.0, help="--live: audio between partials")
    args = parser.parse_args()

    dtype = getattr(mx, args.dtype) if args.dtype else None
    model, tokenizer = g.load(args.model, dtype, dequantize=False if args.keep_quantized else None)
    quantization = json.loads((args.model / "config.json").read_text()).get("quantization")
    common = {
        "backend": "gpu" if mx.default_device() == mx.gpu else "cpu",
        "dtype": str(model.dtype).split(".")[-1],
        "bits": quantization["bits"] if quantization else None,
        "dequantized": bool(quantization)
        and not any(isinstance(m, nn.QuantizedLinear) for m in model.modules()),
        "weights_gb": round(mx.get_active_memory() / 1e9, 3),
    }
    if args.clips:
        return throughput(model, tokenizer, args, common)
    if args.live:
        return live(model, tokenizer, args, common)
    vocab, timed = model.args.editor.vocab_size, args.word_timestamps
    cases = [
        (seconds, synthetic_audio(seconds), fixed_hypothesis(seconds, args.hyp_tokens, vocab))
        for seconds in args.seconds
    ]
    stages = {}  # first, alone in memory: the stage passes, which wait after each stage
    for seconds, waveform, _ in cases:
        stages[seconds] = stages_ms(model, tokenizer, [waveform], args.hyp_tokens, timed)
    # mlx-audio runs beside granite_nar, taking turns, where two copies of the weights fit in
    # half the memory; otherwise alone, after (two float32 copies do not fit a 24 GB machine)
    beside = args.peer and 4 * common["weights_gb"] * 1e9 < memory_bytes()
    peer_model, peer_gb = load_peer(args.model, common["dtype"]) if beside else (None, 0.0)
    for seconds, waveform, hypothesis in cases:
        runs = {"granite_nar": lambda: ours(model, tokenizer, [waveform], args.hyp_tokens)}
        if timed:
            runs["word_timestamps"] = lambda: ours(
                model, tokenizer, [waveform], args.hyp_tokens, timed=True
            )
        if peer_model:
            runs["mlx-audio"] = lambda: peer(peer_model, waveform, hypothesis)
        measured = measure(runs, args.reps)
        row = latency_row("granite_nar", common, seconds, hypothesis, *measured["granite_nar"])
        row["peak_mem_gb"] = round(row["peak_mem_gb"] - peer_gb, 3)  # less mlx-audio's weights
        if timed:  # the whole pass again, with word timestamps
            row["median_ms_word_timestamps"] = round(1000 * measured["word_timestamps"][0], 2)
        print(json.dumps({**row, "stages_ms": stages[seconds]}), flush=True)
        if peer_model:
            row = latency_row("mlx-audio", common, seconds, hypothesis, *measured["mlx-audio"])
            row["peak_mem_gb"] = round(row["peak_mem_gb"] - common["weights_gb"], 3)
            print(json.dumps({**row, "beside": True}), flush=True)
    if args.peer and not beside:  # alone in memory: granite_nar's weights go first
        del model, runs
        mx.clear_cache()
        peer_model = load_peer(args.model, common["dtype"])[0]
        for seconds, waveform, hypothesis in cases:
            measured = measure(
                {"mlx-audio": lambda: peer(peer_model, waveform, hypothesis)}, args.reps
            )
            row = latency_row("mlx-audio", common, seconds, hypothesis, *measured["mlx-audio"])
            print(json.dumps({**row, "beside": False}), flush=True)


def memory_bytes():
    """The device's memory (a GPU's own; the machine's RAM for the CPU or unified memory)."""
    size = mx.device_info().get("memory_size")
    return size or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def load_peer(model_dir, dtype):
    """mlx-audio's model on the same weights, in its layout and the same dtype, and its GB."""
    from mlx_audio.stt import load as peer_load

    before = mx.get_active_memory()
    with tempfile.TemporaryDirectory(prefix="mlx_audio_layout_") as peer_dir:
        to_mlx_audio_dir(model_dir, Path(peer_dir), getattr(mx, dtype))
        peer_model = peer_load(peer_dir)
        mx.eval(peer_model.parameters())  # read before the directory goes
    return peer_model, (mx.get_active_memory() - before) / 1e9


def latency_row(impl, common, seconds, hypothesis, median, peak):
    return {
        "impl": impl,
        **common,
        "seconds_audio": seconds,
        "hyp_tokens": len(hypothesis),
        "median_ms": round(1000 * median, 2),
        "speed": round(seconds / median, 1),
        "peak_mem_gb": round(peak, 3),
    }


if __name__ == "__main__":
    main()
