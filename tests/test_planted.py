"""Bugs that once survived the whole suite, each planted in granite_nar.py one at a time (see the
issue "What the tests let through"): every test here fails with its bug planted.

- outputs written in place instead of to a temporary file renamed over the output
- _shard giving every file to rank 0, or every rank every file (also tests/test_distributed.py)
- Compiled never evicting its traces
- a number taken from a shape inside a compiled pass (a kernel built for each new shape)
- --max-line-width / --max-line-count ignored by --output-format srt / vtt
- word times no longer clamped to their window's end

The model is the dev fixture (random weights): transcripts are gibberish but deterministic, so
expected outputs come from the code's own single-window / uncompiled / library paths.
"""

import os
import subprocess
import sys
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
SR = g.SAMPLE_RATE


def cli(*args, cwd=ROOT):
    result = subprocess.run(
        [sys.executable, str(ROOT / "granite_nar.py"), *map(str, args)],
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        cwd=cwd,
        timeout=300,
    )
    result.stdout = result.stdout.decode("utf-8")
    result.stderr = result.stderr.decode("utf-8")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return result


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())


# ---- outputs: a temporary file, then a rename ----


def test_outputs_replace_the_file_and_never_write_in_place(loaded, model_dir, tmp_path):
    """An output that exists is replaced by a rename: a hard link to it (another name of the same
    file) keeps its content, which writing in place would change. No temporary file is left."""
    (tmp_path / "in").mkdir()
    for name in ("a.wav", "b.wav"):
        (tmp_path / "in" / name).write_bytes(AUDIO_SHORT.read_bytes())
    out = tmp_path / "out" / "in"
    out.mkdir(parents=True)
    keep = tmp_path / "keep.txt"
    keep.write_text("another file's content\n")
    os.link(keep, out / "a.wav.txt")
    (out / "b.wav.txt").write_text("an older transcript, longer than the new one\n")
    cli("in", "--model", model_dir, "--output-dir", "out", "--dtype", "float32", cwd=tmp_path)
    golden = g.transcribe(*loaded, AUDIO_SHORT)
    assert golden
    for name in ("a.wav.txt", "b.wav.txt"):
        assert (out / name).read_text(encoding="utf-8") == golden + "\n", name
    assert keep.read_text() == "another file's content\n"
    assert keep.stat().st_nlink == 1  # the output is a new file, no longer linked to it
    expected = ["in/a.wav", "in/b.wav", "keep.txt", "out/in/a.wav.txt", "out/in/b.wav.txt"]
    assert files_under(tmp_path) == expected  # no temporary file left


# ---- under mlx.launch: each rank its share (the processes themselves: test_distributed.py) ----


def test_shard_partitions_the_inputs_and_balances_them(tmp_path):
    seconds = [1.2, 3.4, 0.3, 6.5, 0.8, 4.1, 2.0, 2.0, 9.0]
    inputs = []
    for i, s in enumerate(seconds):
        sf.write(tmp_path / f"clip{i}.wav", np.zeros(round(s * SR), np.int16), SR)
        inputs.append(tmp_path / f"clip{i}.wav")
    (tmp_path / "broken.wav").write_bytes(b"RIFF not audio")  # unreadable: shared out too
    inputs.append(tmp_path / "broken.wav")
    seconds.append(0.0)
    for size in (1, 2, 3, 4, 16):
        shares = [g._shard(inputs, size, rank) for rank in range(size)]
        assert sorted(i for share in shares for i in share) == list(range(len(inputs))), shares
        assert all(share == sorted(share) for share in shares)  # each in input order
        if size <= len(inputs):
            assert all(shares), shares  # nobody idle while there is work
        loads = [sum(seconds[i] for i in share) for share in shares]
        assert max(loads) - min(loads) <= max(seconds) + 0.1, (size, loads)
    assert g._shard(inputs, 1, 0) == list(range(len(inputs)))
    assert g._shard([], 3, 1) == []


# ---- Compiled: at most MAX_TRACES shapes' traces kept ----


def test_compiled_keeps_at_most_max_traces(monkeypatch):
    monkeypatch.setattr(g.Compiled, "MAX_TRACES", 3)
    traced = []

    def fun(x, mask):  # runs in Python only when mx.compile traces a new shape
        traced.append(x.shape)
        return x * 2 + (0 if mask is None else mask)

    compiled = g.Compiled(fun)
    sizes = [1, 2, 3, 1, 2, 3] + [1, 2, 3, 4, 5] * 3
    for calls, n in enumerate(sizes, 1):
        mask = None if n % 2 else mx.ones(n)
        out = compiled(mx.arange(n), mask)
        expected = 2 * np.arange(n) + (0 if mask is None else 1)
        np.testing.assert_array_equal(np.array(out), expected)
        assert len(compiled.shapes) <= 3, compiled.shapes
        if calls == 6:
            assert len(traced) == 3  # shapes it holds are replayed, not traced again
    # five shapes, room for three: some come back after they were dropped and are traced again
    # (with every trace kept, each shape would be traced once)
    assert len(traced) > 5, traced


def test_model_passes_right_after_traces_are_dropped(loaded, model_dir, monkeypatch):
    full = g.load_audio(AUDIO)
    clips = [full[:n] for n in (8000, 16000, 24000, 40000, None)] + [AUDIO_SHORT]
    expected = [g.transcribe(*loaded, clip) for clip in clips]  # as load() runs them here
    assert len(set(expected)) > 3
    monkeypatch.setattr(g.Compiled, "MAX_TRACES", 2)
    model, tokenizer = g.load(model_dir, dtype=mx.float32, compile=True)  # as on a GPU
    for _ in range(2):
        for clip, text in zip(clips, expected):
            assert g.transcribe(model, tokenizer, clip) == text
            for compiled in (model.compiled_encode, model.compiled_edit):
                assert 1 <= len(compiled.shapes) <= 2


KERNELS = """
import glob, os, re, sys
import mlx.core as mx
import granite_nar as g
model, tokenizer = g.load(sys.argv[1], dtype=mx.float32, compile=True)  # as on a GPU
H, blank = model.args.editor.hidden_size, model.args.blank_token_id
x = g.load_audio(sys.argv[2])

def passes(n, L):  # n samples of audio alone, then with a longer one; the editor at L slots
    g.transcribe(model, tokenizer, x[:n])
    g.transcribe(model, tokenizer, [x[:n], x[: n + 7000]])
    e, ids = mx.zeros((2, 9, H)), mx.full((2, L), blank)
    mx.eval(model.compiled_edit(e, ids, mx.array([9, 7]), mx.array([L, L - 3])))

def kernels():  # MLX's kernel cache: one file a kernel (the CPU's a file a variant)
    files = glob.glob(os.environ["TMPDIR"] + "/**/*.*", recursive=True)
    names = [os.path.basename(f) for f in files if f.endswith((".so", ".ptx"))]
    return {re.sub(r"^lib|_(strided|contiguous).*$|\\.(so|ptx)$", "", f) for f in names}

passes(23456, 16)
before = kernels()
passes(30001, 32)
passes(41234, 48)
print(len(before), sorted(kernels() - before))
"""


def test_compiled_passes_build_no_kernel_for_a_new_shape(model_dir, tmp_path):
    """A pass compiled for a shape builds its fused kernels (seconds each on a fresh GPU machine)
    unless MLX's kernel cache has them: passes over new lengths and slot counts need none."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "MLX_PTX_CACHE_DIR": str(tmp_path / "ptx")}
    run = subprocess.run(
        [sys.executable, "-c", KERNELS, str(model_dir), str(AUDIO)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    built, new = run.stdout.split(" ", 1)
    assert int(built) > 5 and new.strip() == "[]", run.stdout


FIRST_RUN = """
import glob, os, sys
import granite_nar as g
g.transcribe(*g.load(sys.argv[1]), sys.argv[2])
print(len(glob.glob(os.environ["TMPDIR"] + "/**/*.so", recursive=True)))
"""


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="passes are compiled on a GPU")
def test_a_first_run_on_a_cpu_builds_few_kernels(model_dir, tmp_path):
    """On a CPU load() leaves the passes uncompiled: a first run builds the featurizer's and
    mlx.nn's few compiled kernels (9 here), not the compiled passes' (41 here, 19 s of a full-size
    model's first run on 30 s of audio)."""
    run = subprocess.run(
        [sys.executable, "-c", FIRST_RUN, str(model_dir), str(AUDIO)],
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        cwd=ROOT,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) <= 12, run.stdout


# ---- subtitles: --max-line-width and --max-line-count ----


@pytest.fixture(scope="module")
def speech_file(tmp_path_factory):
    """13.7 s: the fixture's clip at four loudnesses, one window of about a dozen words."""
    speech = g.load_audio(AUDIO)
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    sf.write(path, np.concatenate([speech * k for k in (0.3, 0.6, 1.0, 1.5)]), SR, "PCM_16")
    return path


def cues(text, vtt):
    """The text lines of each cue of SRT or WebVTT text."""
    blocks = text.strip("\n").split("\n\n")
    if vtt:
        assert blocks.pop(0) == "WEBVTT"
    found = []
    for block in blocks:
        lines = block.split("\n")
        if not vtt:
            assert lines.pop(0).isdigit(), block
        assert " --> " in lines.pop(0), block
        found.append(lines)
    return found


@pytest.mark.parametrize("fmt, width, count", [("srt", 16, 1), ("vtt", 60, 1), ("srt", 24, 3)])
def test_subtitle_options_shape_the_cues(loaded, model_dir, speech_file, fmt, width, count):
    """The CLI's cues are those of the library's split_segments and subtitles given the options:
    a cue of several words fits `count` lines of `width` characters (a single word may not)."""
    vtt = fmt == "vtt"
    timed = g.transcribe(*loaded, speech_file, word_timestamps=True)
    words = [w for s in timed["segments"] for w in s["words"]]
    segments = g.split_segments(words, width, count)
    expected = g.subtitles(segments, vtt, width, count)
    assert expected != g.subtitles(g.split_segments(words), vtt)  # the options matter here
    options = ("--max-line-width", width, "--max-line-count", count, "--dtype", "float32")
    result = cli(speech_file, "--model", model_dir, "--output-format", fmt, *options)
    assert result.stdout.strip("\n") == expected.strip("\n")
    found = cues(result.stdout, vtt)
    assert len(found) == len(segments) >= 3
    assert sum(len(s["words"]) > 1 for s in segments) >= 2
    for segment, lines in zip(segments, found):
        assert 1 <= len(lines) <= count, lines
        if len(segment["words"]) > 1:
            assert all(len(line) <= width for line in lines), lines


# ---- word times: within their window ----


def test_word_times_end_within_their_window_and_the_audio(loaded):
    """A window's last BPE frame may reach past its end (a frame is several encoder frames): a
    word aligned to it ends at the window's end, not after, and so within the audio."""
    model, tokenizer = loaded
    full = g.load_audio(AUDIO)
    audio = np.concatenate([full, full[::-1], full])  # 10.3 s: windows of ~4 s
    windows = list(
        g.transcribe_stream(model, tokenizer, [audio], chunk_seconds=4, word_timestamps=True)
    )
    assert len(windows) >= 3 and sum(w.seconds for w in windows) == pytest.approx(len(audio) / SR)
    past = 0
    for w in windows:
        piece = audio[round(w.start * SR) : round((w.start + w.seconds) * SR)]
        _, alone = g.transcribe_waveforms(model, tokenizer, [piece], word_timestamps=True)
        past += any(x["end"] > w.seconds for x in alone[0])  # times from the window's start
        assert w.words
        for x in w.words:
            assert w.start <= x["start"] <= x["end"] <= w.start + w.seconds + 1e-9, (w, x)
    assert past >= 2  # the case reaches what it tests: a word past its window's end
    for clip, options in ((audio, {"chunk_seconds": 4}), (AUDIO, {}), (AUDIO_SHORT, {})):
        timed = g.transcribe(model, tokenizer, clip, word_timestamps=True, **options)
        words = [x for s in timed["segments"] for x in s["words"]]
        assert words and 0 <= words[0]["start"]
        assert all(x["end"] <= g.duration(clip) + 1e-9 for x in words), words[-1]
