"""The built book as readers see it: every page opened in headless Chromium.

MathJax is served from node_modules (the npm package pinned in package-lock.json) in
place of the CDN the pages load it from, the book from a local HTTP server, and every
other request is refused, so the test needs no network and sees what a reader sees:
TeX errors, undefined macros (MathJax 3 shows them as red text, not as errors), math
left untypeset (unbalanced braces), images that do not load and links that lead
nowhere. `make test` installs Debian's chromium and the npm packages when missing.
"""

import contextlib
import functools
import http.server
import pathlib
import threading
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import sync_playwright
from sphinx.ext.mathjax import MATHJAX_URL
from test_book import toc_files

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM = pathlib.Path("/usr/bin/chromium")
# Without the last three, Chromium on a closed network keeps trying to reach Google's
# services; --disable-dev-shm-usage keeps it from running out of a container's /dev/shm.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MATHJAX_DIR = ROOT / "node_modules" / "mathjax" / "es5"
# The CDN folder that every page built by Jupyter Book 1 loads MathJax 3 from.
MATHJAX_CDN = MATHJAX_URL.rsplit("/", 1)[0] + "/"
MATHJAX_TIMEOUT_MS = 30_000
DESKTOP = {"width": 1280, "height": 800}
PAGES = toc_files() + ["genindex", "search"]
CHAPTERS = [page for page in toc_files() if (ROOT / f"{page}.ipynb").exists()]
OTHER_PAGES = [page for page in PAGES if page not in CHAPTERS]
PHONE = {"width": 400, "height": 900}
# Sphinx 7.4 writes an inline script that an extension adds after the builder has
# started twice; sphinx-thebe's configuration is one, and its second copy fails to
# redeclare the constants the first has already set to the same values.
HARMLESS_SCRIPT_ERRORS = {"Identifier 'THEBE_JS_URL' has already been declared"}

pytestmark = pytest.mark.browser

# Runs in the page once it has loaded; returns one line per problem a reader would see.
FIND_PROBLEMS = r"""
async (timeoutMs) => {
  const problems = [];
  const snippet = (text) => text.replace(/\s+/g, " ").trim().slice(0, 80);

  // MathJax, on the pages Sphinx gives it to, has loaded and finished typesetting.
  if (window.MathJax && !MathJax.startup) {
    problems.push("MathJax did not load");
  } else if (window.MathJax) {
    const timeout = new Promise((resolve) => setTimeout(() => resolve(false), timeoutMs));
    if (!(await Promise.race([MathJax.startup.promise.then(() => true), timeout]))) {
      problems.push(`MathJax did not finish typesetting within ${timeoutMs} ms`);
    }
    // TeX errors and undefined macros, with the TeX they came from.
    for (const item of MathJax.startup.document.math) {
      const root = item.typesetRoot;
      if (!root) continue;
      for (const error of root.querySelectorAll("mjx-merror")) {
        problems.push(`TeX error "${error.getAttribute("data-mjx-error")}" in: ${snippet(item.math)}`);
      }
      for (const macro of root.querySelectorAll("mjx-assistive-mml mtext[mathcolor=red]")) {
        problems.push(`undefined macro ${macro.textContent} in: ${snippet(item.math)}`);
      }
      // A display too wide for its box can scroll to the right, but what sticks out on
      // the left (pydata-sphinx-theme lays a numbered display out right to left) is
      // out of the reader's reach.
      const box = root.parentElement.getBoundingClientRect();
      if (item.display && root.getBoundingClientRect().left < box.left - 1) {
        problems.push(`equation cut off on the left, too wide for the page: ${snippet(item.math)}`);
      }
    }
  }

  // Math that MathJax did not typeset: a .math element without its rendering, or raw
  // delimiters in the text (outside code, which may show them on purpose).
  for (const math of document.querySelectorAll(".math")) {
    if (!math.querySelector("mjx-container")) problems.push(`math left untypeset: ${snippet(math.textContent)}`);
  }
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.parentElement.closest("script, style, pre, code, textarea, mjx-container, .math")) continue;
    if (/\$\$|\\\(|\\\[|\\begin\{/.test(node.textContent)) {
      problems.push(`raw TeX left in the text: ${snippet(node.textContent)}`);
    }
  }

  // Images: every one loads (lazy ones are asked to load now).
  const images = [...document.images];
  for (const image of images) image.loading = "eager";
  await Promise.all(images.map((image) => image.decode().catch(() => null)));
  for (const image of images) {
    if (!image.complete || image.naturalWidth === 0) problems.push(`image does not load: ${image.getAttribute("src")}`);
  }

  // Internal links: the page they lead to exists, and so does the anchor.
  const targets = new Map();
  for (const link of document.querySelectorAll("a[href]")) {
    const url = new URL(link.href);
    if (url.origin !== location.origin) continue;
    const page = url.origin + url.pathname + url.search;
    if (!targets.has(page)) targets.set(page, new Set());
    if (url.hash.length > 1) targets.get(page).add(link.getAttribute("href"));
  }
  const here = location.origin + location.pathname + location.search;
  for (const [page, hrefs] of targets) {
    let doc = document;
    if (page !== here) {
      const response = await fetch(page);
      if (!response.ok) {
        problems.push(`broken link: ${page.slice(location.origin.length)} (HTTP ${response.status})`);
        continue;
      }
      if (hrefs.size === 0) continue;
      doc = new DOMParser().parseFromString(await response.text(), "text/html");
    }
    for (const href of hrefs) {
      const id = decodeURIComponent(new URL(href, location.href).hash.slice(1));
      if (!doc.getElementById(id) && !doc.getElementsByName(id).length) {
        problems.push(`broken link: ${href} (no such anchor)`);
      }
    }
  }
  return problems;
}
"""


@contextlib.contextmanager
def serve(directory):
    """Serve `directory` over HTTP on a free port of 127.0.0.1; yield its base URL."""

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            """Keep the test output free of one line per request."""

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=directory)
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def open_page(browser, url, **page_options):
    """A new page that may fetch only from the origin of `url` and MathJax's CDN.

    MathJax's CDN is answered from node_modules; every other outside request is
    refused and listed in the returned `refused` list.
    """
    origin = "{0.scheme}://{0.netloc}/".format(urlsplit(url))
    refused = []

    def route(request_route):
        request_url = request_route.request.url
        if request_url.startswith(origin):
            request_route.continue_()
        elif request_url.startswith(MATHJAX_CDN):
            request_route.fulfill(
                path=MATHJAX_DIR / urlsplit(request_url.removeprefix(MATHJAX_CDN)).path
            )
        else:
            refused.append(request_url)
            request_route.abort()

    page = browser.new_page(**page_options)
    page.route("**", route)
    return page, refused


def page_problems(page, url):
    """Load `url` in `page` and list every problem a reader of it would see: what
    FIND_PROBLEMS reports, script errors and refused outside requests. None of these
    depends on the colour scheme or the width of the window."""
    refused = page.refused
    errors = []

    def on_script_error(error):
        if error.message not in HARMLESS_SCRIPT_ERRORS:
            errors.append(f"script error: {error.message}")

    page.on("pageerror", on_script_error)
    response = page.goto(url, wait_until="load")
    if not response.ok:
        return [f"page does not load (HTTP {response.status})"]
    problems = page.evaluate(FIND_PROBLEMS, MATHJAX_TIMEOUT_MS)
    return (
        problems
        + errors
        + [f"outside request refused: {request}" for request in refused]
    )


def browser_problems(browser, url, **page_options):
    """Open `url` in a new page of Chromium (at desktop width unless `page_options`
    say otherwise) and list every problem a reader of the page would see."""
    page, refused = open_page(browser, url, **{"viewport": DESKTOP, **page_options})
    page.refused = refused
    try:
        return page_problems(page, url)
    finally:
        page.close()


# What a narrow screen in dark mode shows: the theme, any horizontal scrolling of the
# whole page and the elements that cause it (outside any box that scrolls or clips on
# its own, or stays fixed on the screen), and for each figure whether it stands on an opaque, light background (its
# own corner pixels, or the background the theme paints behind it).
LAYOUT = r"""
async () => {
  if (window.MathJax && MathJax.startup) await MathJax.startup.promise;
  const width = document.documentElement.clientWidth;
  const contained = (element) => {
    for (let box = element; box && box !== document.body; box = box.parentElement) {
      const style = getComputedStyle(box);
      if (style.position === "fixed" || (box !== element && style.overflowX !== "visible")) return true;
    }
    return false;
  };
  const stickingOut = () => {
    const out = [...document.body.querySelectorAll("*")].filter(
      (element) => element.getBoundingClientRect().right > width + 0.5 && !contained(element));
    return out.filter((element) => !out.includes(element.parentElement)).map(
      (element) => `<${element.localName}> "${element.textContent.replace(/\s+/g, " ").trim().slice(0, 60)}"`);
  };
  const opaqueCorners = (image) => {
    const canvas = document.createElement("canvas");
    [canvas.width, canvas.height] = [image.naturalWidth, image.naturalHeight];
    const context = canvas.getContext("2d");
    context.drawImage(image, 0, 0);
    const corners = [[0, 0], [canvas.width - 1, 0], [0, canvas.height - 1], [canvas.width - 1, canvas.height - 1]];
    return corners.every(([x, y]) => context.getImageData(x, y, 1, 1).data[3] === 255);
  };
  const lightBackground = (image) => {
    const [r, g, b, a = 1] = getComputedStyle(image).backgroundColor.match(/[\d.]+/g).map(Number);
    return a === 1 && (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255 > 0.7;
  };
  // A display wider than the screen must scroll into view, not be cut off on the left.
  const clipped = window.MathJax && MathJax.startup ? [...MathJax.startup.document.math].filter(
    (item) => item.display && item.typesetRoot &&
      item.typesetRoot.getBoundingClientRect().left < item.typesetRoot.parentElement.getBoundingClientRect().left - 1,
  ).map((item) => item.math.replace(/\s+/g, " ").trim().slice(0, 60)) : [];
  // The width of the box of each display (at most 40): what narrowing changes.
  const displayBoxes = window.MathJax && MathJax.startup ? [...MathJax.startup.document.math].filter(
    (item) => item.display && item.typesetRoot).slice(0, 40).map(
    (item) => Math.round(item.typesetRoot.parentElement.getBoundingClientRect().width)) : [];
  return {
    width,
    displayBoxes,
    theme: document.documentElement.dataset.theme,
    clipped,
    overflow: document.documentElement.scrollWidth - width,
    stickingOut: document.documentElement.scrollWidth > width ? stickingOut() : [],
    figures: [...document.querySelectorAll("article img")].map((image) => ({
      src: image.getAttribute("src"), legible: opaqueCorners(image) || lightBackground(image),
    })),
  };
}
"""


def layout_problems(layout):
    """What LAYOUT found wrong at phone width in dark mode, one line each."""
    illegible = [figure["src"] for figure in layout["figures"] if not figure["legible"]]
    problems = []
    if layout["theme"] != "dark":
        problems.append(
            f"the theme is {layout['theme']!r} where the reader asked for dark"
        )
    if layout["clipped"]:
        problems.append(
            f"equations cut off on the left at phone width: {layout['clipped']}"
        )
    if layout["overflow"] > 0:
        problems.append(
            f"the page scrolls sideways by {layout['overflow']} px at phone width, "
            f"because of: {layout['stickingOut']}"
        )
    if illegible:
        problems.append(
            f"figures on a transparent or dark background in dark mode: {illegible}"
        )
    return problems


def chapter_problems(browser, site, chapter, tmp_path):
    """A chapter opened once, in a browser that asks for dark mode: at desktop width,
    every problem `page_problems` finds (math, images, links, scripts, outside
    requests); then the same page narrowed to a phone's width, checked by LAYOUT (no
    sideways scrolling of the page, wide equations that scroll instead of being cut
    off, legible figures). MathJax typesets the chapter once for both.

    The theme reads the reader's colour scheme when the page loads, so dark mode is
    asked for from the start; the desktop checks do not depend on it.
    `test_browser_chapters.py` checks that narrowing a loaded page gives the layout a
    fresh load at phone width gives. When the layout fails, a screenshot is left in
    pytest's temporary directory, under pytest-current/.
    """
    url = f"{site}{chapter}.html"
    page, refused = open_page(browser, url, viewport=DESKTOP, color_scheme="dark")
    page.refused = refused
    try:
        problems = page_problems(page, url)
        page.set_viewport_size(PHONE)
        found = layout_problems(page.evaluate(LAYOUT))
        if found:
            page.screenshot(path=tmp_path / "narrow-dark.png", full_page=True)
    finally:
        page.close()
    return problems + found


def launch_browser(needs=(CHROMIUM, MATHJAX_DIR)):
    """Debian's Chromium, headless, driven by Playwright (the `browser` fixture of
    tests/conftest.py: one per process, shared by every browser test file). `needs`
    lists what must exist first: the book's pages also need MathJax from node_modules,
    JupyterLab (tests/test_jupyterlab.py) only the browser."""
    for needed in needs:
        if not needed.exists():
            pytest.fail(f"{needed} is missing: `make test` installs it")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_FLAGS
        )
        yield chromium
        chromium.close()


def serve_book(built_book):
    """The built book, served on 127.0.0.1: its base URL (the `site` fixture)."""
    _, _, html = built_book
    with serve(html) as url:
        yield url


@pytest.mark.parametrize("page", OTHER_PAGES)
def test_page_renders_in_a_browser(browser, site, page):
    """A page of the book shows all its math, images and link targets, with no script errors."""
    problems = browser_problems(browser, f"{site}{page}.html")
    assert not problems, f"{page}.html:\n" + "\n".join(problems)


@pytest.mark.parametrize("chapter", CHAPTERS[::2])
def test_chapter_on_desktop_and_phone(browser, site, chapter, tmp_path):
    """Half of the chapters (the other half is in test_browser_chapters.py, which the
    second test process runs): everything test_page_renders_in_a_browser checks, then
    the page at phone width in dark mode (see `chapter_problems`)."""
    problems = chapter_problems(browser, site, chapter, tmp_path)
    assert not problems, f"{chapter}.html:\n" + "\n".join(problems)


# One page with one problem of each kind, and the same things done right on its
# first line; the numbered display is laid out as pydata-sphinx-theme lays one out.
BROKEN_PAGE = r"""<!DOCTYPE html>
<html><head>
<script>window.MathJax = {"options": {"processHtmlClass": "math"}}</script>
<script defer src="MATHJAX_URL"></script>
</head><body>
<p id="fine">Typeset: <span class="math">\(\operatorname{vec} A\)</span>, <img src="fine.svg">,
  <a href="#fine">here</a>, <a href="broken.html">this page</a>.</p>
<p>An undefined macro: <span class="math">\(\undefinedmacro x\)</span></p>
<p>A TeX error: <span class="math">\(x^2^3\)</span></p>
<div class="math" style="display: flex; flex-direction: row-reverse; overflow: hidden; width: 300px">
  \[ a + b + c + d + e + f + g + h + i + j + k + l + m + n + o + p \tag{1} \]</div>
<div class="math">\[ \frac{1}{2 \]</div>
<p>Raw: $$ x^2 and no end</p>
<img src="missing.png"> <img src="https://example.com/figure.png">
<a href="missing.html">a missing page</a> <a href="#nowhere">a missing anchor</a>
<script>notDefined()</script>
</body></html>
""".replace("MATHJAX_URL", MATHJAX_URL)


def test_checker_reports_every_kind_of_problem(browser, tmp_path):
    """The checker the book passes does fail a page with problems, naming each one."""
    (tmp_path / "broken.html").write_text(BROKEN_PAGE)
    (tmp_path / "fine.svg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>'
    )
    with serve(tmp_path) as url:
        problems = browser_problems(browser, f"{url}broken.html")
        assert browser_problems(browser, f"{url}missing.html") == [
            "page does not load (HTTP 404)"
        ]
    assert problems == [
        r"undefined macro \undefinedmacro in: \undefinedmacro x",
        r'TeX error "Double exponent: use braces to clarify" in: x^2^3',
        r"equation cut off on the left, too wide for the page: a + b + c + d + e + f + g + h + i + j + k + l + m + n + o + p \tag{1}",
        r"math left untypeset: \[ \frac{1}{2 \]",
        r"raw TeX left in the text: Raw: $$ x^2 and no end",
        "image does not load: missing.png",
        "image does not load: https://example.com/figure.png",
        "broken link: #nowhere (no such anchor)",
        "broken link: /missing.html (HTTP 404)",
        "script error: notDefined is not defined",
        "outside request refused: https://example.com/figure.png",
    ]
