"""A small sequential tar reader: regular members of a stream, as (name, bytes).

Why not `tarfile`: its general-purpose header handling costs about 50 µs per
member, more than decoding and validating a sample together
(docs/benchmarks.md). Shards need much less of tar: POSIX ustar headers, plus
PAX `path`/`size` records and GNU long names, which other writers (webdataset's
TarWriter, GNU tar) emit for long or non-ASCII names. Every header's checksum is
checked; a short read is an error, so truncation is never silent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from egmf.errors import TarFormatError

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
REGULAR = (b"0", b"\0", b"7")


def iter_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """Yield (name, data) of each regular file; stop at the end-of-archive block or at EOF."""
    long_name = long_size = None  # from a PAX or GNU header, for the next member only
    while True:
        header = stream.read(BLOCK)
        if not header or header == ZERO_BLOCK:
            return
        if len(header) < BLOCK:
            raise TarFormatError(f"truncated header ({len(header)} of {BLOCK} bytes)")
        check_checksum(header)
        kind = header[156:157]
        size = parse_number(header[124:136])
        if kind in (b"x", b"L", b"g"):
            data = read_data(stream, size)
            if kind == b"x":
                long_name, long_size = parse_pax(data)
            elif kind == b"L":
                long_name = data.rstrip(b"\0").decode("utf-8")
            continue
        size = long_size if long_size is not None else size
        name = long_name or ustar_name(header)
        long_name = long_size = None
        data = read_data(stream, size)
        if kind in REGULAR:
            yield name, data


def read_data(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    padding = -size % BLOCK
    if len(data) < size or (padding and len(stream.read(padding)) < padding):
        raise TarFormatError(f"truncated member data (expected {size} bytes)")
    return data


def check_checksum(header: bytes) -> None:
    stored = parse_number(header[148:156])
    actual = sum(header[:148]) + 8 * ord(" ") + sum(header[156:])
    if stored != actual:
        raise TarFormatError("bad header checksum (corrupt tar)")


def parse_number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big")
    text = field.rstrip(b"\0 ").strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"bad number field {field!r} (corrupt tar)") from None


def ustar_name(header: bytes) -> str:
    name = header[:100].rstrip(b"\0")
    if header[257:263] == b"ustar\x00":  # POSIX ustar: a prefix field holds the leading directories
        prefix = header[345:500].rstrip(b"\0")
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8")


def parse_pax(data: bytes) -> tuple[str | None, int | None]:
    """The `path` and `size` records of a PAX extended header."""
    name = size = None
    pos = 0
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            name = value.decode("utf-8")
        elif key == b"size":
            size = int(value)
        pos += length
    return name, size
