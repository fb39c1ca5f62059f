"""Shared test set-up: JAX on the CPU in float64, a seeded RNG, and the built book.

JAX_PLATFORMS is set before anything imports JAX, and the notebook kernels that nbval
starts inherit it, so no kernel prints a GPU warning on stderr.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("PYTHONHASHSEED", "0")

import fcntl  # noqa: E402
import json  # noqa: E402
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
def browser():
    """Headless Chromium, one per test process, for every browser test file."""
    from test_browser import launch_browser

    yield from launch_browser()


@pytest.fixture(scope="session")
def site(built_book):
    """The built book served on 127.0.0.1, one server per test process: its base URL."""
    from test_browser import serve_book

    yield from serve_book(built_book)


@pytest.fixture(scope="session")
def built_book(tmp_path_factory, request):
    """Build the whole book once per test run, with warnings as errors.

    Returns (returncode, output, html_dir). The build runs from a copy of the sources
    so that the working tree's _build/ is left alone. Under pytest-xdist the workers
    share one build: the first to ask builds it in the run's common temporary folder
    while holding a lock, and the others wait for it and read its result.
    """
    # Without pytest-xdist (`-p no:xdist`) there is no worker_id, and no one to share with.
    if not hasattr(request.config, "workerinput"):
        return _build_book(tmp_path_factory.mktemp("book-src"))
    shared = tmp_path_factory.getbasetemp().parent
    with open(shared / "book-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = shared / "book-build.json"
        if not result.exists():
            returncode, output, html = _build_book(shared / "book-src")
            result.write_text(json.dumps([returncode, output, str(html)]))
        returncode, output, html = json.loads(result.read_text())
    return returncode, output, pathlib.Path(html)


def _build_book(src):
    src.mkdir(parents=True, exist_ok=True)
    for name in ["_config.yml", "_toc.yml", "book"]:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(
                path,
                src / name,
                ignore=shutil.ignore_patterns("_build", ".ipynb_checkpoints"),
            )
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
