"""A real browser drives notebook 14: Voila serves it on 127.0.0.1, Debian's headless Chromium (through
Playwright, never `playwright install`) moves controls, and the decoded image (its blob URL and its bytes) and the
metric text must change.

Skipped only outside CI when Chromium is missing (`apt-get install chromium`); in CI (env CI set) a missing
browser, Voila or Playwright is a failure - .ci/run installs Chromium.
"""

from __future__ import annotations

import os
import time

import pytest

import rearlib.teaching as Wd
from rearlib.experiments.notebook import NOTEBOOK_DIR

pytestmark = pytest.mark.browser

NOTEBOOK = NOTEBOOK_DIR / "14_teaching.py"
SURGERY = f".{Wd.TokenSurgery.css_class}"
SAME = f".{Wd.SameCTR.css_class}"


def _require(what: str, ok: bool, how: str) -> None:
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI: {what} is missing ({how}); the browser test must run in CI")
    pytest.skip(f"{what} is missing ({how}); CI installs it")


@pytest.fixture(scope="module")
def chromium():
    exe = Wd.find_chromium()
    _require("Debian's chromium", exe is not None, "apt-get install -y --no-install-recommends chromium")
    for mod in ("playwright", "voila"):
        try:
            __import__(mod)
        except ImportError:
            _require(f"the Python package {mod}", False, "pip install -e '.[dev]'")
    return exe


def _wait_change(page, selector: str, before: tuple[str, str], timeout_s: float = 60.0) -> tuple[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = Wd.image_digest(page, selector)
        if now[1] != before[1]:
            return now
        time.sleep(0.1)
    raise AssertionError(f"{selector} did not change within {timeout_s:.0f} s")


def test_voila_widgets_respond_to_a_real_browser(chromium, tmp_path):
    params = {"run_demo": False, "device": "cpu", "num_threads": 1, "reports_dir": str(tmp_path / "reports"),
              "figures_dir": str(tmp_path / "figures")}
    t0 = time.monotonic()
    with Wd.serve_voila(NOTEBOOK, params, timeout_s=120) as (url, log_tail), \
            Wd.chromium_page(chromium, timeout_ms=60_000) as page:
        page.goto(url, timeout=180_000)
        try:
            Wd.wait_for_widgets(page, Wd.TokenSurgery.css_class, 180_000)
            Wd.wait_for_widgets(page, Wd.SameCTR.css_class, 60_000)
        except Exception as err:
            raise AssertionError(f"the widgets did not render: {err}\nvoila log:\n{log_tail()}") from err
        t_loaded = time.monotonic() - t0
        decoded = f"{SURGERY}-decoded"
        metrics = page.locator(f"{SURGERY}-metrics").first
        img0, text0 = Wd.image_digest(page, decoded), metrics.inner_text()
        assert "87.5%" in text0  # k = 32 of 256 wrong at start: CTR 87.5%

        # 1. Move the k slider with the keyboard (what a user does after clicking its handle): 32 -> 42.
        handle = page.locator(f"{SURGERY}-k .noUi-handle").first
        handle.focus()
        t1 = time.monotonic()
        handle.press("ArrowRight")
        img1 = _wait_change(page, decoded, img0)
        latency = time.monotonic() - t1  # key press -> new image bytes in the page (kernel round trip included)
        assert img1[0] != img0[0], "the <img> src did not change"
        for _ in range(9):  # every step is one update (sliders send on change, not while dragging)
            handle.press("ArrowRight")
        page.wait_for_function("sel => document.querySelector(sel).innerText.includes('83.6%')",
                               arg=f"{SURGERY}-metrics")  # k = 42: CTR = 214/256
        text1 = metrics.inner_text()
        img1 = Wd.image_digest(page, decoded)
        assert text1 != text0 and img1[1] != img0[1]

        # 2. Pick another replacement in the dropdown.
        page.locator(f"{SURGERY}-replacement select").first.select_option(value=None, label="embedding-farthest code")
        img2 = _wait_change(page, decoded, img1)
        page.wait_for_function("([sel, old]) => document.querySelector(sel).innerText !== old",
                               arg=[f"{SURGERY}-metrics", text1])
        assert "83.6%" in metrics.inner_text()  # same CTR, other image: the point of the widget

        # 3. Click a token cell on the image: placement switches to the clicked cells (k = 1).
        page.locator(f"{SURGERY}-grid .rearlib-cell").nth(100).click()
        _wait_change(page, decoded, img2)
        page.wait_for_function("sel => document.querySelector(sel).innerText.includes('99.6%')",
                               arg=f"{SURGERY}-metrics")

        # 4. The same-CTR widget's live plot follows its CTR slider.
        plot0 = Wd.image_digest(page, f"{SAME}-plot")
        ctr_handle = page.locator(f"{SAME}-ctr .noUi-handle").first
        ctr_handle.focus()
        ctr_handle.press("ArrowLeft")
        _wait_change(page, f"{SAME}-plot", plot0)
    print(f"page with widgets after {t_loaded:.1f} s; slider -> new image in the browser {latency:.2f} s")
