"""convert.py's --hf-path as a Hugging Face Hub repo id, downloaded as granite_nar.load() downloads
one (granite_nar.model_path). The download is mocked at its boundary, huggingface_hub's
snapshot_download, with a copy of the dev fixture checkpoint (tests/fixtures/dev/checkpoint)."""

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import mlx.core as mx
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import granite_nar as g  # noqa: E402
from convert import convert  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "dev"
CHECKPOINT = FIXTURE / "checkpoint"
REPO = "someone/granite-nar-test"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The (repo_id, allow_patterns) of each download; the snapshot holds the fixture
    checkpoint's files that allow_patterns selects, as the Hub would. The working directory is
    tmp_path, where no folder makes a repo id look local."""
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        local = tmp_path / "hub" / repo_id.replace("/", "--")
        local.mkdir(parents=True)
        for file in CHECKPOINT.iterdir():
            if any(fnmatch.fnmatch(file.name, p) for p in allow_patterns):
                shutil.copy(file, local)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    return calls


def test_repo_id_is_downloaded_and_converts_as_the_local_checkpoint(hub, model_dir, tmp_path):
    convert(REPO, tmp_path / "from_hub")
    assert hub == [(REPO, g.HUB_FILES)]
    ours, local = (
        mx.load(str(d / "model.safetensors")) for d in (tmp_path / "from_hub", model_dir)
    )
    assert sorted(ours) == sorted(local)
    for key in local:
        assert ours[key].dtype == local[key].dtype
        assert mx.array_equal(ours[key], local[key]).item(), key
    names = sorted(p.name for p in (tmp_path / "from_hub").iterdir())
    assert names == sorted(p.name for p in model_dir.iterdir())  # tokenizer files included
    model, tokenizer = g.load(tmp_path / "from_hub", dtype=mx.float32)
    golden = json.loads((FIXTURE / "golden_short.json").read_text())["decoded_text"]
    assert g.transcribe(model, tokenizer, FIXTURE / "audio_short.wav") == golden


@pytest.mark.parametrize(
    "path", ["./someone/model", "/no/such/dir", "nested/too/deep", "plain-name", "models/ckpt"]
)
def test_local_looking_missing_path_is_refused_without_download(hub, tmp_path, path):
    (tmp_path / "models").mkdir()  # models/ckpt: its folder exists here, so it is a local path
    message = f"^checkpoint directory not found: {re.escape(str(Path(path)))}$"
    with pytest.raises(FileNotFoundError, match=message):
        convert(path, tmp_path / "out")
    assert hub == []
    assert not (tmp_path / "out").exists()


def test_busy_output_fails_before_any_download(hub, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="busy"):
        convert(REPO, tmp_path / "busy")
    assert hub == []


def test_repo_id_without_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        convert(REPO, tmp_path / "out")


def _convert_cli(tmp_path, hf_path):
    """convert.py as a subprocess, offline with an empty Hub cache: (exit status, stderr lines)."""
    env = {
        **os.environ,
        "PYTHONIOENCODING": "utf-8",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
    }
    result = subprocess.run(
        [sys.executable, str(ROOT / "convert.py"), "--hf-path", hf_path, "--mlx-path", "out"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    lines = [line for line in result.stderr.splitlines() if "OpenBLAS" not in line]
    return result.returncode, lines


def test_cli_offline_download_fails_in_one_line(tmp_path):
    repo = "nonexistent-owner/nonexistent-model"
    status, lines = _convert_cli(tmp_path, repo)
    assert status == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {repo} is neither a local directory nor a Hub repo"), lines
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


def test_cli_missing_local_directory_in_one_line(tmp_path):
    status, lines = _convert_cli(tmp_path, "./no/such/checkpoint")
    assert status == 1 and lines == ["error: checkpoint directory not found: no/such/checkpoint"]
