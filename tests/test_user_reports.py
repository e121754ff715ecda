"""What users reported, each as they hit it: the command line of granite_nar.py run as a subprocess
(and a few library calls), with the dev model (tests/fixtures/dev, random weights).

Transcripts are gibberish but deterministic: the CLI is compared with the library's own
transcribe of the same audio, or with the same command on a file, never with fixed text. Tests
marked xfail (strict) are bugs found here, each described in its reason.
"""

import ctypes.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from test_first_run import _failure, _lines, _usage_error  # noqa: E402  (tests/ is on the path)

import granite_nar as g  # noqa: E402

SCRIPT = ROOT / "granite_nar.py"
FIXTURE = ROOT / "tests" / "fixtures" / "dev"
AUDIO, AUDIO_SHORT = FIXTURE / "audio.wav", FIXTURE / "audio_short.wav"
SR = g.SAMPLE_RATE


def _env(**extra):
    return {**os.environ, "PYTHONIOENCODING": "utf-8", **extra}


def _cli(*args, cwd=ROOT, stdin=subprocess.DEVNULL, timeout=120, **env):
    """Run the CLI; stdin is bytes (through a pipe) or a file; stdout and stderr decoded."""
    feed = {"input": stdin} if isinstance(stdin, bytes) else {"stdin": stdin}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        env=_env(**env),
        cwd=cwd,
        timeout=timeout,
        **feed,
    )
    result.stdout = result.stdout.decode("utf-8")
    result.stderr = result.stderr.decode("utf-8")
    return result


def _ok(result):
    """A run that went well: exit 0, nothing on stderr (no warning, no traceback)."""
    assert result.returncode == 0 and _lines(result.stderr) == [], result.stderr
    return result.stdout


def _named(*pairs):
    """The stdout of several inputs in text format: each named as head names files."""
    return "\n".join(f"==> {name} <==\n{text}\n" for name, text in pairs)


def _noise(path, seconds, seed=0):
    x = 0.3 * np.random.default_rng(seed).standard_normal(round(seconds * SR))
    sf.write(path, x.astype(np.float32), SR, subtype="PCM_16")


def _tmp_files(folder):
    return [str(p) for p in Path(folder).rglob(".*.tmp")]


@pytest.fixture(scope="module")
def texts(loaded):
    """The library's transcripts of the two fixture clips (float32, as the CLI on a CPU)."""
    model, tokenizer = loaded
    found = {AUDIO: g.transcribe(model, tokenizer, AUDIO)}
    found[AUDIO_SHORT] = g.transcribe(model, tokenizer, AUDIO_SHORT)
    assert found[AUDIO] and found[AUDIO_SHORT] and found[AUDIO] != found[AUDIO_SHORT]
    return found


# 1. Ctrl-C and | head


builds_cpu_kernels = pytest.mark.skipif(
    g.mx.default_device() != g.mx.cpu or not shutil.which("g++"),
    reason="MLX builds CPU kernels with g++ only when the passes run on a CPU",
)


@pytest.fixture(scope="module")
def warm(model_dir, tmp_path_factory):
    """The commands below, run once untimed: on a fresh GPU machine their first run builds the
    kernels for their shapes (a minute or more), and Ctrl-C waits for a kernel being built."""
    folder = tmp_path_factory.mktemp("warm")
    _noise(folder / "long.wav", 30)
    files = AUDIO_SHORT, folder / "long.wav", AUDIO, AUDIO_SHORT
    result = _cli(
        *files, "--model", model_dir, "--chunk-seconds", 4, "--batch-size", 1, timeout=900
    )
    assert result.returncode == 0, result.stderr  # its stderr: progress on the long file


def _stopped(process, timeout=15):
    """(stdout, stderr) left once the process ended; it must end within `timeout` seconds."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: the pipeline, nothing else
        process.communicate()
        pytest.fail(f"still running {timeout} s later")


def _interrupted(command, ready, moment=0.0, **env):
    """Run command; once a line of its stderr passes ready(line), and `moment` s after it started,
    send it SIGINT (Ctrl-C). -> (exit status, all of its stderr); it must end within 15 s."""
    start = time.monotonic()
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        env=_env(**env),
        cwd=ROOT,
        start_new_session=True,
    )
    lines, seen = [], threading.Event()

    def read():  # every line, also those after the one awaited
        for line in process.stderr:
            lines.append(line)
            if ready(line):
                seen.set()
        seen.set()  # the end, without it

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen.wait(60)
    time.sleep(max(0.0, start + moment - time.monotonic()))
    process.send_signal(signal.SIGINT)
    _stopped(process)
    reader.join(5)
    return process.returncode, "".join(lines)


@pytest.mark.usefixtures("warm")
def test_ctrl_c_at_any_moment_exits_130(model_dir, tmp_path):
    _noise(tmp_path / "long.wav", 300)  # a few seconds of windows here: each moment is mid-run
    command = [sys.executable, str(SCRIPT), str(tmp_path / "long.wav"), "--model", str(model_dir)]
    command += ["--chunk-seconds", "4", "--batch-size", "1", "--verbose"]
    after_load = lambda line: line.startswith("loaded ")  # past the imports: see the xfail below
    for moment in (0.3, 0.8, 1.5, 2.5):  # seconds after it started
        start = time.monotonic()
        status, stderr = _interrupted(command, after_load, moment)
        assert time.monotonic() - start < moment + 15
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, (moment, stderr)
        finished = "300 of 300 s" in stderr  # Ctrl-C can still come after that line: 130
        assert status == 130 or (status == 0 and finished), (moment, status, stderr)


def test_ctrl_c_while_starting_exits_130(model_dir):
    command = [sys.executable, str(SCRIPT), str(AUDIO), "--model", str(model_dir)]
    for module in ("argparse", "mlx.core", "soxr"):  # imported by granite_nar.py, in this order
        imported = lambda line: re.search(rf"\|\s+{re.escape(module)}$", line.rstrip())
        # PYTHONPROFILEIMPORTTIME: a line on stderr as each import ends
        status, stderr = _interrupted(command, imported, PYTHONPROFILEIMPORTTIME="1")
        stderr = "".join(x for x in stderr.splitlines(True) if not x.startswith("import time:"))
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, (module, stderr)
        assert status == 130, (module, status)


@builds_cpu_kernels
def test_ctrl_c_while_a_cpu_kernel_builds_leaves_a_cache_that_loads(model_dir, texts, tmp_path):
    # a g++ stopped half-way through a kernel's build: its output created, nothing written yet
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "g++").write_text(
        '#!/bin/sh\nfor a; do [ "$o" = -o ] && : > "$a" && exec sleep 60; o=$a; done\n'
        f'exec {shutil.which("g++")} "$@"\n'
    )
    (tmp_path / "bin" / "g++").chmod(0o755)
    cache = tmp_path / "mlx" / g.mx.__version__ / "cpu"  # MLX's kernels under TMPDIR, empty
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(AUDIO), "--model", str(model_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env(TMPDIR=str(tmp_path), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}"),
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not list(cache.glob("*.so")):  # the g++ above started
        assert process.poll() is None and time.monotonic() < deadline, "no kernel was built"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the compiler gets it too
    assert process.wait(60) == 130 and b"Traceback" not in process.stderr.read()
    again = _cli(AUDIO, "--model", model_dir, TMPDIR=str(tmp_path))  # the real g++
    assert _ok(again) == texts[AUDIO] + "\n"


@builds_cpu_kernels
def test_empty_kernels_in_mlx_cache_fail_one_run_in_one_line(model_dir, texts, tmp_path):
    assert _ok(_cli(AUDIO, "--model", model_dir, TMPDIR=str(tmp_path))) == texts[AUDIO] + "\n"
    kernels = list((tmp_path / "mlx" / g.mx.__version__ / "cpu").glob("lib*.so"))
    for path in kernels:  # as an MLX program whose compiler was killed leaves them
        path.write_bytes(b"")
    broken = _cli(AUDIO, "--model", model_dir, TMPDIR=str(tmp_path))
    assert broken.returncode == 1 and broken.stdout == "", broken.stderr
    [line] = _lines(broken.stderr)
    assert line.startswith("error: ") and any(path.name in line for path in kernels), line
    assert _ok(_cli(AUDIO, "--model", model_dir, TMPDIR=str(tmp_path))) == texts[AUDIO] + "\n"


@pytest.mark.usefixtures("warm")
def test_head_closes_stdout_early(model_dir, tmp_path):
    _noise(tmp_path / "long.wav", 30)
    files = [AUDIO_SHORT, tmp_path / "long.wav", AUDIO, AUDIO_SHORT]
    python = [sys.executable, str(SCRIPT), *map(str, files), "--model", str(model_dir)]
    python += ["--chunk-seconds", "4", "--batch-size", "1"]
    err = tmp_path / "stderr.txt"
    firsts = {"text": f"==> {AUDIO_SHORT} <==\n", "tsv": "\t".join(g.COLUMNS) + "\n"}
    for output_format in ("text", "json", "tsv"):
        for head in ("head -1", "head -c 1"):
            run = shlex.join([*python, "--output-format", output_format])
            command = f"{run} 2>{shlex.quote(str(err))} | {head}; exit ${{PIPESTATUS[0]}}"
            process = subprocess.Popen(
                ["/bin/bash", "-c", command],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=_env(),
                cwd=ROOT,
                start_new_session=True,
            )
            start = time.monotonic()
            stdout = _stopped(process)[0].decode("utf-8")
            assert time.monotonic() - start < 15
            stderr = err.read_text(encoding="utf-8")
            case = (output_format, head, process.returncode, stderr)
            assert "Traceback" not in stderr and "Exception ignored" not in stderr, case
            assert "Broken pipe" not in stderr and "Error" not in stderr, case
            assert process.returncode == 1, case  # what it could not print is a failure
            if head == "head -1" and output_format in firsts:
                assert stdout == firsts[output_format], case
            elif head == "head -1":
                assert json.loads(stdout)["file"] == str(AUDIO_SHORT), case
            else:
                assert len(stdout.encode("utf-8")) == 1, case


# 2. bad standard input among good files


@pytest.mark.parametrize("stdin", ["garbage", "empty", "/dev/null"])
def test_bad_stdin_among_good_files(model_dir, texts, stdin):
    with open(os.devnull, "rb") as null:
        feed = {"garbage": b"garbage\n", "empty": b"", "/dev/null": null}[stdin]
        result = _cli(AUDIO, "-", AUDIO_SHORT, "--model", model_dir, stdin=feed)
    message = _failure(result)
    assert message.startswith("error: -: "), message
    if stdin != "garbage":
        assert "empty" in message, message
    assert result.stdout == _named((AUDIO, texts[AUDIO]), (AUDIO_SHORT, texts[AUDIO_SHORT]))


def test_bad_file_objects_raise_value_errors(loaded):
    model, tokenizer = loaded
    for data in (b"junk", b"", b"RIFF\xff\xff\xff\xffWAVE", b"RIFF\x00\x00\x00\x00WAVEfmt "):
        with pytest.raises(ValueError, match="a file object: "):
            g.transcribe(model, tokenizer, io.BytesIO(data))
    with pytest.raises(ValueError):
        g.transcribe(model, tokenizer, [io.BytesIO(b"junk"), AUDIO])


# 3. an output that cannot be written


def _three_inputs(work):
    (work / "sub").mkdir(parents=True)
    shutil.copy(AUDIO, work / "a.wav")
    shutil.copy(AUDIO_SHORT, work / "sub" / "b.wav")
    shutil.copy(AUDIO, work / "c.wav")
    return ["a.wav", "sub/b.wav", "c.wav"]


def test_output_path_that_is_a_directory(model_dir, texts, tmp_path):
    names = _three_inputs(tmp_path)
    (tmp_path / "out" / "sub" / "b.wav.txt").mkdir(parents=True)
    result = _cli(*names, "--model", model_dir, "--output-dir", "out", cwd=tmp_path)
    message = _failure(result)
    assert message.startswith("error: ") and "out/sub/b.wav.txt" in message, message
    expected = dict(zip(names, (texts[AUDIO], texts[AUDIO_SHORT], texts[AUDIO])))
    assert result.stdout == _named(*expected.items())  # every input still transcribed
    for name in ("a.wav", "c.wav"):  # and the others written
        assert (tmp_path / "out" / f"{name}.txt").read_text(encoding="utf-8") == texts[AUDIO] + "\n"
    assert (tmp_path / "out" / "sub" / "b.wav.txt").is_dir()
    assert _tmp_files(tmp_path) == []


def test_output_folder_that_is_a_file(model_dir, texts, tmp_path):
    names = _three_inputs(tmp_path)
    expected = dict(zip(names, (texts[AUDIO], texts[AUDIO_SHORT], texts[AUDIO])))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sub").write_text("a file, not a folder")
    result = _cli(*names, "--model", model_dir, "--output-dir", "out", cwd=tmp_path)
    message = _failure(result)
    assert message.startswith("error: ") and "out/sub/b.wav.txt" in message, message
    assert result.stdout == _named(*expected.items())
    for name in ("a.wav", "c.wav"):
        assert (tmp_path / "out" / f"{name}.txt").read_text(encoding="utf-8") == texts[AUDIO] + "\n"
    assert _tmp_files(tmp_path) == []
    # --output-dir a file (out.txt, say): every output fails, every input is still transcribed
    (tmp_path / "out.txt").write_text("")
    result = _cli(*names, "--model", model_dir, "--output-dir", "out.txt", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = _lines(result.stderr)
    assert len(lines) == 3 and all(line.startswith("error: out.txt/") for line in lines), lines
    assert result.stdout == _named(*expected.items())


# 4. WAV headers streamed on standard input


def _with_sizes(data, riff, data_size):
    """WAV bytes with their RIFF and data chunk sizes replaced."""
    data = bytearray(data)
    at = data.index(b"data", 12)
    data[4:8], data[at + 4 : at + 8] = struct.pack("<I", riff), struct.pack("<I", data_size)
    return bytes(data)


def _wave_through_a_pipe(path):
    """The WAV that Python's wave module writes to a pipe (it cannot seek back to fix the sizes
    once it knows them): the header goes out first, saying 0 bytes of data."""
    with wave.open(str(path)) as f:
        params, frames = f.getparams(), f.readframes(f.getnframes())
    read, write = os.pipe()
    received = []
    reader = threading.Thread(target=lambda: received.append(os.fdopen(read, "rb").read()))
    reader.start()
    with open(write, "wb") as pipe:
        writer = wave.open(pipe, "wb")
        writer.setparams(params._replace(nframes=0))
        writer.writeframesraw(b"")  # the header, before any sample
        for i in range(0, len(frames), 8000):
            writer.writeframesraw(frames[i : i + 8000])
        with pytest.raises(OSError):  # close() tries to seek back to patch the header
            writer.close()
    reader.join()
    return received[0]


def test_streamed_wav_headers_on_stdin_and_on_disk(model_dir, texts, tmp_path):
    original = AUDIO.read_bytes()
    assert _ok(_cli(AUDIO, "--model", model_dir)) == texts[AUDIO] + "\n"
    streamed = {
        "ffmpeg": _with_sizes(original, 0xFFFFFFFF, 0xFFFFFFFF),
        "zero": _with_sizes(original, 0, 0),
        "wave": _wave_through_a_pipe(AUDIO),
    }
    assert streamed["wave"][4:8] == struct.pack("<I", 36)  # the header of 0 samples
    assert streamed["wave"] == _with_sizes(original, 36, 0)
    for name, data in streamed.items():
        result = _cli("-", "--model", model_dir, "--output-format", "json", stdin=data)
        record = json.loads(_ok(result))
        assert record["file"] == "-" and record["text"] == texts[AUDIO], name
        assert record["audio_seconds"] == pytest.approx(len(g.load_audio(AUDIO)) / SR, abs=1e-3)
        (tmp_path / f"{name}.wav").write_bytes(data)  # the same bytes saved to a file
        assert _ok(_cli(tmp_path / f"{name}.wav", "--model", model_dir)) == texts[AUDIO] + "\n"
    # a stream that stops inside its header: the error names -
    message = _failure(_cli("-", "--model", model_dir, stdin=streamed["ffmpeg"][:30]))
    assert message.startswith("error: -: "), message


def test_wav_sample_formats_on_stdin_as_by_path(model_dir, tmp_path):
    x = sf.read(AUDIO, dtype="float32")[0]
    stereo = np.stack([x, 0.5 * x], axis=1)
    three = np.stack([x, 0.5 * x, 0.25 * x], axis=1)
    files = {
        "pcm24.wav": (x, SR, dict(subtype="PCM_24")),
        "float32.wav": (x, SR, dict(subtype="FLOAT")),
        "stereo.wav": (stereo, SR, dict(subtype="PCM_16")),
        "stereo44k.wav": (stereo, 44100, dict(subtype="PCM_16")),
        "pcm32.wav": (x, SR, dict(subtype="PCM_32")),
        "float64.wav": (x, SR, dict(subtype="DOUBLE")),
        "u8.wav": (x, SR, dict(subtype="PCM_U8")),
        "extensible.wav": (three, 22050, dict(format="WAVEX", subtype="FLOAT")),
    }
    for name, (data, rate, options) in files.items():
        sf.write(tmp_path / name, data, rate, **options)
    # float32: the files are batched together by path, alone on stdin, and on a GPU a clip's
    # text in bf16 can depend on the clips batched with it
    cli_options = "--model", model_dir, "--output-format", "json", "--dtype", "float32"
    result = _cli(*files, *cli_options, cwd=tmp_path)
    by_path = [json.loads(line) for line in _ok(result).splitlines()]
    assert [r["file"] for r in by_path] == list(files)
    for name, record in zip(files, by_path):
        data = (tmp_path / name).read_bytes()
        result = _cli("-", *cli_options, stdin=data)
        piped = json.loads(_ok(result))
        assert piped["file"] == "-" and piped["text"] == record["text"], name
        assert piped["audio_seconds"] == record["audio_seconds"], name


def test_truncated_wav_on_a_pipe_warns_as_a_file_does(model_dir, tmp_path):
    data = AUDIO.read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 8])
    from_file = _cli(tmp_path / "cut.wav", "--model", model_dir)
    assert from_file.returncode == 0 and "truncated" in from_file.stderr, from_file.stderr
    piped = _cli("-", "--model", model_dir, stdin=data[: len(data) // 8])
    assert piped.returncode == 0 and piped.stdout == from_file.stdout
    lines = _lines(piped.stderr)
    assert len(lines) == 1 and lines[0].startswith("warning: -: truncated"), piped.stderr


def test_compressed_wav_files_read_as_libsndfile_reads_them(loaded, model_dir, tmp_path):
    model, tokenizer = loaded
    x = sf.read(AUDIO, dtype="float32")[0]
    names = ["ulaw.wav", "alaw.wav", "adpcm.wav"]
    for name, subtype in zip(names, ("ULAW", "ALAW", "IMA_ADPCM")):
        sf.write(tmp_path / name, x, SR, subtype=subtype)
    expected = [
        g.transcribe(model, tokenizer, sf.read(tmp_path / n, dtype="float32")[0]) for n in names
    ]
    result = _cli(*names, "--model", model_dir, "--dtype", "float32", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == _named(*zip(names, expected))


# 5. standard input with --output-dir


def test_stdin_output_dir_and_skip_existing(model_dir, texts, tmp_path):
    data = AUDIO.read_bytes()
    result = _cli("-", "--model", model_dir, "--output-dir", "out", cwd=tmp_path, stdin=data)
    assert _ok(result) == texts[AUDIO] + "\n"
    assert (tmp_path / "out" / "stdin.txt").read_text(encoding="utf-8") == texts[AUDIO] + "\n"
    options = "--model", model_dir, "--output-dir", "out", "--output-format", "json"
    record = json.loads(_ok(_cli("-", *options, cwd=tmp_path, stdin=data)))
    assert record["file"] == "-" and record["text"] == texts[AUDIO]
    assert json.loads((tmp_path / "out" / "stdin.json").read_text(encoding="utf-8")) == record
    assert sorted(os.listdir(tmp_path / "out")) == ["stdin.json", "stdin.txt"]
    # --skip-existing: stdin.txt is there, so - is skipped, its data read or not
    before = (tmp_path / "out" / "stdin.txt").stat().st_mtime_ns
    for stdin in (data, b"garbage"):
        options = "--model", model_dir, "--output-dir", "out", "--skip-existing"
        result = _cli("-", *options, cwd=tmp_path, stdin=stdin)
        assert result.returncode == 0 and result.stdout == "", result.stderr
        lines = _lines(result.stderr)
        assert len(lines) == 1 and lines[0].startswith("note: 1 file(s) skipped"), lines
    assert (tmp_path / "out" / "stdin.txt").stat().st_mtime_ns == before


def test_stdin_and_a_file_named_stdin_are_refused_together(model_dir, tmp_path):
    # both would write out/stdin.txt: refused before any work, nothing written
    shutil.copy(AUDIO_SHORT, tmp_path / "stdin")
    options = "--model", model_dir, "--output-dir", "out"
    result = _cli("stdin", "-", *options, cwd=tmp_path, stdin=AUDIO.read_bytes())
    assert result.returncode == 2 and result.stdout == "", result
    assert _lines(result.stderr) == [
        f"error: two inputs would write {Path('out/stdin.txt')}: give them in separate runs"
    ]
    assert not (tmp_path / "out").exists()


# 6. --chunk-seconds out of range: exit 2 before loading the model


def test_chunk_seconds_limit_checked_before_loading(model_dir, tmp_path):
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(model_dir / "config.json", weightless / "config.json")  # a config, no weights
    for seconds in ("1e9", "113", "112.5"):
        result = _cli(AUDIO, "--model", weightless, "--chunk-seconds", seconds)
        error = _usage_error(result)
        assert "--chunk-seconds" in error and "112" in error, error
        assert "weights" not in result.stderr
    for seconds in ("4", "112"):  # in range: the missing weights are the one problem
        message = _failure(_cli(AUDIO, "--model", weightless, "--chunk-seconds", seconds))
        assert message.startswith("error: --model ") and "weights" in message, message
        assert str(weightless) in message, message


# 7. srt and vtt of several inputs


@pytest.mark.parametrize("output_format", ["srt", "vtt"])
def test_subtitles_of_several_inputs(model_dir, tmp_path, output_format):
    shutil.copy(AUDIO, tmp_path / "a.wav")
    shutil.copy(AUDIO_SHORT, tmp_path / "b.wav")
    options = "--model", model_dir, "--output-format", output_format
    result = _cli("a.wav", "b.wav", *options, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    error = _lines(result.stderr)[-1]
    assert output_format in error and "--output-dir" in error, error
    assert not (tmp_path / "out").exists()
    result = _cli("a.wav", "b.wav", *options, "--output-dir", "out", cwd=tmp_path)
    assert _ok(result) == ""  # the files only
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == [f"a.wav.{output_format}", f"b.wav.{output_format}"]
    for name in ("a.wav", "b.wav"):  # each as one input's subtitles on stdout
        alone = _ok(_cli(name, *options, cwd=tmp_path))
        assert alone.startswith("WEBVTT" if output_format == "vtt" else "1\n"), alone
        assert (tmp_path / "out" / f"{name}.{output_format}").read_text(encoding="utf-8") == alone


def test_subtitles_of_several_inputs_refused_before_loading(model_dir, tmp_path):
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(model_dir / "config.json", weightless / "config.json")
    result = _cli(AUDIO, AUDIO_SHORT, "--model", weightless, "--output-format", "srt")
    assert result.returncode == 2 and "weights" not in result.stderr, result.stderr
    assert "--output-dir" in _lines(result.stderr)[-1], result.stderr


# 8. --version, txt, --help


def test_version_txt_and_help_defaults(model_dir, tmp_path):
    result = _cli("--version")
    assert result.returncode == 0 and result.stdout == f"granite_nar {g.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+", g.__version__)
    files = AUDIO, AUDIO_SHORT
    text = _ok(_cli(*files, "--model", model_dir, "--output-format", "text"))
    options = "--model", model_dir, "--output-format", "txt", "--output-dir", "out"
    assert _ok(_cli(*files, *options, cwd=tmp_path)) == text
    written = sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written == ["audio.wav.txt", "audio_short.wav.txt"]  # under their common folder
    for name in files:
        saved = (tmp_path / "out" / f"{name.name}.txt").read_text(encoding="utf-8")
        assert f"==> {name} <==\n{saved}" in text
    result = _cli("--help")
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    assert re.search(r"--max-line-width N [^-]*\(default: 42\)", help_text), result.stdout
    assert re.search(r"--max-line-count N [^-]*\(default: 2\)", help_text), result.stdout


# 9. inputs outside the working directory


def test_inputs_outside_the_working_directory(model_dir, texts, tmp_path):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    for folder in ("x", "y"):
        (elsewhere / folder).mkdir(parents=True)
    shutil.copy(AUDIO, elsewhere / "a.wav")
    shutil.copy(AUDIO, elsewhere / "x" / "a.wav")
    shutil.copy(AUDIO_SHORT, elsewhere / "y" / "a.wav")
    result = _cli(elsewhere / "a.wav", "--model", model_dir, "--output-dir", "out", cwd=work)
    assert _ok(result) == texts[AUDIO] + "\n"
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*")) == ["out", "out/a.wav.txt"]
    # two folders outside: relative to their common folder (one path relative, one absolute)
    inputs = elsewhere / "x" / "a.wav", "../elsewhere/y/a.wav"
    result = _cli(*inputs, "--model", model_dir, "--output-dir", "out2", cwd=work)
    expected = {"x/a.wav.txt": texts[AUDIO], "y/a.wav.txt": texts[AUDIO_SHORT]}
    assert _ok(result) == _named(*zip(inputs, expected.values()))
    written = sorted(str(p.relative_to(work / "out2")) for p in (work / "out2").rglob("*.txt"))
    assert written == sorted(expected)
    for name, text in expected.items():
        assert (work / "out2" / name).read_text(encoding="utf-8") == text + "\n"


def test_inputs_inside_and_outside_keep_distinct_outputs(model_dir, texts, tmp_path):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    shutil.copy(AUDIO_SHORT, work / "a.wav")
    shutil.copy(AUDIO, elsewhere / "a.wav")
    result = _cli(
        "a.wav", "../elsewhere/a.wav", "--model", model_dir, "--output-dir", "out", cwd=work
    )
    assert result.returncode == 0, result.stderr
    written = sorted(p.read_text(encoding="utf-8") for p in (work / "out").rglob("*.txt"))
    assert written == sorted([texts[AUDIO] + "\n", texts[AUDIO_SHORT] + "\n"])


# 10. what is not audio, models that are not there


def test_list_of_floats_is_not_a_waveform(loaded):
    model, tokenizer = loaded
    for samples in ([0.1, 0.2, 0.3], (0.1, 0.2), [1, 2, 3]):
        with pytest.raises(ValueError, match="a waveform is an array"):
            g.transcribe(model, tokenizer, samples)


def test_missing_local_model_directory(tmp_path):
    (tmp_path / "models").mkdir()
    message = _failure(_cli(AUDIO, "--model", "models/no_such_model", cwd=tmp_path))
    assert "model directory not found" in message and "models/no_such_model" in message, message


def test_unreachable_hub_repo(tmp_path):
    pytest.importorskip("huggingface_hub")
    hf = tmp_path / "hf"
    hf.mkdir()
    env = dict(HF_HUB_OFFLINE="1", HF_HOME=str(hf), HF_HUB_CACHE=str(hf / "hub"))
    message = _failure(_cli(AUDIO, "--model", "someone/no-such-model", cwd=tmp_path, **env))
    assert message.startswith("error: --model someone/no-such-model: "), message
    assert "neither a local directory nor a Hub repo that could be reached" in message, message


# 11. MLX imported before granite_nar on Linux


@pytest.mark.skipif(
    sys.platform != "linux" or ctypes.util.find_library("openblas") is None,
    reason="the warning is about OpenBLAS on Linux",
)
def test_importing_mlx_first_warns_once():
    def run(code):
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=ROOT
        )
        assert result.returncode == 0, result.stderr
        return result

    late = run("import mlx.core; import granite_nar as g; print(g.HAS_OPENBLAS)")
    assert late.stdout == "False\n"
    assert late.stderr.count("Warning") == 1, late.stderr
    assert "import granite_nar first" in late.stderr, late.stderr
    first = run("import granite_nar as g; import mlx.core; print(g.HAS_OPENBLAS)")
    assert first.stdout == "True\n" and first.stderr == "", first.stderr
    assert run("import granite_nar").stderr == ""
