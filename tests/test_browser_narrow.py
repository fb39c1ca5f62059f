"""The built book on a phone and with Live Code, in headless Chromium.

Split from tests/test_browser.py (whose page helpers it uses; the `browser` and `site`
fixtures are in tests/conftest.py) so that pytest-xdist, which runs each file in one
process, can open these pages while the other file opens the desktop ones.
"""

import pytest
from test_book import toc_files
from test_browser import DESKTOP, ROOT, open_page

pytestmark = pytest.mark.browser

CHAPTERS = [page for page in toc_files() if (ROOT / f"{page}.ipynb").exists()]

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
  return {
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


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_reads_on_a_narrow_screen_in_dark_mode(
    browser, site, chapter, tmp_path
):
    """A phone-wide screen in dark mode: no sideways scrolling of the page, wide equations
    that scroll instead of being cut off, and legible figures.

    When the page fails, a screenshot of it is left in pytest's temporary directory,
    under pytest-current/, to show what a reader would see.
    """
    page, _ = open_page(
        browser, site, viewport={"width": 400, "height": 900}, color_scheme="dark"
    )
    try:
        page.goto(f"{site}{chapter}.html", wait_until="load")
        layout = page.evaluate(LAYOUT)
        illegible = [
            figure["src"] for figure in layout["figures"] if not figure["legible"]
        ]
        if (
            layout["theme"] != "dark"
            or layout["clipped"]
            or layout["overflow"] > 0
            or illegible
        ):
            page.screenshot(path=tmp_path / "narrow-dark.png", full_page=True)
    finally:
        page.close()
    assert layout["theme"] == "dark"
    assert not layout["clipped"], (
        f"equations cut off on the left at 400 px wide: {layout['clipped']}"
    )
    assert layout["overflow"] <= 0, (
        f"the page scrolls sideways by {layout['overflow']} px at 400 px wide, because of: {layout['stickingOut']}"
    )
    assert not illegible, (
        f"figures on a transparent or dark background in dark mode: {illegible}"
    )


@pytest.mark.parametrize("chapter", CHAPTERS[:1])
def test_live_code_button_starts_thebe(browser, site, chapter):
    """Live Code loads Thebe, which would then ask Binder for a kernel (refused here)."""
    page, _ = open_page(browser, site, viewport=DESKTOP)
    try:
        page.goto(f"{site}{chapter}.html", wait_until="load")
        page.click(".dropdown-launch-buttons button.dropdown-toggle")
        with page.expect_request(page.evaluate("THEBE_JS_URL")):
            page.click("button.btn-launch-thebe")
    finally:
        page.close()
