"""tar_stream: the fast reader of shard tars against Python's tarfile, on archives written by tarfile in each of its
formats and by webdataset, and on damaged ones."""

import gzip
import io
import tarfile

import pytest
import webdataset as wds

from dinoscale.data.sources.shards import iter_shard
from dinoscale.data.sources.tar_stream import iter_tar_files


def tarfile_view(data: bytes):
    """(name, bytes) of the regular members, as tarfile reads them."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


def build(fmt, members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, payload, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "elsewhere"
            info.size = len(payload) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


MEMBERS = [
    ("000000.png", b"\x89PNG" + bytes(range(256)) * 3, tarfile.REGTYPE),
    ("000000.cls", b"7", tarfile.REGTYPE),
    ("dir", b"", tarfile.DIRTYPE),
    ("link", b"", tarfile.SYMTYPE),
    ("empty.txt", b"", tarfile.REGTYPE),
    ("a/" + "long-directory-name/" * 8 + "000001.jpg", b"x" * 1000, tarfile.REGTYPE),  # > 100 bytes: prefix or L
    ("caf\u00e9/000002.png", b"y" * 512, tarfile.REGTYPE),  # non-ASCII: a pax header in PAX_FORMAT
    ("000003.png", b"z" * 513, tarfile.REGTYPE),
]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reads_what_tarfile_reads(fmt):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else [m for m in MEMBERS if m[0].isascii()]
    data = build(fmt, members)
    expected = tarfile_view(data)
    assert len(expected) == sum(kind == tarfile.REGTYPE for _, _, kind in members)
    assert list(iter_tar_files(io.BytesIO(data))) == expected


def test_reads_webdataset_shards(tmp_path):
    path = tmp_path / "shard.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(5):
            sink.write({"__key__": f"{i:06d}", "png": bytes([i]) * (100 + 300 * i), "cls": str(i).encode()})
    data = path.read_bytes()
    assert list(iter_tar_files(io.BytesIO(data))) == tarfile_view(data)


def test_damage_raises_read_error():
    """A bad checksum or a header or member (its padding included) cut short raises tarfile.ReadError. (tarfile's
    stream mode raises for a cut member and an empty stream, but takes a damaged or cut header after the first
    member for the end of the archive: the rest of such a shard would be lost without a word, unless an index gave
    its count.)"""
    data = build(tarfile.GNU_FORMAT, MEMBERS)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        second = tar.getmembers()[1].offset  # where the second member's header starts
    damaged_header = bytearray(data)
    damaged_header[second + 130] ^= 0x01  # a size digit: the header's checksum fails
    cut_member = data[: 512 + 100]  # inside the first member's data
    cut_padding = build(tarfile.GNU_FORMAT, [("a.cls", b"1", tarfile.REGTYPE)] * 2)[: 512 + 100]  # data whole
    cut_header = data[: second + 200]  # inside the second header
    for bad in (bytes(damaged_header), cut_member, cut_padding, cut_header, b""):
        with pytest.raises(tarfile.ReadError):
            list(iter_tar_files(io.BytesIO(bad)))
    for bad in (cut_member, cut_padding, b""):
        with pytest.raises(tarfile.ReadError):
            tarfile_view(bad)
    assert len(tarfile_view(bytes(damaged_header))) == 1 and len(tarfile_view(cut_header)) == 1


def test_iter_shard_reads_plain_and_gzipped_shards_alike(tmp_path):
    plain = tmp_path / "a.tar"
    with wds.TarWriter(str(plain)) as sink:
        for i in range(4):
            sink.write({"__key__": f"{i:06d}", "png": bytes([i]) * 700, "cls": str(i).encode()})
    packed = tmp_path / "a.tar.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    read = [list(iter_shard(str(p))) for p in (plain, packed)]
    assert [(s.key, s.data, s.label) for s in read[0]] == [(s.key, s.data, s.label) for s in read[1]]
    assert [s.label for s in read[0]] == [0, 1, 2, 3] and read[0][2].data == bytes([2]) * 700
