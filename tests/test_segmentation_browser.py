"""The evaluation's index.html in a real browser (headless Chromium through selenium), at 1400 and 420 CSS
pixels: images load, the page never scrolls sideways, a table wider than the screen scrolls inside its own
box. Skipped when Chromium, its driver or selenium is missing (unless AMD_REQUIRE_BROWSER=1)."""

from __future__ import annotations


import pytest

from test_segmentation_pictures import _evaluation

pytestmark = pytest.mark.slow  # a browser and an evaluation with figures

@pytest.mark.parametrize("width", [1400, 420])
def test_report_fits_the_screen_and_tables_scroll_in_their_box(browser, tmp_path, capsys, width):
    page = _evaluation(tmp_path, capsys) / "index.html"
    browser.set_window_size(width, 1000)
    browser.get(page.resolve().as_uri())
    browser.set_script_timeout(30)
    loaded = browser.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "Promise.all(Array.from(document.images).map(function(i){return i.complete ? 0 : new Promise(function(r){"
        "i.onload = i.onerror = r;});})).then(function(){done(Array.from(document.images).map(function(i){"
        "return i.naturalWidth > 0;}));});"
    )
    assert loaded and all(loaded)
    doc = browser.execute_script("return [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert doc[0] <= doc[1], f"the page scrolls sideways at {width}px: {doc}"
    boxes = browser.execute_script(
        "return Array.from(document.querySelectorAll('table')).map(function(t){var b = t.parentNode;"
        "return [b.className, getComputedStyle(b).overflowX, b.scrollWidth, b.clientWidth,"
        " b.getBoundingClientRect().right <= document.documentElement.clientWidth + 1];});"
    )
    assert boxes and all(b[0] == "scroll" and b[1] == "auto" and b[4] for b in boxes), boxes
    summary = browser.execute_script("var b = document.getElementById('summary-table'); return [b.scrollWidth, b.clientWidth];")
    if width == 420:
        assert summary[0] > summary[1]  # wider than the screen: it scrolls in its box, the page does not
        before = browser.execute_script(
            "var b = document.getElementById('summary-table'); b.scrollLeft = 200; return b.scrollLeft;")
        assert before > 0
    else:
        assert summary[0] <= summary[1]  # fits at full width
    # figures shrink to the page
    widths = browser.execute_script(
        "return Array.from(document.images).map(function(i){return i.getBoundingClientRect().right;})")
    assert max(widths) <= doc[1] + 1
