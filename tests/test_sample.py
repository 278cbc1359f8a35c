"""The embedded demo sample and ``data.source: auto``: what ships, how ``auto`` resolves, what is recorded.

The sample (``cxr/data/sample_data``) lets a fresh machine without a Kaggle account run the whole
pipeline; these tests keep it small, licensed, patient-clean and splittable, and check that ``auto``
picks Kaggle for every credential form the client accepts and the sample (with one warning line)
otherwise.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import Image

from cxr.config import DataConfig, load_params
from cxr.data import sample
from cxr.data.fetch import fetch, resolve_source, source_digest
from cxr.data.manifest import parse_patient
from cxr.errors import DataError, FetchError
from cxr.provenance.lineage_log import data_lineage
from cxr.stages import inputs_of
from tests.factories import REPO_ROOT, SHARED_DATA
from tests.hostile.harness import run_cxr

SAMPLE = REPO_ROOT / "cxr" / "data" / "sample_data"
MAX_BYTES = 5_000_000
MIN_PER_CLASS_AND_SPLIT = 10  # prepare.min_images_per_class


def _images() -> list[Path]:
    return sorted(p for p in SAMPLE.rglob("*.jpeg"))


@pytest.fixture
def no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HOME, config dir and XDG dir, and no KAGGLE_* variables: a fresh machine."""
    for name in list(os.environ):
        if name.startswith("KAGGLE_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return home


# -- what ships ------------------------------------------------------------------------------------


def test_sample_is_small_licensed_and_described_by_its_manifest() -> None:
    files = [p for p in SAMPLE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES
    assert sorted(p.name for p in SAMPLE.iterdir()) == ["LICENSE", "MANIFEST.csv", "NORMAL", "PNEUMONIA", "README.md"]
    licence, readme = (SAMPLE / "LICENSE").read_text(), (SAMPLE / "README.md").read_text()
    for text in (licence, readme):
        assert "CC BY 4.0" in text and "10.17632/rscbjbr9sj.2" in text and "Cell" in text
    rows = sorted(csv.DictReader((SAMPLE / "MANIFEST.csv").open()), key=lambda r: r["path"])
    images = _images()
    assert [r["path"] for r in rows] == [p.relative_to(SAMPLE).as_posix() for p in images]
    for row, path in zip(rows, images, strict=True):
        assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert int(row["bytes"]) == path.stat().st_size
    counts = Counter(r["class_name"] for r in rows)
    assert 300 <= len(rows) <= 400
    assert counts["NORMAL"] >= 80 and counts["PNEUMONIA"] >= 2 * counts["NORMAL"]  # the real ~1:3 balance
    assert f"| **total** | {len({r['patient_id'] for r in rows})} | {len(rows)} (" in readme


def test_sample_images_are_224_px_jpegs() -> None:
    for path in _images():
        with Image.open(path) as image:
            assert (image.format, image.size) == ("JPEG", (224, 224)), path.name
            image.load()


def test_sample_is_patient_grouped_without_duplicates() -> None:
    classes_of: dict[str, set[str]] = {}
    subtypes: Counter[str] = Counter()
    for path in _images():
        patient, subtype = parse_patient(path.name)
        assert patient, f"{path.name}: no patient id"
        classes_of.setdefault(patient, set()).add(path.parent.name)
        subtypes[subtype] += 1
    assert all(len(c) == 1 for c in classes_of.values())  # no patient in two classes
    assert len(classes_of) >= 150  # patients
    assert subtypes["bacteria"] > 0 and subtypes["virus"] > 0  # both kinds of pneumonia
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in _images()]
    assert len(set(digests)) == len(digests)


def test_sample_ships_with_the_package() -> None:
    """Every file of the sample matches a package-data pattern, so ``pip install .`` carries it."""
    lines = (REPO_ROOT / "pyproject.toml").read_text().splitlines()  # (tomllib is Python 3.11+)
    entry = next(line for line in lines if line.startswith('"cxr.data" = ['))
    patterns = json.loads(entry.partition("=")[2])
    data_root = REPO_ROOT / "cxr" / "data"
    for path in SAMPLE.rglob("*"):
        if path.is_file():
            rel = path.relative_to(data_root).as_posix()
            assert any(fnmatch.fnmatchcase(rel, p) for p in patterns), rel
    assert sample.sample_dir() == SAMPLE.resolve()


def test_dvc_and_prefect_watch_the_sample() -> None:
    params = load_params(REPO_ROOT / "params.yaml")
    assert params["data"]["source"] == "auto"
    assert sample.SAMPLE_INPUT in inputs_of("fetch", params)
    assert (REPO_ROOT / sample.SAMPLE_INPUT).resolve() == sample.SAMPLE_DIR


@pytest.mark.skipif(not (SHARED_DATA / "chest_xray_224" / "train").is_dir(), reason="shared 224 px data not here")
def test_rebuilding_the_sample_gives_the_same_bytes() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "make_sample.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, "identical"), proc.stderr


# -- how auto resolves -----------------------------------------------------------------------------


def test_auto_without_credentials_is_the_sample(no_credentials: Path) -> None:
    assert resolve_source(DataConfig(source="auto")) == "sample"
    assert resolve_source(DataConfig(source="sample")) == "sample"
    assert resolve_source(DataConfig(source="dir")) == "dir"
    assert source_digest(DataConfig(source="auto")) == source_digest(DataConfig(source="sample"))
    assert str(source_digest(DataConfig(source="auto"))).startswith("sample:")


def _oauth_sign_in() -> str:
    expiry = (datetime.now(timezone.utc) + timedelta(hours=12)).isoformat()
    return json.dumps({"refresh_token": "r", "access_token": "a", "access_token_expiration": expiry, "username": "u"})


CREDENTIAL_FORMS = {
    "KAGGLE_API_TOKEN": ({"KAGGLE_API_TOKEN": "KGAT_x"}, {}),
    "KAGGLE_USERNAME/KAGGLE_KEY": ({"KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"}, {}),
    "~/.kaggle/access_token": ({}, {".kaggle/access_token": "KGAT_x\n"}),
    "~/.kaggle/kaggle.json": ({}, {".kaggle/kaggle.json": json.dumps({"username": "u", "key": "k"})}),
    "KAGGLE_CONFIG_DIR/kaggle.json": (
        {"KAGGLE_CONFIG_DIR": "<home>/conf"},
        {"conf/kaggle.json": json.dumps({"username": "u", "key": "k"})},
    ),
    "~/.kaggle/credentials.json (kaggle auth login)": ({}, {".kaggle/credentials.json": _oauth_sign_in()}),
}


@pytest.mark.parametrize("form", list(CREDENTIAL_FORMS))
def test_auto_with_credentials_is_kaggle(form: str, no_credentials: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    variables, files = CREDENTIAL_FORMS[form]
    for name, value in variables.items():
        monkeypatch.setenv(name, value.replace("<home>", str(no_credentials)))
    for rel, content in files.items():
        path = no_credentials / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        path.chmod(0o600)
    assert resolve_source(DataConfig(source="auto")) == "kaggle"
    assert source_digest(DataConfig(source="auto")) is None
    assert resolve_source(DataConfig(source="sample")) == "sample"  # an explicit choice stays


def test_auto_with_unusable_credentials_is_an_error_not_the_sample(no_credentials: Path) -> None:
    """Someone who saved a kaggle.json meant Kaggle: a file others can read is refused, not replaced."""
    path = no_credentials / ".kaggle" / "kaggle.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"username": "u", "key": "k"}))
    path.chmod(0o644)
    with pytest.raises(FetchError, match=r"chmod 600"):
        resolve_source(DataConfig(source="auto"))


# -- what fetch records ----------------------------------------------------------------------------


def test_fetch_records_the_resolved_source(
    no_credentials: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw, record_path = tmp_path / "data" / "raw", tmp_path / "data" / "fetch.json"
    caplog.set_level(logging.INFO, logger="cxr")

    record = fetch(DataConfig(source="auto"), raw_dir=raw, record_path=record_path, cache_dir=tmp_path / "cache")

    assert json.loads(record_path.read_text()) == record
    assert (record["source"], record["requested"], record["demo_sample"]) == ("sample", "auto", True)
    assert record["origin"] == "cxr/data/sample_data" and record["licence"] == "CC-BY-4.0"
    assert record["files"] == len(_images())
    assert sorted(p.name for p in raw.iterdir()) == ["NORMAL", "PNEUMONIA"]  # no licence or manifest files
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [sample.FALLBACK_WARNING]
    assert "kaggle auth login" in warnings[0] and "data.source=dir" in warnings[0]

    explicit = fetch(DataConfig(source="sample"), raw_dir=raw, record_path=record_path, cache_dir=tmp_path / "cache")
    assert "requested" not in explicit and explicit["demo_sample"] is True
    assert explicit["tree_sha256"] == record["tree_sha256"]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1  # no warning when asked for

    # what the model card and the lineage record copy from data/fetch.json
    splits = tmp_path / "splits.csv"
    splits.write_text("path\n")
    lineage = data_lineage(splits, fetch_record=record_path, quality=tmp_path / "none.json")
    assert (lineage["source"], lineage["demo_sample"], lineage["origin"]) == ("sample", True, "cxr/data/sample_data")


def test_missing_sample_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sample, "SAMPLE_DIR", tmp_path / "gone")
    with pytest.raises(DataError, match=r"embedded demo sample is missing.*data\.source=kaggle") as err:
        fetch(DataConfig(source="sample"), raw_dir=tmp_path / "raw", record_path=tmp_path / "r.json")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "raw").exists()


# -- end to end on the command line ----------------------------------------------------------------


def test_fresh_machine_fetches_and_prepares_the_sample(no_credentials: Path, tmp_path: Path) -> None:
    """``cxr fetch`` + ``cxr prepare`` with the repository's params.yaml and no account: one warning, then a
    patient split in which every class of every split holds enough images."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO_ROOT / "params.yaml", project / "params.yaml")
    env = {"HOME": str(no_credentials), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}

    fetched = run_cxr(["fetch"], project, env=env, timeout=300)
    prepared = run_cxr(["prepare"], project, env=env, timeout=300)

    assert fetched.rc == 0, fetched.describe()
    warnings = [line for line in fetched.err.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "data.source=auto: no Kaggle credentials found" in warnings[0]
    assert "Traceback" not in fetched.err
    record = json.loads((project / "data" / "fetch.json").read_text())
    assert (record["source"], record["requested"], record["demo_sample"]) == ("sample", "auto", True)
    assert prepared.rc == 0, prepared.describe()
    quality = json.loads((project / "reports" / "data_quality.json").read_text())
    split = quality["splits"]["patient"]
    assert split["leakage"]["clean"] is True
    assert sorted(split["counts"]) == ["test", "train", "val"]
    for name, per_class in split["counts"].items():
        assert min(per_class.values()) >= MIN_PER_CLASS_AND_SPLIT, (name, per_class)
    assert quality["duplicates"]["duplicate_files"] == 0 and quality["excluded_count"] == 0


def test_a_sample_altered_after_installation_is_refused_in_one_line(tmp_path, monkeypatch, cli):
    """Replaced, added and deleted files of the embedded sample, checked against its own MANIFEST.csv."""
    assert sample.verify_sample() >= 200  # the shipped sample is intact
    altered = tmp_path / "sample_data"
    shutil.copytree(sample.SAMPLE_DIR, altered)
    normal = sorted((altered / "NORMAL").glob("*.jpeg"))
    pneumonia = sorted((altered / "PNEUMONIA").glob("*.jpeg"))
    shutil.copyfile(pneumonia[0], normal[0])  # a valid image over another: the wrong label
    shutil.copyfile(pneumonia[1], altered / "NORMAL" / "IM-9999-0001.jpeg")
    normal[1].unlink()
    with pytest.raises(DataError, match=r"1 changed .*1 added .*1 missing"):
        sample.verify_sample(altered)

    monkeypatch.setattr(sample, "SAMPLE_DIR", altered)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    code, _, err = cli(["fetch", "-S", "data.source=sample"])
    lines = [line for line in err.splitlines() if line.startswith("cxr: error:")]
    assert code == 1 and len(lines) == 1 and "does not match its MANIFEST.csv" in lines[0], err
    assert not (tmp_path / "data/raw").exists()
