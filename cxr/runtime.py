"""Import and configure TensorFlow quietly, once, and keep its C++ log off stderr where it is noise.

TensorFlow logs from C++ (absl) straight to file descriptor 2, so Python cannot filter it. Three
kinds of it reach a user who did nothing wrong:

- the start-up banner (oneDNN, "Could not find cuda drivers"), printed during the import before
  ``TF_CPP_MIN_LOG_LEVEL`` is even read;
- ``E0000 ... cuda_platform.cc ... failed call to cuInit`` on a machine without a GPU, logged at
  ERROR level (so level 2 does not hide it) the first time the devices are listed;
- ``E0000 ... jpeg_mem.cc ... Premature end of JPEG data`` while a truncated JPEG is decoded,
  which the caller reports anyway, as one line naming the file.

So the import and the first device listing run with fd 2 captured (:func:`native_stderr`); the
known no-GPU line is dropped and anything else is passed on. Decoders capture fd 2 the same way and
turn TensorFlow's words into their own one-line message (:func:`decoder_messages`).

``TF_CPP_MIN_LOG_LEVEL`` defaults to 2 (no INFO or WARNING lines); a value the user set wins: 0 or
1 turns the capturing off (every C++ line is shown as TensorFlow prints it), 3 hides ERROR lines
too. It must be set before TensorFlow is imported, which is why this module sets it at import time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any

from cxr.errors import CxrError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

log = logging.getLogger(__name__)

# ``E0000 00:00:1795936012.141670   12439 jpeg_mem.cc:331] Premature end of JPEG data.``: absl's prefix
_ABSL_LINE = re.compile(r"^[IWEF]\d{4} [\d:. ]+\s*\d+ ([\w./-]+\.cc):\d+\] (.*)$")
# what an image decoder (libjpeg, libpng, GIF, BMP) logs about a damaged file
DECODER_LINE = re.compile(r"^[IWEF]\d{4} .*\b\w*(jpeg|png|gif|bmp)\w*\.cc:\d+\]", re.IGNORECASE)
# the no-GPU line, and the banner absl prints before its logging is set up
_NO_GPU = re.compile(r"failed call to cuInit|Could not find cuda drivers|All log messages before absl::InitializeLog")
_fd2_lock = threading.RLock()  # one capture at a time: fd 2 is the process's, not a thread's


def verbose_native_log() -> bool:
    """True when the user asked for TensorFlow's INFO or WARNING lines (``TF_CPP_MIN_LOG_LEVEL`` 0 or 1).

    Returns:
        Whether captured C++ output should be shown as TensorFlow printed it.
    """
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2").strip() in ("0", "1")


@dataclass
class Captured:
    """What C/C++ code wrote to fd 2 inside a :func:`native_stderr` block (filled when the block ends)."""

    text: str = ""

    def lines(self) -> list[str]:
        return [line for line in self.text.splitlines() if line.strip()]


@contextlib.contextmanager
def native_stderr(quiet_on: tuple[type[BaseException], ...] = ()) -> Iterator[Captured]:
    """Capture file descriptor 2 (C and C++ writers, and Python's ``sys.stderr``) for the block.

    Captures do not nest across threads: a process-wide lock lets one block hold fd 2 at a time.
    With ``TF_CPP_MIN_LOG_LEVEL`` 0 or 1 nothing is captured (the user asked to see it all).

    Args:
        quiet_on: when the block raises, what was captured is written to stderr before the
            exception propagates (the context of a failed import, of an interruption), unless the
            exception is one of these (a decoder's error, which the caller turns into one line).

    Returns:
        A context manager yielding a :class:`Captured`, whose ``text`` is set when the block ends.
    """
    captured = Captured()
    if verbose_native_log():
        yield captured
        return
    with _fd2_lock:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            with tempfile.TemporaryFile(mode="w+b") as sink:
                os.dup2(sink.fileno(), 2)
                try:
                    yield captured
                finally:
                    sys.stderr.flush()
                    os.dup2(saved, 2)
                    sink.seek(0)
                    captured.text = sink.read().decode(errors="replace")
        except BaseException as exc:
            if captured.text and not isinstance(exc, quiet_on):
                sys.stderr.write(captured.text)
            raise
        finally:
            os.close(saved)


def pass_on(captured: Captured, drop: re.Pattern[str] | None = None) -> list[str]:
    """Write the captured lines that are not noise back to stderr; return the C++ messages dropped.

    Args:
        captured: the capture.
        drop: lines to drop (default: the no-GPU lines).

    Returns:
        The messages of the dropped lines, without absl's prefix.
    """
    drop = drop or _NO_GPU
    dropped: list[str] = []
    kept: list[str] = []
    for line in captured.lines():
        (dropped if drop.search(line) else kept).append(line)
    if kept:
        sys.stderr.write("\n".join(kept) + "\n")
        sys.stderr.flush()
    return [message(line) for line in dropped]


def message(line: str) -> str:
    """The text of one absl log line without its prefix (``E0000 <time> <thread> <file>:<line>] ``).

    Args:
        line: a line TensorFlow's C++ code logged.

    Returns:
        The message after the prefix; the line itself when it has none.
    """
    match = _ABSL_LINE.match(line.strip())
    return match.group(2).strip() if match else line.strip()


def decoder_messages(captured: Captured) -> list[str]:
    """The messages image decoders (libjpeg, libpng, GIF, BMP) logged during a capture.

    Args:
        captured: fd 2 captured around a decode.

    Returns:
        Their messages without absl's prefix (``Premature end of JPEG data. Stopped at line 18/38``).
    """
    return [message(line) for line in captured.lines() if DECODER_LINE.search(line.strip())]


@cache
def tensorflow() -> ModuleType:
    """The ``tensorflow`` module, imported without its start-up noise, its devices listed once.

    Cached: the first call imports TensorFlow with fd 2 captured (replayed if the import fails, logged
    at DEBUG otherwise), sets its Python logger to ERROR, and lists the physical devices with fd 2 captured, so the
    no-GPU ``failed call to cuInit`` line is dropped (logged at DEBUG instead); any other line is
    passed on. Later calls return the same module.

    Returns:
        The ``tensorflow`` module.
    """
    with native_stderr() as banner:
        import tensorflow as tf
    for line in banner.lines():  # the start-up banner is noise by nature; shown when the import fails
        log.debug("TensorFlow import: %s", message(line))
    tf.get_logger().setLevel("ERROR")
    with native_stderr() as discovery:
        gpus = tf.config.list_physical_devices("GPU")
    for line in pass_on(discovery):
        log.debug("TensorFlow device discovery (%d GPU): %s", len(gpus), line)
    return tf


def cpu_has_bf16() -> bool:
    """True on CPUs with native bfloat16 arithmetic (AVX512-BF16 or AMX).

    Returns:
        Whether ``/proc/cpuinfo`` lists ``avx512_bf16`` or ``amx_bf16``; False where it cannot be
        read (not Linux).
    """
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def configure(seed: int, deterministic: bool, precision: str = "auto") -> str:
    """Seed every RNG, set op determinism and the mixed-precision policy; return the policy used.

    Args:
        seed: seeds Python's ``random``, NumPy and TensorFlow (``keras.utils.set_random_seed``).
        deterministic: turn on TensorFlow's op determinism (same data + seed → same weights, at
            some speed).
        precision: ``auto`` (``mixed_float16`` with a GPU, ``mixed_bfloat16`` on a CPU with native
            bfloat16, else ``float32``), ``float32``, ``bfloat16`` or ``float16``.

    Returns:
        The Keras global dtype policy now set: ``float32``, ``mixed_bfloat16`` or ``mixed_float16``.

    Raises:
        CxrError: ``precision`` is none of those.
    """
    if precision != "auto" and precision not in PRECISIONS:
        raise CxrError(f"precision={precision!r}: choose one of auto, {', '.join(PRECISIONS)}")
    tf = tensorflow()
    import keras

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    gpus = tf.config.list_physical_devices("GPU")  # listed quietly once by tensorflow()
    if precision == "auto":
        policy = "mixed_float16" if gpus else ("mixed_bfloat16" if cpu_has_bf16() else "float32")
    else:
        policy = PRECISIONS[precision]
    keras.mixed_precision.set_global_policy(policy)
    return policy


def distribution(kind: str = "auto") -> Any:
    """The tf.distribute strategy to build and train under.

    Args:
        kind: ``auto``: MirroredStrategy when more than one GPU is visible, else the default (one
            device); ``mirrored``: MirroredStrategy over every GPU, or every logical CPU when there
            is no GPU (tests split the CPU into logical devices); ``none``: the default strategy.

    Returns:
        The ``tf.distribute.Strategy`` whose scope the model is built and trained in.

    Raises:
        ValueError: ``kind`` is not ``auto``, ``mirrored`` or ``none``.
    """
    tf = tensorflow()
    if kind not in ("auto", "mirrored", "none"):
        raise ValueError(f"distribute={kind!r}: choose auto, mirrored or none")
    with native_stderr() as noise:
        gpus = tf.config.list_logical_devices("GPU")
    pass_on(noise)
    if kind == "none" or (kind == "auto" and len(gpus) < 2):
        return tf.distribute.get_strategy()
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices=devices)
