"""How much memory and CPU uploads may cost the server at once: a decode budget in bytes, and two
decode lanes so that large images cannot starve small ones.

Decoding costs memory in proportion to the pixels an image announces, not to its size on the wire
(a 380 KB PNG can announce 49 megapixels), and sixteen such decodes at once took 5.3 GB. So before a
byte of pixel data is decoded, every request reserves what it will cost:

* its body, before it is read: twice the declared ``Content-Length`` (the chunks, then the joined
  bytes), or twice the upload cap for a chunked body;
* its decode, from the header alone (:func:`decode_cost`): Rows × Columns × frames × 24 bytes for a
  DICOM, width × height × 8 bytes for a JPEG/PNG/BMP. Measured peaks on this code: 20.3 bytes per
  pixel for a 24-megapixel 16-bit DICOM with a window, 3.7 for a 49-megapixel 16-bit RGBA PNG, 1.2
  for a JPEG.

A reservation that does not fit waits up to ``wait_s``; then the request is answered 503 with
``Retry-After``. One that could never fit is answered 413. The total is ``cxr serve
--max-memory-mb`` less what the process holds once the model is loaded.

A request holds its body while it waits for its decode, so bodies alone could fill the budget with
every holder waiting for room only another's release would make: sixty-four 48 MB DICOMs arriving at
once on two busy cores were all refused that way. So decodes are served oldest first: while the
oldest waiting decode does not fit, no new body is admitted and a younger decode that does not fit
either gives way at once (503, its body released) instead of waiting beside it.

Images over :data:`LARGE_PIXELS` decode in their own single-thread lane and may hold at most
``large_share`` of the budget, so a request for a 224-pixel JPEG never queues behind sixteen
49-megapixel PNGs: it has its own threads and its own share of the memory.

asyncio's primitives do not count bytes (a semaphore counts permits), hence this small condition-based
budget.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import functools
import io
import logging
import os
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

log = logging.getLogger("cxr.serve")
T = TypeVar("T")

LARGE_PIXELS = 4_000_000  # a Kermany JPEG is 1-7.8 MP, a flat-panel DICOM about 9-18 MP
DICOM_BYTES_PER_PIXEL = 24
IMAGE_BYTES_PER_PIXEL = 8
DEFAULT_MAX_MEMORY_MB = 2048.0
# batches, responses, drained bodies, TensorFlow's first-call buffers and Python's own allocations beside
# the decodes: with the budget's oldest-first decodes and mapped large allocations, 64 concurrent 48 MB
# DICOMs under a 2 GB bound peaked at 1,466-1,945 MB with 384 MB of headroom, 1,421-1,725 MB with 512
HEADROOM_MB = 512.0


# 1 MB also maps the model's activations, which costs serving 7-12 % of its throughput
# (benchmarks/serve_speed.py, cxrnet at 160 px); 8 MB cost nothing there, but the 64-DICOM load test
# then failed 4 runs of 15 (the one message kept: a 2,090 MB peak over its 2,048 MB bound)
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
TRIM_BYTES = 16_000_000  # a reservation this large hands its freed memory back to the system when it ends


def release_freed_memory() -> None:
    """Hand memory the process freed back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    The budget counts bytes in use, but glibc keeps what a thread freed for that thread's next
    allocations: a body read in 64 KB chunks on the event loop, then a decode's temporaries on a lane,
    each left its own high-water mark resident, and 64 concurrent 48 MB DICOMs peaked at 2.8 GB under
    a 2 GB budget. Trimming after each large reservation ends keeps the resident size near what is held.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def map_large_allocations(threshold: int = MMAP_THRESHOLD) -> None:
    """Have glibc map every allocation of ``threshold`` bytes or more on its own, so freeing it returns
    it to the system at once (``mallopt(M_MMAP_THRESHOLD)``; nothing where the C library is not glibc).

    glibc raises that threshold as the process frees large blocks (up to 32 MB), after which a decode's
    multi-megabyte temporaries come from the heap and stay resident when freed; the budget then counts
    bytes that are free while the process still holds them.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


class BudgetError(Exception):
    """A reservation refused: ``status`` 503 (busy, try again) or 413 (never fits)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def resident_mb() -> float:
    """This process's resident memory now, in MB (from ``/proc``; 0 where there is none)."""
    try:
        with open(f"/proc/{os.getpid()}/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def decode_cost(data: bytes, dicom: bool) -> tuple[int, int]:
    """(bytes, pixels) that decoding ``data`` will cost, from its header alone.

    Args:
        data: the uploaded file.
        dicom: it is a DICOM file (by marker, suffix or content type).

    Returns:
        The estimate; (0, 0) for a header that cannot be parsed (the decoder refuses such a file
        before decoding a pixel, so it costs nothing to find out).
    """
    try:
        if dicom:
            import pydicom

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                head = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
                frames = int(head.get("NumberOfFrames") or 1)
                pixels = int(head.get("Rows") or 0) * int(head.get("Columns") or 0) * frames
            return pixels * DICOM_BYTES_PER_PIXEL, pixels
        from PIL import Image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        pixels = int(width) * int(height)
        return pixels * IMAGE_BYTES_PER_PIXEL, pixels
    except Exception:  # any unparseable header: the decoder refuses it cheaply
        return 0, 0


class DecodeBudget:
    """Bytes that requests may hold at once, a larger share denied to large images, and the two lanes.

    Args:
        total_bytes: the budget.
        wait_s: how long a reservation may wait for room before it is refused (503).
        large_share: the fraction of the budget large-image decodes may hold together.
    """

    def __init__(self, total_bytes: int, wait_s: float = 5.0, large_share: float = 0.75) -> None:
        self.total = int(total_bytes)
        self.large_cap = int(total_bytes * large_share)
        self.wait_s = wait_s
        self.used = 0
        self.used_large = 0
        self.peak = 0
        self._waiting: list[tuple[object, int, bool]] = []  # decodes waiting for room, oldest first
        self._changed: asyncio.Condition | None = None
        self.small_lane = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="cxr-decode")
        self.large_lane = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cxr-decode-large")

    def _fits(self, n: int, large: bool) -> bool:
        return self.used + n <= self.total and (not large or self.used_large + n <= self.large_cap)

    def _starved(self) -> bool:
        """The oldest decode waiting for room does not fit: bodies wait, younger decodes give way."""
        return bool(self._waiting) and not self._fits(self._waiting[0][1], self._waiting[0][2])

    @contextlib.asynccontextmanager
    async def hold(self, n: int, what: str, large: bool = False, body: bool = False) -> AsyncIterator[None]:
        """Hold ``n`` bytes of the budget for the block (``body``: a body about to be received; otherwise a
        decode, served oldest first).

        Raises:
            BudgetError: 413 when ``n`` could never fit; 503 when no room came within ``wait_s``.
        """
        cap = self.large_cap if large else self.total
        if n > cap:
            raise BudgetError(
                413,
                f"{what} needs about {n / 1e6:.0f} MB to decode, more than this server's "
                f"{cap / 1e6:.0f} MB{' for large images' if large else ''} (cxr serve --max-memory-mb)",
            )
        if self._changed is None:
            self._changed = asyncio.Condition()
        changed = self._changed
        busy = BudgetError(503, f"the server is busy decoding other images; retry {what} shortly")
        async with changed:
            await self._wait_for_room(changed, n, large, body, busy)
            self.used += n
            self.used_large += n if large else 0
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            if n >= TRIM_BYTES:
                release_freed_memory()
            async with changed:
                self.used -= n
                self.used_large -= n if large else 0
                changed.notify_all()

    async def _wait_for_room(
        self, changed: asyncio.Condition, n: int, large: bool, body: bool, busy: BudgetError
    ) -> None:
        """Wait (holding ``changed``) until ``n`` bytes fit, by the rules above; ``busy`` when they do not."""
        if body:
            await self._wait(changed, lambda: self._fits(n, large) and not self._starved(), busy)
            return
        entry = (object(), n, large)
        self._waiting.append(entry)
        changed.notify_all()  # a younger decode may now have to give way
        try:
            await self._wait(
                changed, lambda: self._fits(n, large) or (self._waiting[0] is not entry and self._starved()), busy
            )
        finally:
            self._waiting.remove(entry)
            changed.notify_all()
        if not self._fits(n, large):
            raise busy  # gave way to an older decode

    async def _wait(self, changed: asyncio.Condition, ready: Callable[[], bool], busy: BudgetError) -> None:
        try:
            await asyncio.wait_for(changed.wait_for(ready), self.wait_s)
        except asyncio.TimeoutError:
            raise busy from None

    async def run(self, large: bool, func: Callable[..., T], *args: object) -> T:
        """``func(*args)`` in the lane for its size."""
        lane = self.large_lane if large else self.small_lane
        return await asyncio.get_running_loop().run_in_executor(lane, func, *args)

    def close(self) -> None:
        self.small_lane.shutdown(wait=False, cancel_futures=True)
        self.large_lane.shutdown(wait=False, cancel_futures=True)
