"""granite_nar.py under mlx.launch: two processes on this machine (MLX's ring backend over
localhost) share a folder of clips, each file transcribed once, and --skip-existing resumes.

mlx.launch has each rank's shell write its pid and the ring's hostfile to files of `mktemp` that
it never removes: the launches run with TMPDIR in the test's temporary folder (child_tmpdir),
on free ports."""

import os
import re
import shutil
import socket
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
AUDIO = ROOT / "tests" / "fixtures" / "dev" / "audio.wav"
# next to this Python (a virtual environment that is not activated), else on PATH (if any)
SEARCH = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])
LAUNCH = shutil.which("mlx.launch", path=SEARCH)
SECONDS = [1.2, 3.4, 2.0, 6.5, 0.8, 4.1, 40.0]  # the last has two windows
# pip install --target (as on some GPU machines) installs no console scripts
pytestmark = pytest.mark.skipif(LAUNCH is None, reason="mlx.launch is not installed")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    x, rate = sf.read(AUDIO, dtype="float32")
    for i, seconds in enumerate(SECONDS):
        y = np.concatenate([x * (0.5 + 0.1 * i)] * int(np.ceil(seconds * rate / len(x))))
        sf.write(folder / f"clip{i}.wav", y[: int(seconds * rate)], rate, subtype="PCM_16")
    return folder


def free_ports(n):
    """The first of n consecutive TCP ports free on localhost (the ring's ranks listen there)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        try:
            with ExitStack() as stack:
                for port in range(first, first + n):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports")


def run(model_dir, *args, processes=1, cwd, tmpdir=None):
    """granite_nar.py, or `processes` of it under mlx.launch with TMPDIR=tmpdir."""
    command = [sys.executable, str(ROOT / "granite_nar.py"), *map(str, args)]
    # float32, where a clip's text does not depend on the clips batched with it (on a GPU bf16
    # would be the default, and a rank's batches differ from one process's)
    command += ["--model", str(model_dir), "--dtype", "float32"]
    env = dict(os.environ)
    if processes > 1:
        # mlx.launch is a script of this Python's: run by it, not by its #! line or PATH; after
        # --, options such as --verbose are the command's, not mlx.launch's own
        port = str(free_ports(processes))
        launch = [LAUNCH, "-n", str(processes), "--backend", "ring", "--starting-port", port]
        command = [sys.executable, *launch, "--python", sys.executable, "--", *command[1:]]
        env["TMPDIR"] = str(tmpdir)  # mlx.launch's pid and host files go there
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def shares(stderr):
    """(files, seconds of audio) each rank transcribed: the summary each prints with --verbose."""
    found = re.findall(r"^(\d+) file\(s\), ([\d.]+) s of audio in", stderr, re.M)
    return [(int(n), float(seconds)) for n, seconds in found]


def outputs(folder):
    return {p.relative_to(folder): p.read_text() for p in sorted(folder.rglob("*.txt"))}


def test_two_processes_transcribe_each_file_once(model_dir, corpus, tmp_path, child_tmpdir):
    one = run(model_dir, corpus, "--output-dir", tmp_path / "one", "--verbose", cwd=corpus.parent)
    two = ("--output-dir", tmp_path / "two", "--verbose")
    two = run(model_dir, corpus, *two, processes=2, cwd=corpus.parent, tmpdir=child_tmpdir)
    assert one.returncode == two.returncode == 0, two.stderr
    assert two.stdout == one.stdout  # in input order, each record once, from rank 0
    assert two.stdout.count("==> ") == len(SECONDS)
    assert outputs(tmp_path / "two") == outputs(tmp_path / "one")
    assert len(outputs(tmp_path / "one")) == len(SECONDS)
    assert "Traceback" not in two.stderr
    # each rank transcribed its share, not all of them: the shares add up to the whole
    assert [n for n, _ in shares(one.stderr)] == [len(SECONDS)]
    files, seconds = zip(*shares(two.stderr))
    assert len(files) == 2 and sum(files) == len(SECONDS) and max(files) < len(SECONDS), files
    assert sum(seconds) == pytest.approx(sum(SECONDS), abs=0.1)


def test_skip_existing_transcribes_exactly_the_missing(model_dir, corpus, tmp_path, child_tmpdir):
    out = tmp_path / "out"
    assert run(model_dir, corpus, "--output-dir", out, cwd=corpus.parent).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.txt")}
    gone = sorted(before)[1:3]
    texts = {p: p.read_text() for p in gone}
    for p in gone:
        p.unlink()
    options = ("--output-dir", out, "--skip-existing", "--verbose")
    result = run(model_dir, corpus, *options, processes=2, cwd=corpus.parent, tmpdir=child_tmpdir)
    assert result.returncode == 0, result.stderr
    assert "5 file(s) skipped" in result.stderr and result.stdout.count("==> ") == 2
    assert [n for n, _ in shares(result.stderr)] == [1, 1]  # a missing file each
    assert {p: p.read_text() for p in gone} == texts  # restored as they were
    assert {p: p.stat().st_mtime_ns for p in before if p not in gone} == {
        p: before[p] for p in before if p not in gone
    }
    result = run(model_dir, corpus, "--skip-existing", cwd=corpus.parent)
    assert result.returncode == 2 and "--skip-existing needs --output-dir" in result.stderr


def test_a_failing_file_is_reported_and_the_others_run(model_dir, corpus, tmp_path, child_tmpdir):
    folder = tmp_path / "mixed"
    shutil.copytree(corpus, folder)
    (folder / "broken.wav").write_bytes(b"RIFF not audio")
    out = ("--output-dir", tmp_path / "out")
    result = run(model_dir, folder, *out, processes=2, cwd=tmp_path, tmpdir=child_tmpdir)
    assert "rank 0 exited with code 1" in result.stderr  # the status of all ranks (mlx.launch)
    assert result.stderr.count("broken.wav: cannot read") == 1 and "Traceback" not in result.stderr
    assert len(outputs(tmp_path / "out")) == 7 and result.stdout.count("==> ") == 7


def test_standard_input_is_refused_under_launch(model_dir, tmp_path, child_tmpdir):
    result = run(model_dir, "-", processes=2, cwd=tmp_path, tmpdir=child_tmpdir)
    assert "- (standard input) reaches one process only" in result.stderr
    assert "exited with code 2" in result.stderr  # as other conflicting options
    assert "Traceback" not in result.stderr
