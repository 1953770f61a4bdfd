"""Text for messages: one line from an exception, a quoted file-provided name, a size.

Errors quote what hostile files contain, so every message is cut to a line a log can hold.
"""

from __future__ import annotations

from typing import Any

MESSAGE_LIMIT = 300


def one_line(exc: BaseException, limit: int = MESSAGE_LIMIT, with_type: bool = False) -> str:
    """The first line of an exception's message, cut to `limit` characters.

    Keras ends some first lines with a colon and puts the point on the next one ("...error
    message for object X:"), so that line is joined on.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    if with_type and lines:
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quoted(value: Any, limit: int = 80) -> str:
    """A file-provided string, quoted and cut so that it cannot flood a message."""
    text = str(value)
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def readable_bytes(n: int) -> str:
    """1023 bytes, 1.5 KiB, 2.0 GiB: sizes as a reader takes them in."""
    if n < 1024:
        return f"{n} bytes"
    value, units = n / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value, units = value / 1024, units[1:]
    return f"{value:.1f} {units[0]}"
