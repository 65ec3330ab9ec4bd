"""The HTML report in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by selenium.

Checks what a reader would see, at 1400 and at 420 CSS pixels wide: every image loads, nothing
overflows horizontally, every in-page anchor has a target, the step / block sliders swap the shown
images, and the console stays free of errors. Skipped with a reason when Chromium, its driver or
selenium is missing, except where ``AMD_REQUIRE_BROWSER=1`` (set by ``.ci/run``, which installs them).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import analyse_stepavg  # noqa: E402
from synthetic_dump import make_layout, random_arrays, write_dump, write_runs  # noqa: E402

pytestmark = pytest.mark.slow  # a browser and two analyses with figures: ~15 s of CPU

PROMPT = "A rusty bicycle in front of a barn"


def _dump(folder, seed, *, maps=True, prompt=PROMPT):
    layout = make_layout([prompt], clip_len=77, t5_len=24)
    arrays = random_arrays(layout, num_blocks=3, num_steps=5, grid=(8, 8), seed=seed)
    if maps:
        rng = np.random.default_rng(seed)
        arrays["per_step_token_map"] = rng.uniform(0.01, 1, (1, 5, 8, 8, layout.T)).astype(np.float32)
        arrays["per_block_token_map"] = rng.uniform(0.01, 1, (1, 3, 8, 8, layout.T)).astype(np.float32)
    write_dump(folder, layout, arrays, seed=seed, image_size=(64, 64), meta={"random_weights": True, "model_id": "tiny-random"})


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """A single run with per-step and per-block maps, and three runs (two of one prompt) with their index."""
    base = tmp_path_factory.mktemp("reports")
    _dump(base / "single", 0)
    assert analyse_stepavg.main(["--root", str(base / "single"), "--topk", "3", "--dpi", "40", "--phrases", "a barn"]) == 0
    multi = base / "multi"
    runs = []
    for k, (prompt, seed) in enumerate([(PROMPT, 1), (PROMPT, 2), ("A furry cat", 1)]):
        folder = f"{k:04d}-run-s{seed}"
        _dump(multi / folder, seed, maps=False, prompt=prompt)
        runs.append({"run": k, "folder": folder, "prompt": [prompt], "seed": seed, "status": "done"})
    runs.append({"run": 3, "folder": "0003-x", "prompt": ["lost"], "seed": 3, "status": "failed", "error": "CUDA OOM"})
    write_runs(multi, runs)
    assert analyse_stepavg.main(["--root", str(multi), "--topk", "2", "--dpi", "40"]) == 0
    out = multi / "analysis"
    groups = sorted((out / "aggregate").glob("*/index.html"))
    assert len(groups) == 1
    for enc in ("clip", "t5"):
        assert (groups[0].parent / enc / "curves_mean.png").is_file() and (groups[0].parent / enc / "heatmaps_mean_01.png").is_file()
    return {"run": base / "single" / "analysis" / "index.html", "index": out / "index.html",
            "run_of_index": out / "0000-run-s1" / "index.html", "group": groups[0]}


def _open(driver, page: Path, width: int) -> None:
    driver.set_window_size(width, 1000)
    driver.get(page.resolve().as_uri())
    # load lazy images now (a reader scrolling would), then wait for all of them
    driver.execute_script("document.querySelectorAll('img').forEach(function(i){i.loading='eager'; i.src=i.src;});")
    driver.set_script_timeout(30)
    driver.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "Promise.all(Array.from(document.images).map(function(i){return i.complete ? 0 : new Promise(function(r){"
        "i.onload = i.onerror = r;});})).then(function(){done(true);});"
    )


def _check_page(driver, page: Path, width: int) -> None:
    _open(driver, page, width)
    inner = driver.execute_script("return window.innerWidth")
    assert abs(inner - width) <= 20, f"window is {inner} px wide, asked for {width}"
    broken = driver.execute_script(
        "return Array.from(document.images).filter(function(i){return !(i.naturalWidth > 0);}).map(function(i){return i.src;});"
    )
    assert not broken, f"{page.name} at {width}px: images that did not load: {broken[:3]}"
    overflow = driver.execute_script("return document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"{page} at {width}px overflows horizontally by {overflow}px"
    wide = driver.execute_script(
        "var w = document.documentElement.clientWidth;"
        "return Array.from(document.querySelectorAll('img')).filter(function(i){var r = i.getBoundingClientRect();"
        " return r.right > w + 1 && !i.closest('.scroll');}).map(function(i){return i.src;});"
    )
    assert not wide, f"{page.name} at {width}px: images wider than the page: {wide[:3]}"
    missing = driver.execute_script(
        "return Array.from(document.querySelectorAll('a[href^=\"#\"]')).map(function(a){return a.getAttribute('href').slice(1);})"
        ".filter(function(id){return !document.getElementById(decodeURIComponent(id));});"
    )
    assert not missing, f"anchors without a target: {missing}"
    errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not errors, errors


@pytest.mark.parametrize("width", [1400, 420])
def test_pages_load_fit_and_link(browser, reports, width):
    for key in ("run", "index", "run_of_index", "group"):
        _check_page(browser, reports[key], width)


def test_run_page_has_toc_and_full_size_links(browser, reports):
    _open(browser, reports["run"], 1400)
    toc = browser.execute_script("return Array.from(document.querySelectorAll('nav.toc a')).map(function(a){return a.textContent;});")
    assert "CLIP" in toc and "T5" in toc and "Segmentation" in toc and "CLIP vs T5" in toc
    # every figure opens its own file at full size
    pairs = browser.execute_script(
        "return Array.from(document.querySelectorAll('figure a > img')).map(function(i){return [i.parentNode.href, i.src];});"
    )
    assert pairs and all(a == b for a, b in pairs)
    assert browser.execute_script("return document.querySelectorAll('.warn').length") == 1  # random weights


def test_sliders_swap_the_images(browser, reports):
    _open(browser, reports["run"], 1400)
    n = browser.execute_script("return document.querySelectorAll('.slider').length")
    kinds = browser.execute_script("return Array.from(document.querySelectorAll('.slider label')).map(function(l){return l.textContent;});")
    assert n >= 4 and any(k.startswith("step") for k in kinds) and any(k.startswith("block") for k in kinds)
    for k in range(n):
        before, after, label = browser.execute_script(
            "var box = document.querySelectorAll('.slider')[arguments[0]];"
            "var img = box.querySelector('img.frame'), input = box.querySelector('input[type=range]');"
            "var before = img.src; input.value = input.value === input.max ? 0 : input.max; input.dispatchEvent(new Event('input'));"
            "return [before, img.src, box.querySelector('output').textContent];",
            k,
        )
        assert before != after, f"slider {k} did not change the image"
        assert label
    # the new image loads
    _check_loaded = browser.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "var imgs = Array.from(document.querySelectorAll('img.frame'));"
        "Promise.all(imgs.map(function(i){return i.complete ? 0 : new Promise(function(r){i.onload = i.onerror = r;});}))"
        ".then(function(){done(imgs.every(function(i){return i.naturalWidth > 0;}));});"
    )
    assert _check_loaded


def test_index_links_both_ways(browser, reports):
    _open(browser, reports["index"], 1400)
    text = browser.execute_script("return document.body.innerText")
    assert "random weights" in text.lower() and "CUDA OOM" in text
    thumbs = browser.execute_script("return document.querySelectorAll('img.thumb').length")
    assert thumbs == 3 * 2  # each analysed run: its image and its top word's map
    _open(browser, reports["run_of_index"], 1400)
    back = browser.execute_script("return document.querySelector('p.back a').href")
    assert back.endswith("/analysis/index.html")
    _open(browser, reports["group"], 1400)
    assert browser.execute_script("return document.querySelector('p.back a').href").endswith("/analysis/index.html")


def test_curves_per_block_at_full_width(browser, reports):
    """The per-block curves (a slider of one image per block) fill the content width, like every other figure."""
    _open(browser, reports["run"], 1400)
    boxes = browser.execute_script(
        "return Array.from(document.querySelectorAll('.slider[id*=curves]')).map(function(b){"
        " var img = b.querySelector('img.frame'), cs = getComputedStyle(document.body);"
        " var content = document.body.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);"
        " return [b.className, img.getBoundingClientRect().width, content];});"
    )
    assert len(boxes) >= 2  # CLIP and T5 (and the phrases')
    for cls, width, content in boxes:
        assert "wide" in cls.split()
        assert width >= 0.9 * content, f"curves shown {width:.0f} px wide of {content:.0f}"


def test_narrow_screen_tables_scroll_names_stay_on_one_line_figures_open(browser, reports):
    """At 420 px: the page never scrolls sideways (tables scroll in their own box), a run's name is
    one line, every figure links its own file, and the summary is the top words' figures stacked."""
    for key in ("run", "index", "group"):
        _open(browser, reports[key], 420)
        assert browser.execute_script("return document.scrollingElement.scrollWidth") <= 420, key
        unlinked = browser.execute_script(
            "return Array.from(document.querySelectorAll('figure img')).filter(function(i){"
            " var a = i.parentNode; return !(a.tagName === 'A' && a.href === i.src);}).map(function(i){return i.src;});"
        )
        assert not unlinked, f"{key}: figures not linked to their file: {unlinked[:3]}"
    _open(browser, reports["index"], 420)
    lines = browser.execute_script(
        "return Array.from(document.querySelectorAll('#runs + .scroll td:nth-child(2) a')).map(function(a){"
        " var lh = parseFloat(getComputedStyle(a).lineHeight); return [a.textContent, a.getBoundingClientRect().height / lh];});"
    )
    assert len(lines) >= 3
    assert all(ratio < 1.5 for _, ratio in lines), lines  # one line per name, not one character per line
    boxes = browser.execute_script(
        "return Array.from(document.querySelectorAll('.scroll')).map(function(b){return [b.scrollWidth, b.clientWidth];});"
    )
    assert any(sw > cw for sw, cw in boxes)  # the runs table is wider than the screen: it scrolls in its box
    for width, shown, hidden in ((420, "narrow-only", "wide-only"), (1400, "wide-only", "narrow-only")):
        _open(browser, reports["run"], width)
        seen = browser.execute_script(
            "function vis(c){return Array.from(document.querySelectorAll('.' + c + ' img')).filter(function(i){"
            " return i.getBoundingClientRect().width > 0;}).length;} return [vis(arguments[0]), vis(arguments[1])];",
            shown, hidden)
        assert seen[0] >= 2 and seen[1] == 0, (width, seen)
    # at 420 the stacked top words are as wide as the content
    _open(browser, reports["run"], 420)
    widths = browser.execute_script(
        "return Array.from(document.querySelectorAll('.narrow-only img')).map(function(i){"
        " return i.getBoundingClientRect().width / document.body.clientWidth;});")
    assert min(widths) >= 0.85
