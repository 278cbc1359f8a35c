"""Hostile input to the data steps (``cxr fetch``, ``cxr prepare``): links out of the source tree, names
that are not UTF-8, crafted zips, read-only folders, a full disk, an interrupted pair write and
concurrent runs in one workspace.

Each case builds its input on the fly and checks what a user would see: the exit status, one
``cxr: error:`` line naming the input, no traceback, the previous outputs byte-identical, no
temporary file, lock or scratch folder left, and, after a race, a record that describes exactly the
data beside it. The real command runs in a subprocess where the case needs a real process (links,
modes, locks, races); failures that cannot be made for real here (a full disk, a read-only file
system while running as root, a kill between two renames) are injected in-process through
``cxr.cli.main``.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
import warnings
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cxr.config import DataConfig, PrepareConfig, SplitConfig
from cxr.data import kaggle as kaggle_source
from cxr.data.archive import ExtractLimits, safe_extract
from cxr.data.fetch import source_digest
from cxr.errors import DataError, FetchError
from cxr.locks import lock_path, step_lock
from cxr.provenance.hashing import hash_tree, sha256_file
from cxr.training.input_pipeline import read_split
from tests.factories import chdir, write_image
from tests.hostile.harness import (
    Outcome,
    assert_no_traceback,
    assert_refused,
    leftovers,
    run_cxr,
    snapshot,
    unprivileged_prefix,
)

ROOT_REASON = "running as root without user namespaces: chmod does not stop root (the in-process cases cover it)"


# ----------------------------------------------------------------------------------------- helpers


def make_source(root: Path, n: int = 4, seed: int = 0) -> Path:
    """``root/{NORMAL,PNEUMONIA}`` with ``n`` tiny images each, Kermany names, distinct bytes."""
    for i in range(n):
        write_image(root / "NORMAL" / f"IM-{seed + i:04d}-0001.jpeg", seed * 1000 + i, size=(16, 16))
        write_image(root / "PNEUMONIA" / f"person{seed + i}_virus_{i}.jpeg", seed * 1000 + 500 + i, size=(16, 16))
    return root


def make_workspace(root: Path, source: Path | str) -> Path:
    """A project folder whose params.yaml fetches ``source`` (``data.source: dir``; a relative path is
    read from the project folder)."""
    root.mkdir(parents=True, exist_ok=True)
    params = {"data": {"source": "dir", "dir": str(source)}, "prepare": {"min_images_per_class": 1, "workers": 1}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def scratch(root: Path) -> list[str]:
    """Temporary files (the harness's markers), fetch scratch folders, set-aside trees and lock files."""
    found = leftovers(root)
    for path in root.rglob("*"):
        name = path.name
        if name.startswith((".fetch-", ".raw.old-")) or name.endswith(".lock"):
            found.append(str(path.relative_to(root)))
    return sorted(found)


def outputs(ws: Path) -> dict[str, str]:
    """Every file the data steps wrote (data/ and reports/), for byte-identical comparisons."""
    return {**snapshot(ws / "data"), **{f"reports/{k}": v for k, v in snapshot(ws / "reports").items()}}


def record_matches_tree(ws: Path) -> bool:
    record = json.loads((ws / "data/fetch.json").read_text())
    return record["tree_sha256"] == hash_tree(ws / "data/raw")


@pytest.fixture(scope="module")
def prepared_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``src/`` (a source folder) and ``ws/`` (a project reading ``../src``, fetched and prepared)."""
    from cxr.data.fetch import fetch
    from cxr.data.prepare import prepare

    root = tmp_path_factory.mktemp("ingest-template")
    make_source(root / "src")
    ws = make_workspace(root / "ws", "../src")
    with chdir(ws):
        fetch(DataConfig(source="dir", dir="../src"))
        prepare("data/raw", SplitConfig(), PrepareConfig(min_images_per_class=1, workers=1))
    return root


@pytest.fixture
def ws(prepared_template: Path, tmp_path: Path) -> Path:
    """A copy of the template: a workspace whose previous outputs (fetch and prepare) are in place,
    reading ``../src`` (``ws.parent / "src"``, this test's own copy)."""
    shutil.copytree(prepared_template, tmp_path, dirs_exist_ok=True, symlinks=True)
    return tmp_path / "ws"


# ----------------------------------------------------------------- 1. links and modes (data.source: dir)


def test_links_out_of_the_source_are_skipped_and_modes_never_widen(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src")
    secret = tmp_path / "secret.jpeg"  # stands for /etc/shadow: mode 640, outside the source
    secret.write_bytes(b"root:$6$secret\n")
    secret.chmod(0o640)
    (src / "NORMAL/shadow.jpeg").symlink_to(secret)
    (src / "NORMAL/alias.jpeg").symlink_to("IM-0000-0001.jpeg")  # inside the tree: followed
    (src / "PNEUMONIA/elsewhere").symlink_to(tmp_path, target_is_directory=True)  # a folder outside: skipped
    (src / "NORMAL/dangling.jpeg").symlink_to(tmp_path / "missing.jpeg")
    os.mkfifo(src / "NORMAL/pipe.jpeg")
    os.chmod(src / "NORMAL/IM-0001-0001.jpeg", 0o640)
    os.chmod(src / "NORMAL/IM-0002-0001.jpeg", 0o600)
    with open(os.path.join(os.fsencode(src), b"PNEUMONIA", b"\xff.jpeg"), "wb") as handle:
        handle.write((src / "PNEUMONIA/person0_virus_0.jpeg").read_bytes())
    ws = make_workspace(tmp_path / "ws", src)

    outcome = run_cxr(["fetch"], ws)

    assert outcome.rc == 0, outcome.describe()
    assert_no_traceback(outcome)
    record = json.loads((ws / "data/fetch.json").read_text())
    assert {e["path"]: e["reason"].split(":")[0] for e in record["skipped"]} == {
        "NORMAL/shadow.jpeg": "symbolic link to a file outside the dataset folder, its DVC cache and data.link_roots",
        "NORMAL/dangling.jpeg": "broken symbolic link (or a link loop)",
        "NORMAL/pipe.jpeg": "not a regular file (socket, FIFO or device)",
        "PNEUMONIA/elsewhere": (
            "symbolic link to a folder outside the dataset folder, its DVC cache and data.link_roots"
        ),
        "PNEUMONIA/\\xff.jpeg": "file name is not valid UTF-8",
    }
    skipped_lines = [line for line in outcome.err.splitlines() if "WARNING cxr.data.dir_copy: skipped" in line]
    assert len(skipped_lines) == 5  # one line per file
    raw = ws / "data/raw"
    assert sorted(p.name for p in raw.rglob("*") if p.is_file()) == sorted(
        [*(f"IM-{i:04d}-0001.jpeg" for i in range(4)), "alias.jpeg", *(f"person{i}_virus_{i}.jpeg" for i in range(4))]
    )
    assert b"secret" not in b"".join(p.read_bytes() for p in raw.rglob("*") if p.is_file())
    assert (raw / "NORMAL/alias.jpeg").read_bytes() == (src / "NORMAL/IM-0000-0001.jpeg").read_bytes()
    for copied in raw.rglob("*.jpeg"):
        original = src / copied.relative_to(raw)
        group_other = copied.stat().st_mode & 0o077
        assert group_other & ~(original.stat().st_mode & 0o077) == 0, f"{copied}: wider than its source"
    assert stat.S_IMODE((raw / "NORMAL/IM-0001-0001.jpeg").stat().st_mode) == 0o640
    assert stat.S_IMODE((raw / "NORMAL/IM-0002-0001.jpeg").stat().st_mode) == 0o600
    assert record["files"] == 9 and record_matches_tree(ws)
    assert scratch(ws) == []


def test_a_class_folder_linked_out_of_the_source_is_not_copied(tmp_path: Path) -> None:
    outside = make_source(tmp_path / "outside", seed=7)
    src = make_source(tmp_path / "src")
    (src / "train").mkdir()
    (src / "NORMAL").rename(src / "train/NORMAL")
    (src / "train/PNEUMONIA").symlink_to(outside / "PNEUMONIA", target_is_directory=True)
    (src / "PNEUMONIA").rename(tmp_path / "unused")
    ws = make_workspace(tmp_path / "ws", src)

    outcome = run_cxr(["fetch"], ws)

    assert outcome.rc == 0, outcome.describe()
    record = json.loads((ws / "data/fetch.json").read_text())
    assert record["skipped"] == [
        {
            "path": "train/PNEUMONIA",
            "reason": "class folder is a symbolic link to outside the dataset folder, its DVC cache and "
            "data.link_roots: not copied",
        }
    ]
    assert record["counts"] == {"train/NORMAL": 4}
    assert scratch(ws) == []


def _kaggle_layout(root: Path, seed: int = 0) -> Path:
    """``root/{train,test}/{NORMAL,PNEUMONIA}`` of tiny distinct images."""
    for split, offset in (("train", 0), ("test", 50)):
        make_source(root / split, n=3, seed=seed + offset)
    return root


def _fetched(ws: Path) -> dict:
    outcome = run_cxr(["fetch"], ws)
    assert outcome.rc == 0, outcome.describe()
    assert_no_traceback(outcome)
    return json.loads((ws / "data/fetch.json").read_text())


def _with_link_roots(ws: Path, roots: list[str]) -> None:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["data"]["link_roots"] = roots
    (ws / "params.yaml").write_text(yaml.safe_dump(params))


def test_split_folders_linked_into_a_listed_root_fetch_like_the_plain_folder(tmp_path: Path) -> None:
    plain = _kaggle_layout(tmp_path / "plain")
    store = tmp_path / "store"  # shared storage holding the real split folders
    shutil.copytree(plain, store)
    linked = tmp_path / "linked"
    linked.mkdir()
    for split in ("train", "test"):
        (linked / split).symlink_to(store / split, target_is_directory=True)
    expected = _fetched(make_workspace(tmp_path / "ws-plain", plain))

    ws = make_workspace(tmp_path / "ws-linked", linked)
    refused = run_cxr(["fetch"], ws)  # without the root listed: each class folder skipped with its reason
    assert_refused(refused, "the class folders hold no files")
    skipped = [line for line in refused.err.splitlines() if "skipped" in line and "data.link_roots" in line]
    assert len(skipped) == 4, refused.describe()

    _with_link_roots(ws, [str(store)])
    record = _fetched(ws)
    assert record["skipped"] == []
    assert record["tree_sha256"] == expected["tree_sha256"] and record["counts"] == expected["counts"]
    assert source_digest(DataConfig(source="dir", dir=str(linked), link_roots=(str(store),))) == source_digest(
        DataConfig(source="dir", dir=str(plain))
    )


def test_a_dvc_checkout_made_of_links_fetches_like_the_plain_folder(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    plain = _kaggle_layout(tmp_path / "plain")
    shutil.copytree(plain, repo / "inbox")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    for command in (
        ["git", "init", "-q"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        [sys.executable, "-m", "dvc", "config", "cache.type", "symlink"],
        [sys.executable, "-m", "dvc", "add", "-q", "inbox"],
    ):
        proc = subprocess.run(command, cwd=repo, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
    linked = sorted(p for p in (repo / "inbox").rglob("*.jpeg"))
    assert linked and all(p.is_symlink() for p in linked)  # DVC replaced every file by a link into its cache
    assert all(".dvc/cache" in os.readlink(p) or "cache" in os.path.realpath(p) for p in linked)

    expected = _fetched(make_workspace(tmp_path / "ws-plain", plain))
    record = _fetched(make_workspace(repo / "project", repo / "inbox"))
    assert record["skipped"] == []
    assert record["tree_sha256"] == expected["tree_sha256"] and record["counts"] == expected["counts"]


def test_links_outside_the_roots_and_loops_stay_refused(tmp_path: Path) -> None:
    src = _kaggle_layout(tmp_path / "src")
    store = tmp_path / "store"
    make_source(store / "extra", n=1, seed=90)
    secret = tmp_path / "secret.jpeg"
    secret.write_bytes(b"root:$6$secret\n")
    (src / "train/NORMAL/shadow.jpeg").symlink_to(secret)  # a file outside every root
    (src / "train/NORMAL/devnull.jpeg").symlink_to("/dev/null")  # a device outside every root
    (src / "train/NORMAL/loop").symlink_to(src / "train", target_is_directory=True)  # inside, but a loop
    (src / "train/PNEUMONIA/more").symlink_to(store / "extra/PNEUMONIA", target_is_directory=True)
    os.mkfifo(store / "extra/PNEUMONIA/pipe.jpeg")
    ws = make_workspace(tmp_path / "ws", src)
    _with_link_roots(ws, [str(store)])  # the store is listed: its folder is followed, its FIFO is not copied

    record = _fetched(ws)

    reasons = {e["path"]: e["reason"] for e in record["skipped"]}
    assert "outside the dataset folder" in reasons["train/NORMAL/shadow.jpeg"]
    assert "outside the dataset folder" in reasons["train/NORMAL/devnull.jpeg"]
    assert "not a regular file" in reasons["train/PNEUMONIA/more/pipe.jpeg"]
    raw = ws / "data/raw"
    assert (raw / "train/PNEUMONIA/more/person90_virus_0.jpeg").is_file()  # the listed store's image came
    assert b"secret" not in b"".join(p.read_bytes() for p in raw.rglob("*") if p.is_file())
    # the loop: train/NORMAL/loop → train: its folders are copied once more at most, never forever
    assert len(list(raw.rglob("*.jpeg"))) < 40


# ------------------------------------------------------------------- 11. names that are not UTF-8


def test_names_that_are_not_utf8_hash_deterministically(tmp_path: Path) -> None:
    folder = tmp_path / "tree"
    folder.mkdir()
    for name in (b"\xff.jpeg", b"\xfe.jpeg", b"ok.jpeg"):
        with open(os.path.join(os.fsencode(folder), name), "wb") as handle:
            handle.write(b"x")
    first = hash_tree(folder)
    assert first == hash_tree(folder)
    os.rename(os.path.join(os.fsencode(folder), b"\xfe.jpeg"), os.path.join(os.fsencode(folder), b"\xfd.jpeg"))
    assert hash_tree(folder) != first  # the name's bytes count, as a renamed file's should
    assert source_digest(DataConfig(source="dir", dir=str(folder))) == hash_tree(folder)


def test_hash_tree_of_a_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a folder"):
        hash_tree(tmp_path / "nope")


def test_prepare_excludes_names_that_are_not_utf8_with_the_reason(ws: Path) -> None:
    normal = os.path.join(os.fsencode(ws), b"data", b"raw", b"NORMAL")
    with open(os.path.join(normal, b"IM-0900-\xff.jpeg"), "wb") as handle:
        handle.write((ws / "data/raw/NORMAL/IM-0000-0001.jpeg").read_bytes())
    with open(os.path.join(normal, b"notes-\xfe.txt"), "wb") as handle:
        handle.write(b"text")

    outcome = run_cxr(["prepare"], ws)

    assert outcome.rc == 0, outcome.describe()
    assert_no_traceback(outcome)
    quality = json.loads((ws / "reports/data_quality.json").read_text())
    reasons = {e["path"]: e["reason"] for e in quality["excluded"]}
    assert reasons["data/raw/NORMAL/IM-0900-\\xff.jpeg"] == "file name is not valid UTF-8: rename it"
    assert reasons["data/raw/NORMAL/notes-\\xfe.txt"] == "not an image file name"
    assert "\\xff" not in (ws / "data/prepared/manifest.csv").read_text()
    assert scratch(ws) == []


# ------------------------------------------------------------------------------------ 10. archives


def _zip(entries: list[tuple[str, bytes]], method: int = zipfile.ZIP_STORED, typed: bool = False) -> bytes:
    """A zip of ``entries``; ``typed``: with a regular file's type bits in each mode, as Info-ZIP (and the
    Kaggle archive) write them, instead of Python's bare permission bits."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": the duplicate case means it
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(2018, 3, 22, 10, 0, 0))
            info.external_attr = ((stat.S_IFREG if typed else 0) | 0o644) << 16
            zf.writestr(info, data)
    return buffer.getvalue()


def _patch_first_entry(archive: bytes, local_offset: int, central_offset: int, value: int, size: int = 2) -> bytes:
    """Overwrite a field of the first entry in both its local header and its central-directory record."""
    data = bytearray(archive)
    central = data.find(b"PK\x01\x02")
    for at in (local_offset, central + central_offset):
        if size == 2:
            data[at : at + 2] = value.to_bytes(2, "little")
        else:
            data[at] |= value
    return bytes(data)


def _encrypted() -> bytes:  # general-purpose flag bit 0, in the local header (+6) and central record (+8)
    return _patch_first_entry(_zip([("chest_xray/NORMAL/locked.jpeg", b"\xff\xd8data")]), 6, 8, 1, size=1)


def _unknown_method() -> bytes:  # compression method 99 (AE-x), at +8 / +10
    return _patch_first_entry(_zip([("chest_xray/NORMAL/odd.jpeg", b"\xff\xd8data")]), 8, 10, 99)


ARCHIVES: dict[str, tuple[object, tuple[str, ...]]] = {
    # case: (zip bytes or a builder, names the error line must carry)
    "file-and-folder": (
        lambda: _zip([("chest_xray/NORMAL/a", b"x"), ("chest_xray/NORMAL/a/b.jpeg", b"y")], typed=True),
        ("chest_xray/NORMAL/a", "also the folder"),
    ),
    "long-name": (lambda: _zip([(f"chest_xray/NORMAL/{'n' * 300}.jpeg", b"x")], typed=True), ("too long", "255")),
    "encrypted": (_encrypted, ("locked.jpeg", "encrypted")),
    "unknown-compression": (_unknown_method, ("odd.jpeg", "compression method 99")),
    "duplicate": (
        lambda: _zip([("chest_xray/NORMAL/twice.jpeg", b"x"), ("chest_xray/NORMAL/twice.jpeg", b"y")]),
        ("twice.jpeg", "appears twice"),
    ),
}


@pytest.mark.parametrize("case", list(ARCHIVES))
def test_bad_archive_entries_are_one_line_naming_the_entry(case: str, tmp_path: Path) -> None:
    build, names = ARCHIVES[case]
    archive = tmp_path / f"{case}.zip"
    archive.write_bytes(build())  # type: ignore[operator]
    with pytest.raises(FetchError) as err:
        safe_extract(archive, tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and all(name in message for name in names), message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def test_a_zip_written_by_python_is_accepted(tmp_path: Path) -> None:
    archive = tmp_path / "plain.zip"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:  # exactly as a user's script would write it
        for name, data in (
            ("chest_xray/NORMAL/", b""),
            ("chest_xray/NORMAL/a.jpeg", b"x"),
            ("chest_xray/PNEUMONIA/b.jpeg", b"y"),
        ):
            zf.writestr(name, data)
    archive.write_bytes(buffer.getvalue())
    with zipfile.ZipFile(archive) as zf:  # zipfile's own entries carry no file-type bits
        assert stat.S_IFMT(zf.getinfo("chest_xray/NORMAL/a.jpeg").external_attr >> 16) == 0
    result = safe_extract(archive, tmp_path / "out")
    assert result.files == 2 and (tmp_path / "out/chest_xray/PNEUMONIA/b.jpeg").read_bytes() == b"y"


@pytest.fixture(scope="module")
def ratio_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~255 KB zip that unpacks to 256 MiB (one entry of zeros)."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("chest_xray/NORMAL/bomb.jpeg", "w") as out:
        block = bytes(1 << 20)
        for _ in range(256):
            out.write(block)
    assert path.stat().st_size < 300_000
    return path


def test_the_ratio_bomb_is_refused_before_writing(ratio_bomb: Path, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"expands 10\d\d:1 .* over the limit of 200:1 \(data\.max_ratio\)"):
        safe_extract(ratio_bomb, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(FetchError, match="unpacks to 268435456 bytes, over the cap"):  # the other caps still hold
        safe_extract(ratio_bomb, tmp_path / "out", ExtractLimits(max_ratio=2000, max_bytes=1 << 20))


def test_bad_archives_through_cxr_fetch_leave_the_previous_data(
    ws: Path, ratio_bomb: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    """The whole fetch on a refused Kaggle archive: one line, data/raw and fetch.json untouched."""
    monkeypatch.chdir(ws)
    before = outputs(ws)
    archives = {case: build() for case, (build, _) in ARCHIVES.items()}  # type: ignore[operator]
    archives["ratio-bomb"] = ratio_bomb.read_bytes()
    for case, payload in archives.items():
        archive = ws.parent / f"{case}.zip"
        archive.write_bytes(payload)
        monkeypatch.setattr(kaggle_source, "download_dataset", lambda *a, path=archive, **k: path)
        code, out, err = cli(["fetch", "-S", "data.source=kaggle"])
        lines = [line for line in err.splitlines() if line.startswith("cxr: error:")]
        assert code == 1 and len(lines) == 1 and out == "", (case, err)
        assert f"archive {case}.zip" in lines[0] and "Traceback" not in err
        assert outputs(ws) == before, case
        assert scratch(ws) == [], case


# ------------------------------------------------------------ 7. read-only folders and a full disk


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _partly_then_full(real):
    """``real`` writing its file, then the disk filling up before the step goes on."""

    def write(*args, **kwargs):
        real(*args, **kwargs)
        _enospc()

    return write


@pytest.mark.parametrize(
    "failing", ["data/prepared/splits.csv", "reports/data_quality.json", "reports/plots/class_distribution.png"]
)
def test_full_disk_while_prepare_writes_keeps_the_previous_outputs(
    failing: str, ws: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    monkeypatch.chdir(ws)
    (ws / "data/raw/NORMAL/IM-0100-0001.jpeg").write_bytes((ws / "data/raw/NORMAL/IM-0000-0001.jpeg").read_bytes())
    before = outputs(ws)
    if failing.endswith("splits.csv"):
        real, calls = pd.DataFrame.to_csv, []

        def to_csv(frame, path, *args, **kwargs):
            calls.append(path)
            (_partly_then_full(real) if len(calls) == 2 else real)(frame, path, *args, **kwargs)

        monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv)
    elif failing.endswith(".json"):
        monkeypatch.setattr(Path, "write_text", _partly_then_full(Path.write_text))
    else:
        import cxr.data.prepare

        monkeypatch.setattr(
            cxr.data.prepare, "class_distribution", _partly_then_full(cxr.data.prepare.class_distribution)
        )

    code, out, err = cli(["prepare"])

    lines = [line for line in err.splitlines() if line.startswith("cxr: error:")]
    assert code == 1 and out == "" and len(lines) == 1 and "Traceback" not in err, err
    assert f"{failing}: No space left on device (free disk space" in lines[0], lines[0]
    assert outputs(ws) == before
    assert scratch(ws) == []


def test_full_disk_while_fetch_copies_keeps_the_previous_data(ws: Path, monkeypatch: pytest.MonkeyPatch, cli) -> None:
    monkeypatch.chdir(ws)
    make_source(ws.parent / "src", n=6, seed=3)  # new content to fetch
    before = outputs(ws)
    calls = {"n": 0}
    import shutil

    real = shutil.copyfileobj

    def copy(src, dst, length=0, _calls=calls):
        _calls["n"] += 1
        if _calls["n"] == 5:
            dst.write(b"half")
            _enospc()
        real(src, dst, length)

    monkeypatch.setattr(shutil, "copyfileobj", copy)
    code, out, err = cli(["fetch"])
    lines = [line for line in err.splitlines() if line.startswith("cxr: error:")]
    assert code == 1 and out == "" and len(lines) == 1 and "Traceback" not in err, err
    assert "No space left on device (free disk space" in lines[0], lines[0]
    assert outputs(ws) == before
    assert scratch(ws) == []


def test_read_only_folders_simulated_in_process(ws: Path, monkeypatch: pytest.MonkeyPatch, cli) -> None:
    """EROFS / EACCES where the steps create their first file (works as root, where chmod does not)."""
    monkeypatch.chdir(ws)
    before = outputs(ws)
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "data")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    code, _, err = cli(["fetch"])
    assert code == 1 and err.count("cxr: error:") == 1 and "data: Read-only file system" in err, err
    monkeypatch.undo()
    monkeypatch.chdir(ws)

    def denied(frame, path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", denied)
    code, _, err = cli(["prepare"])
    assert code == 1 and err.count("cxr: error:") == 1, err
    assert "data/prepared/manifest.csv: Permission denied (make it writable" in err, err
    assert outputs(ws) == before
    assert scratch(ws) == []


@pytest.mark.parametrize("folder", ["data", "data/prepared", "reports", "reports/plots"])
def test_read_only_folders_for_real(ws: Path, folder: str) -> None:
    if unprivileged_prefix() is None:
        pytest.skip(ROOT_REASON)
    step = "fetch" if folder == "data" else "prepare"
    before = outputs(ws)
    (ws / "data/raw/NORMAL/IM-0100-0001.jpeg").write_bytes((ws / "data/raw/NORMAL/IM-0000-0001.jpeg").read_bytes())
    (ws / folder).chmod(0o555)
    try:
        outcome = run_cxr([step], ws, unprivileged=True)
    finally:
        (ws / folder).chmod(0o755)
    assert_refused(outcome, folder)
    assert "Permission denied" in outcome.error_lines[0]
    after = outputs(ws)
    after.pop("raw/NORMAL/IM-0100-0001.jpeg")
    assert after == before
    assert scratch(ws) == []


# --------------------------------------------------------------- 6. an interrupted pair write


def test_an_interrupted_commit_puts_the_previous_pair_back(ws: Path, monkeypatch: pytest.MonkeyPatch, cli) -> None:
    monkeypatch.chdir(ws)
    (ws / "data/raw/NORMAL/IM-0100-0001.jpeg").write_bytes((ws / "data/raw/NORMAL/IM-0000-0001.jpeg").read_bytes())
    before = outputs(ws)
    real = os.replace
    calls = {"n": 0}

    def replace(src, dst, _calls=calls):
        _calls["n"] += 1
        if _calls["n"] == 2:  # manifest.csv is in place, splits.csv not yet: Ctrl-C
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr("cxr.data.prepare.os.replace", replace)
    code, out, err = cli(["prepare"])
    assert code == 130 and out == "" and "Traceback" not in err, err  # no hashes printed: not complete
    assert outputs(ws) == before
    assert scratch(ws) == []


def test_an_interrupted_fetch_puts_the_previous_tree_and_record_back(
    ws: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    """Ctrl-C after the trees were swapped, before the new record is in place: both go back."""
    monkeypatch.chdir(ws)
    make_source(ws.parent / "src", n=6, seed=3)
    before = outputs(ws)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if Path(dst).name == "fetch.json" and len(calls) == 2:  # 1: the record staged beside its tree
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    code, out, err = cli(["fetch"])
    assert code == 130 and out == "" and "Traceback" not in err, err
    assert str(calls[1]) == "data/fetch.json"  # the trees had been swapped when it came
    assert outputs(ws) == before
    assert scratch(ws) == []


def test_a_new_manifest_beside_old_splits_is_refused_by_readers(ws: Path, monkeypatch: pytest.MonkeyPatch, cli) -> None:
    """What a kill between the two renames leaves: readers refuse it, and a rerun of prepare mends it."""
    monkeypatch.chdir(ws)
    splits = ws / "data/prepared/splits.csv"
    assert read_split(splits, "train")[0]  # a matching pair reads
    old_splits = splits.read_bytes()
    (ws / "data/raw/NORMAL/IM-0100-0001.jpeg").write_bytes((ws / "data/raw/NORMAL/IM-0000-0001.jpeg").read_bytes())
    assert cli(["prepare"])[0] == 0
    splits.write_bytes(old_splits)  # the new manifest.csv is in place, the old splits.csv still beside it

    with pytest.raises(DataError, match=r"was cut from another manifest\.csv .*: rerun cxr prepare"):
        read_split(splits, "train")

    assert cli(["prepare"])[0] == 0
    assert read_split(splits, "train")[0]
    quality = json.loads((ws / "reports/data_quality.json").read_text())
    assert quality["manifest_sha256"] == sha256_file(ws / "data/prepared/manifest.csv")
    assert quality["splits_sha256"] == sha256_file(splits)


# ------------------------------------------------------------------------- 5. concurrent runs


def test_a_held_lock_stops_a_second_run_with_one_line_naming_the_holder(
    ws: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    """The real command against a lock held by this process; prepare (which also takes the fetch lock to
    read data/raw) and a bad wait setting in-process (flock also separates two opens in one process)."""
    before = outputs(ws)
    with step_lock(lock_path(ws / "data", "fetch"), "fetch", "data/raw", wait_s=0):
        line = assert_refused(
            run_cxr(["fetch"], ws, env={"CXR_LOCK_WAIT_S": "0.5"}), "data/raw", f"pid {os.getpid()}", "CXR_LOCK_WAIT_S"
        )
        assert "waited 0.5 s" in line
        monkeypatch.chdir(ws)
        monkeypatch.setenv("CXR_LOCK_WAIT_S", "0.2")
        code, out, err = cli(["prepare"])
        assert code == 1 and out == "" and err.count("cxr: error:") == 1 and "data/raw is in use by" in err, err
    with step_lock(lock_path(ws / "data/prepared", "prepare"), "prepare", "data/prepared", wait_s=0):
        code, _, err = cli(["prepare"])
        assert code == 1 and "cxr: error: data/prepared is in use by" in err and f"pid {os.getpid()}" in err, err
    monkeypatch.setenv("CXR_LOCK_WAIT_S", "soon")
    code, _, err = cli(["fetch"])
    assert code == 1 and "cxr: error: CXR_LOCK_WAIT_S='soon'" in err, err
    assert outputs(ws) == before
    assert scratch(ws) == []


def test_a_second_run_waits_for_the_holder_then_runs(ws: Path) -> None:
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with step_lock(lock_path(ws / "data", "fetch"), "fetch", "data/raw", wait_s=0):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    threading.Timer(2.0, release.set).start()
    started = time.monotonic()
    outcome = run_cxr(["fetch"], ws)
    holder.join()
    assert outcome.rc == 0, outcome.describe()
    assert "waiting up to 10 s for data/raw" in outcome.err
    assert time.monotonic() - started >= 1.5
    assert record_matches_tree(ws) and scratch(ws) == []


def test_a_killed_fetch_leaves_nothing_the_next_run_trusts(ws: Path) -> None:
    """A stale lock file, scratch folders and a set-aside data/raw, as kill -9 leaves them."""
    data = ws / "data"
    (data / ".fetch.lock").write_text('{"pid": 999999, "step": "fetch", "command": "cxr fetch"}\n')
    (data / ".fetch-dead1/raw/NORMAL").mkdir(parents=True)
    (data / ".fetch-dead1/raw/NORMAL/x.jpeg").write_bytes(b"x")
    (data / ".fetch.json.tmp-999999").write_text("{")
    (data / "raw").rename(data / ".raw.old-999999")  # killed between the two renames
    (data / "fetch.json").unlink()
    bad = make_workspace(ws.parent / "bad-params", ws.parent / "no-such-source")
    (ws / "params.yaml").write_text((bad / "params.yaml").read_text())

    refused = run_cxr(["fetch"], ws)  # a fetch that fails still puts data/raw back and cleans up

    assert_refused(refused, "no-such-source")
    assert (data / "raw/NORMAL").is_dir()
    assert scratch(ws) == []


def _two_at_once(ws: Path, first: list[str], second: list[str]) -> tuple[Outcome, Outcome]:
    """Start two ``cxr`` processes on one workspace at the same moment (a gate file releases both)."""
    gate = ws.parent / "gate"
    code = (
        "import os, sys, time\n"
        f"import cxr.cli, cxr.data.{first[0]}\n"
        "open(sys.argv[1], 'w').close()\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.005)\n"
        "sys.argv = ['cxr', *sys.argv[2:]]\n"
        "raise SystemExit(cxr.cli.main())\n"
    )
    env = {**os.environ, "CXR_NO_PROGRESS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    readies = [ws.parent / f"ready-{i}" for i in (1, 2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(ready), *args],
            cwd=ws,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for ready, args in zip(readies, (first, second), strict=True)
    ]
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in readies) and time.monotonic() < deadline:
        time.sleep(0.01)  # both have imported what they need before the gate opens
    gate.write_text("go")
    results = []
    for proc, args in zip(procs, (first, second), strict=True):
        out, err = proc.communicate(timeout=120)
        results.append(Outcome(tuple(args), proc.returncode, out.decode(), err.decode(), 0.0))
    for path in (gate, *readies):
        path.unlink()
    return results[0], results[1]


def test_two_fetches_at_once_leave_a_record_of_the_data_beside_it(ws: Path, tmp_path: Path) -> None:
    """Two fetches of different sources started at the same moment run one after the other (or one names
    the holder), and fetch.json describes exactly the tree in data/raw."""
    other = make_source(tmp_path / "other-src", n=40, seed=20)
    make_source(ws.parent / "src", n=40, seed=60)  # enough files for the two runs to overlap
    a, b = _two_at_once(ws, ["fetch"], ["fetch", "-S", f"data.dir={other}"])
    for outcome in (a, b):
        assert_no_traceback(outcome)
        assert outcome.rc == 0 or "is in use by cxr fetch" in outcome.err, outcome.describe()
    assert record_matches_tree(ws)
    record = json.loads((ws / "data/fetch.json").read_text())
    assert record["files"] == sum(1 for p in (ws / "data/raw").rglob("*") if p.is_file())
    assert record["origin"] == ("../src" if record["files"] == 88 else str(other))
    printed = [json.loads(o.out)["tree_sha256"] for o in (a, b) if o.rc == 0]
    assert record["tree_sha256"] in printed
    assert scratch(ws) == []


@pytest.mark.slow  # two prepare processes, one after the other: ~10-20 s on two busy cores
def test_two_prepares_at_once_leave_one_pair(ws: Path) -> None:
    """Two prepares with different seeds at the same moment: the files on disk are one run's pair and report,
    and that run printed their hashes (before, one run printed the other's)."""
    a, b = _two_at_once(ws, ["prepare"], ["prepare", "-S", "split.seed=7"])
    for outcome in (a, b):
        assert_no_traceback(outcome)
        assert outcome.rc == 0 or "is in use by cxr prepare" in outcome.err, outcome.describe()
    splits = ws / "data/prepared/splits.csv"
    read_split(splits, "train")  # the pair on disk is one pair
    quality = json.loads((ws / "reports/data_quality.json").read_text())
    assert quality["splits_sha256"] == sha256_file(splits)
    assert quality["manifest_sha256"] == sha256_file(ws / "data/prepared/manifest.csv")
    printed = [json.loads(o.out) for o in (a, b) if o.rc == 0]
    assert {"manifest_sha256": quality["manifest_sha256"], "splits_sha256": quality["splits_sha256"]} in printed
    assert scratch(ws) == []


def test_an_external_set_made_of_links_into_a_listed_root_is_indexed_like_its_copy(tmp_path: Path) -> None:
    from cxr.data.external_sets import index_external

    plain = make_source(tmp_path / "plain", n=3, seed=70)
    store = tmp_path / "store"
    shutil.copytree(plain, store)
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in ("NORMAL", "PNEUMONIA"):
        (linked / name).symlink_to(store / name, target_is_directory=True)
    (store / "NORMAL/shadow.jpeg").symlink_to(tmp_path / "secret")  # inside the store, pointing out of it
    (tmp_path / "secret").write_bytes(b"secret")

    expected = index_external("plain", plain, out_dir=tmp_path / "out-plain", splits_csv=tmp_path / "none.csv")
    with pytest.raises(DataError, match="NORMAL"):  # not listed: both class folders excluded, no images
        index_external("linked", linked, out_dir=tmp_path / "out-refused", splits_csv=tmp_path / "none.csv")
    summary = index_external(
        "linked", linked, out_dir=tmp_path / "out-linked", splits_csv=tmp_path / "none.csv", extra_roots=[str(store)]
    )

    def images(out: str) -> list[tuple[str, str]]:
        frame = pd.read_csv(next((tmp_path / out).glob("*.csv")))
        return sorted(zip(frame["class_name"], frame["sha256"], strict=True))

    assert images("out-linked") == images("out-plain")  # the same images, reached through links
    assert summary["class_counts"] == expected["class_counts"]
    assert [e["reason"] for e in summary["excluded"]] == [
        "symbolic link to a file outside the dataset folder, its DVC cache and data.link_roots"
    ]
