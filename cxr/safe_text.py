"""Text from outside (file names, card fields) made safe to print on one line."""

from __future__ import annotations

import os


def printable(value: object) -> str:
    """``value`` as text safe to print on one line: control characters and undecodable bytes escaped.

    A file name can carry a newline or a terminal escape; printed raw it could forge a line of output.

    Args:
        value: a path, string or bytes.

    Returns:
        The text, with each control character (and each byte that is not UTF-8) as a ``\\xNN``,
        ``\\n``... escape.
    """
    if isinstance(value, bytes):
        text = value.decode("utf-8", errors="backslashreplace")
    else:
        text = os.fsdecode(value) if isinstance(value, os.PathLike) else str(value)
        text = text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")
    out = []
    for ch in text:
        if ch == "\\" or ch.isprintable() or ch == " ":
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def is_utf8(text: str) -> bool:
    """Whether ``text`` (a name read from the file system) is valid UTF-8, i.e. carries no escaped bytes.

    Args:
        text: a ``str`` from ``os.fsdecode``; undecodable bytes appear in it as lone surrogates.

    Returns:
        True when it encodes to UTF-8.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
