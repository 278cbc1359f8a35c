"""``fetch(source=kaggle)`` end to end: the *real* kaggle client against a local Kaggle stand-in.

Nothing of the client is mocked: kaggle 2.x / kagglesdk make real HTTP requests to
``tests/kaggle_standin.py`` on http://localhost:80 (``KAGGLE_API_ENVIRONMENT=LOCALHOST``), which
serves zips built here from real chest X-ray JPEGs in the layout of the real Kaggle archive.

Import order. ``kaggle.api.kaggle_api_extended`` reads the environment once, when it is first
imported: the class attributes ``KaggleApi.config_dir``/``config`` (``KAGGLE_CONFIG_DIR``, ``HOME``,
``XDG_CONFIG_HOME``) and ``KaggleApi.args`` (``--local`` only if ``KAGGLE_API_ENVIRONMENT`` was
``LOCALHOST`` then: otherwise the client talks to api.kaggle.com). ``kaggle/__init__.py`` also
authenticates at import (printing a help page, or introspecting a token over the network). A
module imported by an earlier test (or another test file) would therefore carry a stale home and
possibly the production endpoint. So every test here runs with the ``kaggle`` package removed from
``sys.modules`` and restored afterwards: the first import happens inside our fetch code under the
test's own environment, exactly as in a fresh ``cxr fetch`` process, whatever ran before.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import secrets
import stat
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from kaggle_standin import KaggleStandIn, Seen, StandInUnavailable

from cxr import CLASS_NAMES, SPLITS
from cxr.config import DataConfig
from cxr.data.fetch import fetch, resolve_source
from cxr.data.kaggle import NoCredentialsError, find_credentials
from cxr.errors import FetchError
from cxr.provenance.hashing import hash_tree
from tests.factories import SHARED_DATA

DATASET = "paultimothymooney/chest-xray-pneumonia"
SLUG = "chest-xray-pneumonia"
SAMPLE_DIR = Path(os.environ.get("CXR_SHARED_DATA", SHARED_DATA)) / ("chest_xray_full_res_sample/train")
PER_SPLIT = 3  # images per class per split
N_FILES = PER_SPLIT * len(SPLITS) * len(CLASS_NAMES)
CLIENT_MODULE = "kaggle.api.kaggle_api_extended"
DS_STORE = b"\0\0\0\1Bud1\0\0\x10\0"
# .DS_Store files kaggle_archive() puts outside the class folders: hidden entries are skipped while
# reading the archive, so they are neither written nor counted against the caps
OUTSIDE_CLASSES = 0
ESCAPE = f"cxr-escape-{secrets.token_hex(6)}.jpeg"  # what an unsafe entry tries to write

pytestmark = pytest.mark.timeout(60)  # the client's own timeouts are 300 s


# -- archives --------------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_info(name: str, mode: int = stat.S_IFREG | 0o644) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(2018, 3, 22, 10, 0, 0))
    info.external_attr = mode << 16
    return info


def make_zip(entries: Iterable[tuple[str | zipfile.ZipInfo, bytes]], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for name, data in entries:
            info = name if isinstance(name, zipfile.ZipInfo) else _file_info(name)
            if info.is_dir():
                info.external_attr = (stat.S_IFDIR | 0o755) << 16 | 0x10
            zf.writestr(info, data, compress_type=compression)
    return buffer.getvalue()


def kaggle_archive(files: Mapping[str, bytes], extra: Iterable[tuple[str, bytes]] = ()) -> bytes:
    """``files`` ({split}/{CLASS}/{name}) laid out like Kaggle's chest-xray-pneumonia zip.

    With its folder entries, a macOS ``__MACOSX/`` resource-fork tree (at the top and inside the
    wrapper), ``.DS_Store`` files outside the class folders and the nested duplicate
    ``chest_xray/chest_xray/train/``: all of which must not reach data/raw.
    """
    folders = sorted(
        {"chest_xray/"}
        | {f"chest_xray/{rel.split('/')[0]}/" for rel in files}
        | {f"chest_xray/{rel.rsplit('/', 1)[0]}/" for rel in files}
    )
    entries: list[tuple[str | zipfile.ZipInfo, bytes]] = [(name, b"") for name in folders]
    entries += [("chest_xray/.DS_Store", DS_STORE), ("chest_xray/train/.DS_Store", DS_STORE)]
    entries += [(f"chest_xray/{rel}", data) for rel, data in sorted(files.items())]
    train = [rel for rel in sorted(files) if rel.startswith("train/")]
    entries += [(f"chest_xray/chest_xray/{rel}", files[rel]) for rel in train]
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "
    entries += [("__MACOSX/", b""), ("__MACOSX/._chest_xray", apple_double)]
    for rel in train:
        folder, name = rel.rsplit("/", 1)
        entries.append((f"chest_xray/__MACOSX/chest_xray/{folder}/._{name}", apple_double))
        entries.append((f"__MACOSX/chest_xray/{folder}/._{name}", apple_double))
    entries += list(extra)
    return make_zip(entries)


def corrupt_member(archive: bytes) -> bytes:
    """Same size, one flipped byte in the middle of the largest member's data: a CRC failure."""
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        info = max(zf.infolist(), key=lambda i: i.compress_size)
    header = archive[info.header_offset : info.header_offset + 30]
    name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
    at = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
    data = bytearray(archive)
    data[at] ^= 0xFF
    return bytes(data)


@pytest.fixture(scope="session")
def images() -> dict[str, bytes]:
    """Real JPEGs as ``{split}/{CLASS}/{name}``: exactly what data/raw must hold after the fetch."""
    if not SAMPLE_DIR.is_dir():
        pytest.skip(f"real sample images not found at {SAMPLE_DIR} (set CXR_SHARED_DATA)")
    files: dict[str, bytes] = {}
    for class_name in CLASS_NAMES:
        chosen = sorted((SAMPLE_DIR / class_name).glob("*.jpeg"), key=lambda p: (p.stat().st_size, p.name))
        chosen = chosen[: PER_SPLIT * len(SPLITS)]  # the smallest, to keep the zip small
        assert len(chosen) == PER_SPLIT * len(SPLITS), f"too few images in {SAMPLE_DIR / class_name}"
        for i, path in enumerate(chosen):
            files[f"{SPLITS[i // PER_SPLIT]}/{class_name}/{path.name}"] = path.read_bytes()
    return files


@pytest.fixture(scope="session")
def kaggle_zip(images: dict[str, bytes]) -> bytes:
    return kaggle_archive(images)


# -- environment, client import, stand-in ---------------------------------------------------------


@dataclass(frozen=True)
class Env:
    home: Path
    config_dir: Path  # KAGGLE_CONFIG_DIR
    xdg: Path  # XDG_CONFIG_HOME
    data: Path

    @property
    def raw(self) -> Path:
        return self.data / "raw"

    @property
    def record(self) -> Path:
        return self.data / "fetch.json"

    @property
    def cache_zip(self) -> Path:
        # one cache folder per owner/slug/version, so datasets sharing a slug never collide
        return self.data / ".cache" / "kaggle" / DATASET.split("/")[0] / SLUG / "latest" / f"{SLUG}.zip"


@pytest.fixture(autouse=True)
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    """A fresh HOME, Kaggle config dir and XDG dir; no KAGGLE_* credentials; no proxies."""
    for name in list(os.environ):
        if (
            name.startswith("KAGGLE_")
            or name.lower().endswith("_proxy")
            or name in ("VERBOSE", "VERBOSE_OUTPUT", "NETRC")
        ):
            monkeypatch.delenv(name)
    paths = Env(tmp_path / "home", tmp_path / "kaggle-config", tmp_path / "xdg", tmp_path / "data")
    paths.home.mkdir()
    paths.xdg.mkdir()
    monkeypatch.setenv("HOME", str(paths.home))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(paths.config_dir))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(paths.xdg))
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1,::1")
    monkeypatch.setenv("no_proxy", "localhost,127.0.0.1,::1")
    return paths


def _is_client_module(name: str) -> bool:
    return name == "kaggle" or name.startswith("kaggle.")


@pytest.fixture(autouse=True)
def fresh_client_import() -> Iterator[None]:
    """Let the kaggle client be imported afresh under this test's environment (module docstring)."""
    saved = {name: module for name, module in sys.modules.items() if _is_client_module(name)}
    for name in saved:
        del sys.modules[name]
    yield
    for name in [name for name in sys.modules if _is_client_module(name)]:
        del sys.modules[name]
    sys.modules.update(saved)


@pytest.fixture
def standin(env: Env, caplog: pytest.LogCaptureFixture) -> Iterator[KaggleStandIn]:
    caplog.set_level(logging.DEBUG)
    server = KaggleStandIn()
    try:
        server.start()
    except StandInUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()
    # No credential value may reach a log record (any logger, any level) or the request log.
    formatter = logging.Formatter()
    for phase in ("setup", "call"):
        for rec in caplog.get_records(phase):
            assert_absent(server.credential_values, formatter.format(rec))
    assert_absent(server.credential_values, repr(server.requests))


@pytest.fixture
def legacy_env(standin: KaggleStandIn, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("KAGGLE_USERNAME", standin.username)
    monkeypatch.setenv("KAGGLE_KEY", standin.key)
    return standin.key


# -- helpers ---------------------------------------------------------------------------------------


def run_fetch(env: Env, dataset: str = DATASET, **params: Any) -> dict[str, Any]:
    data = {"source": "kaggle", "kaggle_dataset": dataset, "retries": 1, "retry_backoff_s": 0.01, **params}
    return fetch(DataConfig(**data), raw_dir=env.raw, record_path=env.record, cache_dir=env.data / ".cache")


def tree(root: Path) -> dict[str, str]:
    """Every file below ``root`` (hidden ones included) → its sha256."""
    return {p.relative_to(root).as_posix(): sha256(p.read_bytes()) for p in root.rglob("*") if p.is_file()}


def expected_tree(files: Mapping[str, bytes]) -> dict[str, str]:
    return {rel: sha256(data) for rel, data in files.items()}


def leftovers(env: Env) -> list[str]:
    """Temporary folders a fetch may leave beside data/raw (.fetch-*, .raw.old-*)."""
    if not env.data.exists():
        return []
    return sorted(p.name for p in env.data.iterdir() if p.name.startswith((".fetch-", ".raw.old")))


def collapse(items: Iterable[str]) -> list[str]:
    """Consecutive repeats collapsed: [a, a, b] → [a, b]."""
    out: list[str] = []
    for item in items:
        if not out or out[-1] != item:
            out.append(item)
    return out


def api_calls(seen: Iterable[Seen]) -> list[Seen]:
    return [s for s in seen if s.endpoint != "storage"]


def assert_absent(needles: Iterable[str], *texts: str) -> None:
    for needle in needles:
        for text in texts:
            assert needle not in text, "a credential value leaked into an output"


def assert_fetched(env: Env, record: dict[str, Any], files: Mapping[str, bytes], archive: bytes) -> None:
    """data/raw holds exactly ``files``; the record (returned and on disk) describes them."""
    assert tree(env.raw) == expected_tree(files)
    counts: dict[str, int] = {}
    for rel in files:
        folder = rel.rsplit("/", 1)[0]
        counts[folder] = counts.get(folder, 0) + 1
    assert record == {
        "source": "kaggle",
        "origin": record["origin"],
        "kaggle_version": record["kaggle_version"],
        "origin_sha256": sha256(archive),
        "files": len(files),
        "counts": dict(sorted(counts.items())),
        "tree_sha256": hash_tree(env.raw),
    }
    assert json.loads(env.record.read_text()) == record
    assert leftovers(env) == []


# -- 1. happy path -------------------------------------------------------------------------------


@pytest.mark.parametrize("redirect", [True, False], ids=["storage-redirect", "zip-in-answer"])
def test_fetch_with_legacy_env_credentials(
    redirect: bool,
    standin: KaggleStandIn,
    legacy_env: str,
    env: Env,
    images: dict[str, bytes],
    kaggle_zip: bytes,
    capsys: pytest.CaptureFixture[str],
) -> None:
    standin.redirect = redirect
    standin.add_dataset(DATASET, kaggle_zip)

    record = run_fetch(env)

    assert_fetched(env, record, images, kaggle_zip)
    assert (record["origin"], record["kaggle_version"], record["files"]) == (DATASET, None, N_FILES)
    assert record["counts"] == {f"{s}/{c}": PER_SPLIT for s in sorted(SPLITS) for c in CLASS_NAMES}
    assert sorted(p.name for p in env.raw.iterdir()) == ["test", "train", "val"]
    assert not [p for p in env.raw.rglob("*") if p.name in ("__MACOSX", "chest_xray") or p.name[0] in "._"]
    # The real client asked for the metadata, then the archive, with HTTP Basic auth; the storage
    # URL it was redirected to got no Authorization header.
    storage = ["storage"] if redirect else []
    assert standin.endpoints() == ["GetDatasetMetadata", "DownloadDataset", *storage]
    download_status = 302 if redirect else 200
    assert [(s.auth, s.status) for s in api_calls(standin.requests)] == [("Basic", 200), ("Basic", download_status)]
    assert [s.auth for s in standin.seen("storage")] == ([None] if redirect else [])
    # The archive stays cached, complete, without the client's resume marker.
    assert sha256(env.cache_zip.read_bytes()) == sha256(kaggle_zip)
    assert not Path(f"{env.cache_zip}.kaggle-partial").exists()
    out, err = capsys.readouterr()
    assert out == ""  # the client's "Dataset URL: ..." lines are swallowed
    assert_absent([legacy_env], out, err, env.record.read_text())

    # A second fetch reuses the cached archive and gives the same record and tree.
    assert run_fetch(env) == record
    assert tree(env.raw) == expected_tree(images)
    assert standin.endpoints()[-2:] == (
        ["DownloadDataset", "storage"] if redirect else ["GetDatasetMetadata", "DownloadDataset"]
    )


def test_skipped_entries_are_not_extracted_and_do_not_count_against_the_caps(
    standin: KaggleStandIn,
    legacy_env: str,
    env: Env,
    images: dict[str, bytes],
) -> None:
    """__MACOSX/ and the nested chest_xray/chest_xray/ are skipped while reading the archive, not
    written and then ignored (the real nested copy is another ~1.2 GB): caps that fit exactly the
    files to write pass, one file less fails."""
    fork = next(iter(images.values()))
    archive = kaggle_archive(images, extra=[("__MACOSX/chest_xray/train/NORMAL/IM-9999-0001.jpeg", fork)])
    standin.add_dataset(DATASET, archive)
    to_write = N_FILES + OUTSIDE_CLASSES
    to_write_bytes = sum(len(data) for data in images.values()) + OUTSIDE_CLASSES * len(DS_STORE)

    record = run_fetch(env, max_files=to_write, max_bytes=to_write_bytes)

    assert_fetched(env, record, images, archive)
    with pytest.raises(FetchError, match=rf"holds {to_write} files, over the cap of {to_write - 1}"):
        run_fetch(env, max_files=to_write - 1)
    with pytest.raises(FetchError, match=rf"unpacks to {to_write_bytes} bytes, over the cap"):
        run_fetch(env, max_bytes=to_write_bytes - 1)
    assert_fetched(env, record, images, archive)  # the failed runs left data/raw as it was


# -- 2. and 3. other credentials -----------------------------------------------------------------


def test_fetch_with_access_token_env(
    standin: KaggleStandIn,
    monkeypatch: pytest.MonkeyPatch,
    env: Env,
    images: dict[str, bytes],
    kaggle_zip: bytes,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = standin.add_token()
    monkeypatch.setenv("KAGGLE_API_TOKEN", token)
    standin.add_dataset(DATASET, kaggle_zip)

    record = run_fetch(env)

    assert_fetched(env, record, images, kaggle_zip)
    # The client introspects the token first (once at import, once in authenticate()), then sends it
    # as a Bearer token.
    assert collapse(standin.endpoints()) == ["IntrospectToken", "GetDatasetMetadata", "DownloadDataset", "storage"]
    assert {s.status for s in standin.seen("IntrospectToken")} == {200}
    assert {s.auth for s in api_calls(standin.requests)} == {"Bearer"}
    out, err = capsys.readouterr()
    assert out == ""
    assert_absent([token], out, err)


CREDENTIAL_FILES = [
    "KAGGLE_CONFIG_DIR/kaggle.json",
    "~/.kaggle/kaggle.json",
    "XDG_CONFIG_HOME/kaggle/kaggle.json",
    "~/.kaggle/access_token",
    "~/.kaggle/access_token.txt",
    "KAGGLE_API_TOKEN=<file>",
    "~/.kaggle/credentials.json",
]


def oauth_sign_in(standin: KaggleStandIn, expires_in: timedelta = timedelta(hours=12)) -> str:
    """``~/.kaggle/credentials.json`` as kagglesdk's ``KaggleCredentials.save`` writes it (``kaggle auth login``)."""
    return json.dumps(
        {
            "refresh_token": standin.add_refresh_token(),
            "access_token": standin.add_token(),
            "access_token_expiration": (datetime.now(timezone.utc) + expires_in).isoformat(),
            "username": standin.username,
            "scopes": ["resources.admin:*"],
        },
        indent=2,
    )


def write_credential_file(
    kind: str, env: Env, standin: KaggleStandIn, monkeypatch: pytest.MonkeyPatch, mode: int
) -> Path:
    if kind.endswith("kaggle.json"):
        content = json.dumps({"username": standin.username, "key": standin.key})
    elif kind.endswith("credentials.json"):
        content = oauth_sign_in(standin)
    else:
        content = standin.add_token() + "\n"
    if kind.startswith(("~", "XDG")):
        monkeypatch.delenv("KAGGLE_CONFIG_DIR", raising=False)
    path = {
        "KAGGLE_CONFIG_DIR/kaggle.json": env.config_dir / "kaggle.json",
        "~/.kaggle/kaggle.json": env.home / ".kaggle" / "kaggle.json",
        "XDG_CONFIG_HOME/kaggle/kaggle.json": env.xdg / "kaggle" / "kaggle.json",
        "~/.kaggle/access_token": env.home / ".kaggle" / "access_token",
        "~/.kaggle/access_token.txt": env.home / ".kaggle" / "access_token.txt",
        "KAGGLE_API_TOKEN=<file>": env.home / "secrets" / "kaggle-token",
        "~/.kaggle/credentials.json": env.home / ".kaggle" / "credentials.json",
    }[kind]
    if kind == "KAGGLE_API_TOKEN=<file>":
        monkeypatch.setenv("KAGGLE_API_TOKEN", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("kind", CREDENTIAL_FILES)
def test_credential_file_readable_by_others_is_refused(
    kind: str,
    standin: KaggleStandIn,
    monkeypatch: pytest.MonkeyPatch,
    env: Env,
    kaggle_zip: bytes,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_credential_file(kind, env, standin, monkeypatch, 0o644)
    standin.add_dataset(DATASET, kaggle_zip)

    with pytest.raises(FetchError) as err:
        run_fetch(env)

    message = str(err.value)
    assert f"chmod 600 {path}" in message
    assert "\n" not in message
    assert standin.requests == []  # refused before the client was even imported
    assert CLIENT_MODULE not in sys.modules
    assert not env.raw.exists()
    assert_absent(standin.credential_values, message, *capsys.readouterr())


@pytest.mark.parametrize("kind", CREDENTIAL_FILES)
def test_credential_file_with_mode_600_works(
    kind: str,
    standin: KaggleStandIn,
    monkeypatch: pytest.MonkeyPatch,
    env: Env,
    images: dict[str, bytes],
    kaggle_zip: bytes,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_credential_file(kind, env, standin, monkeypatch, 0o600)
    standin.add_dataset(DATASET, kaggle_zip)

    record = run_fetch(env)

    assert_fetched(env, record, images, kaggle_zip)
    scheme = "Basic" if kind.endswith("kaggle.json") else "Bearer"
    assert {s.auth for s in api_calls(standin.requests) if s.endpoint != "IntrospectToken"} == {scheme}
    out, err = capsys.readouterr()
    assert out == ""
    assert_absent(standin.credential_values, out, err)


# -- 3b. `kaggle auth login` and the client's own order -------------------------------------------


def _kaggle_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """The real ``kaggle`` command in a child process, under this test's environment (HOME, LOCALHOST).

    The installed console script, not ``python -m kaggle``: while ``-m`` imports the package, ``sys.argv[0]``
    is ``-m``, so the import-time login check does not see the CLI, calls ``exit(1)`` (which closes stdin) and
    ``auth login --no-launch-browser`` can no longer read the pasted code.
    """
    script = Path(sys.executable).with_name("kaggle")
    if not script.is_file():
        pytest.skip(f"the kaggle console script is not installed beside {sys.executable}")
    return subprocess.run(
        [str(script), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )


def test_kaggle_auth_login_credentials_fetch_through_the_standin(
    standin: KaggleStandIn,
    env: Env,
    images: dict[str, bytes],
    kaggle_zip: bytes,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``kaggle auth login --no-launch-browser`` (the user pastes the code the sign-in page shows) saves
    ``~/.kaggle/credentials.json``; ``data.source: auto`` then resolves to Kaggle and fetches with it."""
    standin.add_dataset(DATASET, kaggle_zip)
    code = standin.add_login_code()
    assert resolve_source(DataConfig(source="auto")) == "sample"  # nothing configured yet

    login = _kaggle_cli("auth", "login", "--no-launch-browser", stdin=code + "\n")

    assert login.returncode == 0, login.stdout + login.stderr
    assert f"logged in as [{standin.username}]" in login.stdout
    saved = env.home / ".kaggle" / "credentials.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert {"refresh_token", "access_token", "access_token_expiration"} <= set(json.loads(saved.read_text()))
    assert find_credentials().method == "OAUTH"
    assert resolve_source(DataConfig(source="auto")) == "kaggle"
    login_calls = standin.endpoints()

    record = run_fetch(env, source="auto")

    assert record["source"] == "kaggle" and record["requested"] == "auto" and "demo_sample" not in record
    assert tree(env.raw) == expected_tree(images)
    assert login_calls == ["ExchangeOAuthToken", "IntrospectToken"]
    assert standin.endpoints()[len(login_calls) :] == ["GetDatasetMetadata", "DownloadDataset", "storage"]
    assert {s.auth for s in api_calls(standin.requests[len(login_calls) :])} == {"Bearer"}
    out, err = capsys.readouterr()
    assert out == ""
    assert_absent(standin.credential_values, out, err, login.stdout, login.stderr, env.record.read_text())


def test_expired_sign_in_is_refreshed_by_the_client(
    standin: KaggleStandIn,
    env: Env,
    images: dict[str, bytes],
    kaggle_zip: bytes,
) -> None:
    """The access token of ``credentials.json`` lasts 12 h; after that the client asks for a new one with the
    refresh token (and saves it), so an old sign-in keeps working."""
    standin.add_dataset(DATASET, kaggle_zip)
    saved = env.home / ".kaggle" / "credentials.json"
    saved.parent.mkdir()
    saved.write_text(oauth_sign_in(standin, expires_in=-timedelta(days=2)))
    saved.chmod(0o600)
    old = json.loads(saved.read_text())

    record = run_fetch(env)

    assert tree(env.raw) == expected_tree(images) and record["source"] == "kaggle"
    assert standin.endpoints()[:3] == ["GenerateAccessToken", "GetDatasetMetadata", "DownloadDataset"]
    new = json.loads(saved.read_text())
    assert new["refresh_token"] == old["refresh_token"] and new["access_token"] != old["access_token"]


def test_revoked_sign_in_is_one_clear_error(standin: KaggleStandIn, env: Env, kaggle_zip: bytes) -> None:
    standin.add_dataset(DATASET, kaggle_zip)
    saved = env.home / ".kaggle" / "credentials.json"
    saved.parent.mkdir()
    signed_in = json.loads(oauth_sign_in(standin, expires_in=-timedelta(days=2)))
    saved.write_text(json.dumps({**signed_in, "refresh_token": "refresh-revoked"}))
    saved.chmod(0o600)

    with pytest.raises(FetchError) as err:
        run_fetch(env)

    assert str(err.value).endswith("run 'kaggle auth login' again") and "\n" not in str(err.value)
    assert set(standin.endpoints()) == {"GenerateAccessToken"}
    assert not env.raw.exists()


# Credential forms, alone and together: (name, {path relative to tmp_path or "env:NAME": content}).
# "<token>", "<key>", "<oauth>" are replaced with a credential the stand-in accepts.
_LEGACY = json.dumps({"username": "<user>", "key": "<key>"})
CLIENT_ORDER: dict[str, dict[str, str]] = {
    "KAGGLE_API_TOKEN": {"env:KAGGLE_API_TOKEN": "<token>"},
    "KAGGLE_API_TOKEN=<file>": {"secrets/token": "<token>", "env:KAGGLE_API_TOKEN": "<tmp>/secrets/token"},
    "~/.kaggle/access_token": {"home/.kaggle/access_token": "<token>\n"},
    "~/.kaggle/access_token.txt": {"home/.kaggle/access_token.txt": "<token>"},
    "KAGGLE_USERNAME/KAGGLE_KEY": {"env:KAGGLE_USERNAME": "<user>", "env:KAGGLE_KEY": "<key>"},
    "KAGGLE_CONFIG_DIR/kaggle.json": {"kaggle-config/kaggle.json": _LEGACY},
    "~/.kaggle/kaggle.json": {"home/.kaggle/kaggle.json": _LEGACY, "env:KAGGLE_CONFIG_DIR": ""},
    "XDG/kaggle/kaggle.json": {"xdg/kaggle/kaggle.json": _LEGACY, "env:KAGGLE_CONFIG_DIR": ""},
    "credentials.json": {"home/.kaggle/credentials.json": "<oauth>"},
    # together: the first kind in the client's order wins
    "access_token + kaggle.json + credentials.json": {
        "home/.kaggle/access_token": "<token>",
        "kaggle-config/kaggle.json": _LEGACY,
        "home/.kaggle/credentials.json": "<oauth>",
    },
    "kaggle.json + credentials.json": {
        "kaggle-config/kaggle.json": _LEGACY,
        "home/.kaggle/credentials.json": "<oauth>",
    },
    "KAGGLE_USERNAME/KAGGLE_KEY + credentials.json": {
        "env:KAGGLE_USERNAME": "<user>",
        "env:KAGGLE_KEY": "<key>",
        "home/.kaggle/credentials.json": "<oauth>",
    },
    "kaggle.json username + KAGGLE_KEY": {
        "kaggle-config/kaggle.json": json.dumps({"username": "<user>"}),
        "env:KAGGLE_KEY": "<key>",
    },
    # ~/.kaggle exists (it holds credentials.json), so the client never looks in $XDG_CONFIG_HOME
    "XDG kaggle.json + credentials.json": {
        "xdg/kaggle/kaggle.json": _LEGACY,
        "home/.kaggle/credentials.json": "<oauth>",
        "env:KAGGLE_CONFIG_DIR": "",
    },
    "broken kaggle.json + credentials.json": {
        "kaggle-config/kaggle.json": "{not json",
        "home/.kaggle/credentials.json": "<oauth>",
    },
    # KAGGLE_API_TOKEN names an empty file: the client reads no token and skips ~/.kaggle/access_token
    "empty KAGGLE_API_TOKEN file + access_token": {
        "secrets/empty": "",
        "env:KAGGLE_API_TOKEN": "<tmp>/secrets/empty",
        "home/.kaggle/access_token": "<token>",
    },
    "credentials.json without refresh token": {"home/.kaggle/credentials.json": json.dumps({"access_token": "x"})},
    "nothing": {},
}


def _client_auth_method() -> str | None:
    """How the installed client authenticates here (``KaggleApi.authenticate``), or None when it gives up."""
    with contextlib.redirect_stdout(io.StringIO()):
        from kaggle.api.kaggle_api_extended import KaggleApi

        api = KaggleApi()
        try:
            api.authenticate()
        except SystemExit:
            return None
    return str(api.config_values.get("auth_method"))


@pytest.mark.parametrize("case", list(CLIENT_ORDER))
def test_credential_precheck_agrees_with_the_client(
    case: str, standin: KaggleStandIn, env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``find_credentials`` is a second copy of the client's order: for every form, alone and together, it
    must name the method the installed kaggle client itself authenticates with."""
    values = {
        "<token>": standin.add_token(),
        "<user>": standin.username,
        "<key>": standin.key,
        "<oauth>": oauth_sign_in(standin),
        "<tmp>": str(tmp_path),
    }
    for where, content in CLIENT_ORDER[case].items():
        for placeholder, value in values.items():
            content = content.replace(placeholder, value)
        if where.startswith("env:"):
            if content:
                monkeypatch.setenv(where[4:], content)
            else:
                monkeypatch.delenv(where[4:], raising=False)
            continue
        path = tmp_path / where
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        path.chmod(0o600)
    try:
        ours: str | None = find_credentials().method
    except NoCredentialsError:
        ours = None
    expected_source = "sample" if ours is None else "kaggle"

    assert ours == _client_auth_method()
    assert resolve_source(DataConfig(source="auto")) == expected_source


# -- 4. and 5. missing or wrong credentials --------------------------------------------------------


def test_missing_credentials_is_one_clear_error(
    standin: KaggleStandIn,
    env: Env,
    kaggle_zip: bytes,
    capsys: pytest.CaptureFixture[str],
) -> None:
    standin.add_dataset(DATASET, kaggle_zip)

    with pytest.raises(FetchError) as err:
        run_fetch(env)

    message = str(err.value)
    for needle in (
        "kaggle auth login",
        "KAGGLE_API_TOKEN",
        "kaggle.json",
        "chmod 600",
        "KAGGLE_USERNAME",
        "KAGGLE_KEY",
        "data.source=dir",
        "data.source=medmnist",
    ):
        assert needle in message
    assert "\n" not in message
    out, _ = capsys.readouterr()
    assert out == ""  # no help page from the client: it was never imported
    assert CLIENT_MODULE not in sys.modules
    assert standin.requests == []
    assert not env.raw.exists() and not env.record.exists()
    assert leftovers(env) == []


def test_wrong_key_is_refused_without_leaking_it(
    standin: KaggleStandIn,
    monkeypatch: pytest.MonkeyPatch,
    env: Env,
    kaggle_zip: bytes,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong = "wrongkey" + secrets.token_hex(16)
    monkeypatch.setenv("KAGGLE_USERNAME", standin.username)
    monkeypatch.setenv("KAGGLE_KEY", wrong)
    standin.add_dataset(DATASET, kaggle_zip)

    with pytest.raises(FetchError) as err:
        run_fetch(env, retries=3)

    message = str(err.value)
    assert "refused the credentials from KAGGLE_USERNAME/KAGGLE_KEY (HTTP 401)" in message
    assert DATASET in message and "kaggle.com/settings" in message
    assert "\n" not in message
    # A 401 is not retried.
    seen = [(s.endpoint, s.auth, s.status) for s in standin.requests]
    assert seen == [("GetDatasetMetadata", "Basic", 401)]
    out, errout = capsys.readouterr()
    assert out == ""
    assert_absent([wrong], message, str(err.value.__cause__), out, errout, caplog.text, repr(standin.requests))
    assert not env.raw.exists()


def test_inactive_token_fails_quietly(
    standin: KaggleStandIn,
    monkeypatch: pytest.MonkeyPatch,
    env: Env,
    kaggle_zip: bytes,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = "KGAT_" + secrets.token_hex(16)  # unknown to the server: introspection says inactive
    monkeypatch.setenv("KAGGLE_API_TOKEN", token)
    standin.add_dataset(DATASET, kaggle_zip)

    with pytest.raises(FetchError) as err:
        run_fetch(env)

    message = str(err.value)
    assert "\n" not in message
    # The client printed its auth help page and called exit(1), at import and in authenticate():
    # none of it reaches the user's stdout.
    out, errout = capsys.readouterr()
    assert out == ""
    assert set(standin.endpoints()) == {"IntrospectToken"}
    assert_absent([token], message, out, errout, caplog.text)
    assert not env.raw.exists()


def test_token_answered_with_401_is_refused(
    standin: KaggleStandIn,
    monkeypatch: pytest.MonkeyPatch,
    env: Env,
    kaggle_zip: bytes,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = standin.add_token()
    monkeypatch.setenv("KAGGLE_API_TOKEN", token)
    standin.add_dataset(DATASET, kaggle_zip)
    standin.inject("IntrospectToken", 401, 401)  # at import (swallowed by kaggle/__init__), then ours

    with pytest.raises(FetchError) as err:
        run_fetch(env, retries=3)

    assert str(err.value).startswith(f"Kaggle refused the credentials from KAGGLE_API_TOKEN (HTTP 401) for {DATASET}: ")
    assert [s.status for s in standin.requests] == [401, 401]  # not retried
    out, errout = capsys.readouterr()
    assert out == ""
    assert_absent([token], str(err.value), out, errout)


def test_inactive_token_error_says_the_token_was_rejected(
    standin: KaggleStandIn,
    monkeypatch: pytest.MonkeyPatch,
    env: Env,
    kaggle_zip: bytes,
) -> None:
    monkeypatch.setenv("KAGGLE_API_TOKEN", "KGAT_" + secrets.token_hex(16))
    standin.add_dataset(DATASET, kaggle_zip)

    with pytest.raises(FetchError) as err:
        run_fetch(env)

    assert "no Kaggle credentials found" not in str(err.value)


# -- 6. transient failures -------------------------------------------------------------------------


def test_transient_503s_are_retried_with_backoff(
    standin: KaggleStandIn,
    legacy_env: str,
    env: Env,
    images: dict[str, bytes],
    kaggle_zip: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    standin.add_dataset(DATASET, kaggle_zip)
    standin.inject("GetDatasetMetadata", 503, 503)
    standin.inject("DownloadDataset", 503)
    backoff = 0.05

    record = run_fetch(env, retries=3, retry_backoff_s=backoff)

    assert_fetched(env, record, images, kaggle_zip)
    metadata = standin.seen("GetDatasetMetadata")
    assert [s.status for s in metadata] == [503, 503, 200]
    assert metadata[1].at - metadata[0].at >= backoff  # exponential: backoff, then 2 * backoff
    assert metadata[2].at - metadata[1].at >= 2 * backoff
    assert [s.status for s in standin.seen("DownloadDataset")] == [503, 302]
    warnings = [r.getMessage() for r in caplog.records if r.name == "cxr.data.kaggle" and r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert "Kaggle metadata failed (HTTPError); retry 1/3" in warnings[0]
    assert "Kaggle metadata failed (HTTPError); retry 2/3" in warnings[1]
    assert "Kaggle download failed (HTTPError); retry 1/3" in warnings[2]


def test_persistent_503_gives_up_with_a_clear_error(
    standin: KaggleStandIn,
    legacy_env: str,
    env: Env,
    kaggle_zip: bytes,
) -> None:
    standin.add_dataset(DATASET, kaggle_zip)
    standin.inject("GetDatasetMetadata", 503, 503, 503)

    with pytest.raises(FetchError) as err:
        run_fetch(env, retries=2)

    message = str(err.value)
    assert f"could not reach Kaggle for {DATASET} (HTTPError) after retries" in message
    assert "data.source=dir" in message and "\n" not in message
    assert [s.status for s in standin.requests] == [503, 503, 503]
    assert not env.raw.exists() and leftovers(env) == []


def test_unreachable_server_gives_up_with_a_clear_error(
    standin: KaggleStandIn,
    legacy_env: str,
    env: Env,
) -> None:
    standin.stop()  # nothing listens on localhost:80 any more

    with pytest.raises(FetchError) as err:
        run_fetch(env, retries=1)

    assert f"could not reach Kaggle for {DATASET} (ConnectionError) after retries" in str(err.value)
    assert not env.raw.exists() and leftovers(env) == []


# -- 7. unknown dataset ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "calls"),
    [
        ("nobody/no-such-dataset", [("GetDatasetMetadata", 404)]),
        (f"{DATASET}/99", [("GetDatasetMetadata", 200), ("DownloadDataset", 404)]),  # no such version
    ],
    ids=["dataset", "version"],
)
def test_unknown_dataset_is_a_clear_404(
    dataset: str,
    calls: list[tuple[str, int]],
    standin: KaggleStandIn,
    legacy_env: str,
    env: Env,
    kaggle_zip: bytes,
) -> None:
    standin.add_dataset(DATASET, kaggle_zip)

    with pytest.raises(FetchError) as err:
        run_fetch(env, dataset=dataset, retries=3)

    assert str(err.value) == f"Kaggle has no dataset {dataset!r} (HTTP 404): check data.kaggle_dataset"
    assert [(s.endpoint, s.status) for s in standin.requests] == calls  # not retried
    assert not env.raw.exists() and leftovers(env) == []


# -- 8. unsafe or corrupt archives -----------------------------------------------------------------


def _good(images: Mapping[str, bytes]) -> list[tuple[str | zipfile.ZipInfo, bytes]]:
    return [(f"chest_xray/{rel}", data) for rel, data in sorted(images.items())]


def _symlink(images: Mapping[str, bytes]) -> bytes:
    link = _file_info("chest_xray/train/NORMAL/link.jpeg", stat.S_IFLNK | 0o777)
    return make_zip([*_good(images), (link, b"/etc/passwd")])


def _many_files(images: Mapping[str, bytes]) -> bytes:
    return make_zip([(f"chest_xray/train/NORMAL/tiny-{i:04d}.jpeg", b"\xff\xd8\xff\xd9") for i in range(300)])


def _many_bytes(images: Mapping[str, bytes]) -> bytes:
    zeros = bytes(4 * 1024 * 1024)  # 16 MiB that deflate to a few KiB
    entries = [(f"chest_xray/train/NORMAL/bomb-{i}.jpeg", zeros) for i in range(4)]
    return make_zip(entries, zipfile.ZIP_DEFLATED)


def _truncated(images: Mapping[str, bytes]) -> bytes:
    archive = kaggle_archive(images)
    return archive[: len(archive) // 2]


Builder = Callable[[Mapping[str, bytes]], bytes]
UNSAFE: dict[str, tuple[Builder, dict[str, Any], str]] = {
    # name: (archive builder, extra data params, expected message pattern)
    "absolute-path": (
        lambda im: make_zip([*_good(im), (f"/tmp/{ESCAPE}", b"x")]),
        {},
        r"unsafe archive absolute-path\.zip: entry '/tmp/cxr-escape-.*' has an absolute path",
    ),
    "drive-letter": (lambda im: make_zip([*_good(im), (f"C:/{ESCAPE}", b"x")]), {}, r"has an absolute path"),
    "dotdot": (
        lambda im: make_zip([*_good(im), (f"chest_xray/train/../../../../{ESCAPE}", b"x")]),
        {},
        r"unsafe archive dotdot\.zip: entry 'chest_xray/train/\.\./.*' escapes with '\.\.'",
    ),
    "backslash-dotdot": (
        lambda im: make_zip([*_good(im), (f"chest_xray\\..\\..\\{ESCAPE}", b"x")]),
        {},
        r"escapes with '\.\.'",
    ),
    "symlink": (_symlink, {}, r"entry 'chest_xray/train/NORMAL/link\.jpeg' is a link or special file"),
    "too-many-files": (
        _many_files,
        {"max_files": 100},
        r"archive too-many-files\.zip holds 300 files, over the cap of 100 "
        r"\(data\.max_files\)",
    ),
    "too-many-bytes": (
        _many_bytes,
        {"max_bytes": "1e6"},  # a YAML 1e6 arrives as a string
        r"unpacks to 16777216 bytes, over the cap of 1000000 \(data\.max_bytes\)",
    ),
    "truncated": (_truncated, {}, r"Kaggle download of evil/truncated is corrupt twice in a row"),
    "bad-crc": (
        lambda im: corrupt_member(kaggle_archive(im)),
        {},
        r"Kaggle download of evil/bad-crc is corrupt twice in a row",
    ),
}


@pytest.mark.parametrize("case", list(UNSAFE))
def test_unsafe_archive_is_refused_and_data_raw_is_untouched(
    case: str,
    standin: KaggleStandIn,
    legacy_env: str,
    env: Env,
    tmp_path: Path,
    images: dict[str, bytes],
    kaggle_zip: bytes,
) -> None:
    build, params, pattern = UNSAFE[case]
    standin.add_dataset(DATASET, kaggle_zip)
    run_fetch(env)  # a previous good dataset
    before = (hash_tree(env.raw), env.record.read_bytes())
    standin.add_dataset(f"evil/{case}", build(images))

    with pytest.raises(FetchError, match=pattern) as err:
        run_fetch(env, dataset=f"evil/{case}", **params)

    assert "\n" not in str(err.value)
    assert (hash_tree(env.raw), env.record.read_bytes()) == before
    assert tree(env.raw) == expected_tree(images)
    assert leftovers(env) == []
    assert not list(tmp_path.rglob(ESCAPE)) and not Path("/tmp", ESCAPE).exists()
    if case in ("truncated", "bad-crc"):  # downloaded twice, deleted, never extracted
        assert len(standin.seen("DownloadDataset")) == 1 + 2
        assert not (env.cache_zip.parent / f"{case}.zip").exists()


# -- 9. interrupted downloads, corrupt cache -----------------------------------------------------


def test_download_cut_mid_stream_is_resumed(
    standin: KaggleStandIn,
    legacy_env: str,
    env: Env,
    images: dict[str, bytes],
    kaggle_zip: bytes,
    capsys: pytest.CaptureFixture[str],
) -> None:
    standin.add_dataset(DATASET, kaggle_zip)
    standin.inject("storage", "cut")  # headers and half the bytes, then the connection drops

    record = run_fetch(env)

    assert_fetched(env, record, images, kaggle_zip)
    # The client itself retried (after ~2-3 s) with a Range request and appended the rest.
    storage = standin.seen("storage")
    assert [s.status for s in storage] == [200, 206]
    assert storage[0].range is None
    assert storage[1].range is not None and storage[1].range.startswith("bytes=")
    assert 0 <= int(storage[1].range.removeprefix("bytes=").rstrip("-")) <= len(kaggle_zip) // 2
    assert len(standin.seen("DownloadDataset")) == 1
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("seed", ["first-half", "same-size-corrupt"])
def test_corrupt_cached_zip_is_never_extracted(
    seed: str,
    standin: KaggleStandIn,
    legacy_env: str,
    env: Env,
    images: dict[str, bytes],
    kaggle_zip: bytes,
) -> None:
    standin.add_dataset(DATASET, kaggle_zip)
    env.cache_zip.parent.mkdir(parents=True)
    # Left by an interrupted run (no resume marker), or a damaged file newer than the remote copy.
    bad = kaggle_zip[: len(kaggle_zip) // 2] if seed == "first-half" else corrupt_member(kaggle_zip)
    env.cache_zip.write_bytes(bad)

    record = run_fetch(env)

    assert_fetched(env, record, images, kaggle_zip)
    assert sha256(env.cache_zip.read_bytes()) == sha256(kaggle_zip)
    # first-half: the client sees a short file and downloads afresh. same-size-corrupt: the client
    # keeps the newer local file, our CRC check deletes it and asks again.
    # (requests follows the redirect to storage each time, even when the client then reads nothing.)
    downloads = 1 if seed == "first-half" else 2
    assert len(standin.seen("DownloadDataset")) == downloads
    assert [s.status for s in standin.seen("storage")] == [200] * downloads


# -- bugs found by these tests ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (DATASET, f"{DATASET}/1"),
        (f"alice/{SLUG}", f"bob/{SLUG}"),
    ],
    ids=["older-version", "other-owner"],
)
def test_cache_never_mixes_datasets_that_share_a_slug(
    first: str,
    second: str,
    standin: KaggleStandIn,
    legacy_env: str,
    env: Env,
    images: dict[str, bytes],
) -> None:
    fewer = {rel: data for rel, data in images.items() if not rel.startswith("test/")}
    standin.add_dataset(first, kaggle_archive(images), last_modified="Sat, 01 Jun 2024 00:00:00 GMT")
    wanted = standin.add_dataset(second, kaggle_archive(fewer), last_modified="Sun, 01 Jan 2023 00:00:00 GMT")
    run_fetch(env, dataset=first)

    record = run_fetch(env, dataset=second)

    assert record["origin_sha256"] == wanted.sha256
    assert tree(env.raw) == expected_tree(fewer)


def test_hidden_files_in_class_folders_do_not_reach_data_raw(
    standin: KaggleStandIn,
    legacy_env: str,
    env: Env,
    images: dict[str, bytes],
) -> None:
    ds_store = [(f"chest_xray/{s}/{c}/.DS_Store", DS_STORE) for s in SPLITS for c in CLASS_NAMES]
    archive = kaggle_archive(images, extra=ds_store)
    standin.add_dataset(DATASET, archive)

    record = run_fetch(env)

    assert tree(env.raw) == expected_tree(images)
    assert record["files"] == N_FILES
