"""The results report in a real browser: Debian's headless Chromium, driven by Playwright.

The page must render its charts (every curve has a length, every chart a box, the chart
pixels hold the curves' colours), log no error and request nothing but itself. A
full-page screenshot is kept as CI's artifact, ``.ci/artifacts/report.png``. Without
Playwright or Chromium the test skips, except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

from rapha.client.report import write_report
from rapha.receipt import verify_result
from support.required import skip_or_fail
from support.results import write_result

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Route

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACT = Path(__file__).resolve().parents[2] / ".ci" / "artifacts" / "report.png"
#: The report is served at this address by the route handler, never over a network.
PAGE_URL = "http://report.invalid/report.html"
_PALETTE_RGB = [(0x00, 0x72, 0xB2), (0xD5, 0x5E, 0x00)]  # the first two series colours


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail(
            "playwright is not installed: pip install -e '.[dev]'",
            ci_must="render the results report in a browser",
        )
    if not CHROMIUM.is_file():
        skip_or_fail(
            f"no {CHROMIUM}: run scripts/install-system-deps (Debian's chromium package)",
            ci_must="render the results report in a browser",
        )
    with sync_playwright() as playwright:
        sandbox = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium refuses root
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=sandbox)
        yield browser
        browser.close()


def _open(browser: Browser, html: str) -> tuple[Page, list[str], list[str]]:
    """The page loaded from ``html``, with the console errors and other requests seen."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    def route(r: Route) -> None:
        if r.request.url == PAGE_URL:
            r.fulfill(status=200, content_type="text/html; charset=utf-8", body=html)
        else:
            requests.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.goto(PAGE_URL, wait_until="load")
    return page, errors, requests


def _coloured(png: bytes, rgb: tuple[int, int, int], tolerance: int = 40) -> int:
    """How many pixels of ``png`` are within ``tolerance`` of ``rgb`` on every channel."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    return int(np.all(np.abs(pixels - np.array(rgb)) <= tolerance, axis=-1).sum())


def test_report_charts_render_in_chromium(browser: Browser, tmp_path: Path) -> None:
    result = write_result(tmp_path / "result")
    checks = verify_result(
        result.directory, node_key=result.node_key.public_key(), hub_key=result.hub_key.public_key()
    )
    settlement = {"tx_hash": "0x" + "ab" * 32, "block": 12, "hospital_share_bps": 7000}
    out = write_report(
        result.directory, tmp_path / "report.html", settlement=settlement, checks=checks
    )
    published = [n for n, b in result.metrics["labels"].items() if "auroc" in b]

    page, errors, requests = _open(browser, out.read_text(encoding="utf-8"))

    charts = page.locator("svg.chart")
    assert charts.count() == 1 + len(published) + 1  # ROC, one reliability panel each, training
    for i in range(charts.count()):
        box = charts.nth(i).bounding_box()
        assert box is not None
        assert box["width"] > 100
        assert box["height"] > 100
    lengths = page.eval_on_selector_all(
        "svg.chart path.curve",
        "paths => paths.map(p => [p.closest('svg').dataset.chart, p.dataset.label,"
        " p.getTotalLength(), getComputedStyle(p).stroke, getComputedStyle(p).visibility])",
    )
    by_chart: dict[str, list[str]] = {}
    for chart, label, length, stroke, visibility in lengths:
        assert length > 0, (chart, label)
        assert stroke not in ("none", "")
        assert visibility == "visible"
        by_chart.setdefault(chart, []).append(label)
    assert sorted(by_chart["roc"]) == sorted(published)
    assert sorted(by_chart["calibration"]) == sorted(published)
    assert by_chart["training"] == ["loss"]
    roc = page.locator("#chart-roc").screenshot()
    for rgb in _PALETTE_RGB[: len(published)]:
        assert _coloured(roc, rgb) > 200, rgb  # each curve's colour is on screen
    assert _coloured(page.locator("#chart-training").screenshot(), _PALETTE_RGB[0]) > 200
    assert errors == []
    assert requests == []
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACT), full_page=True)
    page.close()


def test_a_page_that_loaded_something_would_be_caught(browser: Browser) -> None:
    # The checks above are only worth something if they see a load when there is one.
    html = '<!DOCTYPE html><html><body><img src="http://tracker.invalid/p.gif"></body></html>'

    page, _, requests = _open(browser, html)

    assert requests == ["http://tracker.invalid/p.gif"]
    page.close()
