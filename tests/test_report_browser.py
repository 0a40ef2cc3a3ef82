"""The quickstart report's HTML in a real browser (headless Chromium, Debian's `chromium`):
the summary and the headline figure come before the first data table, and no baseline cell is
marked best. Skipped, with the reason, where Chromium is not installed.

``MOEBENCH_SCREENSHOT=path.png`` also writes the first screen (1400x900), as committed in
docs/report_first_screen.png.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from moebench.report.build import write_report

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = sorted((ROOT / "results" / "quickstart").glob("*/rows.jsonl"))
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)

pytestmark = [
    pytest.mark.skipif(BROWSER is None, reason="headless Chromium not installed (apt-get install chromium)"),
    pytest.mark.skipif(not QUICKSTART, reason="no committed quickstart run under results/quickstart/"),
]


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1400,900", *args], capture_output=True, text=True, timeout=120)


class Order(HTMLParser):
    """Events in document order: ("summary"|"headline"|"table", classes), and each table cell
    with its classes and text."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, str]] = []
        self.cells: list[tuple[str, str]] = []
        self._cell: list | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = attrs.get("class") or ""
        if tag == "h2" and attrs.get("id") == "summary":
            self.events.append(("summary", ""))
        elif tag == "figure" and "headline" in classes.split():
            self.events.append(("headline", ""))
        elif tag == "div" and "table-wrap" in classes.split():
            self.events.append(("table", classes))
        elif tag == "td":
            self._cell = [classes, ""]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append(tuple(self._cell))
            self._cell = None


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reports")
    md = write_report([QUICKSTART[-1].parent], out)
    return md.parent / "report.html"


def test_summary_and_headline_come_before_the_first_data_table(report):
    done = _chromium("--dump-dom", report.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    order = Order()
    order.feed(done.stdout)  # the DOM as Chromium built it, not our own string
    kinds = [kind for kind, _ in order.events]
    assert "summary" in kinds and "headline" in kinds, kinds
    first_data = next(i for i, (kind, classes) in enumerate(order.events)
                      if kind == "table" and "summary" not in classes.split())
    assert kinds.index("summary") < first_data and kinds.index("headline") < first_data
    baseline_best = [(c, t) for c, t in order.cells if "baseline" in c.split() and "best" in c.split()]
    assert not baseline_best, baseline_best[:5]
    # every data-table row of a baseline router has no best cell either (never green/bold)
    assert any("baseline" in c.split() for c, _ in order.cells)  # the quickstart has baselines
    assert "<strong>" not in "".join(t for c, t in order.cells if "baseline" in c.split())


def test_first_screen_screenshot(report, tmp_path):
    shot = Path(os.environ.get("MOEBENCH_SCREENSHOT") or tmp_path / "first_screen.png")
    done = _chromium(f"--screenshot={shot}", report.as_uri())
    assert done.returncode == 0 and shot.is_file() and shot.stat().st_size > 10_000, done.stderr[-2000:]
