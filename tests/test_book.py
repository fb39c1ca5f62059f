"""The book builds with warnings as errors, and every page of the table of contents exists."""

import pathlib
import posixpath
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]


def toc_files():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files, stack = (
        [toc["root"]],
        list(toc.get("chapters", [])) + list(toc.get("parts", [])),
    )
    while stack:
        entry = stack.pop(0)
        if "file" in entry:
            files.append(entry["file"])
        stack.extend(entry.get("sections", []) + entry.get("chapters", []))
    return files


@pytest.mark.book
def test_book_builds_without_warnings(built_book):
    returncode, output, _ = built_book
    warnings = [
        line for line in output.splitlines() if "WARNING" in line or "ERROR" in line
    ]
    assert returncode == 0 and not warnings, "\n".join(warnings) or output[-3000:]


@pytest.mark.book
@pytest.mark.parametrize("page", toc_files())
def test_every_toc_page_is_built(built_book, page):
    _, _, html = built_book
    assert (html / f"{page}.html").exists(), f"{page}.html missing from the build"


class _Links:
    """Collect the ids and the hrefs of one HTML page."""

    def __init__(self, text):
        from html.parser import HTMLParser

        self.ids, self.hrefs = set(), []
        outer = self

        class Parser(HTMLParser):
            def handle_starttag(self, tag, attrs):
                attrs = dict(attrs)
                if attrs.get("id"):
                    outer.ids.add(attrs["id"])
                if attrs.get("name") and tag == "a":
                    outer.ids.add(attrs["name"])
                if tag == "a" and attrs.get("href"):
                    outer.hrefs.append(attrs["href"])

        Parser().feed(text)


def internal_link_problems(html_dir):
    """Every internal link of the built book: the page exists and so does its anchor."""
    from urllib.parse import unquote, urlsplit

    html_dir = pathlib.Path(html_dir)
    pages = {
        p.resolve(): _Links(p.read_text(errors="replace"))
        for p in html_dir.rglob("*.html")
        if "_static" not in p.parts
    }
    problems = []
    for page, links in pages.items():
        for href in links.hrefs:
            parts = urlsplit(href)
            if (
                parts.scheme
                or parts.netloc
                or href.startswith(("mailto:", "javascript:"))
            ):
                continue
            target = (
                (page.parent / unquote(parts.path)).resolve() if parts.path else page
            )
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                problems.append(
                    f"{page.relative_to(html_dir.resolve())}: {href} (no such file)"
                )
                continue
            if parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else set()
                if unquote(parts.fragment) not in ids:
                    problems.append(
                        f"{page.relative_to(html_dir.resolve())}: {href} (no such anchor)"
                    )
    return sorted(problems)


@pytest.mark.book
def test_internal_links_and_equation_anchors_resolve(built_book):
    _, _, html = built_book
    problems = internal_link_problems(html)
    assert not problems, "broken internal links:\n" + "\n".join(problems)


def test_link_check_catches_a_missing_anchor(tmp_path):
    (tmp_path / "a.html").write_text('<a id="eq-1"></a><a href="b.html#eq-2">x</a>')
    (tmp_path / "b.html").write_text(
        '<a id="eq-3"></a><a href="a.html#eq-1">y</a><a href="c.html">z</a>'
    )
    problems = internal_link_problems(tmp_path)
    assert problems == [
        "a.html: b.html#eq-2 (no such anchor)",
        "b.html: c.html (no such file)",
    ]


NOTEBOOK_PAGES = [page for page in toc_files() if (ROOT / f"{page}.ipynb").exists()]


@pytest.mark.book
@pytest.mark.parametrize("page", NOTEBOOK_PAGES)
def test_chapter_opens_in_binder_colab_and_thebe_and_downloads(built_book, page):
    """The launch buttons open this notebook from the repository and branch of _config.yml."""
    _, _, html = built_book
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    repository, launch = config["repository"], config["launch_buttons"]
    github_repo, branch = (
        urlsplit(repository["url"]).path.strip("/"),
        repository["branch"],
    )
    notebook = posixpath.join(repository["path_to_book"], f"{page}.ipynb")
    interface = {"jupyterlab": "lab/tree", "classic": "tree"}[
        launch["notebook_interface"]
    ]
    text = (html / f"{page}.html").read_text()
    hrefs = _Links(text).hrefs

    # The URL schemes of BinderHub (/v2/gh/<owner>/<repo>/<ref>) and of Colab (/github/...).
    assert (
        f"{launch['binderhub_url']}/v2/gh/{github_repo}/{branch}?urlpath={interface}/{notebook}"
        in hrefs
    )
    assert (
        f"{launch['colab_url']}/github/{github_repo}/blob/{branch}/{notebook}" in hrefs
    )
    # Live Code: the button, and Thebe's request for a Binder kernel of this repository.
    assert 'onclick="initThebeSBT()"' in text
    assert f'repo: "{github_repo}"' in text and f'ref: "{branch}"' in text
    # The .ipynb download is the notebook the tests ran, outputs included.
    assert posixpath.relpath(f"_sources/{page}.ipynb", posixpath.dirname(page)) in hrefs
    assert (html / "_sources" / f"{page}.ipynb").read_bytes() == (
        ROOT / f"{page}.ipynb"
    ).read_bytes()


# Every numbered equation of the note. (3.10) and (3.15) are empty lines in the note,
# and (3.16)-(3.20) are printed wrongly; the book shows their corrected forms as
# (3.16')-(3.20').
NOTE_EQUATIONS = (
    [f"2.{i}" for i in range(1, 14)]
    + [f"3.{i}" for i in range(1, 21)]
    + [f"A.{i}" for i in range(1, 12)]
    + [f"B.{i}" for i in range(1, 6)]
)
EMPTY_IN_THE_NOTE = {"3.10", "3.15"}
CORRECTED_WITH_A_PRIME = {f"3.{i}" for i in range(16, 21)}


def equation_anchor(number):
    """The id of the anchor before equation `number` ((A.9) -> eq-a-9)."""
    return "eq-" + number.lower().replace(".", "-")


@pytest.mark.book
@pytest.mark.parametrize("number", NOTE_EQUATIONS)
def test_every_equation_of_the_note_is_under_its_number(built_book, number):
    _, _, html = built_book
    pages = {
        p: p.read_text(errors="replace")
        for p in pathlib.Path(html, "book").glob("*.html")
    }
    anchor = f'id="{equation_anchor(number)}"'
    holders = [p for p, text in pages.items() if anchor in text]
    assert len(holders) == 1, (
        f"({number}) has {len(holders)} anchors {anchor} in the book"
    )
    if number in EMPTY_IN_THE_NOTE:
        return
    tag = (
        f"\\tag{{{number}'}}"
        if number in CORRECTED_WITH_A_PRIME
        else f"\\tag{{{number}}}"
    )
    assert tag in pages[holders[0]], (
        f"{holders[0].name} has the anchor of ({number}) but no {tag}"
    )
