"""The text around the code agrees with the book, checked from the sources without a build.

- Every equation that derivlib cites in a docstring or comment (``eq. 3.20f``,
  ``eqs. (B.1) and (B.4)``) is tagged, ``\\tag{3.20f}``, in a notebook of the book.
- Every link from one page of the book to an anchor (``errata.md#errata-chapter-3``,
  ``[(2.10)](#eq-2-10)``) lands on an explicit ``id="..."`` in the target's source.
  The book, JupyterLab, Colab and VS Code slug headings differently, so a link to a
  heading's slug works in one and not in another; an explicit anchor works in all.
- A link into another notebook names a cell, ``02_vector_functions.ipynb#cell-id=eq-2-4``,
  and that notebook has a Markdown cell of that id which begins with the anchor
  ``<a id="eq-2-4"></a>``: JupyterLab opens another notebook at its top for a bare anchor,
  and the book reads the cell's name as the anchor (book/_ext/book_links.py). Within a
  notebook, links stay bare anchors, which JupyterLab follows (and ``#cell-id=`` it does
  not).

Each checker is a plain function of texts, so the tests below can also run it on a
planted mistake and watch it fail.
"""

import json
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"

EQUATION = r"[1-9AB]\.\d+[a-z]?'?"
# "eq. 3.20f", "Eq. (2.4)", "eqs. (B.1) and (B.4)", "eqs. B.3, B.5", "eqs. (3.3)-(3.9)"
CITATION = re.compile(
    rf"\beqs?\.\s*((?:\(?{EQUATION}\)?)(?:\s*(?:,|and|-|to)\s*\(?{EQUATION}\)?)*)",
    re.IGNORECASE,
)
TAG = re.compile(r"\\tag\{([^}]+)\}")
LINK = re.compile(r"\]\(([^)\s#]*)#([^)\s]+)\)|href=\"([^\"#]*)#([^\"]+)\"")
ANCHOR = re.compile(r"\bid=\"([^\"]+)\"")
CELL_ID = "cell-id="


def cited_equations(text):
    """(line number, equation) for every equation a text cites with "eq." or "eqs."."""
    found = []
    for match in CITATION.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        found += [(line, number) for number in re.findall(EQUATION, match.group(1))]
    return found


def untagged_citations(sources, tags):
    """Every citation in `sources` ({name: text}) of an equation that is not in `tags`."""
    return [
        f"{name}:{line}: eq. {number} is not tagged in the book"
        for name, text in sorted(sources.items())
        for line, number in cited_equations(text)
        if number not in tags
    ]


def markdown_of(path):
    """The Markdown of a book page: the file itself, or a notebook's Markdown cells."""
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text())["cells"]
        return "\n\n".join(
            "".join(c["source"]) for c in cells if c["cell_type"] == "markdown"
        )
    return path.read_text()


def book_pages():
    return {
        path.name: markdown_of(path)
        for path in sorted(BOOK.glob("*.ipynb")) + sorted(BOOK.glob("*.md"))
    }


def book_cells():
    """{notebook: {cell id: Markdown source}} for every notebook of the book."""
    return {
        path.name: {
            c.get("id", ""): "".join(c["source"])
            for c in json.loads(path.read_text())["cells"]
            if c["cell_type"] == "markdown"
        }
        for path in sorted(BOOK.glob("*.ipynb"))
    }


def book_tags(pages):
    return {tag for text in pages.values() for tag in TAG.findall(text)}


def anchor_problems(pages, cells):
    """Every link to `page#anchor` (or `#anchor` on the same page) whose anchor is not
    an explicit id in that page's source, and every link into another notebook that
    JupyterLab cannot follow. `pages` is {file name: Markdown text}, `cells` is
    {notebook: {cell id: Markdown source}}."""
    ids = {name: set(ANCHOR.findall(text)) for name, text in pages.items()}
    problems = []
    for name, text in sorted(pages.items()):
        for match in LINK.finditer(text):
            raw = not match.group(2)
            target, anchor = match.group(3, 4) if raw else match.group(1, 2)
            if target.startswith(("http://", "https://")):
                continue
            target = target or name
            link = f"{name}: link to {target}#{anchor}"
            into_notebook = target != name and target.endswith(".ipynb")
            if target not in ids:
                problems.append(f"{link}: no such page")
            elif anchor.startswith(CELL_ID) and not into_notebook:
                problems.append(
                    f"{link}: a cell id is only followed into another notebook; "
                    f"link to #{anchor[len(CELL_ID) :]}"
                )
            elif into_notebook and raw:
                problems.append(
                    f"{link}: write a Markdown link into another notebook; the book does not "
                    "rewrite a raw HTML href"
                )
            elif into_notebook and not anchor.startswith(CELL_ID):
                problems.append(
                    f"{link}: JupyterLab opens another notebook at its top for an anchor; "
                    f"link to {target}#{CELL_ID}{anchor}, the cell that begins with it"
                )
            elif into_notebook:
                cell = anchor[len(CELL_ID) :]
                if (
                    not cells.get(target, {})
                    .get(cell, "")
                    .startswith(f'<a id="{cell}"></a>')
                ):
                    problems.append(
                        f'{link}: no Markdown cell "{cell}" that begins with <a id="{cell}"></a> '
                        "(start a cell with the anchor, or name the first anchor of the line it "
                        "opens with another, then run scripts/run_notebooks.py)"
                    )
            elif anchor not in ids[target]:
                problems.append(f"{link}: no explicit anchor with that id")
    return problems


# ----- The book as it is -----


def test_every_equation_derivlib_cites_is_tagged_in_the_book():
    sources = {
        str(p.relative_to(ROOT)): p.read_text()
        for p in sorted((ROOT / "derivlib").rglob("*.py"))
    }
    assert (
        sum(len(cited_equations(text)) for text in sources.values()) > 20
    )  # the scan finds them
    problems = untagged_citations(sources, book_tags(book_pages()))
    assert not problems, "\n".join(problems)


def test_every_link_to_an_anchor_lands_on_an_explicit_id():
    pages = book_pages()
    assert (
        sum(len(LINK.findall(text)) for text in pages.values()) > 100
    )  # the scan finds them
    problems = anchor_problems(pages, book_cells())
    assert not problems, "\n".join(problems)


# ----- The checkers fail on planted mistakes -----


def test_citation_check_catches_an_untagged_equation():
    planted = {
        "derivlib/fake.py": '"""Module."""\n\n\ndef f():\n    """Eq. 3.20f, and eqs. (B.1) and (B.9)."""\n',
        "derivlib/other.py": "# the Hessian of eq. 3.24' (a number the book never uses)\n",
    }
    tags = {"3.20f", "B.1", "3.20'"}
    assert cited_equations(planted["derivlib/fake.py"]) == [
        (5, "3.20f"),
        (5, "B.1"),
        (5, "B.9"),
    ]
    assert untagged_citations(planted, tags) == [
        "derivlib/fake.py:5: eq. B.9 is not tagged in the book",
        "derivlib/other.py:1: eq. 3.24' is not tagged in the book",
    ]
    assert (
        untagged_citations({"ok.py": "eqs. 3.20f, 3.20' and (B.1)-(B.1)"}, tags) == []
    )


def test_citation_check_reads_the_forms_derivlib_uses():
    text = "Eq. (2.2): ... eqs. B.3, B.5 ... (eq. 2.13; see the errata) ... eq. (A.1)"
    assert [number for _, number in cited_equations(text)] == [
        "2.2",
        "B.3",
        "B.5",
        "2.13",
        "A.1",
    ]


def test_anchor_check_catches_a_slug_and_a_missing_anchor():
    pages = {
        "errata.md": '<a id="errata-chapter-2"></a>\n\n## Chapter 2: Vector functions\n',
        "02.ipynb": "[errata](errata.md#errata-chapter-2), [slug](errata.md#chapter-2-vector-functions), "
        '[(2.1)](#eq-2-1), <a id="eq-2-2"></a> [(2.2)](#eq-2-2), [web](https://x.org/#top), '
        "[gone](03.ipynb#eq-3-1)",
    }
    assert anchor_problems(pages, {}) == [
        "02.ipynb: link to errata.md#chapter-2-vector-functions: no explicit anchor with that id",
        "02.ipynb: link to 02.ipynb#eq-2-1: no explicit anchor with that id",
        "02.ipynb: link to 03.ipynb#eq-3-1: no such page",
    ]


def test_anchor_check_asks_for_a_cell_id_into_another_notebook():
    pages = {
        "02.ipynb": '<a id="eq-2-4"></a>\n\n$$x \\tag{2.4}$$\n\n(see <a id="eq-2-5"></a>)',
        "03.ipynb": "[(2.4)](02.ipynb#cell-id=eq-2-4), [(2.4)](02.ipynb#eq-2-4), [(2.5)](02.ipynb#cell-id=eq-2-5), "
        '<a id="eq-3-1"></a> [(3.1)](#cell-id=eq-3-1), [(3.1)](#eq-3-1), [x](errata.md#cell-id=x), '
        '<a href="02.ipynb#cell-id=eq-2-4">(2.4)</a>',
        "errata.md": '<a id="x"></a>',
    }
    cells = {
        "02.ipynb": {
            "eq-2-4": '<a id="eq-2-4"></a>\n\n$$x \\tag{2.4}$$',
            "cell-3": '(see <a id="eq-2-5"></a>)',
        },
        "03.ipynb": {"cell-1": pages["03.ipynb"]},
    }
    assert anchor_problems(pages, cells) == [
        "03.ipynb: link to 02.ipynb#eq-2-4: JupyterLab opens another notebook at its top for an anchor; "
        "link to 02.ipynb#cell-id=eq-2-4, the cell that begins with it",
        '03.ipynb: link to 02.ipynb#cell-id=eq-2-5: no Markdown cell "eq-2-5" that begins with <a id="eq-2-5"></a> '
        "(start a cell with the anchor, or name the first anchor of the line it opens with another, "
        "then run scripts/run_notebooks.py)",
        "03.ipynb: link to 03.ipynb#cell-id=eq-3-1: a cell id is only followed into another notebook; link to #eq-3-1",
        "03.ipynb: link to errata.md#cell-id=x: a cell id is only followed into another notebook; link to #x",
        "03.ipynb: link to 02.ipynb#cell-id=eq-2-4: write a Markdown link into another notebook; the book does "
        "not rewrite a raw HTML href",
    ]
