"""The HTTP service behind ``cxr serve``: one verified model, ``cxr predict``'s decoding and records.

Endpoints:

* ``POST /predict`` scores one image: a JPEG, PNG, BMP or DICOM file sent either as a multipart
  form field named ``file`` (``curl -F file=@scan.dcm``) or as the raw request body
  (``curl --data-binary @scan.png -H 'Content-Type: application/octet-stream'``, with an optional
  ``?name=scan.png`` for the record). The answer is ``cxr predict --json``'s record for that file:
  ``path`` (the upload's name), ``label``, ``probability``, ``threshold``, ``threshold_source``,
  ``model_sha256`` (the file's), ``card_model_sha256`` and ``verified_model``.
* ``POST /predict/batch`` scores several files sent as repeated multipart fields ``files``: one
  record per file, in order; a file that fails is that record's ``{path, error, status}``.
* ``GET /health``: ``{"status": "ok", ...}`` once the model is loaded and warmed up.
* ``GET /model``: the model card (with its intended use), the file, its sha256 and verification,
  the threshold in use and the upload limits.
* ``GET /openapi.json`` and ``GET /docs``: the schema of all of this (:mod:`cxr.serving.schemas`),
  errors included.

Every error is a JSON object with one line, ``{"error": "..."}``: 413 for an upload over the size
cap (refused from ``Content-Length`` before the body is read, or as soon as a chunked body passes
the cap; what the client still sends is then read and dropped, within a bound), 400 for an empty
or malformed upload, 422 for a file that is not a readable image or whose header claims more
pixels than the cap. A traceback never reaches the client.

The upload goes to a private temporary file and through :func:`cxr.inference.loading.load_image`,
the very function ``cxr predict`` uses, so decoding, its size checks and the preprocessing read
from the model card are the same. Decoding runs in a thread pool; the Keras model is called by one
worker thread only, which scores the images that arrived together as one batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import math
import queue
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cxr.common.images import ImageLimits
from cxr.common.model_card import card_path_for
from cxr.config import InputConfig
from cxr.errors import CxrError, DataError
from cxr.inference.dicom import dicom_intended_use, is_dicom
from cxr.inference.loading import LoadedModel, load_image, predict_images
from cxr.inference.predict import IMAGE_SUFFIXES, verdict
from cxr.safe_text import printable
from cxr.serving.budget import (
    DEFAULT_MAX_MEMORY_MB,
    HEADROOM_MB,
    LARGE_PIXELS,
    BudgetError,
    DecodeBudget,
    decode_cost,
    map_large_allocations,
    resident_mb,
)
from cxr.serving.connections import guarded_protocol
from cxr.serving.schemas import (
    BATCH_BODY,
    UPLOAD_BODY,
    BatchResult,
    Health,
    ModelInfo,
    Prediction,
    Reloaded,
    errors,
)

log = logging.getLogger("cxr.serve")

DEFAULT_MAX_UPLOAD_MB = 50.0
DEFAULT_BATCH_SIZE = 16
MAX_BATCH_FILES = 64  # files in one POST /predict/batch
BATCH_UPLOAD_FACTOR = 4  # a batch's body may be this many times --max-upload-mb
FORM_FIELD = "file"
DICOM_TYPES = {"application/dicom", "application/dicom+binary"}


class UploadError(Exception):
    """A bad upload: answered with ``status`` and ``{"error": message}`` (``name``: the file, in a batch)."""

    def __init__(self, status: int, message: str, name: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.name = name


class _TooLarge(Exception):
    """The request body passed the upload cap while it was being read."""


# what the worker answers for one image: (P(pneumonia), its domain score, or None without a content check)
ImageScore = tuple[float, float | None]


class ModelWorker:
    """The only thread that calls the Keras model; images queued together are scored as one batch.

    Keras models are not safe to call from several threads at once, and one call on a batch of
    eight costs much less than eight calls on one image, so concurrent requests share calls: while
    other requests are still being read or decoded (announced with :meth:`expect`), the worker waits up to
    ``max_wait_s`` for their images before calling the model. A lone request never waits.
    """

    def __init__(
        self,
        model: Any,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_wait_s: float = 0.02,
        score: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray | None]] | None = None,
    ) -> None:
        self.model = model
        # (probabilities, domain scores or None) of a batch: LoadedModel.score, one forward pass
        self.score = score or (lambda images, size: (predict_images(model, images, size), None))
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self._incoming = 0  # requests decoding an image that will be submitted
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[np.ndarray, concurrent.futures.Future[ImageScore]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="cxr-serve-model", daemon=True)
        self._thread.start()

    def expect(self, change: int = 1) -> None:
        """Announce an image being decoded (``change=-1``: it will not come after all)."""
        with self._lock:
            self._incoming += change

    def submit(self, image: np.ndarray, expected: bool = False) -> concurrent.futures.Future[ImageScore]:
        """Queue one (S, S, 3) uint8 image; the future resolves to its P(pneumonia) and domain score.

        Args:
            image: the decoded image.
            expected: it was announced with :meth:`expect`.
        """
        future: concurrent.futures.Future[ImageScore] = concurrent.futures.Future()
        if expected:
            self.expect(-1)
        self._queue.put((image, future))
        return future

    def close(self) -> None:
        """Finish the queued images, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _gather(
        self, first: tuple[np.ndarray, concurrent.futures.Future[ImageScore]]
    ) -> tuple[list[tuple[np.ndarray, concurrent.futures.Future[ImageScore]]], bool]:
        """The first item plus whatever arrives while images are still decoding; (batch, stop after it)."""
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.batch_size:
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if self._incoming <= 0 or left <= 0:
                    break
                try:
                    more = self._queue.get(timeout=min(left, 0.002))
                except queue.Empty:
                    continue
            if more is None:
                return batch, True
            batch.append(more)
        return batch, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is None:
                return
            batch, stopping = self._gather(item)
            batch = [(image, future) for image, future in batch if future.set_running_or_notify_cancel()]
            if not batch:
                continue
            log.debug("scoring a batch of %d image(s)", len(batch))
            try:
                probabilities, scores = self.score(np.stack([image for image, _ in batch]), self.batch_size)
            except Exception as exc:  # handed to each waiting request; the server answers 500 and logs it
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for i, ((_, future), probability) in enumerate(zip(batch, probabilities, strict=True)):
                future.set_result((float(probability), None if scores is None else float(scores[i])))


@dataclass
class _Served:
    """One loaded model with its worker thread, threshold and preprocessing; ``active`` requests on it."""

    lm: LoadedModel
    worker: ModelWorker
    threshold: float
    threshold_source: str
    cfg: InputConfig
    identity: dict[str, str | bool | None]  # the served model's sha256s and whether it was verified
    active: int = 0
    retired: bool = False

    @classmethod
    def start(cls, lm: LoadedModel, threshold: float, source: str, limits: ImageLimits, batch_size: int) -> _Served:
        caps = {"max_image_pixels": limits.max_pixels, "max_image_bytes": limits.max_bytes}
        cfg = lm.input.model_copy(update=caps)
        identity = {
            "model_sha256": lm.sha256 or None,
            "card_model_sha256": lm.card.model_sha256,
            "verified_model": lm.verified,
        }
        return cls(lm, ModelWorker(lm.model, batch_size, score=lm.score), threshold, source, cfg, identity)

    def warm_up(self) -> concurrent.futures.Future[ImageScore]:
        size = self.lm.input.image_size
        return self.worker.submit(np.zeros((size, size, 3), np.uint8))


class _Holder:
    """The model being served now; a replaced one is closed when its last request finishes."""

    def __init__(self, served: _Served) -> None:
        self.current = served
        self._lock = threading.Lock()
        self.swapping = asyncio.Lock()

    def acquire(self) -> _Served:
        with self._lock:
            self.current.active += 1
            return self.current

    def release(self, served: _Served) -> None:
        with self._lock:
            served.active -= 1
            done = served.retired and served.active == 0
        if done:
            threading.Thread(target=served.worker.close, name="cxr-serve-retire", daemon=True).start()

    def replace(self, fresh: _Served) -> None:
        with self._lock:
            old, self.current = self.current, fresh
            old.retired = True
            done = old.active == 0
        if done:
            threading.Thread(target=old.worker.close, name="cxr-serve-retire", daemon=True).start()

    def close(self) -> None:
        self.current.worker.close()


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _error(status: int, message: str, retry_after: bool = False) -> JSONResponse:
    headers = {"Retry-After": "1"} if retry_after else None
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


class _CappedBody:
    """An ASGI ``receive`` that raises :class:`_TooLarge` once the body read so far passes ``limit`` bytes.

    After a refusal, :meth:`discard_rest` reads and drops what the client is still sending (within a
    bound): a server that closes a connection with unread bytes resets it, and the client may then
    lose the answer it was sent (the "lingering close" web servers do).
    """

    def __init__(self, receive: Callable[[], Awaitable[MutableMapping[str, Any]]], limit: int) -> None:
        self.receive = receive
        self.limit = limit
        self.seen = 0
        self.finished = False  # the body's last message has arrived

    async def __call__(self) -> MutableMapping[str, Any]:
        message = await self.receive()
        if message.get("type") == "http.request":
            self.seen += len(message.get("body", b""))
            self.finished = not message.get("more_body", False)
            if self.seen > self.limit:
                raise _TooLarge
        else:
            self.finished = True
        return message

    async def discard_rest(
        self, headers: Mapping[str, str], budget: int, total_s: float = 30.0, idle_s: float = 5.0
    ) -> None:
        """Read and drop the rest of a refused body, up to ``budget`` bytes and ``total_s`` seconds, and
        only while the client keeps sending (no more than ``idle_s`` between two reads): nginx's
        ``lingering_time`` and ``lingering_timeout``, with its defaults. A fixed 10 s was too short
        when sixty 48 MB uploads were refused at once on two busy cores.

        Nothing is read when the client waits for ``100 Continue`` (it then never sends the body), or
        when its declared ``Content-Length`` passes the budget.
        """
        declared = headers.get("content-length", "")
        if self.finished or headers.get("expect", "").lower() == "100-continue":
            return
        if declared.isdigit() and int(declared) > budget:
            return
        loop = asyncio.get_running_loop()
        until = loop.time() + total_s
        dropped = 0
        while not self.finished and dropped <= budget:
            left = min(idle_s, until - loop.time())
            if left <= 0:
                return
            try:
                message = await asyncio.wait_for(self.receive(), left)
            except asyncio.TimeoutError:
                return
            dropped += len(message.get("body", b""))
            self.finished = message.get("type") != "http.request" or not message.get("more_body", False)


def _dicom_or_image_suffix(name: str, content_type: str) -> str:
    """The temporary file's suffix: the upload's own when it is an image suffix, ``.dcm`` for a DICOM type."""
    suffix = Path(name).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return suffix
    return ".dcm" if content_type.split(";")[0].strip().lower() in DICOM_TYPES else ""


class _Service:
    """What the routes of one application share: the model being served (swapped for a newer one on
    reload), the upload limits, the decode budget and how to reload; one method per thing a request does.

    Args: as :func:`create_app`'s, with ``limits`` and ``budget`` given.
    """

    def __init__(
        self,
        lm: LoadedModel,
        threshold: float,
        threshold_source: str,
        max_upload_bytes: int,
        batch_size: int,
        limits: ImageLimits,
        allow_outside_intended_use: bool,
        reload: Callable[[], tuple[LoadedModel, float, str]] | None,
        watch_s: float,
        budget: DecodeBudget,
    ) -> None:
        self.max_upload_bytes = max_upload_bytes
        self.batch_size = batch_size
        self.limits = limits
        self.allow_outside_intended_use = allow_outside_intended_use
        self.reload = reload
        self.watch_s = watch_s
        self.budget = budget
        self.first = _Served.start(lm, threshold, threshold_source, limits, batch_size)  # warmed up by the lifespan
        self.holder = _Holder(self.first)
        self.model_path = lm.path
        self.model_name = lm.path.name.removesuffix(".keras")

    async def swap(self) -> dict[str, Any]:
        """Load the model file again; serve it if its bytes differ (requests in flight finish on the old)."""
        if self.reload is None:
            raise UploadError(409, "this server serves a fixed file; start it with a model name to follow promotions")
        async with self.holder.swapping:
            try:
                new_lm, cut, source = await run_in_threadpool(self.reload)
            except CxrError as exc:
                log.warning("reload refused, still serving %s: %s", self.holder.current.lm.sha256[:12], exc)
                raise UploadError(503, f"reload refused, still serving the previous model: {exc}") from None
            old = self.holder.current
            if new_lm.sha256 == old.lm.sha256 and cut == old.threshold:
                return {"reloaded": False, **old.identity}
            fresh = await run_in_threadpool(_Served.start, new_lm, cut, source, self.limits, self.batch_size)
            await asyncio.wrap_future(fresh.warm_up())
            self.holder.replace(fresh)
            log.info("now serving %s (sha256 %s…; was %s…)", self.model_name, new_lm.sha256[:12], old.lm.sha256[:12])
            return {"reloaded": True, "previous_model_sha256": old.lm.sha256, **fresh.identity}

    async def watch(self) -> None:
        """Poll the model's card every ``watch_s`` seconds; :meth:`swap` when it changed."""
        card_file = card_path_for(self.model_path)
        seen = _stat_key(card_file)
        while True:
            await asyncio.sleep(self.watch_s)
            now = _stat_key(card_file)
            if now == seen:
                continue
            try:
                await self.swap()
                seen = now
            except UploadError:
                pass  # a half-written install (model renamed, card not yet): the next poll tries again

    @contextlib.asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        """Warm the model up and start the watcher; on shutdown, stop it, the model workers and the decode lanes."""
        await asyncio.wrap_future(self.first.warm_up())  # build the model's kernels
        watcher = asyncio.create_task(self.watch()) if self.reload is not None and self.watch_s > 0 else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            self.holder.close()
            self.budget.close()

    def health(self) -> dict[str, Any]:
        """``GET /health``'s answer."""
        return {"status": "ok", "model": self.model_name, **self.holder.current.identity}

    def model_info(self) -> dict[str, Any]:
        """``GET /model``'s answer: the card, the file, the threshold in use and the upload limits."""
        current = self.holder.current
        return {
            "model": self.model_name,
            "model_file": current.lm.path.as_posix(),
            **current.identity,
            "threshold": current.threshold,
            "threshold_source": current.threshold_source,
            "limits": {
                "max_upload_bytes": self.max_upload_bytes,
                "max_batch_files": MAX_BATCH_FILES,
                "max_image_pixels": self.limits.max_pixels,
                "max_image_bytes": self.limits.max_bytes,
                "decode_budget_bytes": self.budget.total,
            },
            "card": current.lm.card.to_json(),
        }

    async def decode_within_budget(
        self, cfg: InputConfig, data: bytes, filename: str, content_type: str
    ) -> tuple[np.ndarray, str | None]:
        """Decode one file in the lane for its size, holding what its decode will cost."""
        dicom = _dicom_or_image_suffix(filename, content_type) == ".dcm" or data[128:132] == b"DICM"
        cost, pixels = await self.budget.run(False, decode_cost, data, dicom)
        large = pixels > LARGE_PIXELS
        async with self.budget.hold(cost, filename, large):
            return await self.budget.run(
                large, _decode, cfg, data, filename, content_type, self.allow_outside_intended_use
            )

    @staticmethod
    def body_reservation(request: Request, cap: int) -> int:
        """What reading the body may hold: twice its declared length, or twice ``cap`` when it declares none."""
        declared = request.headers.get("content-length", "")
        return 2 * (int(declared) if declared.isdigit() and int(declared) <= cap else cap)

    async def score(self, current: _Served, image: np.ndarray, filename: str, outside: str | None) -> dict[str, Any]:
        """The record of one decoded image (its worker was told to expect it)."""
        probability, domain_score = await asyncio.wrap_future(current.worker.submit(image, expected=True))
        if not math.isfinite(probability):
            log.error("%s: the model returned %s", filename, probability)
            raise UploadError(500, f"{filename}: the model returned {probability} for this image; retrain it")
        record = {  # cxr predict --json's record (tests/test_serve.py compares the two)
            "path": filename,
            **verdict(probability, current.threshold, domain_score, self.allow_outside_intended_use),
            "threshold": current.threshold,
            "threshold_source": current.threshold_source,
            **current.identity,
            "intended_use": outside is None,
        }
        if outside is not None:
            record["outside_intended_use"] = outside
        return record

    async def predict(self, current: _Served, request: Request, name: str | None) -> JSONResponse:
        """``POST /predict`` on the model ``current``: the record, or the refusal."""
        body = _CappedBody(request.receive, self.max_upload_bytes)
        current.worker.expect()  # from here on, the worker may wait briefly to batch this image with others
        try:
            try:
                reservation = self.body_reservation(request, self.max_upload_bytes)
                async with self.budget.hold(reservation, "the upload", body=True):
                    data, filename, content_type = await _read_upload(request, body, name)
                    image, outside = await self.decode_within_budget(current.cfg, data, filename, content_type)
            except BaseException:
                current.worker.expect(-1)
                raise
            return JSONResponse(await self.score(current, image, filename, outside))
        except (UploadError, BudgetError, ClientDisconnect) as exc:
            return await _refused(exc, "an upload", body, request, 4 * self.max_upload_bytes)

    async def predict_batch(self, current: _Served, request: Request) -> JSONResponse:
        """``POST /predict/batch`` on the model ``current``: a record per file, or the batch's refusal."""
        cap = BATCH_UPLOAD_FACTOR * self.max_upload_bytes
        body = _CappedBody(request.receive, cap)
        try:
            async with self.budget.hold(self.body_reservation(request, cap), "the batch", body=True):
                files = await _read_batch(request, body, self.max_upload_bytes)
                current.worker.expect(sum(1 for f in files if not isinstance(f, UploadError)))
                results = await asyncio.gather(*(self.batch_item(current, f) for f in files))
        except (UploadError, BudgetError, ClientDisconnect) as exc:
            return await _refused(exc, "a batch", body, request, 2 * cap)
        return JSONResponse({"results": list(results)})

    async def batch_item(self, current: _Served, item: tuple[bytes, str, str] | UploadError) -> dict[str, Any]:
        """One file's record in a batch: its verdict, or its error (the worker was told to expect it)."""
        if isinstance(item, UploadError):
            return {"path": item.name, "error": item.message, "status": item.status}
        data, filename, content_type = item
        try:
            try:
                image, outside = await self.decode_within_budget(current.cfg, data, filename, content_type)
            except BaseException:
                current.worker.expect(-1)
                raise
            return await self.score(current, image, filename, outside)
        except (UploadError, BudgetError) as exc:
            return {"path": filename, "error": exc.message, "status": exc.status}


def create_app(
    lm: LoadedModel,
    threshold: float,
    threshold_source: str,
    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1e6),
    batch_size: int = DEFAULT_BATCH_SIZE,
    limits: ImageLimits | None = None,
    allow_outside_intended_use: bool = False,
    reload: Callable[[], tuple[LoadedModel, float, str]] | None = None,
    watch_s: float = 0.0,
    budget: DecodeBudget | None = None,
) -> FastAPI:
    """The FastAPI application serving one loaded model, swapped for a newer one on reload.

    Args:
        lm: the loaded, verified model.
        threshold: P(pneumonia) at or above which an image is called PNEUMONIA.
        threshold_source: where the threshold came from (as ``cxr predict --json`` names it).
        max_upload_bytes: the largest request body accepted (413 above it).
        batch_size: the most images scored in one model call.
        limits: the decode caps (default: ``input.max_image_pixels`` / ``max_image_bytes`` defaults).
        allow_outside_intended_use: score a DICOM whose metadata says it is not a chest radiograph
            (its record says ``intended_use: false`` and why) instead of answering 422.
        reload: loads the model file again (verified) with its threshold: ``POST /reload`` and the
            watcher call it. None: the model is fixed (``POST /reload`` answers 409).
        watch_s: with ``reload``, poll the model's card every this many seconds and reload when it
            changes (a promotion or a rollback writes the card last); 0 = only on ``POST /reload``.
        budget: the memory uploads and decodes may hold at once, and the decode lanes
            (:mod:`cxr.serving.budget`); default: 1 GB.

    Returns:
        The application; its lifespan starts and stops the model worker threads.
    """
    service = _Service(
        lm,
        threshold,
        threshold_source,
        max_upload_bytes,
        batch_size,
        limits or ImageLimits.of(),
        allow_outside_intended_use,
        reload,
        watch_s,
        budget or DecodeBudget(1_000_000_000),
    )
    app = FastAPI(
        title="cxr serve",
        summary=f"P(pneumonia) for chest radiographs from {service.model_name}",
        version=_version(),
        lifespan=service.lifespan,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    _add_error_handlers(app)
    _add_routes(app, service)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Answer every error with one line, ``{"error": "..."}``; a traceback never reaches the client."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, exc.detail if isinstance(exc.detail, str) else "bad request")

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error: %s: %s", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")


def _add_routes(app: FastAPI, service: _Service) -> None:
    """The endpoints, each handing its request to ``service`` (their names and docstrings are the
    OpenAPI schema's operations)."""

    @app.get("/health", response_model=Health)
    async def health() -> dict[str, Any]:
        """The model is loaded and warmed up; which file it is."""
        return service.health()

    @app.post("/reload", response_model=Reloaded, responses=errors(409, 503))
    async def reload_model() -> JSONResponse:
        """Load the model file again and serve it if its bytes changed (a promotion or a rollback)."""
        try:
            return JSONResponse(await service.swap())
        except UploadError as exc:
            return _error(exc.status, exc.message)

    @app.get("/model", response_model=ModelInfo)
    async def model_card() -> dict[str, Any]:
        """The model card, the threshold in use and the upload limits."""
        return service.model_info()

    @app.post("/predict", response_model=Prediction, responses=errors(400, 413, 422, 503), openapi_extra=UPLOAD_BODY)
    async def predict(
        request: Request, name: str | None = Query(None, max_length=255, description="the file's name for the record")
    ) -> JSONResponse:
        """Score one image: ``cxr predict --json``'s record."""
        current = service.holder.acquire()  # this request finishes on this model, whatever a reload does meanwhile
        try:
            return await service.predict(current, request, name)
        finally:
            service.holder.release(current)

    @app.post("/predict/batch", response_model=BatchResult, responses=errors(400, 413, 503), openapi_extra=BATCH_BODY)
    async def predict_batch(request: Request) -> JSONResponse:
        """Score several images sent together: one record per file, in order; a file that fails is
        that record's error, not the request's."""
        current = service.holder.acquire()
        try:
            return await service.predict_batch(current, request)
        finally:
            service.holder.release(current)


async def _refused(
    exc: UploadError | BudgetError | ClientDisconnect, what: str, body: _CappedBody, request: Request, drain: int
) -> JSONResponse:
    """The one-line answer to a refused request; what the client still sends is read and dropped
    (up to ``drain`` bytes) so that it receives the answer instead of a reset connection."""
    if isinstance(exc, ClientDisconnect):
        return _error(400, "the client closed the connection during the upload")
    log.info("refused %s (%d): %s", what, exc.status, exc.message)
    await body.discard_rest(request.headers, budget=max(drain, 8_000_000))
    return _error(exc.status, exc.message, retry_after=exc.status == 503)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cxr-pipeline")
    except PackageNotFoundError:
        return "unknown"


async def _read_batch(request: Request, body: _CappedBody, file_cap: int) -> list[tuple[bytes, str, str] | UploadError]:
    """The files of a batch, in order: ``(bytes, name, content type)``, or the error of one that is
    empty or over ``file_cap`` (it becomes that file's record).

    Raises:
        UploadError: 413 over the batch's limit; 400 not multipart, malformed, or without files.
    """
    declared = request.headers.get("content-length")
    too_large = UploadError(413, f"batch larger than the {body.limit} byte limit (4 × cxr serve --max-upload-mb)")
    if declared and declared.isdigit() and int(declared) > body.limit:
        raise too_large
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise UploadError(400, "send a batch as multipart/form-data, one field 'files' per image")
    capped = Request(request.scope, body)
    items: list[tuple[bytes, str, str] | UploadError] = []
    try:
        async with capped.form(max_files=MAX_BATCH_FILES, max_fields=16) as form:
            uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]  # repeated fields, in order
            if not uploads:
                raise UploadError(400, "a batch without files: send each image as a multipart field 'files'")
            for index, upload in enumerate(uploads):
                name = printable(upload.filename or f"file{index}")
                data = await upload.read(file_cap + 1)
                if not data:
                    items.append(UploadError(400, f"{name}: empty file (0 bytes)", name))
                elif len(data) > file_cap:
                    items.append(UploadError(413, f"{name}: larger than the {file_cap} byte limit per file", name))
                else:
                    items.append((data, name, upload.content_type or ""))
    except _TooLarge:
        raise too_large from None
    except StarletteHTTPException as exc:  # the form parser's refusals (malformed, too many files or fields)
        raise UploadError(exc.status_code, str(exc.detail)) from None
    return items


async def _read_upload(request: Request, body: _CappedBody, name: str | None) -> tuple[bytes, str, str]:
    """The uploaded file's bytes, its name for the record and its content type.

    Raises:
        UploadError: 413 over the body's limit, 400 for an empty body, a malformed form or a form
            without a file.
    """
    declared = request.headers.get("content-length")
    too_large = UploadError(413, f"upload larger than the {body.limit} byte limit (cxr serve --max-upload-mb)")
    if declared and declared.isdigit() and int(declared) > body.limit:
        raise too_large
    content_type = request.headers.get("content-type", "")
    capped = Request(request.scope, body)
    try:
        if content_type.lower().startswith("multipart/form-data"):
            async with capped.form(max_files=1, max_fields=16) as form:
                upload = form.get(FORM_FIELD)
                if not isinstance(upload, UploadFile):
                    files = [v for v in form.values() if isinstance(v, UploadFile)]
                    upload = files[0] if len(files) == 1 else None
                if upload is None:
                    raise UploadError(400, f"multipart upload without a file field (send it as '{FORM_FIELD}')")
                data = await upload.read()
                filename = upload.filename or name or "upload"
                content_type = upload.content_type or ""
        else:
            chunks = [chunk async for chunk in capped.stream()]
            data = b"".join(chunks)
            filename = name or "upload"
    except _TooLarge:
        raise too_large from None
    except StarletteHTTPException as exc:  # the form parser's refusals (malformed, too many files or fields)
        raise UploadError(exc.status_code, str(exc.detail)) from None
    if not data:
        raise UploadError(400, "empty upload (0 bytes): send a JPEG, PNG or DICOM file")
    return data, printable(filename), content_type


def _decode(
    cfg: InputConfig, data: bytes, filename: str, content_type: str, allow_outside: bool = False
) -> tuple[np.ndarray, str | None]:
    """Write the upload to a private temporary file and decode it exactly as ``cxr predict`` does;
    also say why it is outside the intended use, when it is and that is allowed.

    Raises:
        UploadError: 422 naming the upload when it is not a readable image (or passes a decode cap).
    """
    suffix = _dicom_or_image_suffix(filename, content_type)
    with tempfile.TemporaryDirectory(prefix="cxr-serve-") as folder:
        path = Path(folder) / f"upload{suffix}"
        path.write_bytes(data)
        try:
            image = load_image(path, cfg, allow_outside)
            outside = dicom_intended_use(path) if allow_outside and is_dicom(path) else None
            return image, outside
        except DataError as exc:
            raise UploadError(422, str(exc).replace(str(path), filename)) from None
        except Exception as exc:  # a decoder's own failure on hostile bytes is the upload's fault, not a 500
            log.warning("decoding %s failed: %s: %s", filename, type(exc).__name__, exc)
            raise UploadError(422, f"{filename}: not a readable image ({type(exc).__name__})") from None


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port).

    Raises:
        CxrError: the address cannot be bound (in use, not this machine's, no permission).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CxrError(f"--host {printable(host)}: unknown host ({exc.strerror})") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise CxrError(
            f"cannot listen on {printable(host)}:{port} ({exc.strerror or exc}); choose another --port or --host"
        ) from exc
    sock.set_inheritable(True)
    return sock


MIN_UPLOAD_MB = 0.1
MAX_UPLOAD_MB = 1000.0


def _decode_budget(max_memory_mb: float) -> DecodeBudget:
    """The decode budget left by ``--max-memory-mb`` once the model is loaded; refused when none is."""
    held = resident_mb()
    left_mb = max_memory_mb - held - HEADROOM_MB
    if left_mb < 64:
        raise CxrError(
            f"--max-memory-mb {max_memory_mb:g}: the loaded model already takes {held:.0f} MB and the server "
            f"{HEADROOM_MB:.0f} MB beside it; give at least {held + HEADROOM_MB + 64:.0f}"
        )
    log.info("decode budget %.0f MB (--max-memory-mb %g, %.0f MB held after loading)", left_mb, max_memory_mb, held)
    return DecodeBudget(int(left_mb * 1e6))


def serve(
    model: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    threshold: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    limits: ImageLimits | None = None,
    allow_outside_intended_use: bool = False,
    watch_s: float = 2.0,
    max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
) -> None:
    """Load the model, refuse it unless verified, and serve it until interrupted; follow promotions.

    Args:
        model: a model name (``models/NAME.keras``) or a ``.keras`` file with its card.
        host: the address to bind; loopback by default (anything else logs a warning).
        port: the TCP port; 0 picks a free one (the start-up line names it).
        max_upload_mb: the largest request body, in megabytes (10⁶ bytes).
        threshold: the decision threshold (0 to 1); None uses the model's shipped threshold.
        batch_size: the most images scored in one model call.
        limits: the decode caps, as ``cxr predict`` applies them (default: the built-in caps).
        allow_outside_intended_use: see :func:`create_app`.
        watch_s: poll the model's card this often and serve the new model when a promotion or a
            rollback replaced it (0: only on ``POST /reload``).
        max_memory_mb: the most memory the server may hold: what the loaded model takes, plus
            :data:`~cxr.serving.budget.HEADROOM_MB`, plus the decode budget, which is the rest
            (:mod:`cxr.serving.budget`).

    Raises:
        CxrError: a bad option; the model is missing, damaged, unloadable or unverified; or the
            address cannot be bound.
    """
    from cxr.inference.loading import load, model_file

    cut_given = _check_serve_options(max_upload_mb, max_memory_mb, batch_size, port, threshold)
    map_large_allocations()  # before the model loads (cxr.serving.budget)
    path = model_file(model)
    lm = load(path)  # refuses a file that is not the one its card describes
    if not lm.verified:  # defence in depth: never serve an unverified model
        raise CxrError(f"{printable(path)}: unverified model; retrain it or restore the file its card describes")
    cut, cut_source = lm.threshold(cut_given)
    budget = _decode_budget(max_memory_mb)
    if not math.isfinite(watch_s) or watch_s < 0:
        raise CxrError(f"--watch {watch_s}: give seconds ≥ 0 (0: reload only on POST /reload)")
    app = create_app(
        lm,
        cut,
        cut_source,
        int(max_upload_mb * 1e6),
        batch_size,
        limits,
        allow_outside_intended_use,
        reload=_reloader(path, cut_given),
        watch_s=watch_s,
        budget=budget,
    )
    sock = listen(host, port)
    _announce(lm, cut, cut_source, host, sock.getsockname()[1])
    _run_uvicorn(app, sock, path)


def _check_serve_options(
    max_upload_mb: float, max_memory_mb: float, batch_size: int, port: int, threshold: float | None
) -> float | None:
    """Refuse a bad ``cxr serve`` option; the threshold given (None: the model's shipped one).

    Raises:
        CxrError: naming the option and what to give instead.
    """
    from cxr.inference.predict import check_threshold

    if not math.isfinite(max_upload_mb) or not MIN_UPLOAD_MB <= max_upload_mb <= MAX_UPLOAD_MB:
        raise CxrError(
            f"--max-upload-mb {max_upload_mb:g}: give a size from {MIN_UPLOAD_MB:g} to {MAX_UPLOAD_MB:g} MB, e.g. 50 "
            "(no chest film is smaller; none is larger than the decode cap input.max_image_bytes allows)"
        )
    if not math.isfinite(max_memory_mb) or max_memory_mb <= 0:
        raise CxrError(f"--max-memory-mb {max_memory_mb:g}: give megabytes above 0, e.g. 2048")
    if not 1 <= batch_size <= 1024:
        raise CxrError(f"--batch-size {batch_size}: give 1 to 1024 images per model call")
    if not 0 <= port <= 65535:
        raise CxrError(f"--port {port}: give a TCP port from 0 to 65535 (0: any free port)")
    return None if threshold is None else check_threshold(threshold)


def _reloader(path: Path, cut_given: float | None) -> Callable[[], tuple[LoadedModel, float, str]]:
    """What ``POST /reload`` and the watcher call: load ``path`` again, refused unless verified, with its threshold."""
    from cxr.inference.loading import load

    def reload_model() -> tuple[LoadedModel, float, str]:
        fresh = load(path)
        if not fresh.verified:
            raise CxrError(f"{printable(path)}: unverified model")
        new_cut, new_source = fresh.threshold(cut_given)
        return fresh, new_cut, new_source

    return reload_model


def _announce(lm: LoadedModel, cut: float, cut_source: str, host: str, bound: int) -> None:
    """The start-up line (the port actually bound); a warning when the address is not loopback."""
    if not is_loopback(host):
        log.warning("listening on %s, beyond this machine: the service has no authentication", printable(host))
    shown = f"[{host}]" if ":" in host else host
    log.info(
        "serving %s (sha256 %s…, verified; threshold %.4g from %s) on http://%s:%d",
        lm.path.as_posix(),
        lm.sha256[:12],
        cut,
        cut_source,
        shown,
        bound,
    )


def _run_uvicorn(app: FastAPI, sock: socket.socket, path: Path) -> None:
    """Serve ``app`` on ``sock`` until interrupted, uvicorn logging through cxr's handler.

    Raises:
        CxrError: the server did not start.
    """
    import uvicorn

    # The decode budget bounds the work; uvicorn's own limit only bounds sockets. Idle ones are
    # closed by the guarded protocol, so they cannot fill it (cxr.serving.connections).
    config = uvicorn.Config(
        app, http=guarded_protocol(), log_config=None, server_header=False, limit_concurrency=512, lifespan="on"
    )
    # after Config, which sets uvicorn's levels: cxr's one-line handler; a line per request at INFO
    cxr_logger = logging.getLogger("cxr")
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = list(cxr_logger.handlers)
        logger.propagate = False
        logger.setLevel(cxr_logger.level if name == "uvicorn.access" else max(logging.WARNING, cxr_logger.level))
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    if not server.started:
        raise CxrError(f"{printable(path)}: the server did not start (see the lines above)")
