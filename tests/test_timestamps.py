"""Word timestamps and subtitles of granite_nar.py: CTC forced alignment (planted paths, brute
force, an independent Viterbi), words, segments, SRT / WebVTT, end to end with the dev model
(tests/fixtures/dev, random weights: transcripts are gibberish, so they are checked against the
module's own single-window path), and the command line.
"""

import itertools
import json
import re
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import granite_nar as g  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "dev"
AUDIO = FIXTURE / "audio.wav"
SR = g.SAMPLE_RATE
FRAME = 0.08  # one pooled BPE frame of the dev model (4 encoder frames of 20 ms)


# ---- helpers ----


def log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def planted(n_frames, vocab, ids, spans, blank):
    """Log-probs whose best path is exactly `spans` for `ids`, blank on every other frame."""
    logits = np.zeros((n_frames, vocab))
    logits[:, blank] = 10.0
    for i, (s, e) in zip(ids, spans):
        logits[s:e, blank] = 0.0
        logits[s:e, i] = 10.0
    return log_softmax(logits)


def path_score(log_probs, ids, spans, blank):
    """The score of the frame labelling that spans describe (blank outside them)."""
    labels = np.full(len(log_probs), blank)
    for i, (s, e) in zip(ids, spans):
        labels[s:e] = i
    return float(np.asarray(log_probs, np.float64)[np.arange(len(log_probs)), labels].sum())


def assert_valid(spans, ids, n_frames):
    """Spans in order, non-empty, inside the frames, a blank frame between equal neighbours."""
    assert len(spans) == len(ids)
    previous_end = 0
    for k, (s, e) in enumerate(spans):
        assert isinstance(s, int) and isinstance(e, int)
        assert previous_end <= s < e <= n_frames, spans
        if k and ids[k] == ids[k - 1]:
            assert s > previous_end, "equal neighbours need a blank frame between them"
        previous_end = e


def segment_viterbi(log_probs, ids, blank):
    """Best CTC score of ids, or None, over token runs with prefix sums and running maxima (as
    ctc_align, written independently: blanks scored as such, loops instead of arrays).

    done[t]: best score of frames [0, t) whose frame t - 1 ends token k (t = 0 for k = 0).
    ready[s]: best score of frames [0, s) with k tokens out, where token k + 1 may begin at s.
    """
    n_frames, neg = len(log_probs), float("-inf")
    prefix = {}  # label -> [sum of its log-probs over frames [0, t) for t in 0..T]

    def sums(label):
        if label not in prefix:
            acc = [0.0]
            for row in log_probs:
                acc.append(acc[-1] + float(row[label]))
            prefix[label] = acc
        return prefix[label]

    def after_blanks(done):  # best over "done at t, then blanks up to s" (at least one blank)
        b, out, best = sums(blank), [neg] * (n_frames + 1), neg
        for s in range(n_frames + 1):
            if s:
                out[s] = best + b[s]
            best = max(best, done[s] - b[s])
        return out

    done = [0.0] + [neg] * n_frames
    for k, token in enumerate(ids):
        gap = after_blanks(done)
        direct = k == 0 or token != ids[k - 1]  # a different neighbour may touch
        ready = [max(x, y if direct else neg) for x, y in zip(gap, done)]
        c, new, best = sums(token), [neg] * (n_frames + 1), neg
        for e in range(n_frames + 1):
            if e:
                new[e] = best + c[e]
            best = max(best, ready[e] - c[e])
        done = new
    final = max(done[n_frames], after_blanks(done)[n_frames])
    return None if final == neg else final


def lattice_viterbi(log_probs, ids, blank):
    """Best CTC score of ids, or None, by the textbook recursion over the blank-interleaved
    states [_, a, _, b, _]: stay, advance, or skip the blank between two different labels."""
    labels, neg = [blank], float("-inf")
    for i in ids:
        labels += [i, blank]
    score = [log_probs[0][label] if s < 2 else neg for s, label in enumerate(labels)]
    for row in log_probs[1:]:
        came = []
        for s, label in enumerate(labels):
            best = max(score[s], score[s - 1] if s else neg)
            if s >= 2 and label != blank and label != labels[s - 2]:
                best = max(best, score[s - 2])
            came.append(best + row[label])
        score = came
    final = max(score[-2:])
    return None if final == neg else final


def make_words(texts, duration=0.3, gap=0.1, start=0.0):
    words, t = [], start
    for text in texts:
        words.append({"word": text, "start": t, "end": t + duration, "confidence": 1.0})
        t += duration + gap
    return words


def texts(segments):
    return [s["text"] for s in segments]


def squash(text):
    return "".join(text.split())


TIME = r"(\d{2,}):([0-5]\d):([0-5]\d)%s(\d{3})"


def parse_cues(text, vtt, width, count):
    """Parse SRT (numbered from 1, ",") or WebVTT ("WEBVTT" header, ".") text strictly; return
    [(start, end, lines)] in seconds. Lines over width are allowed only for a single word."""
    if vtt:
        assert text.startswith("WEBVTT\n\n"), text[:40]
        text = text[len("WEBVTT\n\n") :]
    assert text.endswith("\n") and not text.endswith("\n\n\n"), repr(text[-40:])
    mark = re.escape("." if vtt else ",")
    timing = re.compile(rf"{TIME % mark} --> {TIME % mark}")
    cues = []
    for k, block in enumerate(text.rstrip("\n").split("\n\n"), 1):
        lines = block.split("\n")
        if not vtt:
            assert lines.pop(0) == str(k), block
        match = timing.fullmatch(lines.pop(0))
        assert match, block
        h1, m1, s1, ms1, h2, m2, s2, ms2 = map(int, match.groups())
        start = h1 * 3600 + m1 * 60 + s1 + ms1 / 1000
        end = h2 * 3600 + m2 * 60 + s2 + ms2 / 1000
        assert 1 <= len(lines) <= count, block
        for line in lines:
            assert line and line == line.strip() and "-->" not in line, block
            assert len(line) <= width or " " not in line, block
        cues.append((start, end, lines))
    return cues


def assert_cue_times(cues, duration=None, slack=0.0):
    """Each cue lasts, starts after the one before, and (with slack: a pooled frame past a
    window's end) does not run into the next; all inside [0, duration + slack]."""
    assert all(start < end for start, end, _ in cues)
    assert all(a[0] < b[0] and a[1] <= b[0] + slack for a, b in itertools.pairwise(cues))
    if duration is not None:
        assert cues[0][0] >= 0 and cues[-1][1] <= duration + slack


# ---- ctc_align ----


@pytest.mark.parametrize(
    "ids, spans, n_frames",
    [
        ([5, 5, 7], [(1, 3), (4, 5), (5, 8)], 10),
        ([1, 2, 3], [(0, 1), (1, 2), (2, 3)], 3),
        ([4, 4, 4], [(0, 2), (3, 4), (5, 9)], 9),
        ([2, 6, 2, 2], [(2, 4), (6, 7), (7, 8), (9, 12)], 14),
        ([3], [(0, 6)], 6),
    ],
)
def test_planted_alignment(ids, spans, n_frames):
    log_probs = planted(n_frames, 8, ids, spans, blank=0)
    assert g.ctc_align(log_probs, ids, blank_id=0) == spans


def test_planted_full_size():
    # 150 tokens (301 states, beyond int8's range) over 400 frames, repeats included.
    rng = np.random.default_rng(3)
    vocab = 64
    ids = [int(i) for i in rng.integers(1, 6, size=150)]
    spans, t = [], 0
    for k, i in enumerate(ids):
        t += int(rng.integers(0, 2))
        if k and i == ids[k - 1] and t == spans[-1][1]:
            t += 1  # equal neighbours need a blank frame between them
        length = int(rng.integers(1, 3))
        spans.append((t, t + length))
        t += length
    assert t <= 400
    log_probs = planted(400, vocab, ids, spans, blank=0)
    assert g.ctc_align(log_probs, ids, blank_id=0) == spans
    assert g.ctc_align(mx.array(log_probs.astype(np.float32)), ids, blank_id=0) == spans


def test_planted_with_nonzero_blank_and_float32():
    ids, spans = [0, 3, 3], [(0, 2), (3, 5), (6, 7)]
    log_probs = planted(8, 5, ids, spans, blank=4).astype(np.float32)
    assert g.ctc_align(log_probs, ids, blank_id=4) == spans
    assert g.ctc_align(mx.array(log_probs), ids, blank_id=4) == spans


@cache
def labelings(n_frames, vocab, blank):
    """Every frame labelling as an array, and for each collapsed sequence the rows giving it."""
    rows = np.array(list(itertools.product(range(vocab), repeat=n_frames)))
    by_sequence = {}
    for r, row in enumerate(rows):
        merged = [label for k, label in enumerate(row) if k == 0 or label != row[k - 1]]
        key = tuple(int(label) for label in merged if label != blank)
        by_sequence.setdefault(key, []).append(r)
    return rows, by_sequence


def test_brute_force_tiny_cases():
    rng = np.random.default_rng(0)
    infeasible = 0
    for _ in range(300):
        n_frames, vocab = int(rng.integers(1, 8)), int(rng.integers(3, 6))
        if vocab == 5:
            n_frames = min(n_frames, 6)
        blank = int(rng.integers(vocab))
        tokens = [v for v in range(vocab) if v != blank][: int(rng.integers(1, 4))]
        ids = [int(rng.choice(tokens)) for _ in range(int(rng.integers(0, 4)))]
        log_probs = log_softmax(rng.normal(size=(n_frames, vocab)) * rng.choice([0.3, 3.0]))
        rows, by_sequence = labelings(n_frames, vocab, blank)
        spans = g.ctc_align(log_probs, ids, blank)
        if tuple(ids) not in by_sequence:
            infeasible += 1
            assert spans is None, (ids, n_frames)
            continue
        scores = log_probs[np.arange(n_frames), rows[by_sequence[tuple(ids)]]].sum(axis=1)
        assert spans is not None
        assert_valid(spans, ids, n_frames)
        assert path_score(log_probs, ids, spans, blank) == pytest.approx(scores.max(), abs=1e-9)
    assert infeasible > 5


def test_segment_viterbi_is_right():
    # the reference itself, against brute force on a few tiny cases
    rng = np.random.default_rng(5)
    for _ in range(60):
        n_frames, vocab, blank = int(rng.integers(1, 7)), 4, int(rng.integers(4))
        tokens = [v for v in range(vocab) if v != blank]
        ids = [int(rng.choice(tokens)) for _ in range(int(rng.integers(0, 4)))]
        log_probs = log_softmax(rng.normal(size=(n_frames, vocab)) * 2)
        rows, by_sequence = labelings(n_frames, vocab, blank)
        expected = None
        if tuple(ids) in by_sequence:
            rows = rows[by_sequence[tuple(ids)]]
            expected = float(log_probs[np.arange(n_frames), rows].sum(axis=1).max())
        for reference in (segment_viterbi, lattice_viterbi):
            got = reference(log_probs.tolist(), ids, blank)
            assert (got is None) == (expected is None)
            assert got is None or got == pytest.approx(expected, abs=1e-9)


def test_against_reference_viterbi():
    rng = np.random.default_rng(1)
    infeasible = 0
    for case in range(400):
        n_frames, n, vocab = int(rng.integers(1, 61)), int(rng.integers(0, 21)), 4
        blank = int(rng.integers(vocab))
        tokens = [v for v in range(vocab) if v != blank]
        ids = [int(rng.choice(tokens)) for _ in range(n)]
        scale = rng.choice([20.0, 0.1])  # sharp and flat posteriors
        log_probs = log_softmax(rng.normal(size=(n_frames, vocab)) * scale)
        if case % 4 == 0:
            log_probs = log_probs.astype(np.float32)
        expected = segment_viterbi(log_probs.tolist(), ids, blank)
        lattice = lattice_viterbi(log_probs.tolist(), ids, blank)
        assert (lattice is None) == (expected is None)
        assert lattice is None or lattice == pytest.approx(expected, abs=1e-6)
        spans = g.ctc_align(log_probs, ids, blank)
        if expected is None:
            infeasible += 1
            assert spans is None, (ids, n_frames)
            continue
        assert spans is not None, (ids, n_frames)
        assert_valid(spans, ids, n_frames)
        assert path_score(log_probs, ids, spans, blank) == pytest.approx(expected, abs=1e-4)
    assert infeasible > 20  # the infeasible branch was actually exercised


def test_infeasible_lengths():
    log_probs = log_softmax(np.zeros((2, 5)))
    assert g.ctc_align(log_probs, [3, 3], 0) is None
    assert g.ctc_align(log_probs, [3, 4], 0) == [(0, 1), (1, 2)]
    assert g.ctc_align(log_probs, [3, 4, 1], 0) is None
    assert g.ctc_align(log_softmax(np.zeros((3, 5))), [3, 3], 0) == [(0, 1), (2, 3)]
    assert g.ctc_align(log_probs, [], 0) == []
    assert g.ctc_align(np.zeros((0, 5)), [], 0) == []
    assert g.ctc_align(np.zeros((0, 5)), [1], 0) is None
    assert g.ctc_align(mx.array(log_probs), [3, 3], 0) is None


def test_minus_infinity_entries():
    log_probs = log_softmax(np.zeros((4, 5)))
    log_probs[:, 3] = -np.inf  # token 3 masked out everywhere: the alignment must still be valid
    spans = g.ctc_align(log_probs, [1, 3, 3], 0)
    assert_valid(spans, [1, 3, 3], 4)
    assert_valid(g.ctc_align(mx.array(log_probs.astype(np.float32)), [1, 3, 3], 0), [1, 3, 3], 4)


def test_mlx_input_matches_numpy():
    rng = np.random.default_rng(2)
    for vocab, ids in [(6, [1, 1, 2, 3, 3, 5]), (300, [7, 250, 250, 3, 299, 7, 7])]:
        log_probs = log_softmax(rng.normal(size=(50, vocab)) * 5).astype(np.float32)
        expected = g.ctc_align(log_probs, ids, 0)
        assert expected is not None
        assert g.ctc_align(mx.array(log_probs), ids, 0) == expected
        assert g.ctc_align(mx.array(log_probs).astype(mx.bfloat16), ids, 0) is not None


def test_full_size_cost():
    """150 tokens over 400 frames of a 100352-token vocabulary: timed, not asserted."""
    rng = np.random.default_rng(4)
    vocab, blank = 100352, 100351
    log_probs = rng.standard_normal((400, vocab), dtype=np.float32) * 3
    log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
    ids = [int(i) for i in rng.integers(0, vocab - 1, size=150)]
    ids[10] = ids[11]  # a repeat
    on_device = mx.array(log_probs)
    mx.eval(on_device)
    results, lines = [], []
    for name, x in [("numpy", log_probs), ("mlx", on_device)]:
        timings = []
        for _ in range(2):
            tic = time.perf_counter()
            results.append(g.ctc_align(x, ids, blank))
            timings.append(time.perf_counter() - tic)
        lines.append(f"{name} {' / '.join(f'{t * 1000:.1f}' for t in timings)} ms")
    print(f"\nctc_align 150 tokens x 400 frames x {vocab}: " + ", ".join(lines))
    assert all(r == results[0] for r in results)
    assert_valid(results[0], ids, 400)
    columns = sorted(set(ids) | {blank})
    small = log_probs[:, columns].tolist()
    index = {c: k for k, c in enumerate(columns)}
    expected = segment_viterbi(small, [index[i] for i in ids], index[blank])
    assert path_score(log_probs, ids, results[0], blank) == pytest.approx(expected, abs=1e-3)


# ---- group_words ----


def test_group_words():
    pieces = [
        (b'"', 0.0, 0.1, 0.5),  # punctuation with no word before starts the first word
        (b"Hi", 0.1, 0.3, 0.9),
        (b",", 0.3, 0.4, 0.7),
        (b" caf\xc3", 0.5, 0.7, 0.2),  # "é" is split over two tokens
        (b"\xa9", 0.7, 0.8, 0.4),
        (b" !", 0.8, 0.9, 0.6),  # punctuation joins the word before even after a space
        (b" wor", 1.0, 1.2, 0.8),
        (b"ld", 1.2, 1.4, None),  # unaligned token: left out of the mean
        (b" \xe3\x80\x82", 1.4, 1.5, 0.1),  # " 。": punctuation, joins "world"
        (b" \xe6\x97", 1.6, 1.7, 0.3),  # "日" over two tokens, after a space
        (b"\xa5", 1.7, 1.8, 0.5),
    ]
    words = g.group_words(pieces)
    assert [w["word"] for w in words] == ['"Hi,', " café !", " world 。", " 日"]
    assert [(w["start"], w["end"]) for w in words] == [
        (0.0, 0.4),
        (0.5, 0.9),
        (1.0, 1.5),
        (1.6, 1.8),
    ]
    assert [w["confidence"] for w in words] == pytest.approx([0.7, 0.4, 0.45, 0.4])
    assert g.group_words([(b"x", 0, 1, None)])[0]["confidence"] is None
    assert g.group_words([(b" a", 0, 1, None), (b"b", 1, 2, None)]) == [
        {"word": " ab", "start": 0, "end": 2, "confidence": None}
    ]
    assert g.group_words([]) == []
    # the words' text is the pieces' text: nothing lost or added, even with broken UTF-8
    broken = [(b" a\xe3", 0, 1, 1.0), (b" \x80b", 1, 2, 1.0), (b"\xff", 2, 3, 1.0)]
    decoded = b"".join(p[0] for p in broken).decode(errors="replace")
    assert "".join(w["word"] for w in g.group_words(broken)) == decoded


# ---- split_segments ----


def test_split_on_pause():
    words = make_words([" one", " two"]) + make_words([" three"], start=1.2)
    assert texts(g.split_segments(words)) == ["one two", "three"]
    words = make_words([" one", " two"]) + make_words([" three"], start=1.0)
    assert texts(g.split_segments(words)) == ["one two three"]  # a 0.3 s pause
    assert texts(g.split_segments(words, pause=0.3)) == ["one two", "three"]


def test_split_on_sentence_end():
    words = make_words([" Hi.", " there", " ok?", " yes", "」", "。", ' no!"', " end…", " x"])
    assert texts(g.split_segments(words)) == ["Hi.", "there ok?", "yes」。", 'no!"', "end…", "x"]


def test_split_after_sentence_end_in_brackets():
    words = make_words([" 「はい。」", " next", " 『x。』", " y"])
    assert texts(g.split_segments(words)) == ["「はい。」", "next 『x。』", "y"]


def test_split_on_width():
    words = make_words([" word"] * 40, duration=0.05, gap=0.0)
    segments = g.split_segments(words, max_line_width=20, max_line_count=2)
    assert sum(len(s["words"]) for s in segments) == 40
    # "word word word word" (19 characters) per line, two lines: 8 words fill a segment
    assert [len(s["words"]) for s in segments] == [8] * 5
    segments = g.split_segments(words, max_line_width=20, max_line_count=1)
    assert [len(s["words"]) for s in segments] == [4] * 10


def test_split_when_wrapping_needs_more_lines():
    # 20 characters fit 2 lines of 10 by count, but greedy wrapping needs 3 lines.
    words = make_words([" aaaaaa", " bbbbbb", " cccccc"])
    segments = g.split_segments(words, max_line_width=10, max_line_count=2)
    assert texts(segments) == ["aaaaaa bbbbbb", "cccccc"]


def test_split_on_duration():
    words = make_words([f" w{k}" for k in range(20)], duration=0.9, gap=0.1)
    segments = g.split_segments(words)
    assert [len(s["words"]) for s in segments] == [7, 7, 6]
    assert all(s["end"] - s["start"] <= 7.0 for s in segments)
    assert [len(s["words"]) for s in g.split_segments(words, max_seconds=3.0)] == [3] * 6 + [2]


def test_segment_fields():
    words = make_words([" a", " b"], start=2.0)
    expected = {"start": 2.0, "end": words[1]["end"], "text": "a b", "words": words}
    assert g.split_segments(words) == [expected]
    assert g.split_segments([]) == []


def test_giant_word():
    words = make_words([" a", " " + "x" * 200, " b"], duration=0.1, gap=0.0)
    segments = g.split_segments(words)
    assert [w for s in segments for w in s["words"]] == words  # every word once, in order
    assert all(len(g._wrap(s["text"], 42)) <= 2 for s in segments)
    assert "x" * 200 in [w for s in segments for w in s["text"].split()]  # never cut
    assert g.split_segments(make_words([" " + "y" * 9], duration=30.0)) != []


def test_giant_word_gets_own_segment():
    words = make_words([" a", " " + "x" * 200, " b"], duration=0.1, gap=0.0)
    assert texts(g.split_segments(words)) == ["a", "x" * 200, "b"]


# ---- subtitles ----


def subtitle_segments():
    words = make_words([f" word{k % 7}" + ("." if k % 11 == 10 else "") for k in range(60)])
    segments = g.split_segments(words, max_line_width=30, max_line_count=2)
    segments.append({"start": 30.0, "end": 30.0, "text": "a --> b\n\nc", "words": []})
    segments.append({"start": 31.0, "end": 32.0, "text": "  ", "words": []})  # dropped
    segments.append({"start": 3600 + 61.25, "end": 3600 + 62.0004, "text": "late", "words": []})
    return segments


@pytest.mark.parametrize("vtt", [False, True], ids=["srt", "vtt"])
def test_subtitle_syntax(vtt):
    segments = subtitle_segments()
    text = g.subtitles(segments, vtt, max_line_width=30, max_line_count=2)
    assert text.startswith("WEBVTT\n\n") == vtt
    assert ("," in text.split("\n")[2 if vtt else 1]) != vtt
    cues = parse_cues(text, vtt, 30, 2)
    assert len(cues) == len(segments) - 1
    assert_cue_times(cues)
    assert cues[-2][:2] == pytest.approx((30.0, 30.001))  # zero length: a millisecond
    assert cues[-2][2] == ["a -> b c"]
    assert cues[-1][:2] == pytest.approx((3661.25, 3662.0))
    assert "01:01:01" in text
    spoken = [c[2] for c in cues[:-2]]
    assert " ".join(" ".join(lines) for lines in spoken) == " ".join(texts(segments[:-3]))
    assert len(cues) > 5 and any(len(lines) == 2 for lines in spoken)


def test_subtitles_edge_cases():
    assert g.subtitles([]) == ""
    assert g.subtitles([], vtt=True) == "WEBVTT\n\n"
    early = [{"start": -0.5, "end": -0.2, "text": "x"}]
    assert g.subtitles(early) == "1\n00:00:00,000 --> 00:00:00,001\nx\n"
    # text given by hand that does not fit: the rest goes on the last line
    long = [{"start": 0.0, "end": 1.0, "text": "aa bb cc dd ee"}]
    assert (
        g.subtitles(long, True, 5, 2)
        == "WEBVTT\n\n00:00:00.000 --> 00:00:01.000\naa bb\ncc dd ee\n"
    )
    assert g.subtitles([{"start": 1.0, "end": 2.0, "text": "x ---> y -> z"}]).endswith(
        "x -> y -> z\n"
    )


# ---- end to end with the dev model ----


@pytest.fixture(scope="module")
def speech():
    audio, rate = sf.read(AUDIO, dtype="float32")
    assert rate == SR and audio.ndim == 1
    return audio


@pytest.fixture(scope="module")
def multi_window(speech):
    """~11 s: the fixture three times with 0.5 s silences (several 4 s windows)."""
    gap = np.zeros(SR // 2, np.float32)
    return np.concatenate([speech, gap, speech, gap, speech])


def test_stream_words_per_window(loaded, multi_window):
    model, tokenizer = loaded
    windows = list(
        g.transcribe_stream(model, tokenizer, [multi_window], chunk_seconds=4, word_timestamps=True)
    )
    pieces = list(g.split_windows([multi_window], chunk_seconds=4))
    assert len(windows) == len(pieces) >= 3
    assert [w.last for w in windows] == [False] * (len(windows) - 1) + [True]
    starts = np.cumsum([0] + [len(p) for p in pieces[:-1]]) / SR
    for w, piece, start in zip(windows, pieces, starts):
        assert w.start == pytest.approx(start) and w.seconds == pytest.approx(len(piece) / SR)
        assert w.words, w
        for word in w.words:
            assert w.start <= word["start"] < word["end"] <= w.start + w.seconds + FRAME, word
        assert all(a["end"] <= b["start"] for a, b in itertools.pairwise(w.words))
        # special tokens have no bytes; a window after the first begins a new word
        words = [x["word"] for x in w.words]
        assert "".join(words) == (" " if w.start > 0 and w.text[:1] != " " else "") + w.text
        texts, timed = g.transcribe_waveforms(model, tokenizer, [piece], word_timestamps=True)
        text, alone = texts[0], timed[0]
        assert w.text == text
        assert [x.strip() for x in words] == [x["word"].strip() for x in alone]
        for x, y in zip(w.words, alone):  # times in the input's, within the window
            assert x["start"] == pytest.approx(min(y["start"], w.seconds) + w.start, abs=1e-9)
            assert x["end"] == pytest.approx(min(y["end"], w.seconds) + w.start, abs=1e-9)
            assert (x["confidence"] is None) == (y["confidence"] is None)
            # float32 logits of a window alone and in a batch differ by rounding (~1e-5)
            assert x["confidence"] is None or x["confidence"] == pytest.approx(
                y["confidence"], abs=1e-5
            )
            assert x["confidence"] is None or 0 <= x["confidence"] <= 1
    plain = g.transcribe_stream(model, tokenizer, [multi_window], chunk_seconds=4)
    assert [w.words for w in plain] == [None] * len(windows)


def test_transcribe_word_timestamps(loaded, multi_window, speech):
    model, tokenizer = loaded
    for audio, options in [(multi_window, {"chunk_seconds": 4}), (AUDIO, {})]:
        plain = g.transcribe(model, tokenizer, audio, **options)
        timed = g.transcribe(model, tokenizer, audio, word_timestamps=True, **options)
        assert set(timed) == {"text", "segments"}
        assert timed["text"] == plain and plain.strip()
        segments = timed["segments"]
        assert segments and squash(" ".join(texts(segments))) == squash(plain)
        words = [x for s in segments for x in s["words"]]
        assert all(a["start"] <= b["start"] for a, b in itertools.pairwise(words))
        for s in segments:
            assert s["start"] == s["words"][0]["start"] and s["end"] == s["words"][-1]["end"]
            assert s["text"] == "".join(x["word"] for x in s["words"]).strip()
            assert len(g._wrap(s["text"], 42)) <= 2 or len(s["words"]) == 1
            assert s["end"] - s["start"] <= 7.0 or len(s["words"]) == 1
    assert "".join(x["word"] for x in words) == plain  # one window: the text exactly
    for other in g.transcribe(model, tokenizer, [AUDIO, speech], word_timestamps=True):
        assert other["text"] == timed["text"]  # a batch rounds float32 sums differently, no more
        ours = [(w["word"], w["start"], w["end"]) for s in other["segments"] for w in s["words"]]
        assert ours == [(w["word"], w["start"], w["end"]) for w in words]
        confidences = [w["confidence"] for s in other["segments"] for w in s["words"]]
        assert confidences == pytest.approx([w["confidence"] for w in words], rel=1e-5)


def test_segments_keep_window_boundaries(loaded, multi_window):
    # A window's text may begin without a space; join_windows puts one between windows, but
    # split_segments joins the words as they are: "...chyych��chio..." for "...chyych�� chio...".
    model, tokenizer = loaded
    timed = g.transcribe(model, tokenizer, multi_window, chunk_seconds=4, word_timestamps=True)
    assert " ".join(texts(timed["segments"])).split() == timed["text"].split()


def window_words(model, tokenizer, logits, ids):
    """word_times of one window: BPE CTC logits (F, vocab) and its final ids, also its tokens."""
    tokens = mx.array(np.array(ids, np.int32)[None])
    log_probs = g.token_log_probs(logits[None], tokens, model.args.blank_token_id)
    return g.word_times(model, tokenizer, log_probs, tokens, [logits.shape[0]], [ids])[0]


def test_word_times_spread_when_no_path(loaded):
    model, tokenizer = loaded
    logits = mx.array(
        np.random.default_rng(0).normal(size=(3, model.args.encoder.bpe_output_dim)), mx.float32
    )
    ids = list(range(10, 16))  # 6 tokens, 3 frames: no path fits
    assert g.ctc_align(np.array(logits), ids, model.args.blank_token_id) is None
    words = window_words(model, tokenizer, logits, ids)
    assert "".join(w["word"] for w in words) == tokenizer.decode(ids)
    assert all(w["confidence"] is None for w in words)
    assert words[0]["start"] == 0 and words[-1]["end"] == pytest.approx(3 * FRAME)
    assert all(a["end"] == pytest.approx(b["start"]) for a, b in itertools.pairwise(words))
    json.dumps(words)  # numpy scalars would not serialize


def test_word_times_aligned(loaded):
    model, tokenizer = loaded
    blank, vocab = model.args.blank_token_id, model.args.encoder.bpe_output_dim
    ids = [10, 11, 11, 12]
    logits = planted(12, vocab, ids, [(1, 3), (4, 5), (6, 8), (9, 12)], blank)
    words = window_words(model, tokenizer, mx.array(logits.astype(np.float32)), ids)
    pieces = [tokenizer.token_bytes(i) for i in ids]
    assert "".join(w["word"] for w in words) == b"".join(pieces).decode(errors="replace")
    assert words[0]["start"] == pytest.approx(FRAME) and words[-1]["end"] == pytest.approx(0.96)
    assert all(0.95 < w["confidence"] <= 1 for w in words)  # e^10 against 356 e^0
    special = window_words(model, tokenizer, mx.array(logits.astype(np.float32)), [10, 11, 356, 12])
    assert "".join(w["word"] for w in special) == tokenizer.decode([10, 11, 12])


def test_word_times_read_the_ids_among_any_tokens(loaded):
    # transcription hands word_times the editor's best token in every slot: blanks, repeats and
    # other tokens around the final ids; token_log_probs is the log-softmax of those columns
    model, tokenizer = loaded
    blank, vocab = model.args.blank_token_id, model.args.encoder.bpe_output_dim
    ids = [10, 11, 11, 12]
    logits = planted(12, vocab, ids, [(1, 3), (4, 5), (6, 8), (9, 12)], blank).astype(np.float32)
    slots = [blank, 10, blank, 11, 5, 11, blank, 12, 12, blank]
    tokens = mx.array([slots])
    log_probs = np.array(g.token_log_probs(mx.array(logits)[None], tokens, blank))
    x = logits.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    reference = x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))
    assert log_probs.shape == (1, 12, 1 + len(slots))
    np.testing.assert_allclose(log_probs[0], reference[:, [blank, *slots]], atol=1e-5)
    words = g.word_times(model, tokenizer, log_probs, tokens, [12], [ids])[0]
    assert words == window_words(model, tokenizer, mx.array(logits), ids)


def test_word_times_empty_hypothesis(loaded, monkeypatch):
    # An empty hypothesis is reached whenever a non-silent window's editor output collapses to
    # nothing; its words are none.
    model, tokenizer = loaded
    logits = mx.zeros((10, model.args.encoder.bpe_output_dim))
    assert window_words(model, tokenizer, logits, []) == []
    blank = model.args.blank_token_id
    only_blanks = lambda model, e, l, hypotheses, step: (mx.full((len(hypotheses), 8), blank), [8])
    monkeypatch.setattr(g, "edit_pass", only_blanks)
    assert g.transcribe(model, tokenizer, AUDIO, word_timestamps=True) == {
        "text": "",
        "segments": [],
    }


# ---- the command line ----

LONG_SECONDS = 47


@pytest.fixture(scope="module")
def long_file(speech, tmp_path_factory):
    """47 s of the fixture repeated with 0.5 s gaps, PCM_16: two 30 s windows."""
    gap = np.zeros(SR // 2, np.float32)
    reps = -(-LONG_SECONDS * SR // (len(speech) + len(gap)))
    audio = np.concatenate([speech, gap] * reps)[: LONG_SECONDS * SR]
    path = tmp_path_factory.mktemp("long") / "long.wav"
    sf.write(path, audio, SR, subtype="PCM_16")
    return path


def cli(*args):
    result = subprocess.run(
        [sys.executable, "granite_nar.py", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_cli_subtitles(fmt, model_dir, long_file, tmp_path):
    out = tmp_path / "out"
    stdout = cli(long_file, "--model", model_dir, "--output-format", fmt, "--output-dir", out)
    cues = parse_cues(stdout, fmt == "vtt", 42, 2)
    assert len(cues) >= 3
    assert_cue_times(cues, LONG_SECONDS, slack=FRAME)  # the last pooled frame may pass the end
    assert any(start > 30 for start, _, _ in cues)  # the second window
    written = out / (long_file.name + "." + fmt)  # outside the working directory: its name
    assert written.read_text(encoding="utf-8") == stdout


def test_cli_json_word_timestamps(model_dir, long_file):
    stdout = cli(long_file, "--model", model_dir, "--output-format", "json", "--word-timestamps")
    lines = stdout.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["file"] == str(long_file)
    assert record["audio_seconds"] == LONG_SECONDS
    segments = record["segments"]
    assert len(segments) >= 3 and all(s["words"] for s in segments)
    words = [w for s in segments for w in s["words"]]
    assert set(words[0]) == {"word", "start", "end", "confidence"}
    starts = [w["start"] for w in words]
    assert starts == sorted(starts) and starts[0] >= 0 and starts[-1] < LONG_SECONDS
    assert all(w["start"] < w["end"] <= LONG_SECONDS + FRAME for w in words)
    assert any(w["start"] > 30 for w in words)
    assert squash(" ".join(s["text"] for s in segments)) == squash(record["text"])
