"""Fixtures shared by the tests: the dev checkpoint (tests/fixtures/dev), converted once."""

import os

# The tests compare float32 with the reference: on a GPU, float32 matmuls must not run as TF32.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

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
