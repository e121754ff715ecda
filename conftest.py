"""Fixtures shared by the tests: the dev checkpoint (tests/fixtures/dev), converted once."""

import os
import tempfile
from pathlib import Path

# The tests compare float32 with the reference: on a GPU, float32 matmuls must not run as TF32.
os.environ.setdefault("MLX_ENABLE_TF32", "0")
# MLX compiles its CPU kernels with g++, which finds its own parts through PATH: without one
# (env -i), the tests and the processes they start get the system's default.
os.environ.setdefault("PATH", os.defpath)

import granite_nar as g  # noqa: E402  (first: it loads OpenBLAS before MLX)

# isort: split
import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402

from convert import convert  # noqa: E402

DEV_CHECKPOINT = os.path.join(os.path.dirname(__file__), "tests", "fixtures", "dev", "checkpoint")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "mlx"
    convert(DEV_CHECKPOINT, out)
    return out


@pytest.fixture(scope="session")
def loaded(model_dir):
    return g.load(model_dir, dtype=mx.float32)


@pytest.fixture
def child_tmpdir(tmp_path):
    """An empty folder for a child process's TMPDIR, whose temporary files a test can then see,
    but for MLX's cache of compiled CPU kernels (TMPDIR/mlx, a minute to fill): a link to this
    process's."""
    cache = Path(tempfile.gettempdir()) / "mlx"
    cache.mkdir(exist_ok=True)
    folder = tmp_path / "child_tmpdir"
    folder.mkdir()
    (folder / "mlx").symlink_to(cache, target_is_directory=True)
    return folder
