"""The paths a first user takes through the command line of granite_nar.py, run as a subprocess.

Every failure is one line on stderr naming the input (argparse usage errors: its usage block and
one error line), exit status 1 (2 for usage errors), and never a traceback. The model is the dev
fixture (tests/fixtures/dev, random weights): transcripts are gibberish but deterministic.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import warnings
import wave
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import granite_nar as g  # noqa: E402

SCRIPT = ROOT / "granite_nar.py"
FIXTURE = ROOT / "tests" / "fixtures" / "dev"
AUDIO, AUDIO_SHORT = FIXTURE / "audio.wav", FIXTURE / "audio_short.wav"
GOLDEN_TEXT = json.loads((FIXTURE / "golden.json").read_text())["decoded_text"]
GOLDEN_SHORT = json.loads((FIXTURE / "golden_short.json").read_text())["decoded_text"]
SR = g.SAMPLE_RATE
COLUMNS = ["file", "text", "audio_seconds", "processing_seconds", "speed"]


def _env(**extra):
    return {**os.environ, "PYTHONIOENCODING": "utf-8", **extra}


def _cli(*args, cwd=ROOT, stdin=None, **env):
    """Run the CLI; stdout and stderr decoded as UTF-8, line ends untouched."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        input=stdin,
        capture_output=True,
        env=_env(**env),
        cwd=cwd,
        timeout=300,  # a GPU compiles each new shape's kernels on first use, here in every run
    )
    result.stdout = result.stdout.decode("utf-8")
    result.stderr = result.stderr.decode("utf-8")
    return result


def _lines(stderr):
    """stderr's lines, less the note a machine without OpenBLAS adds to every run."""
    return [line for line in stderr.splitlines() if "OpenBLAS" not in line]


def _failure(result, status=1):
    """The one line a failed run writes to stderr (checked: exit status, no traceback)."""
    assert result.returncode == status, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = _lines(result.stderr)
    assert len(lines) == 1, result.stderr
    return lines[0]


def _usage_error(result):
    """An argparse usage error: exit 2, the usage block, then one error line (returned)."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    *usage, error = _lines(result.stderr)
    assert usage and usage[0].startswith("usage:"), result.stderr
    assert all(line.startswith(" ") for line in usage[1:]), result.stderr  # usage continued
    assert error.startswith("granite_nar.py: error: "), result.stderr
    return error


def _noise(path, seconds, seed=0):
    x = 0.3 * np.random.default_rng(seed).standard_normal(round(seconds * SR))
    sf.write(path, x.astype(np.float32), SR, subtype="PCM_16")


# 1. bad option values


def test_bad_options_are_one_line_each(model_dir):
    messages = {}
    for option in (
        "--chunk-seconds inf",
        "--chunk-seconds nan",
        "--batch-size 0",
        "--batch-seconds 0",
        "--batch-seconds nan",
        "--editing-steps 0",
        "--verbose --quiet",
    ):
        messages[option] = _usage_error(_cli(AUDIO, "--model", model_dir, *option.split()))
        assert option.split()[0] in messages[option], messages[option]
        if option == "--verbose --quiet":
            assert "--quiet" in messages[option], messages[option]
    limit = g.max_chunk_seconds(g.read_checkpoint(model_dir)[1].args)
    assert limit == 112  # the dev model's editor positions
    message = _usage_error(_cli(AUDIO, "--model", model_dir, "--chunk-seconds", "300"))
    assert "--chunk-seconds" in message and str(limit) in message, message
    messages["--chunk-seconds 300"] = message
    assert len(set(messages.values())) == len(messages), messages


# 2. | head -1


def test_closed_stdout_gives_no_traceback(model_dir, tmp_path):
    # c.wav takes a few seconds (window by window): its lines come after head has exited
    _noise(tmp_path / "c.wav", 30)
    err = tmp_path / "stderr.txt"
    files = [AUDIO_SHORT, AUDIO, tmp_path / "c.wav"]
    python = [sys.executable, str(SCRIPT), *map(str, files), "--model", str(model_dir)]
    python += ["--chunk-seconds", "4", "--batch-size", "1"]
    command = f"{shlex.join(python)} 2>{shlex.quote(str(err))} | head -1; exit ${{PIPESTATUS[0]}}"
    result = subprocess.run(
        command,
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=120,
    )
    stderr = err.read_text(encoding="utf-8")
    assert result.stdout == f"==> {AUDIO_SHORT} <==\n", result.stdout
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert "Broken pipe" not in stderr, stderr
    assert result.returncode == 1, (result.returncode, stderr)


# 3. Ctrl-C


def test_ctrl_c_exits_130_without_traceback(model_dir, tmp_path):
    _noise(tmp_path / "long.wav", 180)  # minutes of windows: it is still going
    command = [sys.executable, str(SCRIPT), str(tmp_path / "long.wav"), "--model", str(model_dir)]
    command += ["--chunk-seconds", "4", "--batch-size", "1"]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        env=_env(),
        cwd=ROOT,
    )
    try:
        seen = []
        for line in process.stderr:  # wait for the first progress line: it is transcribing
            seen.append(line)
            if " of 180 s" in line:
                break
        assert process.poll() is None, "".join(seen)
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    stderr = "".join(seen) + rest
    assert process.returncode == 130, (process.returncode, stderr)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "180 of 180 s" not in stderr  # it stopped before the end


# 4. - is standard input


def test_stdin_wav_and_flac(model_dir, tmp_path):
    result = _cli("-", "--model", model_dir, stdin=AUDIO.read_bytes())
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == GOLDEN_TEXT + "\n"
    sf.write(tmp_path / "audio.flac", sf.read(AUDIO, dtype="int16")[0], SR, subtype="PCM_16")
    result = _cli("-", "--model", model_dir, stdin=(tmp_path / "audio.flac").read_bytes())
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == GOLDEN_TEXT + "\n"


# 5. uint8 arrays


def test_uint8_array_transcribes_as_its_8_bit_file(loaded, tmp_path):
    model, tokenizer = loaded
    sf.write(tmp_path / "u8.wav", sf.read(AUDIO, dtype="float32")[0], SR, subtype="PCM_U8")
    with wave.open(str(tmp_path / "u8.wav")) as f:
        assert f.getsampwidth() == 1 and f.getframerate() == SR
        pcm8 = np.frombuffer(f.readframes(f.getnframes()), np.uint8)
    from_file = g.transcribe(model, tokenizer, tmp_path / "u8.wav")
    assert g.transcribe(model, tokenizer, pcm8) == from_file
    assert from_file  # not silence: the comparison means something


# 6. --model that is not there


def test_missing_model_directory_and_unknown_repo(model_dir, tmp_path):
    (tmp_path / "models").mkdir()
    result = _cli(AUDIO, "--model", "models/granite_nar_mlx", cwd=tmp_path, HF_HUB_OFFLINE="1")
    message = _failure(result)
    assert "model directory not found" in message and "models/granite_nar_mlx" in message, message
    assert "download" not in message.lower() and "hub" not in message.lower(), message
    repo = "nonexistent-owner/nonexistent-model"
    message = _failure(_cli(AUDIO, "--model", repo, HF_HUB_OFFLINE="1"))
    assert "--model" in message and repo in message and "directory" in message, message


# 7-10. several files, folders, --output-dir, temporary files


def test_several_files_folders_output_dir_and_no_temporary_files(model_dir, tmp_path, child_tmpdir):
    work, out, tmpdir = tmp_path / "work", tmp_path / "out", child_tmpdir
    for folder in ("a", "b", "c"):
        (work / folder).mkdir(parents=True)
    shutil.copy(AUDIO, work / "a" / "x.wav")
    shutil.copy(AUDIO_SHORT, work / "b" / "x.wav")  # the same name in another folder
    sf.write(work / "a" / "x.flac", sf.read(AUDIO, dtype="int16")[0], SR, subtype="PCM_16")
    shutil.copy(AUDIO_SHORT, work / "c" / "y.wav")
    (work / "c" / "notes.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A not really")
    (work / "c" / "notes.txt").write_text("not audio")
    inputs = ("a/x.wav", "b/x.wav", "a/x.flac", "c")
    result = _cli(*inputs, "--model", model_dir, "--output-dir", out, cwd=work, TMPDIR=str(tmpdir))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    # 7: each file named, as head does; a blank line between blocks
    texts = {
        "a/x.wav": GOLDEN_TEXT,
        "b/x.wav": GOLDEN_SHORT,
        "a/x.flac": GOLDEN_TEXT,
        "c/y.wav": GOLDEN_SHORT,
    }
    assert result.stdout == "\n".join(f"==> {f} <==\n{t}\n" for f, t in texts.items())
    # 9: one note naming the skipped files
    notes = [line for line in _lines(result.stderr) if line.startswith("note:")]
    assert len(notes) == 1 and "notes.m4a" in notes[0] and "notes.txt" in notes[0], result.stderr
    assert "y.wav" not in notes[0]
    # 8: outputs mirror the inputs' paths: no two inputs share one
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["a/x.flac.txt", "a/x.wav.txt", "b/x.wav.txt", "c/y.wav.txt"], written
    for name, text in texts.items():
        assert (out / f"{name}.txt").read_text(encoding="utf-8") == text + "\n", name
    # 10: no temporary files left, in the output dir or in TMPDIR (MLX's kernel cache may be)
    left = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.endswith(".tmp")]
    assert left == []
    assert set(os.listdir(tmpdir)) <= {"mlx"}, os.listdir(tmpdir)
    # a single file: just its text
    result = _cli("c/y.wav", "--model", model_dir, cwd=work)
    assert result.returncode == 0 and result.stdout == GOLDEN_SHORT + "\n", result.stderr


# 7, 11. json and tsv keep the file field; speed, not real_time_factor


def test_json_and_tsv_name_files_and_give_speed(model_dir):
    result = _cli(AUDIO, AUDIO_SHORT, "--model", model_dir, "--output-format", "json")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "==>" not in result.stdout
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["file"] for r in records] == [str(AUDIO), str(AUDIO_SHORT)]
    assert [r["text"] for r in records] == [GOLDEN_TEXT, GOLDEN_SHORT]
    for record in records:
        assert list(record) == COLUMNS and "real_time_factor" not in record
        assert record["speed"] > 0
    result = _cli(AUDIO, AUDIO_SHORT, "--model", model_dir, "--output-format", "tsv")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    header, *rows = result.stdout.split("\n")[:-1]
    assert header.split("\t") == COLUMNS and "==>" not in result.stdout
    assert [row.split("\t")[0] for row in rows] == [str(AUDIO), str(AUDIO_SHORT)]


def test_a_slow_first_run_keeps_its_speed():
    # a first run on a GPU builds its kernels: 1 s of audio in 40 s is 0.025x, not 0.0
    window = g.Window(0, 0.0, 1.0, True, text="a", elapsed=40.0)
    assert g._record("a.wav", [window], None)["speed"] == 0.025


# 12. a truncated WAV


def test_truncated_wav_transcribes_with_one_warning(loaded, model_dir, tmp_path):
    data = AUDIO.read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 8])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = g.transcribe(*loaded, tmp_path / "cut.wav")
        n_read = len(g.load_audio(tmp_path / "cut.wav"))
    result = _cli(tmp_path / "cut.wav", "--model", model_dir)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == expected + "\n"
    lines = _lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("warning: "), result.stderr
    header_seconds = sf.info(str(AUDIO)).frames / SR
    for part in ("cut.wav", "truncated", f"{header_seconds:.2f} s", f"{n_read / SR:.2f} s"):
        assert part in lines[0], (part, lines[0])


# 13. unreadable files


def test_corrupt_empty_and_m4a_files(model_dir, tmp_path):
    (tmp_path / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "zero.wav").write_bytes(b"")
    (tmp_path / "x.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(200))
    names = ("corrupt.wav", "zero.wav", "x.m4a")
    result = _cli(*(tmp_path / n for n in names), AUDIO_SHORT, "--model", model_dir)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == f"==> {AUDIO_SHORT} <==\n{GOLDEN_SHORT}\n"  # the others still go
    lines = _lines(result.stderr)
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), result.stderr
    by_name = {n: [line for line in lines if n in line] for n in names}
    assert all(len(found) == 1 for found in by_name.values()), result.stderr
    assert "ffmpeg" not in by_name["corrupt.wav"][0] and "ffmpeg" not in by_name["zero.wav"][0]
    assert "empty" in by_name["zero.wav"][0]
    hint = re.search(r"ffmpeg -i (\S+) (\S+?)\)?$", by_name["x.m4a"][0])
    assert hint, by_name["x.m4a"][0]
    source, target = hint.groups()
    assert source == str(tmp_path / "x.m4a") and Path(target).name == "x.wav", hint.groups()
