"""The whole book as one PDF, as `make pdf` builds it: its text, read with pdftotext.

Every equation of the note is set under its number, as a tag at the right margin (a
number in running text is only a reference to it); every tagged equation of every
chapter is; every part and chapter title appears; and nothing is left unresolved:
no `??`, no undefined reference and no missing glyph in the LaTeX log.

`make test-pdf` builds the PDF and runs this file; `make test` leaves its PDF tests out
(marker `pdf`), since the LaTeX run takes a minute, and runs only the last test: every
page of the HTML book links to the PDF.
"""

import json
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml
from test_book import (
    CORRECTED_WITH_A_PRIME,
    EMPTY_IN_THE_NOTE,
    NOTE_EQUATIONS,
    toc_files,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
LATEX = ROOT / "_build" / "latex"
PDF = LATEX / "differentials.pdf"
LOG = LATEX / "differentials.log"
TAG = re.compile(r"\\tag\{([^{}]*)\}")


def book_sources():
    """Every file the PDF is built from."""
    return [ROOT / "_config.yml", ROOT / "_toc.yml"] + [
        p
        for p in (ROOT / "book").rglob("*")
        if p.is_file() and not {"__pycache__", ".ipynb_checkpoints"} & set(p.parts)
    ]


def pdf_text(pdf):
    """The text of `pdf`, laid out as on the page, with typographic quotes made plain."""
    if not shutil.which("pdftotext"):
        pytest.fail("pdftotext is missing: `make test-pdf` installs it (poppler-utils)")
    text = subprocess.run(
        ["pdftotext", "-layout", str(pdf), "-"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return text.replace("\u2019", "'").replace("\u2032", "'")


def tagged_numbers(text):
    """The equation numbers set as tags: at the end of a line that reaches the right
    margin (near the longest lines' end), alone or far from the equation before them. A
    number that ends a line of a table, or of prose, short of the margin is a reference."""
    lines = [line.rstrip() for line in text.splitlines()]
    margin = 0.8 * max(map(len, lines), default=0)
    tag = re.compile(r"(?:^ *|\S {4,})\(([0-9A-Z]+\.[0-9a-z]+'?)\)$")
    return {
        m.group(1) for line in lines if len(line) >= margin and (m := tag.search(line))
    }


def titles():
    """The book's title (the title page stands for the root page's heading), the
    caption of every part, and the title of every other page of the table of contents."""
    found = [yaml.safe_load((ROOT / "_config.yml").read_text())["title"]]
    found += [
        part["caption"]
        for part in yaml.safe_load((ROOT / "_toc.yml").read_text()).get("parts", [])
    ]
    for page in toc_files()[1:]:
        path = ROOT / f"{page}.ipynb"
        if path.exists():
            cells = json.loads(path.read_text())["cells"]
            source = "\n".join(
                "".join(c["source"]) for c in cells if c["cell_type"] == "markdown"
            )
        else:
            source = (ROOT / f"{page}.md").read_text()
        found.append(
            re.search(r"^# (.+)$", source, flags=re.MULTILINE).group(1).strip()
        )
    return found


def notebook_tags():
    """Every equation number that a chapter sets with \\tag."""
    tags = set()
    for page in toc_files():
        path = ROOT / f"{page}.ipynb"
        if path.exists():
            for cell in json.loads(path.read_text())["cells"]:
                if cell["cell_type"] == "markdown":
                    tags.update(TAG.findall("".join(cell["source"])))
    return tags


def unresolved(text, log):
    """What the PDF leaves unresolved: `??` in its text, undefined references and
    citations, and characters missing from its fonts, in the LaTeX log."""
    problems = [f"?? in: {line.strip()}" for line in text.splitlines() if "??" in line]
    problems += [
        line.strip()
        for line in log.splitlines()
        if re.search(r"undefined|Missing character", line) and "pdfTeX" not in line
    ]
    return problems


def missing_titles(text, expected):
    flat = " ".join(text.split())
    return [title for title in expected if " ".join(title.split()) not in flat]


@pytest.fixture(scope="module")
def text():
    """The PDF's text; the PDF must be newer than every source it is built from."""
    if not PDF.exists():
        pytest.fail(f"{PDF.relative_to(ROOT)} is missing: `make test-pdf` builds it")
    newest = max(book_sources(), key=lambda p: p.stat().st_mtime)
    if newest.stat().st_mtime > PDF.stat().st_mtime:
        pytest.fail(
            f"{PDF.relative_to(ROOT)} is older than {newest.relative_to(ROOT)}: `make test-pdf` rebuilds it"
        )
    return pdf_text(PDF)


@pytest.mark.pdf
@pytest.mark.parametrize("number", NOTE_EQUATIONS)
def test_every_equation_of_the_note_is_under_its_number(text, number):
    if number in EMPTY_IN_THE_NOTE:
        pytest.skip(
            f"({number}) is an empty line in the note: the book has its anchor, and no equation"
        )
    shown = f"{number}'" if number in CORRECTED_WITH_A_PRIME else number
    assert shown in tagged_numbers(text), f"no equation tagged ({shown}) in the PDF"


@pytest.mark.pdf
def test_every_tagged_equation_of_the_book_is_numbered_in_the_pdf(text):
    missing = sorted(notebook_tags() - tagged_numbers(text))
    assert not missing, (
        f"equations tagged in the notebooks but not in the PDF: {missing}"
    )


@pytest.mark.pdf
def test_every_part_and_chapter_title_is_in_the_pdf(text):
    missing = missing_titles(text, titles())
    assert not missing, f"titles missing from the PDF: {missing}"


@pytest.mark.pdf
def test_nothing_is_unresolved(text):
    problems = unresolved(text, LOG.read_text(errors="replace"))
    assert not problems, "\n".join(problems)


@pytest.mark.pdf
def test_the_checks_fail_on_a_broken_pdf():
    """The checks above catch a missing tag, a number that is only referenced (in
    prose or in a table), a missing title, a `??`, an undefined reference and a missing
    glyph."""
    text = (
        "   d sigma = J dx                                  (2.4)\n"
        "Line (2.4) is used in the softmax, and the sigmoid is (2.5)\n"
        "                                                 (3.16')\n"
        "| trace | (A.11)\n"
        "the softmax (2.10) of the logits, by\n"
        "2. Vector functions\n"
        "see equation ??\n"
    )
    assert tagged_numbers(text) == {"2.4", "3.16'"}
    assert missing_titles(text, ["2. Vector functions", "3. Loss functions"]) == [
        "3. Loss functions"
    ]
    log = (
        "LaTeX Warning: Hyper reference `book/02_vector_functions:eq-2-99' on page 3 undefined on input line 7.\n"
        "Missing character: There is no \u2299 in font FreeSerif!\n"
    )
    assert unresolved(text, log) == [
        "?? in: see equation ??",
        "LaTeX Warning: Hyper reference `book/02_vector_functions:eq-2-99' on page 3 undefined on input line 7.",
        "Missing character: There is no \u2299 in font FreeSerif!",
    ]


@pytest.mark.book
@pytest.mark.parametrize("page", toc_files())
def test_every_page_links_to_the_pdf(built_book, page):
    """The download menu of every page offers the whole book as a PDF, at the site's root
    where the publish workflow puts it (book/_ext/book_pdf.py)."""
    _, _, html = built_book
    text = (html / f"{page}.html").read_text()
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    owner, name = config["repository"]["url"].rstrip("/").split("/")[-2:]
    assert (
        f'<a href="https://{owner}.github.io/{name}/{PDF.name}"' in text
        and "Book .pdf" in text
    )
