"""Files read whole are read only if they are regular files, up to a cap, and JSON only up to a nesting
depth (issue 19, part 3): a device, a FIFO, an oversized or deeply nested file is one line, never a
traceback, an out-of-memory kill or a hang. Every case drives the real CLI in its own process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.hostile.harness import assert_no_traceback, assert_refused, run_cxr

DEEP = b"[" * 200_000 + b"]" * 200_000


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("source", ["/dev/zero", "fifo"])
def test_agreement_and_params_refuse_devices_and_fifos_at_once(project: Path, fifo: Path, source: str) -> None:
    target = "/dev/zero" if source == "/dev/zero" else str(fifo)
    assert_refused(run_cxr(["agreement", target], project, timeout=60), target, "not a regular file")
    image = next((project / "data/raw/NORMAL").glob("*.jpeg"))
    outcome = run_cxr(["predict", "--model", "smallnet", "--params", target, str(image)], project, timeout=60)
    assert_refused(outcome, target, "not a regular file")
    assert outcome.peak_rss_mb < 2000


def test_a_report_whose_readers_file_is_a_device_is_one_line(project: Path) -> None:
    outcome = run_cxr(["report", "-S", "report.readers=/dev/zero"], project, timeout=120)
    assert_refused(outcome, "/dev/zero", "not a regular file")
    assert outcome.peak_rss_mb < 3000


def test_deeply_nested_json_in_the_lineage_log_or_a_card_is_one_line(project: Path) -> None:
    log = project / "lineage/models.jsonl"
    log.write_bytes(log.read_bytes() + DEEP + b"\n")
    outcome = run_cxr(["audit", "models/smallnet.keras"], project, timeout=120)
    assert outcome.rc == 0 and "skipped" in outcome.err and "nested more than 64" in outcome.err, outcome.describe()
    assert_no_traceback(outcome)
    assert_no_traceback(run_cxr(["audit", "--data", "abcdef"], project, timeout=120))

    card = project / "models/smallnet.card.json"
    card.write_bytes(DEEP)
    outcome = run_cxr(["audit", "models/smallnet.keras"], project, timeout=120)
    assert outcome.rc == 1 and "nested more than 64" in outcome.out, outcome.describe()
    assert_no_traceback(outcome)
    image = next((project / "data/raw/NORMAL").glob("*.jpeg"))
    assert_refused(run_cxr(["predict", "--model", "smallnet", str(image)], project), "nested more than 64")


def test_an_oversized_card_is_refused_naming_the_cap(project: Path) -> None:
    card = project / "models/smallnet.card.json"
    card.write_bytes(card.read_bytes()[:-2] + b', "padding": "' + b"x" * 11_000_000 + b'"}\n')
    image = next((project / "data/raw/NORMAL").glob("*.jpeg"))
    assert_refused(run_cxr(["predict", "--model", "smallnet", str(image)], project), "over the 10 MB")
