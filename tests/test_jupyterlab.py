"""The chapters as Binder opens them: a real JupyterLab server (the version pinned in
requirements.txt) on 127.0.0.1 with a token, and every chapter opened in headless
Chromium as a reader would.

Each chapter shows all its math typeset (no TeX error, no raw `$$`), keeps every folded
solution folded with the code of its check collapsed, shows its figure captions, and is
not marked modified by opening it (its stored kernelspec and language_info are what a
fresh kernel writes). Links to an equation land on it, within a chapter and from
another one; the bibliography reads as a list of references.

Two things make the links land, and both are tested here: JupyterLab runs with the
book's settings (scripts/lab_settings.py, which Binder's postBuild and `make` install:
every cell drawn, so a link within a chapter does not overshoot its equation), and a
link into another notebook names the cell that begins with its anchor,
`02_vector_functions.ipynb#cell-id=eq-2-4` (JupyterLab opens the other notebook at its top
for a bare anchor, as a planted link shows; tests/test_prose.py checks every such link
from the sources).

The browser tests carry the marker `jupyterlab` and run with `make test-lab`, not in
`make test`: opening every chapter in JupyterLab takes a few minutes. The checks of the
notebooks' metadata at the top of this file are quick and run in `make test` too.
"""

import contextlib
import json
import os
import pathlib
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from test_book import toc_files
from test_browser import CHROMIUM, launch_browser

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import lab_settings  # noqa: E402
import run_notebooks  # noqa: E402

CHAPTERS = [
    page.split("/")[-1] for page in toc_files() if (ROOT / f"{page}.ipynb").exists()
]
TIMEOUT_S = 60
SETTLE_S = 15


def notebook(name, root=ROOT / "book"):
    return json.loads((root / f"{name}.ipynb").read_text())


def tags(cell):
    return cell.get("metadata", {}).get("tags", [])


# ---------------------------------------------------------------------------------------
# The notebooks' metadata (quick; in `make test` too)
# ---------------------------------------------------------------------------------------


def metadata_problems(nb):
    """What JupyterLab and Colab would show wrongly, read from a notebook's JSON."""
    problems = []
    cells = nb["cells"]
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        if "hide-input" in tags(cell) and not cell.get("metadata", {}).get(
            "jupyter", {}
        ).get("source_hidden"):
            problems.append(
                f"cell {i}: tagged hide-input but not collapsed in JupyterLab (jupyter.source_hidden)"
            )
        caption = (
            cell.get("metadata", {}).get("mystnb", {}).get("figure", {}).get("caption")
        )
        if caption:
            after = cells[i + 1] if i + 1 < len(cells) else {}
            if "".join(
                after.get("source", [])
            ) != f"**Figure.** {caption}" or "remove-cell" not in tags(after):
                problems.append(
                    f"cell {i}: its caption is not repeated in a remove-cell Markdown cell under it"
                )
    return problems


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_metadata_reads_in_jupyterlab_and_colab(chapter):
    problems = metadata_problems(notebook(chapter))
    assert not problems, (
        f"{chapter}.ipynb: run `python scripts/run_notebooks.py book/{chapter}.ipynb`\n"
        + "\n".join(problems)
    )


def test_bibliography_is_written_from_references_bib():
    """book/bibliography.md is plain Markdown, as scripts/run_notebooks.py writes it."""
    assert (
        ROOT / "book" / "bibliography.md"
    ).read_text() == run_notebooks.bibliography_markdown(), (
        "run `python scripts/run_notebooks.py --bibliography`"
    )


def test_jupyterlab_has_the_books_settings():
    """What Binder's postBuild installs, and `make` installs in .venv, is in place."""
    assert "python scripts/lab_settings.py" in (ROOT / "postBuild").read_text()
    assert os.access(ROOT / "postBuild", os.X_OK), (
        "postBuild must be executable for Binder to run it"
    )
    installed = lab_settings.overrides_file()
    assert (
        installed.exists()
        and json.loads(installed.read_text()) == lab_settings.SETTINGS
    ), (
        f"{installed} is missing or stale: run `make` (or `python scripts/lab_settings.py`)"
    )


def test_metadata_check_catches_what_jupyterlab_would_show():
    code = {
        "cell_type": "code",
        "source": ["plt.plot()"],
        "outputs": [],
        "metadata": {
            "tags": ["hide-input"],
            "mystnb": {"figure": {"caption": "A curve."}},
        },
    }
    nb = {
        "cells": [code, {"cell_type": "markdown", "source": ["Text."], "metadata": {}}]
    }
    assert metadata_problems(nb) == [
        "cell 0: tagged hide-input but not collapsed in JupyterLab (jupyter.source_hidden)",
        "cell 0: its caption is not repeated in a remove-cell Markdown cell under it",
    ]
    prepared = run_notebooks.prepare(
        run_notebooks.nbformat.from_dict(
            {**nb, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
        ),
        metadata={},
    )
    assert metadata_problems(prepared) == []


# ---------------------------------------------------------------------------------------
# JupyterLab in Chromium (`make test-lab`)
# ---------------------------------------------------------------------------------------


def free_port():
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def jupyterlab(root, home):
    """A JupyterLab server on 127.0.0.1 serving `root`: yields (base URL, token).

    Its settings, workspaces and runtime files stay in `home`; it fetches no news and
    checks for no updates; `window.jupyterapp` lets the test run JupyterLab's commands.
    """
    token, port = secrets.token_hex(16), free_port()
    env = {
        **os.environ,
        "HOME": str(home),
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JAX_PLATFORMS": "cpu",
    }
    command = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--ServerApp.allow_root=True",
        "--LabApp.expose_app_in_browser=True",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
        f"--LabApp.workspaces_dir={home / 'workspaces'}",
        f"--LabApp.user_settings_dir={home / 'settings'}",
    ]
    log = open(home / "server.log", "w")
    server = subprocess.Popen(
        command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(
                    f"{base}api/status?token={token}", timeout=2
                ):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        "JupyterLab did not start:\n"
                        + (home / "server.log").read_text()[-3000:]
                    )
                time.sleep(0.3)
        yield base, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on a copy of book/, so that nothing it saves reaches the sources."""
    root = tmp_path_factory.mktemp("lab") / "book"
    shutil.copytree(
        ROOT / "book",
        root,
        ignore=shutil.ignore_patterns("_build", ".ipynb_checkpoints", "__pycache__"),
    )
    home = tmp_path_factory.mktemp("lab-home")
    with jupyterlab(root, home) as (base, token):
        yield root, base, token


@pytest.fixture(scope="module")
def lab_browser():
    """Debian's Chromium, headless, driven by Playwright, as the browser test runs it."""
    yield from launch_browser(needs=(CHROMIUM,))


# Runs in JupyterLab once a notebook is open: waits until every cell is attached and
# typeset and the kernel is idle, then lists what a reader would see wrongly.
NOTEBOOK_PROBLEMS = r"""
async (timeoutMs) => {
  const app = window.jupyterapp;
  const panel = app.shell.currentWidget;
  const notebook = panel.content;
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const snippet = (text) => text.replace(/\s+/g, " ").trim().slice(0, 80);
  const deadline = Date.now() + timeoutMs;
  const problems = [];
  await panel.context.ready;
  await panel.sessionContext.ready;
  // JupyterLab attaches the cells of a long notebook a few at a time.
  while (notebook.node.querySelectorAll(".jp-Cell").length < notebook.widgets.length && Date.now() < deadline) await sleep(200);
  const raw = () => {
    const found = [];
    for (const md of notebook.node.querySelectorAll(".jp-RenderedMarkdown")) {
      const walker = document.createTreeWalker(md, NodeFilter.SHOW_TEXT);
      for (let node = walker.nextNode(); node; node = walker.nextNode()) {
        if (node.parentElement.closest("pre, code, mjx-container, script, style")) continue;
        if (/\$\$|\\begin\{|\\tag\{|\\\(|\\\[/.test(node.textContent)) found.push(snippet(node.textContent));
      }
    }
    return found;
  };
  // Math is typeset a cell at a time after the cell is rendered: wait until what is
  // left untypeset has not changed for 1.5 s.
  let left = raw().join("\n"), since = Date.now();
  while (left && Date.now() - since < 1500 && Date.now() < deadline) {
    await sleep(250);
    const now = raw().join("\n");
    if (now !== left) [left, since] = [now, Date.now()];
  }
  while (panel.sessionContext.session?.kernel?.status !== "idle" && Date.now() < deadline) await sleep(250);
  await sleep(1000);
  if (notebook.node.querySelectorAll(".jp-Cell").length < notebook.widgets.length) problems.push("not every cell was shown");
  for (const text of raw()) problems.push(`raw TeX left in the text: ${text}`);
  for (const error of notebook.node.querySelectorAll("mjx-merror")) {
    problems.push(`TeX error "${error.getAttribute("data-mjx-error")}": ${snippet(error.closest("mjx-container")?.parentElement?.textContent || "")}`);
  }
  for (const macro of notebook.node.querySelectorAll('mjx-container mjx-mtext[style*="color: red"]')) {
    problems.push(`undefined macro: ${snippet(macro.textContent)}`);
  }
  // A folded solution stays folded, and the code of the check under it is collapsed.
  const cells = notebook.widgets;
  cells.forEach((cell, i) => {
    if (cell.model.type !== "markdown" || !cell.node.querySelector("details")) return;
    for (const details of cell.node.querySelectorAll("details")) {
      if (details.open) problems.push(`cell ${i}: a folded box is unfolded`);
    }
    // Folded errata boxes are followed by the cell that shows the printed form failing,
    // which stays in view; only a solution's check hides its code.
    const summaries = [...cell.node.querySelectorAll("details > summary")].map((s) => s.textContent.trim());
    if (!summaries.some((text) => text.startsWith("Solution"))) return;
    const next = cells[i + 1];
    if (next && next.model.type === "code") {
      const editor = next.node.querySelector(".jp-InputArea-editor");
      if (editor && editor.getClientRects().length) problems.push(`cell ${i + 1}: the check under the solution shows its code`);
    }
  });
  // Every figure's caption is on screen under it.
  cells.forEach((cell, i) => {
    const caption = cell.model.getMetadata("mystnb")?.figure?.caption;
    if (!caption) return;
    const next = cells[i + 1];
    const shown = next && next.model.type === "markdown" ? next.node.querySelector(".jp-RenderedMarkdown")?.textContent || "" : "";
    if (!shown.startsWith("Figure.")) problems.push(`cell ${i}: its figure has no caption on screen`);
  });
  if (panel.context.model.dirty) problems.push("opening the notebook marked it modified");
  return problems;
}
"""


def open_in_lab(browser, base, token, path):
    """A new page with JupyterLab showing `path` (a fresh workspace); only 127.0.0.1 is reached."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    refused = []

    def route(request_route):
        if request_route.request.url.startswith(base):
            request_route.continue_()
        else:
            refused.append(request_route.request.url)
            request_route.abort()

    page.route("**", route)
    page.goto(f"{base}lab/tree/{path}?reset&token={token}", wait_until="load")
    page.wait_for_function(
        "() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
        f" && window.jupyterapp.shell.currentWidget.title.label === {json.dumps(path.split('/')[-1])}",
        timeout=TIMEOUT_S * 1000,
    )
    return page, refused


def notebook_problems(browser, base, token, path):
    page, refused = open_in_lab(browser, base, token, path)
    try:
        problems = page.evaluate(NOTEBOOK_PROBLEMS, TIMEOUT_S * 1000)
    finally:
        page.close()
    return problems + [f"outside request refused: {url}" for url in refused]


@pytest.mark.jupyterlab
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_reads_in_jupyterlab(lab_browser, lab, chapter):
    """Math typeset, solutions folded with their checks collapsed, captions shown, and
    the chapter not marked modified by opening it."""
    _, base, token = lab
    problems = notebook_problems(lab_browser, base, token, f"{chapter}.ipynb")
    assert not problems, f"{chapter}.ipynb in JupyterLab:\n" + "\n".join(problems)


# Where the target of a link is, once it has been followed: the tab shown, and the top
# and bottom of the element after the anchor (the equation) in the notebook's viewport.
TARGET = r"""
(fragment) => {
  const panel = window.jupyterapp.shell.currentWidget;
  const content = panel.content;
  const anchor = content.node.querySelector(`[data-jupyter-id="${CSS.escape(fragment)}"]`);
  const view = content.node.getBoundingClientRect();
  if (!anchor) return {tab: panel.title.label, found: false};
  const block = anchor.closest("p, h1, h2, h3, h4, h5, h6") || anchor;
  const target = block.matches("p") && !block.textContent.trim() ? block.nextElementSibling || block : block;
  const box = target.getBoundingClientRect();
  return {tab: panel.title.label, found: true, top: box.top - view.top, bottom: box.bottom - view.top, height: view.height};
}
"""


def follow_link(page, source, href, anchor=None):
    """Click the first link to `href` in the notebook `source`, then say where its target,
    `anchor` (by default the fragment of `href`), is."""
    document, _, fragment = href.partition("#")
    selector = (f'[href*="{document}"]' if document else "") + f'[href$="#{fragment}"]'
    link = page.locator(
        f".jp-NotebookPanel:not(.lm-mod-hidden) .jp-RenderedMarkdown a{selector}"
    ).first
    link.scroll_into_view_if_needed(timeout=TIMEOUT_S * 1000)
    link.click()
    # A notebook opened by the link draws its cells a few at a time and scrolls once the
    # target's cell is drawn: wait until the target has stayed put for a second.
    where, since, deadline = None, time.monotonic(), time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        page.wait_for_timeout(250)
        now = page.evaluate(TARGET, anchor or fragment)
        if now != where:
            where, since = now, time.monotonic()
        elif where.get("found") and time.monotonic() - since >= 1:
            break
    return where


def activate(page, label):
    """Show the tab `label` again."""
    page.evaluate(
        """(label) => { for (const w of window.jupyterapp.shell.widgets("main"))
                                    if (w.title.label === label) window.jupyterapp.shell.activateById(w.id); }""",
        label,
    )
    page.wait_for_timeout(300)


def landed(where, tab):
    """The link opened `tab` with its target inside the visible part of the notebook."""
    return (
        where.get("tab") == tab
        and where.get("found")
        and where["top"] >= -2
        and where["bottom"] <= where["height"]
    )


def wait_until_shown(page):
    page.evaluate(NOTEBOOK_PROBLEMS, TIMEOUT_S * 1000)


@pytest.mark.jupyterlab
def test_jupyterlab_runs_with_the_books_settings(lab_browser, lab):
    _, base, token = lab
    page, _ = open_in_lab(lab_browser, base, token, "03_loss_functions.ipynb")
    try:
        mode = page.evaluate(
            "() => window.jupyterapp.shell.currentWidget.content.notebookConfig.windowingMode"
        )
    finally:
        page.close()
    assert (
        mode
        == lab_settings.SETTINGS["@jupyterlab/notebook-extension:tracker"][
            "windowingMode"
        ]
    )


@pytest.mark.jupyterlab
@pytest.mark.parametrize(
    "href, anchor, tab",
    [
        ("#eq-3-9a", "eq-3-9a", "03_loss_functions.ipynb"),  # within Chapter 3
        (
            "02_vector_functions.ipynb#cell-id=eq-2-4",
            "eq-2-4",
            "02_vector_functions.ipynb",
        ),  # into Chapter 2
    ],
    ids=["same chapter", "another chapter"],
)
def test_a_link_from_chapter_3_to_an_equation_lands_on_it(
    lab_browser, lab, href, anchor, tab
):
    _, base, token = lab
    page, _ = open_in_lab(lab_browser, base, token, "03_loss_functions.ipynb")
    try:
        wait_until_shown(page)
        where = follow_link(page, "03_loss_functions.ipynb", href, anchor=anchor)
    finally:
        page.close()
    assert landed(where, tab), where


SHALLOW = 10  # Markdown cells


def deepest_links():
    """For each notebook another page links into, the link whose anchor is furthest down
    it, as the book writes it: {notebook: (href, anchor)}. A target among the first
    SHALLOW cells is left out: it may be in view as soon as its notebook opens, so
    landing on it would show nothing."""
    import test_prose

    cells, deepest = test_prose.book_cells(), {}
    for name, text in test_prose.book_pages().items():
        for match in test_prose.LINK.finditer(text):
            target, fragment = match.group(1, 2)
            if (
                target
                and target.endswith(".ipynb")
                and target != name
                and fragment.startswith("cell-id=")
            ):
                anchor = fragment[len("cell-id=") :]
                depth = list(cells[target]).index(anchor)
                if (
                    depth >= SHALLOW
                    and depth > deepest.get(target, (None, None, -1))[2]
                ):
                    deepest[target] = (f"{target}#{fragment}", anchor, depth)
    return {
        target: (href, anchor) for target, (href, anchor, _) in sorted(deepest.items())
    }


@pytest.mark.jupyterlab
def test_links_into_every_notebook_land_on_their_equation(lab_browser, lab):
    """From a page of links, one into each notebook that another page links into: the
    one whose target is furthest down that notebook. Each opens its notebook anew."""
    root, base, token = lab
    links = deepest_links()
    assert len(links) >= 4, (
        links
    )  # Chapters 2 and 3 and both appendices (Chapter 1's target is its second cell)
    nb = notebook("03_loss_functions")
    (root / "links_into_notebooks.ipynb").write_text(
        json.dumps(
            {
                **nb,
                "cells": nb["cells"][:2]
                + [
                    {
                        "cell_type": "markdown",
                        "id": "links",
                        "metadata": {},
                        "source": [
                            " ".join(
                                f"[{anchor}]({href})" for href, anchor in links.values()
                            )
                        ],
                    }
                ],
            }
        )
    )
    page, _ = open_in_lab(lab_browser, base, token, "links_into_notebooks.ipynb")
    missed = {}
    try:
        wait_until_shown(page)
        for target, (href, anchor) in links.items():
            activate(page, "links_into_notebooks.ipynb")
            where = follow_link(page, "links_into_notebooks.ipynb", href, anchor=anchor)
            if not landed(where, target):
                missed[href] = where
    finally:
        page.close()
    assert not missed, missed


@pytest.mark.jupyterlab
def test_a_link_to_an_equation_of_an_open_chapter_lands_on_it(lab_browser, lab):
    """Once the other chapter is open and shown, a second click lands on the equation."""
    _, base, token = lab
    page, _ = open_in_lab(lab_browser, base, token, "03_loss_functions.ipynb")
    try:
        wait_until_shown(page)
        follow_link(
            page, "03_loss_functions.ipynb", "02_vector_functions.ipynb#cell-id=eq-2-4"
        )
        wait_until_shown(page)
        activate(page, "03_loss_functions.ipynb")
        where = follow_link(
            page,
            "03_loss_functions.ipynb",
            "02_vector_functions.ipynb#cell-id=eq-2-4",
            anchor="eq-2-4",
        )
    finally:
        page.close()
    assert landed(where, "02_vector_functions.ipynb"), where


BIBLIOGRAPHY_TEXT = r"""
async (path) => {
  const widget = await window.jupyterapp.commands.execute("docmanager:open", {path, factory: "Markdown Preview"});
  await widget.context.ready;
  for (let i = 0; i < 100 && !widget.content.node.querySelector(".jp-RenderedMarkdown li, .jp-RenderedMarkdown pre"); i++) {
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  return widget.content.node.innerText;
}
"""


def bibliography_problems(text, entries):
    problems = [
        f"shows the directive: {word}"
        for word in ["{bibliography}", ":all:"]
        if word in text
    ]
    flat = " ".join(text.split())
    problems += [f"no reference: {title}" for title in entries if title not in flat]
    return problems


def bibliography_titles():
    from pybtex.database import parse_file

    entries = parse_file(ROOT / "book" / "references.bib").entries.values()
    return [run_notebooks._bib_text(entry.fields["title"]) for entry in entries]


@pytest.mark.jupyterlab
def test_bibliography_reads_in_jupyterlab(lab_browser, lab):
    """bibliography.md, in JupyterLab's Markdown preview, lists every reference."""
    root, base, token = lab
    (root / "planted_bibliography.md").write_text(
        "# Bibliography\n\n```{bibliography}\n:all:\n```\n"
    )
    page, _ = open_in_lab(lab_browser, base, token, "bibliography.md")
    try:
        text = page.evaluate(BIBLIOGRAPHY_TEXT, "bibliography.md")
        planted = page.evaluate(BIBLIOGRAPHY_TEXT, "planted_bibliography.md")
    finally:
        page.close()
    assert not bibliography_problems(text, bibliography_titles()), text
    # JupyterLab shows the MyST directive as a code block of one line, ":all:".
    title = bibliography_titles()[0]
    assert bibliography_problems(planted, [title]) == [
        "shows the directive: :all:",
        f"no reference: {title}",
    ]


# A chapter with one of each problem, and the same things done right in its first cells.
PLANTED = {
    "cells": [
        {
            "cell_type": "markdown",
            "metadata": {},
            "source": [
                "# Planted\n\nFine: $\\operatorname{vec} X$ and\n\n$$\nx = 1 \\tag{9.1}\n$$\n"
            ],
        },
        {
            "cell_type": "markdown",
            "metadata": {},
            "source": ["A TeX error: $x^2^3$ and a raw $$ x^2 with no end"],
        },
        {
            "cell_type": "markdown",
            "metadata": {},
            "source": [
                "<details open>\n<summary>Solution</summary>\n\nThe answer.\n\n</details>"
            ],
        },
        {
            "cell_type": "code",
            "execution_count": None,
            "metadata": {"tags": ["hide-input"]},
            "outputs": [],
            "source": ["answer = 42"],
        },
        {
            "cell_type": "code",
            "execution_count": None,
            "outputs": [],
            "source": ["x = 1"],
            "metadata": {
                "tags": ["hide-input"],
                "mystnb": {"figure": {"caption": "A figure.", "name": "fig-x"}},
            },
        },
    ],
    # What an older run_notebooks.py stored: JupyterLab rewrites it when the kernel starts.
    "metadata": {
        "kernelspec": {
            "display_name": "Python 3",
            "language": "python",
            "name": "python3",
        },
        "language_info": {"name": "python"},
    },
    "nbformat": 4,
    "nbformat_minor": 5,
}


@pytest.mark.jupyterlab
def test_checker_fails_on_a_planted_chapter(lab_browser, lab):
    root, base, token = lab
    cells = [dict(cell, id=f"cell-{i}") for i, cell in enumerate(PLANTED["cells"])]
    (root / "planted.ipynb").write_text(json.dumps({**PLANTED, "cells": cells}))
    problems = notebook_problems(lab_browser, base, token, "planted.ipynb")
    assert [problem.split(":")[0] for problem in problems] == [
        "raw TeX left in the text",
        'TeX error "Double exponent',
        "cell 2",
        "cell 3",
        "cell 4",
        "opening the notebook marked it modified",
    ], problems
    assert problems[2:5] == [
        "cell 2: a folded box is unfolded",
        "cell 3: the check under the solution shows its code",
        "cell 4: its figure has no caption on screen",
    ]


@pytest.mark.jupyterlab
def test_link_check_fails_on_a_link_that_does_not_land(lab_browser, lab):
    """A link to a missing anchor, and a bare anchor in another notebook, do not land."""
    root, base, token = lab
    nb = notebook("03_loss_functions")
    (root / "planted_links.ipynb").write_text(
        json.dumps(
            {
                **nb,
                "cells": nb["cells"][:2]
                + [
                    {
                        "cell_type": "markdown",
                        "id": "planted-links",
                        "metadata": {},
                        "source": [
                            "[(9.9)](#eq-9-9) and [(A.9)](A_matrix_manipulation.ipynb#eq-a-9)"
                        ],
                    }
                ],
            }
        )
    )
    page, _ = open_in_lab(lab_browser, base, token, "planted_links.ipynb")
    try:
        wait_until_shown(page)
        missing = follow_link(page, "planted_links.ipynb", "#eq-9-9")
        activate(page, "planted_links.ipynb")
        bare = follow_link(
            page, "planted_links.ipynb", "A_matrix_manipulation.ipynb#eq-a-9"
        )
    finally:
        page.close()
    assert not landed(missing, "planted_links.ipynb") and missing == {
        "tab": "planted_links.ipynb",
        "found": False,
    }
    # JupyterLab opens the other notebook at its top: if this fails, it follows bare
    # anchors now, and tests/test_prose.py's rule for links between notebooks can go.
    assert bare["tab"] == "A_matrix_manipulation.ipynb" and not landed(
        bare, "A_matrix_manipulation.ipynb"
    ), bare


# The errata's headings that the chapters link to, with their text.
ERRATA_HEADINGS = {
    "errata-chapter-2": "Chapter 2: Vector functions",
    "errata-chapter-3": "Chapter 3: Loss functions",
    "errata-appendix-a": "Appendix A: Matrix manipulation",
    "errata-appendix-b": "Appendix B: Differentials",
}


def link_to_errata(root, errata, fragments):
    """A notebook whose links lead to `errata#fragment`, one per fragment."""
    nb = notebook("03_loss_functions")
    name = f"link_to_{errata.replace('.', '_')}.ipynb"
    links = [
        {
            "cell_type": "markdown",
            "id": f"errata-link-{i}",
            "metadata": {},
            "source": [f"See the [errata]({errata}#{fragment})."],
        }
        for i, fragment in enumerate(fragments)
    ]
    (root / name).write_text(json.dumps({**nb, "cells": nb["cells"][:2] + links}))
    return name


def follow_links_to_errata(browser, base, token, source, errata, fragments):
    """Where each link of `source` to `errata` lands, the notebook shown again before each click."""
    page, _ = open_in_lab(browser, base, token, source)
    found = {}
    try:
        wait_until_shown(page)
        for fragment in fragments:
            activate(page, source)
            found[fragment] = follow_link(page, source, f"{errata}#{fragment}")
    finally:
        page.close()
    return found


@pytest.mark.jupyterlab
def test_an_explicit_anchor_makes_an_errata_link_land_on_its_heading(lab_browser, lab):
    """JupyterLab names a heading after its text ("Chapter-2:-Vector-functions"), the book
    after a slug of it: an anchor `<a id="chapter-2-vector-functions"></a>` on the line
    before the heading is found by both."""
    root, base, token = lab
    fragment, heading = next(iter(ERRATA_HEADINGS.items()))
    (root / "anchored_errata.md").write_text(
        "# Errata\n\n"
        + "Filler.\n\n" * 80
        + f'<a id="{fragment}"></a>\n\n## {heading}\n\n'
        + "More.\n\n" * 80
    )
    source = link_to_errata(root, "anchored_errata.md", [fragment])
    where = follow_links_to_errata(
        lab_browser, base, token, source, "anchored_errata.md", [fragment]
    )[fragment]
    assert landed(where, "anchored_errata.md"), where


@pytest.mark.jupyterlab
def test_errata_links_land_on_their_heading(lab_browser, lab):
    root, base, token = lab
    source = link_to_errata(root, "errata.md", list(ERRATA_HEADINGS))
    found = follow_links_to_errata(
        lab_browser, base, token, source, "errata.md", list(ERRATA_HEADINGS)
    )
    missed = {
        fragment: where
        for fragment, where in found.items()
        if not landed(where, "errata.md")
    }
    assert not missed, missed
