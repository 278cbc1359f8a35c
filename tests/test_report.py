"""The HTML/Markdown report of a small evaluated project, checked as text and in a real browser.

The browser checks run headless Chromium (``/usr/bin/chromium``, or ``$CHROMIUM``): the page's own
script marks ``<body data-images="ok">`` once every embedded figure has decoded. Without Chromium
they are skipped, unless ``CI`` is set: there a missing browser fails.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.reporting.report import render
from tests.factories import HOSTILE_NAME, chdir

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SECTIONS = ("Data", "Training", "Test metrics", "Grad-CAM", "Lineage")
HOSTILE_ORIGIN = '<script>alert("origin")</script> & "quotes"'
HOSTILE_PROBLEM = "<b onmouseover=alert(2)>val AUC</b> too low"


class _Page(HTMLParser):
    """The tags a page really contains (markup inside escaped text does not count)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.h2: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_h2 = tag == "h2"

    def handle_endtag(self, tag: str) -> None:
        self._in_h2 = False if tag == "h2" else self._in_h2

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self.h2.append(data)


def parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


@pytest.fixture(scope="module")
def reported(evaluated: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the evaluated project with hostile data strings, rendered once."""
    root = tmp_path_factory.mktemp("report") / "project"
    shutil.copytree(evaluated, root)
    (root / "data/fetch.json").write_text(json.dumps({"source": "dir", "origin": HOSTILE_ORIGIN}))
    card_file = root / "models/smallnet.card.json"
    card = json.loads(card_file.read_text())
    card["health"] = {"status": "degenerate", "problems": [HOSTILE_PROBLEM]}
    card_file.write_text(json.dumps(card))
    with chdir(root):
        result = render(["smallnet"])
    assert result["html"] == "reports/report.html"
    return root


@pytest.fixture(scope="module")
def page(reported: Path) -> str:
    return (reported / "reports/report.html").read_text()


def test_report_has_every_section_and_the_metrics(reported, page):
    parsed = parse(page)
    assert [h for h in parsed.h2 if h in SECTIONS] == list(SECTIONS)
    metrics = json.loads((reported / "reports/metrics.json").read_text())["models"]["smallnet"]
    card = json.loads((reported / "models/smallnet.card.json").read_text())
    assert f"<td>smallnet</td><td>{metrics['auc']:.3f}</td>" in page
    assert f"<td>{metrics['youden_threshold']:.3f}</td></tr>" in page
    assert f"<code>{card['model_sha256'][:16]}</code>" in page
    quality = json.loads((reported / "reports/data_quality.json").read_text())
    assert quality["excluded_count"] == 1
    assert f"{quality['images_usable']} usable images, 1 excluded" in page
    gradcam = json.loads((reported / "reports/gradcam/summary.json").read_text())["models"]["smallnet"]
    assert f"<td>conv3</td><td>{gradcam['border_fraction_mean']:.3f}</td>" in page


def test_markdown_summary(reported):
    md = (reported / "reports/report.md").read_text()
    metrics = json.loads((reported / "reports/metrics.json").read_text())["models"]["smallnet"]
    low, high = metrics["ci95"]["auc"]
    assert md.startswith("# Chest X-ray pneumonia pipeline — report\n")
    assert "leakage clean: **True**" in md
    assert f"| smallnet | {metrics['auc']:.3f} ({low:.3f} to {high:.3f}) |" in md
    assert "**Warning: smallnet is degenerate:" in md


def test_the_top_of_the_page_summary_youden_provenance_and_limitations(reported, page):
    from cxr.common.intended_use import INTENDED_USE, LIMITATIONS

    parsed = parse(page)
    assert parsed.h2[:4] == ["Summary", "Provenance", "Intended use and limitations", "Data"]
    m = json.loads((reported / "reports/metrics.json").read_text())["models"]["smallnet"]
    n, ci = m["n"], m["ci95"]
    # per model and data set: n, prevalence, AUC / sensitivity / specificity with 95 % CIs ("a to b")
    row = (
        f"<td>test split</td><td>smallnet</td><td>{n}</td><td>0.500</td>"
        f"<td>{m['auc']:.3f} ({ci['auc'][0]:.3f} to {ci['auc'][1]:.3f})</td>"
        f"<td>{m['sensitivity']:.3f} ({ci['sensitivity'][0]:.3f} to {ci['sensitivity'][1]:.3f})</td>"
        f"<td>{m['specificity']:.3f} ({ci['specificity'][0]:.3f} to {ci['specificity'][1]:.3f})</td>"
    )
    assert row in page
    # the figures at Youden's threshold, computed by evaluate, are shown too
    youden = m["at_youden"]
    assert (
        f"<td>test split</td><td>smallnet</td><td>{m['youden_threshold']:.3f}</td><td>{youden['sensitivity']:.3f}</td>"
        f"<td>{youden['specificity']:.3f}</td><td>{youden['accuracy']:.3f}</td>"
    ) in page
    # provenance: outside git the commit is "unknown"; the package version is cxr's
    import cxr

    assert "<td>code commit</td><td>unknown (not a git checkout)</td>" in page
    assert f"<td>package</td><td>cxr {cxr.__version__}</td>" in page
    assert re.search(r"<td>generated</td><td>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00</td>", page)
    # intended use and limitations: the same text as the model card's
    card = json.loads((reported / "models/smallnet.card.json").read_text())
    assert card["intended_use"]["limitations"] == list(LIMITATIONS)
    assert card["intended_use"]["medical_device"] is False
    assert html.escape(INTENDED_USE) in page
    for line in LIMITATIONS:
        assert f"<li>{html.escape(line)}</li>" in page
    assert "Not a medical device" in page and "Guangzhou" in page and "adults" in page
    assert "id='demo-sample'" not in page  # trained on a folder, not the demo sample
    md = (reported / "reports/report.md").read_text()
    assert "## Provenance" in md and "## Intended use and limitations" in md and "Demo sample" not in md
    assert f"| test split | smallnet | {m['youden_threshold']:.3f} |" in md


@pytest.fixture(scope="module")
def demo_report(reported: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reported project as if trained on the embedded demo sample, in git, with a negative AUC difference."""
    root = tmp_path_factory.mktemp("demo") / "project"
    shutil.copytree(reported, root)
    (root / "data/fetch.json").write_text(json.dumps({"source": "sample", "requested": "auto", "demo_sample": True}))
    metrics = json.loads((root / "reports/metrics.json").read_text())
    metrics["comparison"] = [
        {
            "a": "smallnet",
            "b": "cxrnet",
            "auc_difference": -0.0241,
            "ci95": [-0.03812, -0.0104],
            "p_value": 0.002,
            "method": "paired bootstrap",
        }
    ]
    (root / "reports/metrics.json").write_text(json.dumps(metrics))
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "reports/metrics.json"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "metrics"], cwd=root, check=True)
    (root / "reports/metrics.json").write_text(json.dumps(metrics, indent=1))  # a tracked file changed: dirty
    with chdir(root):
        render(["smallnet"])
    return root


def test_demo_sample_banner_commit_and_negative_intervals(demo_report):
    page = (demo_report / "reports/report.html").read_text()
    md = (demo_report / "reports/report.md").read_text()
    assert "<p class='banner' id='demo-sample'>Demo sample: these models were trained on the small sample" in page
    assert md.split("\n")[2].startswith("> **Demo sample:")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=demo_report, capture_output=True, text=True).stdout
    assert f"<td>code commit</td><td>{commit[:12]} (dirty: uncommitted changes)</td>" in page
    # a negative CI reads "−0.038 to −0.010" (real minus signs), never "-0.038–-0.010"
    assert "<td>smallnet − cxrnet</td><td>−0.024</td><td>−0.038 to −0.010</td>" in page
    assert "AUC smallnet − cxrnet: −0.024 (95 % CI −0.038 to −0.010," in md
    for text in (page, md):
        assert "-0.038" not in text and "–-" not in text


def test_images_are_embedded_data_uris(page):
    images = [attrs for tag, attrs in parse(page).tags if tag == "img"]
    # class distribution, training curves, confusion/ROC/PR/calibration, Grad-CAM gallery
    assert len(images) == 7
    for attrs in images:
        src = attrs["src"] or ""
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            assert image.format == "PNG" and min(image.size) >= 100
    assert not any(tag == "link" or attrs.get("href") for tag, attrs in parse(page).tags)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page)
    assert "url(" not in page and "@import" not in page
    assert "(one augmented training batch: not produced)" in page  # no preview was run


def test_data_strings_are_html_escaped(page):
    for raw in (HOSTILE_NAME.removesuffix(".jpeg"), '<script>alert("origin")</script>', "<b onmouseover"):
        assert raw not in page
    assert "&lt;img src=x onerror=alert(1)&gt;.jpeg" in page
    assert "&lt;script&gt;alert(&quot;origin&quot;)&lt;/script&gt; &amp; &quot;quotes&quot;" in page
    assert "&lt;b onmouseover=alert(2)&gt;val AUC&lt;/b&gt; too low" in page
    tags = parse(page).tags
    assert sum(tag == "script" for tag, _ in tags) == 1  # the page's own image check only
    assert not any(name.startswith("on") for _, attrs in tags for name in attrs)


def test_report_command_with_readers(reported, tmp_path, cli, monkeypatch):
    root = tmp_path / "project"
    shutil.copytree(reported, root)
    predictions = (root / "reports/eval/smallnet/predictions.csv").read_text().splitlines()[1:]
    rows = ["image,r1,r2"] + [
        f"{Path(line.split(',')[0]).name},{line.split(',')[1]},{'PNEUMONIA' if i % 4 else 'NORMAL'}"
        for i, line in enumerate(predictions)
    ]
    (root / "readers.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.chdir(root)
    code, out, _ = cli(["report", "-S", "report.readers=readers.csv", "-S", "evaluate.bootstrap=30"])
    assert code == 0 and json.loads(out) == {"html": "reports/report.html"}
    agreement = json.loads((root / "reports/agreement.json").read_text())
    assert [c["pair"] for c in agreement["cohen"]] == ["smallnet vs r1", "smallnet vs r2", "r1 vs r2"]
    html = (root / "reports/report.html").read_text()
    assert "<h2>Reader agreement</h2>" in html and "<td>smallnet vs r1</td>" in html
    assert f"Fleiss' kappa across readers: {agreement['fleiss']['kappa']:.3f}" in html
    # without a readers file the section (and a stale agreement.json) disappears
    code, _, _ = cli(["report"])
    assert code == 0 and not (root / "reports/agreement.json").exists()
    assert "Reader agreement" not in (root / "reports/report.html").read_text()


# ------------------------------------------------------------------------------------- in a browser


CHROMIUM_INSTALL_WAIT_S = 600


def find_chromium() -> str:
    """The Chromium binary; skip without one, but fail where CI is set (the browser checks must run there).

    ``.ci/run`` installs Chromium in the background while the project installs; until it has finished,
    the flag file named by ``CXR_CHROMIUM_PENDING`` exists, and this waits for it (at most 10 minutes)."""
    pending = os.environ.get("CXR_CHROMIUM_PENDING")
    deadline = time.monotonic() + CHROMIUM_INSTALL_WAIT_S
    while pending and Path(pending).exists() and time.monotonic() < deadline:
        time.sleep(1)
    candidates = [
        os.environ.get("CHROMIUM"),
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
        "/usr/bin/chromium",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail("CI is set but Chromium is not installed (install chromium or set CHROMIUM=/path/to/it)")
    pytest.skip("Chromium is not installed (/usr/bin/chromium); the browser checks run where CI is set")


@pytest.fixture(scope="module")
def chromium() -> str:
    return find_chromium()


def run_chromium(binary: str, page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *extra,
        page.resolve().as_uri(),
    ]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def body_tag(dom: str) -> str:
    match = re.search(r"<body[^>]*>", dom)
    assert match, dom[:500]
    return match.group(0)


def console_lines(stderr: str) -> list[str]:
    """Lines Chromium logs for the page's console (``[...:INFO:CONSOLE:1] "message", source: ...``)."""
    return [line for line in stderr.splitlines() if re.search(r":CONSOLE(\(|:|\])", line)]


def console_errors(stderr: str) -> list[str]:
    return [line for line in console_lines(stderr) if "Uncaught" in line or "ERROR:CONSOLE" in line]


def test_find_chromium_skips_or_fails_by_ci(monkeypatch):
    monkeypatch.delenv("CHROMIUM", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Chromium is not installed"):
        find_chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set but Chromium is not installed"):
        find_chromium()


def test_find_chromium_waits_for_the_background_install(monkeypatch, tmp_path):
    flag, binary = tmp_path / "pending", tmp_path / "chromium"
    flag.write_text("")
    monkeypatch.setenv("CXR_CHROMIUM_PENDING", str(flag))
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(shutil, "which", lambda name: None)

    def install() -> None:  # what .ci/run's background job does: the binary appears, then the flag goes
        time.sleep(0.5)
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
        flag.unlink()

    monkeypatch.setenv("CHROMIUM", str(binary))
    worker = threading.Thread(target=install)
    worker.start()
    try:
        assert find_chromium() == str(binary)
    finally:
        worker.join()
    assert not flag.exists()


def test_every_figure_loads_in_chromium(chromium, reported, tmp_path):
    proc = run_chromium(chromium, reported / "reports/report.html", tmp_path / "profile", "--dump-dom")
    assert 'data-images="ok"' in body_tag(proc.stdout)
    assert "<h2>Lineage</h2>" in proc.stdout


_VISIBILITY_PROBE = """<script>
window.addEventListener('load', function () {
  var out = {}, order = [];
  ['demo-sample', 'summary', 'youden', 'provenance', 'limitations'].forEach(function (id) {
    var el = document.getElementById(id);
    if (!el) { out[id] = null; return; }
    var r = el.getBoundingClientRect(), st = getComputedStyle(el);
    out[id] = {visible: r.width > 0 && r.height > 0 && st.display !== 'none' && st.visibility !== 'hidden'
               && parseFloat(st.opacity) > 0, top: r.top + window.scrollY, text: el.innerText};
  });
  document.body.setAttribute('data-probe', JSON.stringify(out));
});
</script></body>"""


def test_summary_provenance_and_limitations_render_in_chromium(chromium, demo_report, tmp_path):
    probed = tmp_path / "probed.html"
    probed.write_text((demo_report / "reports/report.html").read_text().replace("</body>", _VISIBILITY_PROBE))
    proc = run_chromium(chromium, probed, tmp_path / "profile", "--window-size=1200,2000", "--dump-dom")
    match = re.search(r'data-probe="([^"]*)"', body_tag(proc.stdout))
    assert match, body_tag(proc.stdout)
    probe = json.loads(html.unescape(match.group(1)))
    assert all(probe[k] and probe[k]["visible"] for k in probe), probe
    tops = [probe[k]["top"] for k in ("demo-sample", "summary", "youden", "provenance", "limitations")]
    assert tops == sorted(tops)  # laid out in reading order, at the top of the page
    assert "Demo sample" in probe["demo-sample"]["text"]
    assert "test split" in probe["summary"]["text"] and " to " in probe["summary"]["text"]
    assert "code commit" in probe["provenance"]["text"] and "cxr " in probe["provenance"]["text"]
    assert "Not a medical device" in probe["limitations"]["text"] and "adults" in probe["limitations"]["text"]


def test_a_broken_figure_is_reported_by_the_page(chromium, page, tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    proc = run_chromium(chromium, broken, tmp_path / "profile", "--dump-dom")
    assert 'data-images="broken"' in body_tag(proc.stdout)
    assert "1 figure(s) failed to load." in proc.stdout


def test_screenshot_of_the_report(chromium, reported, tmp_path):
    shot = tmp_path / "report.png"
    run_chromium(
        chromium,
        reported / "reports/report.html",
        tmp_path / "profile",
        f"--screenshot={shot}",
        "--window-size=1200,2000",
        "--hide-scrollbars",
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    with Image.open(shot) as image:
        assert image.size == (1200, 2000)
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.std() > 10  # text and figures, not a blank page
    assert (pixels < 128).mean() > 0.005  # some dark ink


def test_no_console_errors(chromium, reported, page, tmp_path):
    logging_args = ("--enable-logging=stderr", "--v=0", "--dump-dom")
    # the check is real: a page with a deliberate script error is caught
    faulty = tmp_path / "faulty.html"
    faulty.write_text(page.replace("</body>", "<script>undefinedFunction();</script></body>"))
    proc = run_chromium(chromium, faulty, tmp_path / "profile-faulty", *logging_args)
    errors = console_errors(proc.stderr)
    assert len(errors) == 1 and "Uncaught ReferenceError: undefinedFunction is not defined" in errors[0]
    # the report itself writes nothing at all to the console
    proc = run_chromium(chromium, reported / "reports/report.html", tmp_path / "profile", *logging_args)
    assert console_errors(proc.stderr) == [] and console_lines(proc.stderr) == []
    assert 'data-images="ok"' in body_tag(proc.stdout)
