"""Shared test set-up: JAX on the CPU in float64, a seeded RNG, and the built book.

JAX_PLATFORMS is set before anything imports JAX, and the notebook kernels that nbval
starts inherit it, so no kernel prints a GPU warning on stderr.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("PYTHONHASHSEED", "0")

import pathlib  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_enable_x64", True)

ROOT = pathlib.Path(__file__).resolve().parents[1]

settings.register_profile("book", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("book")


@pytest.fixture
def rng():
    return np.random.default_rng(20181)


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    """Build the whole book once per test session, with warnings as errors.

    Yields (returncode, output, html_dir). The build runs from a copy of the sources
    so that the working tree's _build/ is left alone.
    """
    src = tmp_path_factory.mktemp("book-src")
    for name in ["_config.yml", "_toc.yml", "book"]:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("_build", ".ipynb_checkpoints"))
        else:
            shutil.copy(path, src / name)
    jb = pathlib.Path(sys.executable).with_name("jupyter-book")
    proc = subprocess.run(
        [str(jb), "build", str(src), "-W", "-n", "--keep-going", "--all"],
        capture_output=True,
        text=True,
        cwd=src,
    )
    return proc.returncode, proc.stdout + proc.stderr, src / "_build" / "html"
