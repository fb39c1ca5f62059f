"""`make benchmark`: every benchmark script, at the libraries' default threads and at
one thread, one after the other in one run.

Each setting runs in a fresh process, because NumPy's BLAS and XLA size their thread
pools when they load:

- **default threads**: OpenBLAS with one thread per core (its own default, written out
  so that a script's "one thread unless set" does not apply) and XLA's CPU backend as it
  comes: what a reader who installs the libraries gets;
- **one thread**: OPENBLAS_NUM_THREADS, OMP_NUM_THREADS and MKL_NUM_THREADS set to 1 and
  XLA's CPU backend on one thread, for both sides of every comparison.

The scripts that already print both settings themselves run once. Every table says
which setting it was run at.

usage: python benchmarks/run.py [SCRIPT ...]   (default: every benchmarks/bench_*.py)
"""

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
ONE_THREAD = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
}
# Scripts that run both settings themselves: each setting in its own subprocess, except
# bench_robust.py, which runs the one-thread setting in the same process under
# threadpoolctl's limit (it times NumPy and SciPy only, no XLA).
BOTH_ITSELF = {
    "bench_geometry.py",
    "bench_robust.py",
    "bench_bundle.py",
    "bench_implicit.py",
    "bench_images.py",
    "bench_flow.py",
}
# The flag that lets a script, which holds one thread by default, use the default.
DEFAULT_FLAGS = {
    "bench_backprop.py": ["--threads", "0"],
    "bench_layers.py": ["--all-threads"],
}


def environment(setting):
    env = {k: v for k, v in os.environ.items() if k not in ONE_THREAD}
    env.setdefault("JAX_PLATFORMS", "cpu")
    if setting == "one thread":
        env.update(ONE_THREAD)
    else:
        env["OPENBLAS_NUM_THREADS"] = str(os.cpu_count())
    return env


def run(script, setting):
    flags = DEFAULT_FLAGS.get(script.name, []) if setting == "default threads" else []
    print(f"\n# {script.name}: {setting}\n", flush=True)
    subprocess.run(
        [sys.executable, str(script), *flags],
        env=environment(setting),
        cwd=HERE.parent,
        check=True,
    )


def main(names):
    scripts = (
        [HERE / pathlib.Path(n).name for n in names]
        if names
        else sorted(HERE.glob("bench_*.py"))
    )
    print(f"{os.cpu_count()} cores", flush=True)
    for script in scripts:
        if script.name in BOTH_ITSELF:
            print(
                f"\n# {script.name}: both settings, as the script runs them\n",
                flush=True,
            )
            subprocess.run(
                [sys.executable, str(script)],
                env=environment("default threads"),
                cwd=HERE.parent,
                check=True,
            )
            continue
        for setting in ["default threads", "one thread"]:
            run(script, setting)


if __name__ == "__main__":
    main(sys.argv[1:])
