"""report.html in a real browser: headless Chromium (Debian's ``chromium`` package, which
``.ci/run`` installs) lays out a report evaluated from ``tiny_run`` in a 1280 px wide window.

A copy of the page gets a small script that measures the laid-out page on ``load`` and writes
what it found into an attribute of ``<html>``; ``--dump-dom`` prints the DOM after the load
(``--virtual-time-budget`` lets it settle) and the test reads the attribute back. The report
itself stays script-free. The same measurement of a page with a 2000 px wide element and a
broken image shows that the checks fail when they should.
"""

from __future__ import annotations

import html
import io
import json
import re
import subprocess
from pathlib import Path

import pytest

from medtransfer.evaluation.clinical import ClinicalSettings
from medtransfer.rundir import SPEC_FILE
from medtransfer.spec import load_spec

CHROMIUM = Path("/usr/bin/chromium")
WIDTH = 1280

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason=f"{CHROMIUM} is missing: install Debian's chromium package "
    "(apt-get install -y chromium, as .ci/run does) to lay the report out in a browser",
)

MEASURE = """<script>
window.addEventListener("load", () => {
  const doc = document.documentElement;
  const wide = [...document.body.querySelectorAll("*")]
    .filter((e) => e.getBoundingClientRect().right > window.innerWidth + 0.5)
    .map((e) => e.tagName.toLowerCase() + (e.className ? "." + e.className : ""));
  doc.setAttribute("data-measured", JSON.stringify({
    scrollWidth: doc.scrollWidth,
    innerWidth: window.innerWidth,
    images: [...document.images].map((i) => ({
      alt: i.alt, loaded: i.complete && i.naturalWidth > 0, natural: i.naturalWidth,
      shown: Math.round(i.getBoundingClientRect().width)})),
    overflowing: wide.slice(0, 10),
    provenance: document.querySelectorAll("#provenance th").length,
    confusion: [...document.querySelectorAll("table.confusion")].map((t) => t.innerText),
  }));
});
</script>"""


def measure(page: Path, tmp_path: Path) -> dict:
    """Lay ``page`` out in headless Chromium at 1280 px wide and measure it."""
    probe = tmp_path / f"measured-{page.name}"
    probe.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",  # tests and CI run as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--window-size={WIDTH},2000",
        "--virtual-time-budget=10000",
        "--dump-dom",
        probe.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    found = re.search(r'data-measured="([^"]*)"', done.stdout)
    assert found, (
        f"Chromium did not measure the page (exit {done.returncode}): {done.stderr[-2000:]}"
    )
    return json.loads(html.unescape(found.group(1)))


@pytest.fixture(scope="module")
def report(tiny_run, tmp_path_factory) -> Path:
    from medtransfer.evaluation.report import evaluate

    out = tmp_path_factory.mktemp("browser_report")
    settings = ClinicalSettings(bootstrap_resamples=200)
    evaluate(tiny_run, load_spec(tiny_run / SPEC_FILE), out_dir=out, settings=settings)
    return out / "report.html"


def test_report_fits_1280_px_and_every_figure_loads(report, tmp_path):
    found = measure(report, tmp_path)
    assert found["innerWidth"] == WIDTH
    assert found["scrollWidth"] <= WIDTH, f"horizontal overflow: {found['overflowing']}"
    assert found["overflowing"] == []
    assert len(found["images"]) == 3  # ROC, reliability, Grad-CAM
    assert all(image["loaded"] for image in found["images"]), found["images"]
    # the Grad-CAM strip is wider than the page as drawn: shown scaled down, not clipped
    assert all(0 < image["shown"] <= WIDTH for image in found["images"]), found["images"]


def test_a_figure_wider_than_the_page_is_scaled_down_not_clipped(report, tmp_path):
    """The demo's Grad-CAM strip (6 panels, ~1560 px) is wider than the window: the page made
    from the same metrics with such a figure still fits, and the figure keeps its aspect."""
    found = measure(wide_report(report, tmp_path, css=True), tmp_path)
    assert found["scrollWidth"] <= WIDTH, f"horizontal overflow: {found['overflowing']}"
    (image,) = found["images"]
    assert image["loaded"] and image["natural"] > WIDTH and 0 < image["shown"] < WIDTH
    # without the responsive rule the same page overflows, and the measurement says so
    found = measure(wide_report(report, tmp_path, css=False), tmp_path)
    assert found["scrollWidth"] > WIDTH and "img" in found["overflowing"]


def wide_report(report: Path, tmp_path: Path, *, css: bool) -> Path:
    import numpy as np

    from medtransfer.evaluation.html_report import render_report
    from medtransfer.evaluation.plots import cam_overlay_figure

    rng = np.random.default_rng(0)
    strip = cam_overlay_figure(rng.random((6, 32, 32)), rng.random((6, 8, 8)), columns=6)
    buffer = io.BytesIO()
    strip.savefig(buffer, format="png")
    metrics = json.loads((report.parent / "metrics.json").read_text())
    page = render_report(metrics, {"Grad-CAM strip": buffer.getvalue()}, "wide figure")
    if not css:
        page = page.replace("img { max-width: 100%; height: auto; }", "")
    path = tmp_path / f"wide-{css}.html"
    path.write_text(page)
    return path


def test_report_shows_its_provenance_and_confusion_matrices(report, tmp_path):
    found = measure(report, tmp_path)
    assert found["provenance"] >= 5  # model, training, data, evaluated when, images, thresholds
    assert len(found["confusion"]) == 4  # one per operating point of the positive class
    for matrix in found["confusion"]:
        assert all(word in matrix for word in ("TP", "FP", "FN", "TN", "called positive"))


def test_the_measurement_catches_overflow_and_broken_images(tmp_path):
    """A test that cannot fail proves nothing: a 2000 px element and an undecodable image."""
    page = tmp_path / "broken.html"
    page.write_text(
        "<!doctype html><html><head><meta charset='utf-8'></head><body>"
        "<div class='wide' style='width: 2000px'>wide</div>"
        "<img alt='broken' src='data:image/png;base64,AAAA'></body></html>"
    )
    found = measure(page, tmp_path)
    assert found["scrollWidth"] > WIDTH and "div.wide" in found["overflowing"]
    assert [(image["alt"], image["loaded"]) for image in found["images"]] == [("broken", False)]
    assert found["provenance"] == 0 and found["confusion"] == []


def test_a_screenshot_of_the_report_is_taken(report, tmp_path):
    """What a reader sees first, as a PNG (kept under the test's tmp_path for a person)."""
    shot = tmp_path / "report.png"
    subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={WIDTH},2000",
         f"--screenshot={shot}", report.as_uri()],
        capture_output=True, timeout=180, check=False,
    )  # fmt: skip
    assert shot.is_file() and shot.stat().st_size > 10_000
