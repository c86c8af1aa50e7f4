"""A zip archive written as it streams (nothing held whole): Python's zipfile writes to a non-seekable sink
with data descriptors, and each finished member's bytes are handed on at once."""
from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator


class _Sink(io.RawIOBase):
    def __init__(self) -> None:
        self._buffer = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._buffer += data
        return len(data)

    def take(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


def safe_name(text: str) -> str:
    """A member name from user text: no directories, no traversal, nothing a file system would refuse."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:100] or "item"


def zip_stream(members: Iterable[tuple[str, Callable[[], bytes]]]) -> Iterator[bytes]:
    """The archive of (name, read) members; images are stored, not deflated (they are compressed already)."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, read in members:
            archive.writestr(name, read())
            yield sink.take()
    yield sink.take()
