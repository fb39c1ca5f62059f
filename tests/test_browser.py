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


def browser_problems(browser, url):
    """Open `url` in Chromium and list every problem a reader of the page would see."""
    page, refused = open_page(browser, url, viewport=DESKTOP)
    errors = []

    def on_script_error(error):
        if error.message not in HARMLESS_SCRIPT_ERRORS:
            errors.append(f"script error: {error.message}")

    page.on("pageerror", on_script_error)
    try:
        response = page.goto(url, wait_until="load")
        if not response.ok:
            return [f"page does not load (HTTP {response.status})"]
        problems = page.evaluate(FIND_PROBLEMS, MATHJAX_TIMEOUT_MS)
    finally:
        page.close()
    return (
        problems
        + errors
        + [f"outside request refused: {request}" for request in refused]
    )


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


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_in_a_browser(browser, site, page):
    """A page of the book shows all its math, images and link targets, with no script errors."""
    problems = browser_problems(browser, f"{site}{page}.html")
    assert not problems, f"{page}.html:\n" + "\n".join(problems)


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
