"""The second half of the chapters on desktop and on a phone, Live Code, and the check
that narrowing a loaded page shows what a fresh load on a phone shows.

Split from tests/test_browser.py (whose page helpers it uses; the `browser` and `site`
fixtures are in tests/conftest.py) so that pytest-xdist, which runs each file in one
process, can open these pages while the other file opens the first half.
"""

import pytest
from test_browser import (
    CHAPTERS,
    DESKTOP,
    LAYOUT,
    PHONE,
    chapter_problems,
    layout_problems,
    open_page,
)

pytestmark = pytest.mark.browser


@pytest.mark.parametrize("chapter", CHAPTERS[1::2])
def test_chapter_on_desktop_and_phone(browser, site, chapter, tmp_path):
    """The chapters test_browser.py leaves out: every problem a reader would see at
    desktop width, then at phone width in dark mode (see `chapter_problems`)."""
    problems = chapter_problems(browser, site, chapter, tmp_path)
    assert not problems, f"{chapter}.html:\n" + "\n".join(problems)


def layout_after(browser, site, chapter, viewport, narrow_to=None):
    page, _ = open_page(browser, site, viewport=viewport, color_scheme="dark")
    try:
        page.goto(f"{site}{chapter}.html", wait_until="load")
        if narrow_to:
            page.evaluate(LAYOUT)  # typeset first, as chapter_problems does
            page.set_viewport_size(narrow_to)
        return page.evaluate(LAYOUT)
    finally:
        page.close()


def test_narrowing_a_loaded_page_lays_it_out_as_a_phone_does(browser, site):
    """`chapter_problems` checks the phone layout by narrowing the page it checked at
    desktop width. Here the same chapter, with equations, tables and figures, is laid
    out both ways: the theme, the equations cut off, the sideways overflow, what sticks
    out, each figure's legibility, and the width of the page and of the first 40
    displays must agree, and the layout must pass."""
    chapter = "book/06_camera_geometry"
    assert chapter in CHAPTERS
    fresh = layout_after(browser, site, chapter, PHONE)
    narrowed = layout_after(browser, site, chapter, DESKTOP, narrow_to=PHONE)
    assert fresh["figures"], "the chapter has figures to compare"
    assert fresh["width"] <= PHONE["width"] and len(fresh["displayBoxes"]) > 10
    assert narrowed == fresh
    assert layout_problems(fresh) == []


def test_layout_problems_names_each_problem():
    """The phone-width verdict fails on each kind of problem, and names it."""
    bad = {
        "width": 400,
        "displayBoxes": [],
        "theme": "light",
        "clipped": ["x = 1"],
        "overflow": 12,
        "stickingOut": ['<table> "wide"'],
        "figures": [
            {"src": "a.png", "legible": False},
            {"src": "b.png", "legible": True},
        ],
    }
    assert layout_problems(bad) == [
        "the theme is 'light' where the reader asked for dark",
        "equations cut off on the left at phone width: ['x = 1']",
        "the page scrolls sideways by 12 px at phone width, because of: "
        "['<table> \"wide\"']",
        "figures on a transparent or dark background in dark mode: ['a.png']",
    ]


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
