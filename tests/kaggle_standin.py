"""A local stand-in for the Kaggle public API, for tests that drive the *real* ``kaggle`` client.

With ``KAGGLE_API_ENVIRONMENT=LOCALHOST`` (read when ``kaggle.api.kaggle_api_extended`` is imported),
``KaggleApi`` adds ``--local`` to its args and kagglesdk sends every call to ``http://localhost``
(port 80, no TLS) as ``POST /api/v1/{service}/{method}`` with a JSON body. This server answers the
calls our fetch path and ``kaggle auth login`` make, the way the real service does:

* ``security.OAuthService/IntrospectToken`` (``KAGGLE_API_TOKEN`` auth) → ``{"active", "username"}``;
* ``security.OAuthService/ExchangeOAuthToken`` (``kaggle auth login``: the code the user pastes) →
  ``{"accessToken", "refreshToken", "expiresIn", "username"}``, which the client saves in
  ``~/.kaggle/credentials.json``;
* ``users.AccountService/GenerateAccessToken`` (the client refreshing an expired access token of
  ``credentials.json`` with its refresh token) → ``{"token", "expiresIn", "userName"}``, 401 for an
  unknown refresh token;
* ``datasets.DatasetApiService/GetDatasetMetadata`` → ``{"info": {..., "licenses": [{"name"}]}}``;
* ``datasets.DatasetApiService/DownloadDataset`` → by default a 302 to a signed storage URL on
  ``127.0.0.1`` (another host name, so ``requests`` drops the Authorization header on the way, as
  it does for Kaggle's real GCS redirect), which serves the zip with ``Content-Length``,
  ``Last-Modified``, ``ETag`` and byte ranges (``Range`` / ``If-Range``, 206 / 416). With
  ``redirect=False`` the zip is the body of the POST answer itself.

Errors are JSON ``{"code", "message"}`` bodies, which kagglesdk turns into ``HTTPError``. API calls
need valid credentials (HTTP Basic ``username:key`` or ``Bearer <token>``), else 401.

It records every request (endpoint, auth *scheme* only, status, Range header, time) and never the
credentials themselves. Failures can be injected per endpoint: an HTTP status (e.g. 503) or
``"cut"`` (send the headers and half the body, then drop the connection). It listens on loopback
addresses only, reads at most 64 KiB of request body and times idle connections out after a few
seconds.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import socket
import socketserver
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

PORT = 80  # kagglesdk: KaggleEnv.LOCAL -> "http://localhost", no port
STORAGE_HOST = "127.0.0.1"  # a different host name than "localhost": requests strips auth on redirect
API_PREFIX = "/api/v1/"
INTROSPECT = "security.OAuthService/IntrospectToken"
EXCHANGE = "security.OAuthService/ExchangeOAuthToken"
REFRESH = "users.AccountService/GenerateAccessToken"
ACCESS_TOKEN_S = 12 * 3600  # kagglesdk's default access-token lifetime
METADATA = "datasets.DatasetApiService/GetDatasetMetadata"
DOWNLOAD = "datasets.DatasetApiService/DownloadDataset"
STORAGE = "storage"
MAX_BODY = 64 * 1024
DEFAULT_LAST_MODIFIED = "Mon, 01 Jan 2024 00:00:00 GMT"

Fault = int | str  # an HTTP status to answer with, or "cut"


class StandInUnavailable(RuntimeError):
    """The stand-in cannot listen where the client connects (port taken, no permission...)."""


@dataclass
class Dataset:
    archive: bytes
    last_modified: str = DEFAULT_LAST_MODIFIED
    licenses: tuple[str, ...] = ("CC-BY-4.0",)
    title: str = "Chest X-Ray Images (Pneumonia)"

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.archive).hexdigest()[:32] + '"'

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.archive).hexdigest()


@dataclass(frozen=True)
class Seen:
    """One request as the stand-in saw it. Holds the *kind* of credential, never its value."""

    http_method: str
    endpoint: str  # "IntrospectToken", "GetDatasetMetadata", "DownloadDataset", "storage" or the path
    auth: str | None  # "Basic", "Bearer", another scheme, or None when no Authorization header
    status: int  # 0 when no answer was sent
    range: str | None
    at: float  # time.monotonic() when the answer started


@dataclass
class KaggleStandIn:
    username: str = "standin-user"
    key: str = field(default_factory=lambda: secrets.token_hex(16))
    tokens: dict[str, str] = field(default_factory=dict)  # access token -> username
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # OAuth refresh token -> username
    login_codes: dict[str, str] = field(default_factory=dict)  # one-time `kaggle auth login` code -> username
    redirect: bool = True
    ranges: bool = True
    datasets: dict[str, Dataset] = field(default_factory=dict)  # "owner/slug" or "owner/slug/version"
    requests: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: dict[str, deque[Fault]] = {}
        self._signed: dict[str, str] = {}  # storage path -> dataset key
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []

    # -- configuration -------------------------------------------------------------------------

    def add_dataset(self, ref: str, archive: bytes, **kwargs: Any) -> Dataset:
        dataset = Dataset(archive, **kwargs)
        with self._lock:
            self.datasets[ref] = dataset
        return dataset

    def inject(self, endpoint: str, *faults: Fault) -> None:
        """Answer the next requests to ``endpoint`` ("GetDatasetMetadata", "storage"...) with faults."""
        with self._lock:
            self._faults.setdefault(endpoint, deque()).extend(faults)

    def add_token(self, username: str | None = None) -> str:
        token = "KGAT_" + secrets.token_hex(16)
        with self._lock:
            self.tokens[token] = username or self.username
        return token

    def add_login_code(self, username: str | None = None) -> str:
        """A one-time code, as Kaggle's sign-in page shows it for ``kaggle auth login --no-launch-browser``."""
        code = "code-" + secrets.token_hex(12)
        with self._lock:
            self.login_codes[code] = username or self.username
        return code

    def add_refresh_token(self, username: str | None = None) -> str:
        token = "refresh-" + secrets.token_hex(16)
        with self._lock:
            self.refresh_tokens[token] = username or self.username
        return token

    @property
    def credential_values(self) -> list[str]:
        """Every credential value this server accepts or issued (tests check none of them leaks)."""
        with self._lock:
            return [self.key, *self.tokens, *self.refresh_tokens, *self.login_codes]

    def endpoints(self) -> list[str]:
        with self._lock:
            return [seen.endpoint for seen in self.requests]

    def seen(self, endpoint: str) -> list[Seen]:
        with self._lock:
            return [seen for seen in self.requests if seen.endpoint == endpoint]

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> KaggleStandIn:
        for host in _listen_hosts():
            cls = _Server6 if ":" in host else _Server
            try:
                server = cls((host, PORT), _Handler)
            except OSError as exc:
                self.stop()
                raise StandInUnavailable(
                    f"cannot listen on {host} port {PORT} ({exc.strerror or exc}); the kaggle client's "
                    "LOCALHOST environment only talks to http://localhost:80"
                ) from exc
            server.standin = self
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                daemon=True,
                name=f"kaggle-standin-{host}",
            )
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> KaggleStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- used by the handler -------------------------------------------------------------------

    def _next_fault(self, endpoint: str) -> Fault | None:
        with self._lock:
            queue = self._faults.get(endpoint)
            return queue.popleft() if queue else None

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.requests.append(seen)

    def _check_auth(self, header: str | None) -> tuple[str | None, bool]:
        if not header:
            return None, False
        scheme, _, value = header.partition(" ")
        if scheme == "Basic":
            try:
                user, _, key = base64.b64decode(value, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return scheme, False
            return scheme, user == self.username and hmac.compare_digest(key.encode(), self.key.encode())
        if scheme == "Bearer":
            with self._lock:
                return scheme, any(hmac.compare_digest(value.encode(), t.encode()) for t in self.tokens)
        return scheme, False

    def _find(self, owner: str, slug: str, version: int | None = None) -> tuple[str, Dataset] | None:
        ref = f"{owner}/{slug}" + (f"/{version}" if version else "")
        with self._lock:
            dataset = self.datasets.get(ref)
            if dataset is None and version is None:  # only versioned copies exist
                found = sorted(k for k in self.datasets if k.startswith(f"{owner}/{slug}/"))
                if found:
                    ref, dataset = found[-1], self.datasets[found[-1]]
        return (ref, dataset) if dataset is not None else None

    def _sign(self, ref: str) -> str:
        path = f"/storage/{secrets.token_hex(8)}/{ref.split('/')[1]}.zip"
        with self._lock:
            self._signed[path] = ref
        return path

    def _signed_dataset(self, path: str) -> Dataset | None:
        with self._lock:
            ref = self._signed.get(path)
            return self.datasets.get(ref) if ref else None


def _listen_hosts() -> list[str]:
    """127.0.0.1 (the storage host) plus every address ``localhost`` resolves to; loopback only."""
    hosts = ["127.0.0.1"]
    for *_, sockaddr in socket.getaddrinfo("localhost", PORT, type=socket.SOCK_STREAM):
        host = str(sockaddr[0])
        if not ipaddress.ip_address(host).is_loopback:
            raise StandInUnavailable(f"localhost resolves to {host}, not a loopback address")
        if host not in hosts:
            hosts.append(host)
    return hosts


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 16
    standin: KaggleStandIn

    def server_bind(self) -> None:  # skip HTTPServer's getfqdn() lookup
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "localhost", PORT

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up mid-answer is expected here (see the "cut" fault)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5  # seconds a connection may sit idle
    server: _Server
    _pending: tuple[str, str | None] | None = None  # (endpoint, auth scheme) until the answer starts

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are recorded in KaggleStandIn.requests, headers never printed

    def send_response(self, code: int, message: str | None = None) -> None:
        # Recorded before any byte of the answer leaves, so a test sees it as soon as the client does.
        self._record(code)
        super().send_response(code, message)

    def _record(self, status: int) -> None:
        if self._pending is not None:
            endpoint, auth = self._pending
            self._pending = None
            self.server.standin._record(
                Seen(self.command, endpoint, auth, status, self.headers.get("Range"), time.monotonic())
            )

    # -- helpers -------------------------------------------------------------------------------

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"code": status, "message": message})

    def _send_archive(self, dataset: Dataset, name: str, fault: Fault | None) -> None:
        data, start, end, status = dataset.archive, 0, len(dataset.archive), 200
        wanted = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        standin = self.server.standin
        if wanted and standin.ranges and if_range in (None, dataset.etag, dataset.last_modified):
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
            if match:
                start = int(match[1])
                end = min(int(match[2]) + 1, len(data)) if match[2] else len(data)
                if start >= end:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
        body = data[start:end]
        self.send_response(status)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Disposition", f"attachment; filename={name}.zip")
        self.send_header("Last-Modified", dataset.last_modified)
        self.send_header("ETag", dataset.etag)
        if standin.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if fault == "cut":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def _answer(self, endpoint: str, work: Any) -> None:
        standin = self.server.standin
        auth, _ = standin._check_auth(self.headers.get("Authorization"))
        self._pending = (endpoint, auth)
        try:
            fault = standin._next_fault(endpoint)
            if isinstance(fault, int):
                self._error(fault, f"injected failure {fault}")
            else:
                work(fault)
        finally:
            self._record(0)  # no answer was started (the handler failed): status 0

    # -- HTTP methods --------------------------------------------------------------------------

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        endpoint = path.rsplit("/", 1)[-1] if path.startswith(API_PREFIX) else path
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            self._answer(endpoint, lambda _: self._error(413, "request body too large"))
            return
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._answer(endpoint, lambda _: self._error(400, "request body is not a JSON object"))
            return
        service_method = path[len(API_PREFIX) :] if path.startswith(API_PREFIX) else ""
        handlers = {
            INTROSPECT: self._introspect,
            EXCHANGE: self._exchange,
            REFRESH: self._refresh,
            METADATA: self._metadata,
            DOWNLOAD: self._download,
        }
        handler = handlers.get(service_method)
        if handler is None:
            self._answer(endpoint, lambda _: self._error(404, f"no such method {path}"))
            return
        self._answer(endpoint, lambda fault: handler(body, fault))

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if not parts.path.startswith("/storage/"):
            self._answer(parts.path, lambda _: self._error(404, "not found"))
            return

        def serve(fault: Fault | None) -> None:
            dataset = self.server.standin._signed_dataset(parts.path)
            if dataset is None:
                self._error(403, "signed URL unknown or expired")
            else:
                self._send_archive(dataset, parts.path.rsplit("/", 1)[-1].removesuffix(".zip"), fault)

        self._answer(STORAGE, serve)

    # -- API methods ---------------------------------------------------------------------------

    def _introspect(self, body: dict[str, Any], fault: Fault | None) -> None:
        token = str(body.get("token") or "")
        with self.server.standin._lock:
            username = self.server.standin.tokens.get(token)
        if username is None:
            self._json(200, {"active": False})
        else:
            self._json(200, {"active": True, "username": username, "scope": "resources.read"})

    def _exchange(self, body: dict[str, Any], fault: Fault | None) -> None:
        standin = self.server.standin
        with standin._lock:
            username = standin.login_codes.pop(str(body.get("code") or ""), None)  # one use only
        if username is None or body.get("grantType") != "authorization_code" or not body.get("codeVerifier"):
            self._error(400, "invalid_grant")
            return
        access, refresh = standin.add_token(username), standin.add_refresh_token(username)
        payload = {"accessToken": access, "refreshToken": refresh, "tokenType": "Bearer"}
        self._json(200, {**payload, "expiresIn": ACCESS_TOKEN_S, "username": username})

    def _refresh(self, body: dict[str, Any], fault: Fault | None) -> None:
        standin = self.server.standin
        with standin._lock:
            username = standin.refresh_tokens.get(str(body.get("refreshToken") or ""))
        if username is None:
            self._error(401, "Unauthenticated")
            return
        self._json(200, {"token": standin.add_token(username), "expiresIn": ACCESS_TOKEN_S, "userName": username})

    def _authorised(self) -> bool:
        _, ok = self.server.standin._check_auth(self.headers.get("Authorization"))
        if not ok:
            self._error(401, "Unauthenticated")
        return ok

    def _metadata(self, body: dict[str, Any], fault: Fault | None) -> None:
        if not self._authorised():
            return
        owner, slug = str(body.get("ownerSlug") or ""), str(body.get("datasetSlug") or "")
        found = self.server.standin._find(owner, slug)
        if found is None:
            self._error(404, f"Dataset {owner}/{slug} not found")
            return
        _, dataset = found
        self._json(
            200,
            {
                "info": {
                    "datasetSlug": slug,
                    "ownerUser": owner,
                    "title": dataset.title,
                    "licenses": [{"name": name} for name in dataset.licenses],
                }
            },
        )

    def _download(self, body: dict[str, Any], fault: Fault | None) -> None:
        if not self._authorised():
            return
        owner, slug = str(body.get("ownerSlug") or ""), str(body.get("datasetSlug") or "")
        version = body.get("datasetVersionNumber")
        found = self.server.standin._find(owner, slug, int(version) if version else None)
        if found is None:
            self._error(404, f"Dataset {owner}/{slug} version {version} not found")
            return
        ref, dataset = found
        if not self.server.standin.redirect:
            self._send_archive(dataset, slug, fault)
            return
        self.send_response(302)
        self.send_header("Location", f"http://{STORAGE_HOST}:{PORT}{self.server.standin._sign(ref)}")
        self.send_header("Content-Length", "0")
        self.end_headers()
