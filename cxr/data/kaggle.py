"""Download a Kaggle dataset with the real ``kaggle`` client, safely.

Credentials are looked up in the client's own order (:func:`find_credentials`, checked against the
client by ``tests/test_kaggle_fetch.py``) *before* the client is imported: importing ``kaggle``
authenticates at import time and prints a help page when nothing is configured. Secrets are never
logged; only the *kind* of credential is.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import stat
import sys
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from cxr.errors import FetchError

if TYPE_CHECKING:  # imported where used: kaggle authenticates at import
    from kaggle.api.kaggle_api_extended import KaggleApi

log = logging.getLogger(__name__)
T = TypeVar("T")

NO_CREDENTIALS = (
    "no Kaggle credentials found: run 'kaggle auth login', or set KAGGLE_API_TOKEN (a token from "
    "kaggle.com/settings), or save ~/.kaggle/kaggle.json (then chmod 600 it), or set KAGGLE_USERNAME and "
    "KAGGLE_KEY - or use data.source=sample (a small demo), data.source=dir (a local folder) or "
    "data.source=medmnist (no account needed)"
)

# The client's AuthMethod names (kaggle.api.kaggle_api_extended.AuthMethod), in the order it tries them.
ACCESS_TOKEN, LEGACY_API_KEY, OAUTH = "ACCESS_TOKEN", "LEGACY_API_KEY", "OAUTH"


class NoCredentialsError(FetchError):
    """No Kaggle credential of any kind is configured (``data.source: auto`` then uses the sample)."""


@dataclass(frozen=True)
class Credentials:
    kind: str  # a description safe to log: never the secret itself
    path: Path | None = None
    method: str = ""  # ACCESS_TOKEN, LEGACY_API_KEY or OAUTH: what the client will authenticate with


def _config_dir(env: Mapping[str, str], home: Path) -> Path:
    """Where the client looks for ``kaggle.json`` (``KaggleApi.config_dir``, computed at its import)."""
    if env.get("KAGGLE_CONFIG_DIR"):
        return Path(env["KAGGLE_CONFIG_DIR"])
    legacy = home / ".kaggle"
    if legacy.exists() or not sys.platform.startswith("linux"):
        return legacy
    return Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "kaggle"


def _refuse_if_shared(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise FetchError(
            f"{path} is readable by other users (mode {stat.S_IMODE(mode):o}): run 'chmod 600 {path}' and retry"
        )


def _token_in(path: Path) -> bool:
    """True when the file holds a token (kagglesdk ``_get_access_token_from_file``: stripped, non-empty)."""
    try:
        return bool(path.read_text().strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise FetchError(f"{path}: cannot read the Kaggle token ({type(exc).__name__}); fix or remove it") from exc


def _access_token(env: Mapping[str, str], home: Path) -> Credentials | None:
    """kagglesdk ``get_access_token_from_env``: notebook token file, KAGGLE_API_TOKEN, ~/.kaggle/access_token[.txt]."""
    notebook_file = env.get("KAGGLE_API_V1_TOKEN")
    if env.get("KAGGLE_KERNEL_RUN_TYPE") is not None and env.get("KAGGLE_DATA_PROXY_URL") is not None and notebook_file:
        path = Path(notebook_file)
        if path.exists() and _token_in(path):
            return Credentials("Kaggle notebook token (KAGGLE_API_V1_TOKEN)", path, ACCESS_TOKEN)
    token = env.get("KAGGLE_API_TOKEN", "")
    if token:
        if not Path(token).exists():
            return Credentials("KAGGLE_API_TOKEN", None, ACCESS_TOKEN)
        path = Path(token)
        if not _token_in(path):
            return None  # the client reads no token from it and goes on to the API key, not to access_token
        _refuse_if_shared(path)
        return Credentials("KAGGLE_API_TOKEN (file)", path, ACCESS_TOKEN)
    for name in ("access_token", "access_token.txt"):
        path = home / ".kaggle" / name
        if path.exists() and _token_in(path):
            _refuse_if_shared(path)
            return Credentials("access token file", path, ACCESS_TOKEN)
    return None


def _legacy_key(env: Mapping[str, str], home: Path) -> tuple[Credentials | None, FetchError | None]:
    """``KaggleApi._load_config``: ``kaggle.json`` in the config dir, overridden by KAGGLE_USERNAME / KAGGLE_KEY.

    Returns the credential, or the problem of a ``kaggle.json`` the client would ignore (raised only
    when no later kind of credential is found either).
    """
    from_env = {k: env.get(f"KAGGLE_{k.upper()}", "") for k in ("username", "key")}
    if all(from_env.values()):
        return Credentials("KAGGLE_USERNAME/KAGGLE_KEY", None, LEGACY_API_KEY), None
    config = _config_dir(env, home) / "kaggle.json"
    if not config.is_file():
        return None, None
    try:
        values = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        return None, FetchError(f"{config}: not valid JSON ({type(exc).__name__}); re-download it")
    values = values if isinstance(values, dict) else {}
    merged = {k: from_env[k] or values.get(k) for k in from_env}
    if not all(merged.values()):
        return None, FetchError(f"{config}: needs both 'username' and 'key'; re-download it from Kaggle")
    _refuse_if_shared(config)
    kind = "kaggle.json" if not any(from_env.values()) else "kaggle.json with KAGGLE_USERNAME/KAGGLE_KEY"
    return Credentials(kind, config, LEGACY_API_KEY), None


def oauth_credentials_file(home: Path) -> Path:
    """Where ``kaggle auth login`` saves its sign-in (kagglesdk ``KaggleCredentials.DEFAULT_CREDENTIALS_FILE``).

    Always under the home folder: ``KAGGLE_CONFIG_DIR`` does not move it.
    """
    return home / ".kaggle" / "credentials.json"


def _oauth(home: Path) -> Credentials | None:
    """kagglesdk ``KaggleCredentials.load``: ``~/.kaggle/credentials.json`` with a refresh token."""
    path = oauth_credentials_file(home)
    if not path.exists():
        return None
    try:
        values = json.loads(path.read_text())
    except ValueError:
        return None  # the client ignores an unreadable file too
    except OSError as exc:
        raise FetchError(f"{path}: cannot read it ({type(exc).__name__}); run 'kaggle auth login --force'") from exc
    if not isinstance(values, dict):
        raise FetchError(f"{path}: not a Kaggle sign-in (expected a JSON object); run 'kaggle auth login --force'")
    if not values.get("refresh_token"):
        return None
    _refuse_if_shared(path)
    return Credentials("credentials.json (kaggle auth login)", path, OAUTH)


def find_credentials(env: Mapping[str, str] | None = None, home: Path | None = None) -> Credentials:
    """Say which credential the client will use, checking file permissions; never log or return secrets.

    The order is kaggle 2.x's ``KaggleApi.authenticate``: (1) an access token (kagglesdk
    ``get_access_token_from_env``: in a Kaggle notebook the file named by ``KAGGLE_API_V1_TOKEN``, then
    ``KAGGLE_API_TOKEN`` — a file path if one exists, else the token itself — then
    ``~/.kaggle/access_token`` or ``access_token.txt``); (2) the legacy API key (``kaggle.json`` in
    ``KAGGLE_CONFIG_DIR``, else ``~/.kaggle`` if it exists, else ``$XDG_CONFIG_HOME/kaggle``, each value
    overridden by ``KAGGLE_USERNAME`` / ``KAGGLE_KEY``); (3) the OAuth sign-in ``kaggle auth login`` saves
    in ``~/.kaggle/credentials.json``. (The client's fourth way, anonymous access, is for its own CLI
    only.) A test checks this order against the installed client.

    Args:
        env: the environment (default ``os.environ``).
        home: the home folder (default ``$HOME`` of ``env``, else ``Path.home()``).

    Returns:
        The kind of credential (safe to log), its file if it is one, and the client's name for the
        method (``ACCESS_TOKEN``, ``LEGACY_API_KEY``, ``OAUTH``).

    Raises:
        NoCredentialsError: no credential of any kind.
        FetchError: a credential file readable by other users, or a broken ``kaggle.json`` /
            ``credentials.json`` with nothing else to fall back on.
    """
    env = os.environ if env is None else env
    home = (Path(env["HOME"]) if env.get("HOME") else Path.home()) if home is None else home
    creds = _access_token(env, home)
    if creds is not None:
        return creds
    creds, problem = _legacy_key(env, home)
    if creds is not None:
        return creds
    creds = _oauth(home)
    if creds is not None:
        return creds
    if problem is not None:
        raise problem
    raise NoCredentialsError(NO_CREDENTIALS)


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(exc: BaseException) -> bool:
    import requests

    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return True
    status = _http_status(exc)
    return status is not None and (status >= 500 or status == 429)


def with_retries(
    action: Callable[[], T],
    what: str,
    retries: int = 4,
    backoff_s: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``action``; retry transient network errors with exponential backoff.

    Args:
        action: the call to make.
        what: what it does, for the warning logged before each retry.
        retries: retries after the first attempt; connection errors, timeouts, HTTP 429 and 5xx are retried.
        backoff_s: the first delay; it doubles on every retry.
        sleep: the wait (tests replace it).

    Returns:
        What ``action`` returns.
    """
    for attempt in range(retries + 1):
        try:
            return action()
        except Exception as exc:
            if not _is_transient(exc) or attempt == retries:
                raise
            delay = backoff_s * 2**attempt
            log.warning("%s failed (%s); retry %d/%d in %.0f s", what, type(exc).__name__, attempt + 1, retries, delay)
            sleep(delay)
    raise AssertionError("unreachable")


def _explain(exc: BaseException, dataset: str, creds: Credentials) -> FetchError:
    status = _http_status(exc)
    if status in (401, 403):
        return FetchError(
            f"Kaggle refused the credentials from {creds.kind} (HTTP {status}) for {dataset}: "
            "create a new API token at kaggle.com/settings and accept the dataset's terms"
        )
    if status == 404:
        return FetchError(f"Kaggle has no dataset {dataset!r} (HTTP 404): check data.kaggle_dataset")
    if _is_transient(exc):
        return FetchError(
            f"could not reach Kaggle for {dataset} ({type(exc).__name__}) after retries: check the "
            "network, or use data.source=dir or data.source=medmnist offline"
        )
    return FetchError(f"Kaggle download of {dataset} failed: {type(exc).__name__}: {exc}")


def _zip_is_complete(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def _cached_zip(dataset: str, cache_dir: Path) -> Path:
    """Where the zip of ``dataset`` is downloaded: one folder per owner/slug/version, created.

    The client keeps a cached zip that is "newer", so two datasets or versions must never share a
    file name.
    """
    owner, slug, *version = dataset.split("/")
    folder = cache_dir / owner / slug / (version[0] if version else "latest")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{slug}.zip"


def _client() -> KaggleApi:
    """An authenticated ``KaggleApi``."""
    # kaggle authenticates (and may print help or call the network) at import: keep it quiet.
    with contextlib.redirect_stdout(io.StringIO()):
        from kaggle.api.kaggle_api_extended import KaggleApi

        api = KaggleApi()
        api.authenticate()
    return api


def _log_licence(api: KaggleApi, dataset: str) -> None:
    """Ask Kaggle for the dataset's metadata (so a wrong name fails early) and log its licence."""
    from kagglesdk.datasets.types.dataset_api_service import ApiGetDatasetMetadataRequest

    owner, name = dataset.split("/")[:2]
    request = ApiGetDatasetMetadataRequest()
    request.owner_slug, request.dataset_slug = owner, name
    with api.build_kaggle_client() as kaggle:
        response = kaggle.datasets.dataset_api_client.get_dataset_metadata(request)
    if response.error_message:
        raise FetchError(f"Kaggle: {dataset}: {response.error_message}")
    licences = [lic.name for lic in (response.info.licenses or []) if lic.name] if response.info else []
    log.info("Kaggle dataset %s, licence %s", dataset, ", ".join(licences) or "unknown")


def _download(api: KaggleApi, dataset: str, folder: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        api.dataset_download_files(dataset, path=str(folder), force=False, quiet=True)


def _download_complete_zip(api: KaggleApi, dataset: str, target: Path, retries: int, backoff_s: float) -> None:
    """Download ``dataset`` to ``target``; a zip that fails its CRC check is deleted and downloaded once more."""
    for attempt in (1, 2):
        with_retries(lambda: _download(api, dataset, target.parent), "Kaggle download", retries, backoff_s)
        if _zip_is_complete(target):
            return
        log.warning("downloaded %s fails its integrity check; deleting it (attempt %d)", target, attempt)
        target.unlink(missing_ok=True)
    raise FetchError(f"Kaggle download of {dataset} is corrupt twice in a row: try again later")


def _refused_login(creds: Credentials) -> FetchError:
    """The error for the client's exit(1) when authentication fails."""
    if creds.method == OAUTH:  # the client deletes a credentials.json whose refresh token Kaggle refuses
        return FetchError(
            f"Kaggle did not accept the sign-in saved in {creds.path} (expired or revoked): "
            "run 'kaggle auth login' again"
        )
    if "token" in creds.kind.lower():
        return FetchError(
            f"Kaggle did not accept the token from {creds.kind} (inactive or expired): create a "
            "new API token at kaggle.com/settings"
        )
    return FetchError(NO_CREDENTIALS)


def download_dataset(dataset: str, cache_dir: Path, retries: int = 4, backoff_s: float = 2.0) -> Path:
    """Download ``owner/slug[/version]`` as a zip into ``cache_dir`` and return its path.

    The client resumes interrupted downloads itself; a zip that fails its CRC check is deleted
    and downloaded once more before giving up.

    Args:
        dataset: ``owner/slug`` or ``owner/slug/version`` on Kaggle.
        cache_dir: the download cache; the zip goes to ``<owner>/<slug>/<version or latest>/<slug>.zip``.
        retries: how many times a transient network error is retried, per request.
        backoff_s: the first retry delay; it doubles on every retry.

    Returns:
        The path of the downloaded, CRC-checked zip.

    Raises:
        FetchError: no or refused credentials, an unknown dataset, no network after retries, or a
            zip corrupt twice in a row.
    """
    creds = find_credentials()
    log.info("Kaggle credentials: %s", creds.kind)
    target = _cached_zip(dataset, cache_dir)
    try:
        api = with_retries(_client, "Kaggle authentication", retries, backoff_s)
        with_retries(lambda: _log_licence(api, dataset), "Kaggle metadata", retries, backoff_s)
        _download_complete_zip(api, dataset, target, retries, backoff_s)
    except FetchError:
        raise
    except SystemExit as exc:  # the client calls exit(1) when authentication fails
        raise _refused_login(creds) from exc
    except Exception as exc:
        raise _explain(exc, dataset, creds) from exc
    return target
