"""granite_nar.py under mlx.launch: two processes on this machine (MLX's ring backend over
localhost) share a folder of clips, each file transcribed once, and --skip-existing resumes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
AUDIO = ROOT / "tests" / "fixtures" / "dev" / "audio.wav"
LAUNCH = shutil.which(
    "mlx.launch", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
)
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


def run(model_dir, *args, processes=1, cwd):
    command = [
        sys.executable,
        str(ROOT / "granite_nar.py"),
        *map(str, args),
        "--model",
        str(model_dir),
    ]
    if processes > 1:
        command = [LAUNCH, "-n", str(processes), "--backend", "ring", "--python", *command]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300)


def outputs(folder):
    return {p.relative_to(folder): p.read_text() for p in sorted(folder.rglob("*.txt"))}


def test_two_processes_transcribe_each_file_once(model_dir, corpus, tmp_path):
    one = run(model_dir, corpus, "--output-dir", tmp_path / "one", cwd=corpus.parent)
    two = run(model_dir, corpus, "--output-dir", tmp_path / "two", processes=2, cwd=corpus.parent)
    assert one.returncode == two.returncode == 0, two.stderr
    assert two.stdout == one.stdout  # in input order, each record once, from rank 0
    assert two.stdout.count("==> ") == len(SECONDS)
    assert (
        outputs(tmp_path / "two") == outputs(tmp_path / "one")
        and len(outputs(tmp_path / "one")) == 7
    )
    assert "Traceback" not in two.stderr


def test_skip_existing_transcribes_exactly_the_missing(model_dir, corpus, tmp_path):
    out = tmp_path / "out"
    assert run(model_dir, corpus, "--output-dir", out, cwd=corpus.parent).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.txt")}
    gone = sorted(before)[1:3]
    texts = {p: p.read_text() for p in gone}
    for p in gone:
        p.unlink()
    result = run(
        model_dir, corpus, "--output-dir", out, "--skip-existing", processes=2, cwd=corpus.parent
    )
    assert result.returncode == 0, result.stderr
    assert "5 file(s) skipped" in result.stderr and result.stdout.count("==> ") == 2
    assert {p: p.read_text() for p in gone} == texts  # restored as they were
    assert {p: p.stat().st_mtime_ns for p in before if p not in gone} == {
        p: before[p] for p in before if p not in gone
    }
    result = run(model_dir, corpus, "--skip-existing", cwd=corpus.parent)
    assert result.returncode == 2 and "--skip-existing needs --output-dir" in result.stderr


def test_a_failing_file_is_reported_and_the_others_run(model_dir, corpus, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(corpus, folder)
    (folder / "broken.wav").write_bytes(b"RIFF not audio")
    result = run(model_dir, folder, "--output-dir", tmp_path / "out", processes=2, cwd=tmp_path)
    assert "rank 0 exited with code 1" in result.stderr  # the status of all ranks (mlx.launch)
    assert result.stderr.count("broken.wav: cannot read") == 1 and "Traceback" not in result.stderr
    assert len(outputs(tmp_path / "out")) == 7 and result.stdout.count("==> ") == 7


def test_standard_input_is_refused_under_launch(model_dir, tmp_path):
    result = run(model_dir, "-", processes=2, cwd=tmp_path)
    assert "- (standard input) reaches one process only" in result.stderr
    assert "Traceback" not in result.stderr
