"""Fixtures shared by the tests: the dev checkpoint (tests/fixtures/dev), converted once."""

import importlib.metadata
import os
import tempfile
from pathlib import Path

# The tests compare float32 with the reference: on a GPU, float32 matmuls must not run as TF32.
os.environ.setdefault("MLX_ENABLE_TF32", "0")
# MLX compiles its CPU kernels with g++, which finds its own parts through PATH: without one
# (env -i), the tests and the processes they start get the system's default.
os.environ.setdefault("PATH", os.defpath)
# MLX writes a GPU kernel it builds into its cache file in place, so a process reading that file
# while another writes it loads half a kernel and stops: under pytest-xdist (-n) each worker, and
# the processes it starts, keep their own cache.
if worker := os.environ.get("PYTEST_XDIST_WORKER"):
    mlx_version = importlib.metadata.version("mlx")  # as MLX's own default, one cache a version
    default = os.path.join(tempfile.gettempdir(), "mlx", mlx_version, "ptx")
    os.environ["MLX_PTX_CACHE_DIR"] = os.path.join(
        os.environ.get("MLX_PTX_CACHE_DIR", default), worker
    )

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
