"""Audio input, long-form windows, iterative editing and the command line of granite_nar.py.

The model is the dev fixture (tests/fixtures/dev, random weights): transcripts are gibberish, so
transcription is checked against this module's own single-window, single-step path, which
test_granite_nar.py checks against the upstream reference.
"""

import json
import os
import subprocess
import sys
import threading
import wave
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import granite_nar as g  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "dev"
AUDIO, AUDIO_SHORT = FIXTURE / "audio.wav", FIXTURE / "audio_short.wav"
GOLDEN_TEXT = json.loads((FIXTURE / "golden.json").read_text())["decoded_text"]
SR = g.SAMPLE_RATE


def _sine(freq, rate, seconds, amplitude=0.5):
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate)).astype(
        np.float32
    )


def _interior(y):
    return y[len(y) // 10 : -len(y) // 10]  # away from the zero padding at both ends


# ---- resampling ----

RATES = [
    8000,
    11025,
    12000,
    22050,
    24000,
    32000,
    44100,
    48000,
    96000,
    7919,
]  # 7919 Hz: prime, no small ratio


def _file_audio(x, rate, tmp_path):
    """x written as a float WAV at rate and read back: the streamed path, READ_SECONDS a block."""
    sf.write(tmp_path / "x.wav", x, rate, subtype="FLOAT")
    return g.load_audio(tmp_path / "x.wav")


@pytest.mark.parametrize("rate", RATES)
def test_resampling_keeps_frequency_and_amplitude(rate):
    # Up to 0.44 of the lower rate a sine comes out as the same sine at the output times, phase
    # included (no delay): gain error, ripple, images and aliases stay below -60 dB.
    for freq in (100, 440, 2500, 0.44 * min(rate, SR)):
        y = g.load_audio(_sine(freq, rate, 2.0), sample_rate=rate)
        assert len(y) == round(2 * SR)
        error = _interior(y - _sine(freq, SR, len(y) / SR))
        assert np.abs(error).max() < 1e-3 * 0.5, (rate, freq)


@pytest.mark.parametrize("rate", [22050, 44100, 44056, 48000, 96000])
def test_resampling_rejects_energy_above_8khz(rate):
    # Above 8 kHz nothing may alias into the 16 kHz output (>= 80 dB down).
    for freq in np.linspace(8200, rate / 2 - 50, 12):
        y = g.load_audio(_sine(freq, rate, 1.0), sample_rate=rate)
        rms = np.sqrt(np.mean(_interior(y) ** 2))
        assert rms < 1e-4 * 0.5 / np.sqrt(2), (rate, freq, 20 * np.log10(rms / (0.5 / np.sqrt(2))))


def test_resampling_below_16khz_adds_no_images():
    # Upsampling 8 kHz: the output holds nothing between 4 and 8 kHz (the images of the input band).
    x = _sine(3000, 8000, 4.0) + _sine(3500, 8000, 4.0)
    y = _interior(g.load_audio(x, sample_rate=8000))
    spectrum = np.abs(np.fft.rfft(y * np.kaiser(len(y), 14))) ** 2
    freqs = np.fft.rfftfreq(len(y), 1 / SR)
    assert spectrum[freqs > 4100].sum() < 1e-8 * spectrum.sum()


@pytest.mark.parametrize("rate", [11025, 44100, 44056])
def test_files_resample_block_by_block_as_a_whole(rate, tmp_path):
    # A file is read and resampled READ_SECONDS at a time: the same samples as the whole at once.
    x = np.random.default_rng(0).uniform(-0.5, 0.5, 25 * rate + 17).astype(np.float32)
    streamed = _file_audio(x, rate, tmp_path)
    np.testing.assert_allclose(streamed, g.load_audio(x, sample_rate=rate), atol=1e-6)
    assert len(streamed) == round(len(x) * SR / rate)


# ---- reading files and arrays ----


def test_formats_rates_and_channels(tmp_path):
    # Every format this libsndfile writes comes back as the same 16 kHz mono signal; channels are
    # averaged.
    left, right = _sine(440, 44100, 1.5, 0.6), _sine(440, 44100, 1.5, 0.2)
    expected = _sine(440, SR, 1.5, 0.4)
    for name, fmt in [("a.wav", "WAV"), ("a.flac", "FLAC"), ("a.ogg", "OGG"), ("a.mp3", "MP3")]:
        if fmt not in sf.available_formats():
            continue
        sf.write(tmp_path / name, np.stack([left, right], axis=1), 44100)
        audio = g.load_audio(tmp_path / name)
        assert audio.dtype == np.float32 and audio.ndim == 1
        if fmt in ("WAV", "FLAC"):  # lossless: PCM16 rounding only
            assert len(audio) == len(expected)
            assert np.abs(_interior(audio - expected)).max() < 1e-3, name
        else:  # lossy codecs delay and pad: compare the level and the dominant frequency
            assert abs(len(audio) / SR - 1.5) < 0.1, name
            assert abs(np.sqrt(np.mean(_interior(audio) ** 2)) - 0.4 / np.sqrt(2)) < 0.02, name
            spectrum = np.abs(np.fft.rfft(_interior(audio)))
            assert (
                abs(np.fft.rfftfreq(len(_interior(audio)), 1 / SR)[spectrum.argmax()] - 440) < 5
            ), name


def test_arrays_with_rate_and_channels():
    stereo = np.stack(
        [_sine(440, 48000, 1.0, 0.6), _sine(440, 48000, 1.0, 0.2)], axis=1
    )  # (n, channels)
    np.testing.assert_allclose(
        g.load_audio(stereo, sample_rate=48000), g.load_audio(stereo.mean(axis=1), 48000), atol=1e-6
    )
    three = np.stack([np.full(SR, 0.1), np.full(SR, 0.2), np.full(SR, 0.6)], axis=1)
    np.testing.assert_allclose(g.load_audio(three), np.full(SR, 0.3), rtol=1e-6)
    assert len(g.load_audio(_sine(440, 22050, 1.0), sample_rate=22050)) == SR
    waveform = np.random.default_rng(1).standard_normal(SR).astype(np.float32)
    assert np.array_equal(g.load_audio(waveform), waveform)  # 16 kHz mono passes untouched
    pcm, _ = sf.read(AUDIO, dtype="int16")  # integer PCM is scaled as a file's samples are
    assert np.array_equal(g.load_audio(pcm), g.load_audio(AUDIO))


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.flac"):
        g.load_audio(tmp_path / "nope.flac")
    (tmp_path / "notes.m4a").write_text("not audio")
    m4a = str(tmp_path / "notes.m4a")
    with pytest.raises(ValueError, match=rf"notes.m4a: cannot read .* ffmpeg -i {m4a} notes.wav"):
        g.load_audio(m4a)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF not really a wav file")
    with pytest.raises(ValueError, match="corrupt.wav: cannot read") as error:
        g.load_audio(tmp_path / "corrupt.wav")
    assert "ffmpeg" not in str(error.value)  # converting a .wav to a .wav would not help
    (tmp_path / "zero.wav").write_bytes(b"")
    with pytest.raises(ValueError, match=r"zero.wav: the file is empty \(0 bytes\)"):
        g.load_audio(tmp_path / "zero.wav")
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), SR)
    with pytest.raises(ValueError, match="empty.wav: audio is empty"):
        g.load_audio(tmp_path / "empty.wav")
    bad = np.zeros(3 * SR, np.float32)
    bad[SR + SR // 4] = np.inf
    sf.write(tmp_path / "inf.wav", bad, SR, subtype="FLOAT")
    with pytest.raises(ValueError, match="inf.wav: NaN or infinite samples at 1.25 s"):
        g.load_audio(tmp_path / "inf.wav")
    with pytest.raises(ValueError, match="NaN or infinite samples at 0.50 s"):
        g.load_audio(np.concatenate([np.zeros(SR // 2), [np.nan]]))
    with pytest.raises(ValueError, match="empty"):
        g.load_audio(np.zeros(0))
    with pytest.raises(ValueError, match=r"got shape \(2, 16000\)"):
        g.load_audio(np.zeros((2, SR)))  # (channels, n_samples): transposed
    for rate in (44100.5, "16000", float("inf"), 0):
        with pytest.raises(ValueError, match="sample_rate must be a positive whole number"):
            g.load_audio(np.zeros(SR), sample_rate=rate)
    with pytest.raises(ValueError, match="sample_rate is for arrays"):
        g.load_audio(AUDIO, sample_rate=SR)
    with pytest.raises(ValueError, match="expected a file path, a file object or a waveform"):
        g.load_audio({"not": "audio"})


def test_uint8_file_objects_and_truncated_files(tmp_path):
    x = g.load_audio(AUDIO)
    sf.write(tmp_path / "u8.wav", x, SR, subtype="PCM_U8")
    with wave.open(str(tmp_path / "u8.wav")) as f:  # its samples as scipy.io.wavfile gives them
        pcm8 = np.frombuffer(f.readframes(f.getnframes()), np.uint8)
    np.testing.assert_array_equal(g.load_audio(pcm8), g.load_audio(tmp_path / "u8.wav"))
    with open(AUDIO, "rb") as f:  # a file object reads as its file does
        np.testing.assert_array_equal(g.load_audio(f), x)
    data = AUDIO.read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 8])  # the header still says 3.43 s
    with pytest.warns(
        UserWarning, match=r"cut.wav: truncated: its header says 3.43 s, but only 0.4\d s"
    ):
        cut = g.load_audio(tmp_path / "cut.wav")
    np.testing.assert_array_equal(cut, x[: len(cut)])


def test_short_and_silent_audio_give_empty_text(loaded):
    model, tokenizer = loaded
    assert g.transcribe(model, tokenizer, np.full(SR // 10 - 1, 0.5, np.float32)) == ""  # < 0.1 s
    assert g.transcribe(model, tokenizer, np.zeros(5 * SR, np.float32)) == ""
    assert g.transcribe(model, tokenizer, np.full(5 * SR, 5e-5, np.float32), chunk_seconds=2) == ""


def test_audio_that_resamples_to_nothing(loaded, model_dir, tmp_path):
    # One sample at 44.1 kHz is no sample at 16 kHz: an empty transcript, in the API and the CLI.
    model, tokenizer = loaded
    assert g.transcribe(model, tokenizer, np.full(1, 0.5, np.float32), sample_rate=44100) == ""
    sf.write(tmp_path / "one.wav", np.full(1, 0.5, np.float32), 44100)
    assert g.transcribe(model, tokenizer, tmp_path / "one.wav", word_timestamps=True) == {
        "text": "",
        "segments": [],
    }
    result = _run(tmp_path / "one.wav", "--model", model_dir, "--output-format", "json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["text"] == "" and record["audio_seconds"] == record["speed"] == 0


# ---- long-form windows ----


def _noise_with_gaps(seconds, gaps, seed=0):
    """Loud noise with 0.2 s silences starting at `gaps` (seconds)."""
    x = (0.3 * np.random.default_rng(seed).standard_normal(round(seconds * SR))).astype(np.float32)
    for start in gaps:
        x[round(start * SR) : round((start + 0.2) * SR)] = 0
    return x


def _windows(x, chunk_seconds=g.CHUNK_SECONDS, block=SR):
    return list(g.split_windows((x[i : i + block] for i in range(0, len(x), block)), chunk_seconds))


def test_cuts_land_in_quiet_gaps():
    gaps = [27.0, 60.5, 93.0, 121.0]  # each within 5 s of 30 s after the previous cut
    x = _noise_with_gaps(140, gaps)
    windows = _windows(x)
    assert len(windows) == 5
    assert np.array_equal(np.concatenate(windows), x)  # every sample exactly once, in order
    cuts = np.cumsum([len(w) for w in windows])[:-1] / SR
    for cut, gap in zip(cuts, gaps):
        assert gap + 0.01 <= cut <= gap + 0.19, (cut, gap)  # the middle of a silent 20 ms frame


def test_windows_do_not_depend_on_block_size():
    x = _noise_with_gaps(100, [31.0, 58.0])
    reference = _windows(x, block=len(x))
    for block in (1000, SR, 7 * SR + 13):
        assert all(
            np.array_equal(a, b) for a, b in zip(_windows(x, block=block), reference, strict=True)
        )


def test_window_count_and_lengths():
    x = (0.1 * np.random.default_rng(2).standard_normal(10 * 60 * SR)).astype(np.float32)
    windows = _windows(x)
    assert 18 <= len(windows) <= 24  # 600 s in windows of 25 to 35 s, and the rest
    assert all(25 * SR <= len(w) <= 35 * SR for w in windows[:-1])
    assert sum(len(w) for w in windows) == len(x)
    assert len(_windows(x[: 30 * SR])) == 1 and np.array_equal(
        _windows(x[: 30 * SR])[0], x[: 30 * SR]
    )


@pytest.mark.parametrize("extra", [1, 100, 319, 320, 6000])
def test_no_window_shorter_than_an_encoder_frame(extra):
    x = (0.1 * np.random.default_rng(3).standard_normal(30 * SR + extra)).astype(np.float32)
    x[-extra:] = 0  # the quietest frames are at the very end
    windows = _windows(x)
    assert len(windows) == 2 and min(len(w) for w in windows) >= g.SAMPLES_PER_FRAME
    assert np.array_equal(np.concatenate(windows), x)


def test_long_audio_is_transcribed_window_by_window(loaded):
    model, tokenizer = loaded
    speech = g.load_audio(AUDIO)  # 3.4 s
    x = np.concatenate([speech, np.zeros(SR // 2, np.float32)] * 4)  # 15.7 s, quiet every 3.9 s
    windows = list(g.split_windows([x], chunk_seconds=4))
    assert len(windows) == 4
    texts = [g.transcribe(model, tokenizer, w) for w in windows]
    assert g.transcribe(model, tokenizer, x, chunk_seconds=4) == " ".join(
        t.strip() for t in texts if t.strip()
    )
    assert (
        g.transcribe(model, tokenizer, AUDIO, chunk_seconds=4) == GOLDEN_TEXT
    )  # shorter: one window


def test_batches_keep_to_batch_size_and_batch_seconds(loaded, monkeypatch):
    model, tokenizer = loaded
    speech = g.load_audio(AUDIO)  # 3.4 s
    audios = [speech[: len(speech) * k // 6] for k in (6, 1, 3, 5, 2, 4)] + [np.tile(speech, 3)]
    alone = [g.transcribe(model, tokenizer, x, batch_size=1) for x in audios]
    batches, prepare_batch = [], g.prepare_batch
    monkeypatch.setattr(
        g,
        "prepare_batch",
        lambda waveforms: batches.append([len(w) for w in waveforms]) or prepare_batch(waveforms),
    )
    for batch_size, batch_seconds in ((3, 1e9), (8, 6.0), (2, 4.0)):
        batches.clear()
        options = dict(batch_size=batch_size, batch_seconds=batch_seconds)
        assert g.transcribe(model, tokenizer, audios, **options) == alone
        assert sorted(n for b in batches for n in b) == sorted(map(len, audios))
        for b in batches:  # within both bounds; a window over batch_seconds goes alone
            assert len(b) <= batch_size
            assert len(b) * max(b) <= batch_seconds * SR or len(b) == 1
        assert any(len(b) > 1 for b in batches)
    with pytest.raises(ValueError, match="batch_seconds must be positive"):
        g.transcribe(model, tokenizer, speech, batch_seconds=0)


@pytest.mark.parametrize("editing_steps", [1, 2])
@pytest.mark.parametrize("word_timestamps", [False, True])
def test_batches_overlap_with_one_batch_lag(loaded, monkeypatch, editing_steps, word_timestamps):
    # Each window equals its input transcribed alone. And the device always has work while the
    # host reads a batch's hypotheses or finishes a batch: batch k + 1's encoder pass is queued
    # before batch k's editor passes, and batch k's windows (read, decoded, aligned) come only
    # after batch k + 1's editor passes and batch k + 3's encoder pass are queued; a silent
    # batch has no editor pass.
    model, tokenizer = loaded
    speech = g.load_audio(AUDIO)
    audios = [speech[:SR], np.zeros(SR // 2, np.float32), speech[: 2 * SR], speech]
    options = dict(editing_steps=editing_steps, word_timestamps=word_timestamps)
    alone = [g.transcribe(model, tokenizer, x, **options) for x in audios]
    log, threads = [], set()
    for name in ("encode_batch", "edit_batch"):
        function = getattr(g, name)
        logged = lambda *a, name=name, function=function: log.append(name) or function(*a)
        monkeypatch.setattr(g, name, logged)
    finish_batch = g.finish_batch  # in a thread: the host finishes while the device works
    monkeypatch.setattr(
        g, "finish_batch", lambda *a: threads.add(threading.current_thread()) or finish_batch(*a)
    )
    seconds = [0.5, 1.0, 2.0, len(speech) / SR]  # the order of the batches: shortest first
    for w in g.transcribe_stream(model, tokenizer, audios, batch_size=1, **options):
        log.append(seconds.index(w.seconds))
        expected = alone[w.index]["text"] if word_timestamps else alone[w.index]
        assert w.text == expected
        if word_timestamps:
            assert w.words == [x for s in alone[w.index]["segments"] for x in s["words"]]
        else:
            assert w.words is None
    enc, edit = "encode_batch", "edit_batch"
    assert log == [enc, enc, edit, enc, edit, enc, 0, edit, 1, edit, 2, 3]
    assert len(threads) == 1 and threading.main_thread() not in threads


@pytest.mark.parametrize("word_timestamps", [False, True])
def test_a_batch_frees_its_bpe_logits_once_read(loaded, word_timestamps):
    # The (B, F, vocab) logits are a batch's largest array, and transcribe_stream holds three
    # batches at once: edit_batch drops them, the word times read from them unchanged
    model, tokenizer = loaded
    speech = g.load_audio(AUDIO)
    waveforms = [speech[:SR], speech]
    encoded = g.encode_batch(model, g.prepare_batch(waveforms))
    logits = encoded.bpe_logits
    tokens, _, log_probs = g.edit_batch(model, encoded, 1, word_timestamps)
    assert encoded.bpe_logits is None
    if word_timestamps:
        expected = g.token_log_probs(logits, tokens, model.args.blank_token_id)
        assert mx.array_equal(log_probs, expected)
    else:
        assert log_probs is None


# ---- iterative editing ----


def test_editing_steps_feed_each_output_back(loaded):
    # Step k + 1 reads step k's CTC-collapsed output, over the audio embeddings of the one encoder
    # pass. At half its level, the fixture clip is one where the second step still changes the ids.
    model, tokenizer = loaded
    blank, x = model.args.blank_token_id, 0.5 * g.load_audio(AUDIO)
    bpe_logits, audio_embeds = model.encode(g.log_mel([x])[0])
    ids = g.ctc_collapse(mx.argmax(bpe_logits[0], axis=-1), blank)
    steps = []
    for _ in range(3):
        slots = g.insert_slots(ids, blank, model.args.min_edit_sequence_length)
        ids = g.ctc_collapse(
            mx.argmax(model.edit(audio_embeds, mx.array([slots]))[0], axis=-1), blank
        )
        steps.append(ids)
    assert steps[0] != steps[1]  # so the comparison below tells step 2 from a repeated step 1
    for n, ids in enumerate(steps, start=1):
        assert g.transcribe(model, tokenizer, x, editing_steps=n) == tokenizer.decode(ids)
    assert (
        g.transcribe(model, tokenizer, AUDIO, editing_steps=1) == GOLDEN_TEXT
    )  # step 1 is the reference's
    with pytest.raises(ValueError, match="editing_steps"):
        g.transcribe(model, tokenizer, AUDIO, editing_steps=0)


# ---- command line ----


def _run(*args):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    command = [sys.executable, "granite_nar.py", *map(str, args)]
    return subprocess.run(
        command, capture_output=True, text=True, encoding="utf-8", env=env, cwd=ROOT
    )


def test_help_explains_the_options():
    result = _run("--help")
    assert result.returncode == 0
    for option in (
        "--model",
        "--chunk-seconds",
        "--editing-steps",
        "--output-format",
        "--output-dir",
        "--dtype",
        "--verbose",
        "--quiet",
        "examples:",
        "Exit status",
    ):
        assert option in result.stdout, option


def test_directories_formats_and_output_dir(model_dir, tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    sf.write(
        calls / "b.flac", np.stack([g.load_audio(AUDIO)] * 2, axis=1), SR
    )  # stereo FLAC, same content
    sf.write(calls / "a.wav", g.load_audio(AUDIO_SHORT), SR, subtype="PCM_16")
    (calls / "notes.txt").write_text("skipped: not an audio extension")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    result = _run(
        calls,
        tmp_path / "missing.wav",
        tmp_path / "empty",
        "--model",
        model_dir,
        "--output-format",
        "json",
        "--output-dir",
        out,
    )
    assert result.returncode == 1  # two failures, reported per input; the others are transcribed
    assert "missing.wav" in result.stderr and "empty: no audio files" in result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["file"]).name for r in records] == ["a.wav", "b.flac"]
    short_text = g.transcribe(*g.load(model_dir, dtype=mx.float32), AUDIO_SHORT)
    assert [r["text"] for r in records] == [short_text, GOLDEN_TEXT]
    for record in records:
        assert list(record) == ["file", "text", "audio_seconds", "processing_seconds", "speed"]
        assert isinstance(record["audio_seconds"], float) and isinstance(
            record["processing_seconds"], float
        )
        seconds, elapsed = record["audio_seconds"], record["processing_seconds"]
        # x real time, from the unrounded times: elapsed and speed are rounded to 3 decimals
        slowest, fastest = seconds / (elapsed + 5e-4), seconds / max(elapsed - 5e-4, 1e-9)
        assert slowest - 5e-4 - 1e-9 <= record["speed"] <= fastest + 5e-4 + 1e-9
    assert records[1]["audio_seconds"] == pytest.approx(54857 / SR, abs=1e-3)
    outputs = {p.name: p for p in out.rglob("*") if p.is_file()}
    assert sorted(outputs) == ["a.wav.json", "b.flac.json"]  # the inputs' paths, under out/
    # outside the working directory: relative to the inputs' common folder (tmp_path)
    assert outputs["b.flac.json"].parent == out / "calls"
    assert json.loads(outputs["b.flac.json"].read_text()) == records[1]


def test_text_and_tsv_output(model_dir, tmp_path):
    result = _run(
        AUDIO, AUDIO_SHORT, "--model", model_dir, "--output-format", "tsv", "--output-dir", tmp_path
    )
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split("\t") == ["file", "text", "audio_seconds", "processing_seconds", "speed"]
    assert [len(row.split("\t")) for row in rows] == [5, 5]
    assert rows[0].split("\t")[1] == " ".join(GOLDEN_TEXT.splitlines()).replace("\t", " ")
    written = tmp_path / AUDIO.relative_to(ROOT).with_suffix(
        ".wav.tsv"
    )  # relative to the working directory
    assert written.read_text(encoding="utf-8") == header + "\n" + rows[0] + "\n"


def test_progress_verbose_quiet_and_editing_steps(model_dir, tmp_path):
    x = np.concatenate([g.load_audio(AUDIO), np.zeros(SR // 2, np.float32)] * 2)  # 7.9 s
    sf.write(tmp_path / "two.wav", x, SR, subtype="FLOAT")
    model, tokenizer = g.load(model_dir, dtype=mx.float32)
    expected = g.transcribe(model, tokenizer, x, chunk_seconds=4, editing_steps=2)
    result = _run(
        tmp_path / "two.wav",
        "--model",
        model_dir,
        "--chunk-seconds",
        "4",
        "--editing-steps",
        "2",
        "--verbose",
        "--dtype",
        "float32",  # as expected's, also on a GPU (whose default is bfloat16)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert "two.wav: 8 of 8 s" in result.stderr  # progress, for audio longer than one window
    assert "loaded" in result.stderr and "1 file(s), 7.9 s of audio in" in result.stderr
    result = _run(tmp_path / "two.wav", "--model", model_dir, "--chunk-seconds", "4", "--quiet")
    assert result.returncode == 0 and result.stderr == ""
    result = _run(AUDIO, "--model", model_dir, "--chunk-seconds", "0.5")
    assert result.returncode == 2 and "--chunk-seconds must be between 1 and" in result.stderr


PEAK_RSS = """import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
# RUSAGE_CHILDREN: of the CLI, this process's only child
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(peak / (2**20 if sys.platform == "darwin" else 2**10), file=sys.stderr)
sys.exit(code)
"""


def _speechlike(path, minutes, rate=44100):
    """Tone bursts with a 0.2 s pause every second plus noise, stereo PCM16, written a second at a
    time."""
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", rate, 2, "PCM_16") as f:
        for second in range(round(minutes * 60)):
            t = np.arange(rate) / rate
            x = 0.3 * np.sin(2 * np.pi * (200 + 50 * (second % 7)) * t) * (
                t < 0.8
            ) + 0.01 * rng.standard_normal(rate)
            f.write(np.stack([x, 0.5 * x], axis=1))


def test_ten_minutes_in_flat_memory(model_dir, tmp_path):
    # A 10-minute 44.1 kHz stereo file (106 MB as PCM16, 212 MB as float32; 38 MB even as 16 kHz
    # mono float32) must take no more memory than a 5-minute one: it is read, resampled and
    # transcribed a batch of windows at a time, and at most MAX_TRACES compiled shapes are kept
    # (both files have more windows than that: 5 s windows, one a batch here).
    peaks = {}
    for minutes in (5, 10):
        _speechlike(tmp_path / f"{minutes}.wav", minutes)
        command = [
            sys.executable,
            "-c",
            PEAK_RSS,
            sys.executable,
            "granite_nar.py",
            tmp_path / f"{minutes}.wav",
        ]
        result = subprocess.run(
            [
                *map(str, command),
                "--model",
                model_dir,
                "--output-format",
                "json",
                "--batch-size",
                "1",
                "--chunk-seconds",
                "5",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr
        *progress, peak = result.stderr.splitlines()
        peaks[minutes] = float(peak)
        record = json.loads(result.stdout)
        assert record["audio_seconds"] == pytest.approx(60 * minutes, abs=1e-3)
        assert progress[-1] == f"{tmp_path / f'{minutes}.wav'}: {60 * minutes} of {60 * minutes} s"
        assert (
            60 * minutes / 6.25 <= len(progress) <= 60 * minutes / 3.75 + 1
        )  # a line per window of 5 s, give or take a quarter
    # MB; on a GPU the process holds ~1.5 GB of CUDA runtime, whose caches vary by ~1.5 %
    assert peaks[10] < peaks[5] + max(20, 0.02 * peaks[5]), peaks
