"""The book builds with warnings as errors, and every page of the table of contents exists."""

import pathlib

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]


def toc_files():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files, stack = [toc["root"]], list(toc.get("chapters", []))
    while stack:
        entry = stack.pop(0)
        files.append(entry["file"])
        stack.extend(entry.get("sections", []))
    return files


@pytest.mark.book
def test_book_builds_without_warnings(built_book):
    returncode, output, _ = built_book
    warnings = [line for line in output.splitlines() if "WARNING" in line or "ERROR" in line]
    assert returncode == 0 and not warnings, "\n".join(warnings) or output[-3000:]


@pytest.mark.book
@pytest.mark.parametrize("page", toc_files())
def test_every_toc_page_is_built(built_book, page):
    _, _, html = built_book
    assert (html / f"{page}.html").exists(), f"{page}.html missing from the build"
