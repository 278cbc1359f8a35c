"""Logging like a tool: one line per meaningful event, quiet and parseable in CI."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


_OUR_LOGGERS = ("cxr", "tasks", "flows")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is *now* (a caller or test may have swapped it since)."""

    _cxr = True  # marks the handler setup_logging added: a second call replaces it instead of stacking one

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


_NOISY_LOGGERS = ("httpx", "httpcore", "urllib3", "matplotlib", "PIL")


def setup_logging(level: str | None = None) -> None:
    """Send our loggers' events to stderr, one line each (level from ``CXR_LOG_LEVEL``).

    Our loggers (``cxr``, ``tasks``, ``flows``) do not propagate to the root logger, so a host that
    also logs there (Prefect's console handler) does not print each line twice; chatty libraries
    (httpx, urllib3, matplotlib, PIL) are held at WARNING. Calling it again replaces the handler it
    added before instead of stacking a second one.

    Args:
        level: a logging level name (``DEBUG``, ``INFO``...; any case); None reads
            ``CXR_LOG_LEVEL``, default ``INFO``.
    """
    level = (level or os.environ.get("CXR_LOG_LEVEL", "INFO")).upper()
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    for name in _OUR_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not getattr(h, "_cxr", False)]
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))


def interactive() -> bool:
    """True when a person watches a terminal (progress bars), False in CI and pipes.

    Returns:
        False when ``CI`` or ``CXR_NO_PROGRESS`` is set, else whether stderr is a terminal.
    """
    if os.environ.get("CI") or os.environ.get("CXR_NO_PROGRESS"):
        return False
    return sys.stderr.isatty()


def progress(items: Iterable[T], total: int | None, desc: str) -> Iterator[T]:
    """Wrap ``items`` in a progress bar on a terminal; plain iteration otherwise.

    The bar is tqdm's, on stderr, counted in images and cleared when done; without tqdm installed,
    or when :func:`interactive` is False, the items pass through untouched.

    Args:
        items: what to iterate over.
        total: the number of items, for the bar's length (None when unknown).
        desc: the bar's label.

    Returns:
        An iterator over ``items``, in order.
    """
    if not interactive():
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm arrives with dvc and kaggle; stay usable without it
        yield from items
        return
    yield from tqdm(items, total=total, desc=desc, unit="img", leave=False, file=sys.stderr)
