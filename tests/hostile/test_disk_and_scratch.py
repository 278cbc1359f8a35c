"""A full disk during training, scratch folders of killed runs, links planted at output names, and
server options without bounds (issue 19, part 5), through the real CLI."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.errors import CxrError
from tests.factories import chdir, small_params, synthetic
from tests.hostile.harness import assert_no_traceback, assert_refused, run_cxr, snapshot


def test_a_full_disk_during_training_is_one_line_and_leaves_no_partial_backup(project: Path) -> None:
    shipped = snapshot(project / "models") | snapshot(project / "registry")
    outcome = run_cxr(["train", "--model", "smallnet"], project, file_size_limit=100_000)

    line = assert_refused(outcome, "writing a training checkpoint failed", "free disk space and rerun")
    assert "Exception ignored" not in outcome.err and "h5py" not in outcome.err, outcome.describe()
    backups = project / "models/.backup/smallnet"
    assert not backups.exists() or not any(backups.rglob("*.h5*")), sorted(backups.rglob("*"))
    assert snapshot(project / "models") | snapshot(project / "registry") == shipped
    assert line.count("cxr: error:") == 1

    again = run_cxr(["train", "--model", "smallnet", "--no-promote"], project)  # space back: it trains
    assert again.rc == 0, again.describe()
    assert_no_traceback(again)


def test_training_without_room_for_its_checkpoints_is_refused_before_the_first_epoch(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cxr.config import parse_params
    from cxr.training import disk
    from cxr.training.train import train

    root = tmp_path / "project"
    shutil.copytree(trained, root)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 10**6, 10**6))
    before = snapshot(root / "models")
    with chdir(root), pytest.raises(CxrError, match=r"models: 1 MB free, about \d+ MB needed"):
        train("smallnet", parse_params(small_params()))
    assert snapshot(root / "models") == before


def test_a_killed_ensemble_leaves_scratch_that_the_next_run_sweeps(project: Path) -> None:
    stale = project / ".ensemble.tmp-999999"  # a process id that is not running
    stale.mkdir()
    (stale / "ensemble.keras").write_bytes(b"half written")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = project / f".ensemble.tmp-{live.pid}"  # a live writer's scratch stays
        running.mkdir()
        outcome = run_cxr(["ensemble"], project)
        assert outcome.rc == 0, outcome.describe()
        assert not stale.exists()
        assert running.exists()
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()


def test_gradcam_never_writes_through_a_link_planted_at_its_output_name(project: Path, tmp_path: Path) -> None:
    image = tmp_path / "in" / "scan.png"
    image.parent.mkdir()
    Image.fromarray(synthetic(np.random.default_rng(1), bright=True), mode="L").save(image)
    out = tmp_path / "cams"
    first = run_cxr(["predict", "--model", "smallnet", "--json", "--gradcam", out, image], project)
    assert first.rc == 0, first.describe()
    (written,) = out.glob("*.gradcam.png")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    written.unlink()
    written.symlink_to(victim)  # the predictable name now points elsewhere

    again = run_cxr(["predict", "--model", "smallnet", "--json", "--gradcam", out, image], project)

    assert again.rc == 0, again.describe()
    assert victim.read_text() == "precious\n"
    assert not written.is_symlink() and written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("value", ["1e-9", "0", "-1", "nan", "1e6"])
def test_serve_refuses_an_upload_cap_no_film_fits(project: Path, value: str) -> None:
    started = time.monotonic()
    outcome = run_cxr(["serve", "--model", "smallnet", "--port", "0", "--max-upload-mb", value], project, timeout=120)
    line = assert_refused(outcome, "--max-upload-mb")
    assert "give a size from 0.1 to 1000 MB" in line
    assert time.monotonic() - started < 120
