"""Reading the regular files of a tar stream in order, fast: what shard reading needs from ``tarfile``.

``tarfile`` parses every header field into a ``TarInfo`` in Python; for shards of small images (Fashion-MNIST's
are 28 px PNGs of ~350 bytes) that costs more than decoding the image (75 us per sample against 23 here). This
reader takes from each 512-byte header only the name, size, type and checksum, and hands plain tar streams
(ustar, GNU and pax, as written by ``tarfile``, GNU tar and webdataset) to :func:`iter_tar_files`; a compressed
stream (gzip, bzip2, xz) goes through ``tarfile`` as before. Damaged data raises ``tarfile.ReadError`` (a bad
header checksum, a member or header cut short), as ``tarfile`` does.
"""

from __future__ import annotations

import tarfile
from typing import BinaryIO, Iterator

BLOCK = 512
# First bytes of the compressed streams tarfile's "r|*" mode accepts.
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
# Type flags of the members yielded (tarfile's isreg(): regular file, old-style regular file, contiguous file).
_REGULAR = (b"0", b"\0", b"7")


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    """``size`` bytes, or fewer only at the end of the stream."""
    data = stream.read(size)
    if len(data) == size or not data:
        return data
    chunks = [data]
    got = len(data)
    while got < size:
        more = stream.read(size - got)
        if not more:
            break
        chunks.append(more)
        got += len(more)
    return b"".join(chunks)


def _number(field: bytes) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256 (first byte's high bit set)."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise tarfile.ReadError(f"invalid number field {field!r} in a tar header") from None


def _pax_path(data: bytes) -> bytes | None:
    """The ``path`` record of a pax extended header (records are ``"<length> <key>=<value>\\n"``)."""
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise tarfile.ReadError("invalid pax extended header") from None
        if length <= 0:
            raise tarfile.ReadError("invalid pax extended header")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value
        pos += length
    return None


def is_compressed(head: bytes) -> bool:
    """Whether a stream starting with ``head`` is a compressed tar (read it with ``tarfile``)."""
    return head.startswith(_COMPRESSED_MAGIC)


def _check_header(header: bytes) -> None:
    """Raise ``tarfile.ReadError`` unless the header's checksum (unsigned or signed byte sum, as tarfile) holds."""
    stored = _number(header[148:156])
    outside = header[:148] + header[156:]
    unsigned = sum(outside) + 8 * 32  # the checksum field counts as spaces
    if stored != unsigned and stored != unsigned - 256 * sum(1 for b in outside if b > 127):
        raise tarfile.ReadError("bad checksum in a tar header")


def iter_tar_files(stream: BinaryIO, first_block: bytes | None = None) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of each regular file of an uncompressed tar ``stream``, in order.

    ``first_block``: the stream's first 512 bytes if they were already read (to check :func:`is_compressed`).
    Directories, links and other members are skipped; GNU long names (``L``) and pax ``path`` records name the
    member that follows them. Ends at the end-of-archive block, or at the end of the stream after a whole member;
    an empty stream is an error (as for ``tarfile``).
    """
    header = first_block if first_block is not None else _read_exactly(stream, BLOCK)
    if not header:
        raise tarfile.ReadError("empty file")
    long_name: bytes | None = None
    while header and header.count(0) < BLOCK:
        if len(header) < BLOCK:
            raise tarfile.ReadError("unexpected end of data in a tar header")
        _check_header(header)
        size = _number(header[124:136])
        data = _read_exactly(stream, size)
        padding = (-size) % BLOCK  # to the next block: a stream that ends inside it is cut short too (as tarfile)
        if len(data) < size or len(_read_exactly(stream, padding)) < padding:
            raise tarfile.ReadError("unexpected end of data in a tar member")
        kind = header[156:157]
        if kind == b"L":
            long_name = data.split(b"\0", 1)[0]
        elif kind == b"x":
            long_name = _pax_path(data) or long_name
        elif kind not in _REGULAR:  # a directory, link, global pax header, ...: nothing to read
            long_name = None
        else:
            if long_name is not None:
                name, long_name = long_name, None
            else:
                name = header[:100].split(b"\0", 1)[0]
                if header[257:262] == b"ustar":
                    prefix = header[345:500].split(b"\0", 1)[0]
                    if prefix:
                        name = prefix + b"/" + name
            yield name.decode("utf-8", "surrogateescape"), data
        header = _read_exactly(stream, BLOCK)


class Prepended:
    """A read-only stream: ``head``, then the rest of ``stream`` (to hand a stream whose start was read to tarfile)."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self._head = head
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        if not self._head:
            return self._stream.read(size)
        if size is None or size < 0:
            out, self._head = self._head + self._stream.read(), b""
            return out
        out, self._head = self._head[:size], self._head[size:]
        if len(out) < size:
            out += self._stream.read(size - len(out))
        return out


def tarfile_files(tar: tarfile.TarFile) -> Iterator[tuple[str, bytes]]:
    """:func:`iter_tar_files` through ``tarfile`` (compressed streams): ``(name, data)`` of each regular file."""
    for member in tar:
        if member.isreg():
            data = tar.extractfile(member).read()
            tar.members = []  # streaming: do not keep every header in memory
            yield member.name, data


def read_first_block(stream: BinaryIO) -> bytes:
    """The first 512 bytes of ``stream`` (fewer if it is shorter), for :func:`is_compressed`."""
    return _read_exactly(stream, BLOCK)
