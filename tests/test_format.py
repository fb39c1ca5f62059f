"""Code fits the page: derivlib and every notebook's code at most 88 characters a line,
and the whole repository in `ruff format`'s layout (the settings are in pyproject.toml).

The HTML book's code cell shows about 88 characters, so a wider line makes the reader
scroll sideways; the PDF cuts it. `ruff format` reads notebooks as well as modules.
"""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff", path=str(pathlib.Path(sys.executable).parent)) or "ruff"


def ruff(*args, cwd=ROOT):
    return subprocess.run(
        [RUFF, *args], cwd=cwd, capture_output=True, text=True, check=False
    )


def test_derivlib_and_notebooks_fit_88_columns():
    result = ruff(
        "check", "--select", "E501", "--output-format", "concise", "derivlib", "book"
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_repository_is_in_ruff_format():
    result = ruff("format", "--check", ".")
    assert result.returncode == 0, (
        "run `.venv/bin/ruff format .`; these files differ:\n" + result.stdout
    )


@pytest.mark.parametrize("kind", ["module", "notebook"])
def test_a_wide_line_is_caught(tmp_path, kind):
    """The width check can fail: a planted 89-character line in a module and in a
    notebook's code cell."""
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    wide = "x = " + repr("a" * 83)
    assert len(wide) == 89
    if kind == "module":
        (tmp_path / "wide.py").write_text(wide + "\n")
    else:
        import nbformat

        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(wide)])
        nbformat.write(nb, tmp_path / "wide.ipynb")
    result = ruff(
        "check", "--select", "E501", "--output-format", "concise", ".", cwd=tmp_path
    )
    assert result.returncode == 1 and "E501" in result.stdout, result.stdout


def rules_with_positional_options(namespace):
    """(rule, option) for each option of a public `_jvp` / `_vjp` rule that can be
    passed by position: the book's convention is `<name>_jvp(*primals, *tangents,
    **options)` and `<name>_vjp(*primals, G, **options)`, options keyword-only."""
    import inspect

    found = []
    for name in namespace.__all__:
        if not name.endswith(("_jvp", "_vjp")):
            continue
        for p in inspect.signature(getattr(namespace, name)).parameters.values():
            if p.default is not p.empty and p.kind is not p.KEYWORD_ONLY:
                found.append((name, p.name))
    return found


def test_every_rule_takes_its_options_by_keyword():
    import derivlib

    assert sum(n.endswith(("_jvp", "_vjp")) for n in derivlib.__all__) > 50
    assert rules_with_positional_options(derivlib) == []


def test_a_positional_option_is_caught():
    import types

    def planted_vjp(X, G, eps=1e-5):
        return X

    def fine_jvp(X, dX, *, eps=1e-5):
        return dX

    namespace = types.SimpleNamespace(
        __all__=["planted_vjp", "fine_jvp"], planted_vjp=planted_vjp, fine_jvp=fine_jvp
    )
    assert rules_with_positional_options(namespace) == [("planted_vjp", "eps")]
