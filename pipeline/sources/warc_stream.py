"""WARC framing with exact accounting: gzip members, record boundaries, truncation and resynchronisation.

A WARC.gz file is a sequence of gzip members, one record per member (WARC 1.1, annex D). Members are
inflated one at a time with zlib (C speed, bounded memory: a member larger than ``max_member`` is skipped
and booked, never held), and each member's bytes are framed into records by their ``Content-Length``.
A plain ``.warc`` is framed the same way straight from the file.

What every damage becomes — one item each, never a phantom:

* a member (or a plain file) that ends before its record's declared length: that record is
  ``truncated_record``; the records before it are complete and kept;
* a member whose deflate stream or CRC is corrupt: ``corrupt_gzip_member``; reading resumes at the next
  gzip member header whose data inflates to ``WARC/`` (``resync``);
* bytes where a record header should start: ``corrupt_record``; framing resumes at the next line that
  starts a WARC record;
* a member inflating to more than ``max_member`` bytes: ``gzip_member_too_large`` (a whole-file gzip
  stream, which is not a WARC.gz layout; recompress it per record).

Records are handed on as bytes (header + block) for FastWARC to parse, each with the offset of its gzip
member (compressed files) or of itself (plain files): the reader's locator, the same whether the file is
read whole or in ranges. A range ``[start, end)`` of a WARC.gz takes the members that start in it (see
``gzip_records``); a damaged member is booked by the range it starts in, and resynchronisation after it
lands at the latest on the next range's start, which the planner chose by the same test
(``starts_a_member``), so each record and each damage is booked exactly once over the ranges.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b\x08"
MAX_HEADER = 64 * 1024
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)[ \t]*\r\n", re.IGNORECASE)
_RECORD_START = b"\nWARC/1."


@dataclass(frozen=True)
class Framed:
    """One record's bytes, one skipped record (``oversize``: its declared block length) or one damage."""

    offset: int                  # of the gzip member (compressed files) or of the record (plain files)
    data: bytes | None = None    # WARC header + block
    damage: str | None = None
    oversize: int = 0


class _Buffer:
    """A forward-only byte window over ``read``, with the absolute offset of its first byte."""

    def __init__(self, read: Callable[[int], bytes], offset: int = 0):
        self._read = read
        self.data = bytearray()
        self.offset = offset
        self.eof = False

    def fill(self, n: int) -> bool:
        while len(self.data) < n and not self.eof:
            chunk = self._read(CHUNK)
            if chunk:
                self.data += chunk
            else:
                self.eof = True
        return len(self.data) >= n

    def find(self, needle: bytes, limit: int) -> int:
        start = 0
        while True:
            idx = self.data.find(needle, start, limit)
            if idx >= 0 or len(self.data) >= limit or self.eof:
                return idx
            start = max(0, len(self.data) - len(needle) + 1)
            self.fill(len(self.data) + 1)

    def drop(self, n: int) -> int:
        """Discard ``n`` bytes (reading through what is not buffered); returns how many were there."""
        done = 0
        while done < n:
            if not self.data and not self.fill(1):
                break
            step = min(n - done, len(self.data))
            del self.data[:step]
            self.offset += step
            done += step
        return done

    def take(self, n: int) -> bytes:
        out = bytes(self.data[:n])
        self.drop(n)
        return out


def _resync(buf: _Buffer) -> bool:
    """Drop bytes up to the next line that starts a record; False at end of input."""
    while True:
        idx = buf.find(_RECORD_START, len(buf.data) + CHUNK)
        if idx >= 0:
            buf.drop(idx + 1)
            return True
        if buf.eof:
            buf.drop(len(buf.data))
            return False
        buf.drop(max(0, len(buf.data) - len(_RECORD_START)))


def frame_records(read: Callable[[int], bytes], max_record: int, offset: int = 0,
                  report_offset: int | None = None) -> Iterator[Framed]:
    """Records from a byte stream. ``report_offset`` fixes the offset reported (a gzip member's)."""
    buf = _Buffer(read, offset)
    while True:
        while buf.fill(1) and buf.data[:1] in (b"\r", b"\n"):
            buf.drop(1)
        if not buf.data:
            return
        at = buf.offset if report_offset is None else report_offset
        buf.fill(5)
        if not buf.data.startswith(b"WARC/"):
            yield Framed(at, damage="corrupt_record")
            if not _resync(buf):
                return
            continue
        end = buf.find(b"\r\n\r\n", MAX_HEADER)
        if end < 0:
            yield Framed(at, damage="truncated_record" if buf.eof else "corrupt_record")
            if buf.eof or not _resync(buf):
                return
            continue
        header_len = end + 4
        match = _CONTENT_LENGTH.search(buf.data, 0, header_len)
        if match is None:
            yield Framed(at, damage="corrupt_record")
            buf.drop(header_len)
            if not _resync(buf):
                return
            continue
        total = header_len + int(match.group(1))
        if total - header_len > max_record:
            header = bytes(buf.data[:header_len])
            if buf.drop(total) < total:
                yield Framed(at, damage="truncated_record")
                return
            yield Framed(at, data=header, oversize=total - header_len)
            continue
        if not buf.fill(total):
            yield Framed(at, damage="truncated_record")
            return
        yield Framed(at, data=buf.take(total))


def starts_a_member(raw: BinaryIO, at: int) -> bool:
    """Whether a gzip member that inflates to a WARC record header starts at byte ``at``."""
    raw.seek(at)
    head = raw.read(64 * 1024)
    if not head.startswith(GZIP_MAGIC):
        return False
    try:
        return zlib.decompressobj(31).decompress(head, 8).startswith(b"WARC/")
    except zlib.error:
        return False


def next_member(raw: BinaryIO, after: int, limit: int | None = None) -> int | None:
    """The offset of the first plausible gzip member (``starts_a_member``) at or after ``after`` and
    before ``limit`` (the end of the file when None), or None. Used both to resynchronise after a corrupt
    member and, by the planner, to cut a WARC.gz into ranges: the same test, so they agree."""
    pos = after
    while limit is None or pos < limit:
        raw.seek(pos)
        want = CHUNK if limit is None else min(CHUNK, limit - pos)
        chunk = raw.read(want + len(GZIP_MAGIC) - 1)
        if len(chunk) < len(GZIP_MAGIC):
            return None
        idx = chunk.find(GZIP_MAGIC)
        while 0 <= idx < want:  # a magic starting in the overlap is looked at on the next round
            if starts_a_member(raw, pos + idx):
                return pos + idx
            idx = chunk.find(GZIP_MAGIC, idx + 1)
        pos += want
    return None


def gzip_records(raw: BinaryIO, max_record: int, max_member: int, start: int = 0, end: int | None = None,
                 missed: Callable[[int], None] | None = None) -> Iterator[Framed]:
    """Records from a WARC.gz, member by member (``raw`` must be seekable for resynchronisation).

    With a range, reading starts at ``start`` (a member start: the planner checked it with
    ``starts_a_member``) and takes every member that *starts* before ``end``, damaged ones included; the
    member at ``end`` belongs to the next range. A member straddling ``end``, or a resynchronisation that
    lands past it, means ``end`` was not on this file's chain of members (a gzip member stored verbatim
    inside a record): ``missed`` is told where reading stopped instead."""
    if start:
        raw.seek(start)
    pending = b""
    member_start = start
    while True:
        if end is not None and member_start >= end:
            if member_start != end and missed is not None:
                missed(member_start)
            return
        data = pending or raw.read(CHUNK)
        if not data:
            return
        inflater = zlib.decompressobj(31)
        out = bytearray()
        too_large = corrupt = False
        in_offset = member_start
        while True:
            piece = data
            try:
                while piece:
                    produced = inflater.decompress(piece, CHUNK)
                    if not too_large:
                        out += produced
                        if len(out) > max_member:
                            too_large, out = True, bytearray()
                    if inflater.eof:
                        break
                    piece = inflater.unconsumed_tail
            except zlib.error:
                corrupt = True
            if corrupt or inflater.eof:
                break
            in_offset += len(data)
            data = raw.read(CHUNK)
            if not data:
                break
        if corrupt:
            following = next_member(raw, member_start + 1)
            tail = b"" if following is not None else _tail(raw, member_start)
            if following is not None or tail.strip(b"\x00"):
                yield Framed(member_start, damage="corrupt_gzip_member")
            if following is None:
                return
            raw.seek(following)
            member_start, pending = following, b""
            continue
        if too_large:
            yield Framed(member_start, damage="gzip_member_too_large")
        elif out or not inflater.eof:
            records = frame_records(_reader(bytes(out)), max_record, report_offset=member_start)
            yielded = False
            for item in records:
                yielded = True
                yield item
            if not inflater.eof and not yielded:
                yield Framed(member_start, damage="truncated_record")
        if not inflater.eof:
            return  # the file ended inside this member
        pending = inflater.unused_data
        member_start = in_offset + len(data) - len(pending)


def _tail(raw: BinaryIO, at: int) -> bytes:
    raw.seek(at)
    return raw.read(CHUNK)


def _reader(data: bytes) -> Callable[[int], bytes]:
    view = memoryview(data)
    position = 0

    def read(n: int) -> bytes:
        nonlocal position
        chunk = bytes(view[position:position + n])
        position += len(chunk)
        return chunk

    return read
