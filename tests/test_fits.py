"""The FITS content check on real files written by astropy: complete files pass and are
described exactly; truncated, padded, corrupted, foreign and changing files fail with a
reason that names the problem."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits as afits

from contimg_publisher import fits
from contimg_publisher.fits import FitsError, hash_fd, is_fits_signature, scan_fits

BLOCK = 2880
PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489")


# --- files ------------------------------------------------------------------------------------

def mosaic_hdu(pixels: int = 64) -> afits.PrimaryHDU:
    data = np.random.default_rng(1).normal(0.0, 1e-4, (pixels, pixels + 3)).astype(np.float32)
    hdu = afits.PrimaryHDU(data)
    h = hdu.header
    h["OBJECT"] = "DSA110_MOSAIC"
    h["BUNIT"] = "Jy/beam"
    h["DATE-OBS"] = "2026-11-28T03:04:05"
    h["MJD-OBS"] = 61007.127836
    h["CRVAL1"] = 180.25
    h["CRVAL2"] = 37.0
    h["NIMAGES"] = 10
    h["MEDRMS"] = 1.1e-4
    h["EFFNOISE"] = 3.2e-5
    h["COVERAGE"] = 0.97
    h["TELESCOP"] = "DSA-110"  # not a metadata key: must not be reported
    return hdu


EXPECTED_METADATA = {
    "OBJECT": "DSA110_MOSAIC", "DATE-OBS": "2026-11-28T03:04:05", "MJD-OBS": 61007.127836,
    "CRVAL1": 180.25, "CRVAL2": 37.0, "NAXIS1": 67, "NAXIS2": 64, "BUNIT": "Jy/beam",
    "NIMAGES": 10, "MEDRMS": 1.1e-4, "EFFNOISE": 3.2e-5, "COVERAGE": 0.97,
}


def write_mosaic(path: Path, checksum: bool, pixels: int = 64) -> Path:
    mosaic_hdu(pixels).writeto(path, overwrite=True, checksum=checksum)
    return path


def write_multi(path: Path, checksum: bool) -> Path:
    primary = afits.PrimaryHDU()
    primary.header["OBJECT"] = "group_7"
    image = afits.ImageHDU(np.arange(100 * 77, dtype=np.int16).reshape(100, 77), name="WEIGHT")
    rows = np.array([np.arange(n, dtype=np.int32) for n in (1, 5, 300)], dtype=object)
    table = afits.BinTableHDU.from_columns([
        afits.Column(name="samples", format="PJ()", array=rows),
        afits.Column(name="label", format="10A", array=np.array(["a", "bb", "ccc"])),
    ], name="SAMPLES")
    afits.HDUList([primary, image, table]).writeto(path, overwrite=True, checksum=checksum)
    return path


def raw_header(*cards: str, end: bool = True) -> bytes:
    """Header blocks from card texts, as a FITS writer lays them out."""
    text = "".join(card.ljust(80) for card in cards) + ("END".ljust(80) if end else "")
    return text.ljust(-(-len(text) // BLOCK) * BLOCK).encode("ascii")


@pytest.fixture
def open_fd() -> Iterator:
    fds: list[int] = []

    def opener(path: Path, flags: int = os.O_RDONLY) -> int:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
        fds.append(fd)
        return fd

    yield opener
    for fd in fds:
        os.close(fd)


def data_start(path: Path, index: int = 0) -> int:
    with afits.open(path) as hdul:
        return hdul.fileinfo(index)["datLoc"]


def scan_error(path: Path, open_fd, **kwargs) -> str:
    with pytest.raises(FitsError) as info:
        scan_fits(open_fd(path), **kwargs)
    assert str(info.value) == info.value.reason
    return info.value.reason


def ones_complement_sum(data: bytes) -> int:
    """The FITS checksum sum computed the slow, obvious way, to check the fast one against."""
    total = 0
    for (word,) in np.frombuffer(data, dtype=">u4").reshape(-1, 1).tolist():
        total += word
        if total > 0xFFFFFFFF:
            total = (total & 0xFFFFFFFF) + 1
    return total


# --- signature --------------------------------------------------------------------------------

def test_signature_is_the_simple_card_by_content() -> None:
    assert is_fits_signature(b"SIMPLE  =                    T / conforms")
    assert is_fits_signature(memoryview(b"SIMPLE  =  T"))
    assert not is_fits_signature(b"XTENSION= 'IMAGE   '")
    assert not is_fits_signature(b"simple  =                    T")
    assert not is_fits_signature(b"SIMPLE =                     T")
    assert not is_fits_signature(PNG)
    assert not is_fits_signature(b"SIMPLE")
    assert not is_fits_signature(b"")


# --- complete files ---------------------------------------------------------------------------

def test_image_without_checksums(tmp_path: Path, open_fd) -> None:
    path = write_mosaic(tmp_path / "nightly_20261128.fits", checksum=False)
    raw = path.read_bytes()
    report = scan_fits(open_fd(path))
    assert report.size == len(raw) == data_start(path) + 64 * 67 * 4 + (-64 * 67 * 4) % BLOCK
    assert report.hdus == 1
    assert report.checksum == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert report.metadata == EXPECTED_METADATA
    assert json.loads(json.dumps(report.metadata)) == EXPECTED_METADATA
    assert report.fits_checksums == "absent"


def test_image_with_checksums(tmp_path: Path, open_fd) -> None:
    path = write_mosaic(tmp_path / "nightly_20261128.fits", checksum=True)
    raw = path.read_bytes()
    header = afits.getheader(path)
    assert "CHECKSUM" in header and "DATASUM" in header
    report = scan_fits(open_fd(path), algorithm="blake2b", chunk_size=BLOCK)
    assert report.size == len(raw)
    assert report.hdus == 1
    assert report.checksum == "blake2b:" + hashlib.blake2b(raw).hexdigest()
    assert report.metadata == EXPECTED_METADATA
    assert report.fits_checksums == "verified"


def test_fast_sum_matches_the_plain_definition(tmp_path: Path, open_fd) -> None:
    path = write_mosaic(tmp_path / "m.fits", checksum=True)
    raw = path.read_bytes()
    datasum = int(afits.getheader(path)["DATASUM"])
    start = data_start(path)
    assert fits._fold(fits._word_sum(raw[start:])) == ones_complement_sum(raw[start:]) == datasum
    assert fits._fold(fits._word_sum(raw)) == ones_complement_sum(raw) == 0xFFFFFFFF


def test_metadata_keeps_only_json_values(tmp_path: Path, open_fd) -> None:
    hdu = afits.PrimaryHDU(np.zeros((4, 5), dtype=np.float32))
    hdu.header["OBJECT"] = "x"
    hdu.header["BUNIT"] = None            # a keyword without a value
    hdu.header["NIMAGES"] = 3
    hdu.header["COVERAGE"] = True
    path = tmp_path / "m.fits"
    hdu.writeto(path)
    report = scan_fits(open_fd(path))
    assert report.metadata == {"OBJECT": "x", "NAXIS1": 5, "NAXIS2": 4, "BUNIT": None,
                               "NIMAGES": 3, "COVERAGE": True}


def test_multi_hdu_with_variable_length_column(tmp_path: Path, open_fd) -> None:
    path = write_multi(tmp_path / "group_7.fits", checksum=True)
    raw = path.read_bytes()
    with afits.open(path) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "WEIGHT", "SAMPLES"]
        assert hdul[2].header["PCOUNT"] > 0  # the heap of the variable-length column
    expected = "sha256:" + hashlib.sha256(raw).hexdigest()
    for chunk in (BLOCK, 5 * BLOCK, 5 * BLOCK + 100, 8 << 20):
        report = scan_fits(open_fd(path), chunk_size=chunk)
        assert (report.hdus, report.size, report.checksum) == (3, len(raw), expected)
        assert report.metadata == {"OBJECT": "group_7"}
        assert report.fits_checksums == "verified"
    plain = write_multi(tmp_path / "group_8.fits", checksum=False)
    report = scan_fits(open_fd(plain))
    assert (report.hdus, report.fits_checksums) == (3, "absent")


def test_random_groups_primary(tmp_path: Path, open_fd) -> None:
    data = afits.GroupData(np.arange(6 * 3 * 2, dtype=np.float32).reshape(6, 1, 3, 2),
                           parnames=["UU", "VV"], pardata=[np.arange(6.0), np.arange(6.0)],
                           bitpix=-32)
    path = tmp_path / "uv.fits"
    afits.GroupsHDU(data).writeto(path, checksum=True)
    header = afits.getheader(path)
    assert header["GROUPS"] is True and header["NAXIS1"] == 0 and header["GCOUNT"] == 6
    report = scan_fits(open_fd(path))
    assert (report.hdus, report.size, report.fits_checksums) == (1, 2 * BLOCK, "verified")


def test_extension_appended_whole_is_one_more_hdu(tmp_path: Path, open_fd) -> None:
    path = write_mosaic(tmp_path / "m.fits", checksum=True)
    afits.append(path, np.ones((3, 3), dtype=np.float64), checksum=True)
    report = scan_fits(open_fd(path))
    assert (report.hdus, report.fits_checksums) == (2, "verified")
    assert report.checksum == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_file_position_does_not_matter(tmp_path: Path, open_fd) -> None:
    path = write_multi(tmp_path / "m.fits", checksum=True)
    fd = open_fd(path)
    first = scan_fits(fd)
    os.lseek(fd, 12345, os.SEEK_SET)
    assert scan_fits(fd, chunk_size=BLOCK) == first
    assert os.lseek(fd, 0, os.SEEK_CUR) == 12345


# --- incomplete files -------------------------------------------------------------------------

def test_truncated_at_several_points(tmp_path: Path, open_fd) -> None:
    full = tmp_path / "full.fits"
    hdu = mosaic_hdu(100)
    for n in range(40):
        hdu.header.add_history(f"mosaic tile {n}")
    hdu.writeto(full, overwrite=True, checksum=True)
    raw = full.read_bytes()
    header_bytes = len(raw) - 100 * 103 * 4 - (-100 * 103 * 4) % BLOCK
    assert header_bytes == 2 * BLOCK
    data_needed = len(raw) - header_bytes
    cuts = {
        1000: f"truncated: HDU 0 header block at byte 0 has only 1000 of {BLOCK} bytes "
              "(file size 1000)",
        BLOCK + 80: f"truncated: HDU 0 header block at byte {BLOCK} has only 80 of {BLOCK}",
        BLOCK: "truncated: HDU 0 header has no END card and the file ends after 2880 of its",
        header_bytes: f"truncated: HDU 0 data needs {data_needed} bytes from byte "
                      f"{header_bytes}, file ends after 0 of them",
        header_bytes + 1001: f"truncated: HDU 0 data needs {data_needed} bytes from byte "
                             f"{header_bytes}, file ends after 1001 of them",
        header_bytes + 4 * BLOCK: f"file ends after {4 * BLOCK} of them "
                                  f"(file size {header_bytes + 4 * BLOCK})",
        len(raw) - 1: f"file ends after {data_needed - 1} of them",
    }
    for cut, reason in cuts.items():
        path = tmp_path / f"cut_{cut}.fits"
        path.write_bytes(raw[:cut])
        assert reason in scan_error(path, open_fd, chunk_size=BLOCK), cut
        assert reason in scan_error(path, open_fd), cut


def test_truncated_in_a_later_hdu(tmp_path: Path, open_fd) -> None:
    raw = write_multi(tmp_path / "full.fits", checksum=True).read_bytes()
    with afits.open(tmp_path / "full.fits") as hdul:
        starts = [hdul.fileinfo(i)["hdrLoc"] for i in range(3)]
        data_starts = [hdul.fileinfo(i)["datLoc"] for i in range(3)]
    path = tmp_path / "cut.fits"
    path.write_bytes(raw[:starts[2] + 100])
    assert scan_error(path, open_fd) == (
        f"truncated: HDU 2 header block at byte {starts[2]} has only 100 of {BLOCK} bytes "
        f"(file size {starts[2] + 100})")
    path.write_bytes(raw[:data_starts[2]])
    assert scan_error(path, open_fd) == (
        f"truncated: HDU 2 data needs {len(raw) - data_starts[2]} bytes from byte "
        f"{data_starts[2]}, file ends after 0 of them (file size {data_starts[2]})")
    path.write_bytes(raw[:data_starts[1] + BLOCK])
    assert scan_error(path, open_fd).startswith(
        f"truncated: HDU 1 data needs {starts[2] - data_starts[1]} bytes from byte "
        f"{data_starts[1]}, file ends after {BLOCK} of them")


def test_header_without_end_card(tmp_path: Path, open_fd) -> None:
    path = write_mosaic(tmp_path / "m.fits", checksum=False)
    raw = bytearray(path.read_bytes())
    end = raw.index(b"END" + b" " * 77)
    raw[end:end + 3] = b"   "
    path.write_bytes(raw)
    # The header runs on into the pixels, which are not text.
    assert re.fullmatch(r"HDU 0 header has no END card: byte \d+ is 0x[0-9a-f]{2}, "
                        r"not header text", scan_error(path, open_fd))
    header_only = tmp_path / "header_only.fits"
    header_only.write_bytes(raw_header("SIMPLE  =                    T",
                                       "BITPIX  =                    8",
                                       "NAXIS   =                    0", end=False))
    assert scan_error(header_only, open_fd) == (
        "truncated: HDU 0 header has no END card and the file ends after 2880 of its bytes "
        "(header starts at byte 0)")


def test_wrong_datasum(tmp_path: Path, open_fd) -> None:
    path = write_mosaic(tmp_path / "m.fits", checksum=True)
    stated = int(afits.getheader(path)["DATASUM"])
    start = data_start(path)
    raw = bytearray(path.read_bytes())
    raw[start + 10] ^= 0x01
    path.write_bytes(raw)
    actual = ones_complement_sum(bytes(raw[start:]))
    assert actual != stated
    assert scan_error(path, open_fd) == (
        f"HDU 0 DATASUM mismatch: header says {stated}, data gives {actual}")


def test_wrong_checksum_after_header_edit(tmp_path: Path, open_fd) -> None:
    path = write_mosaic(tmp_path / "m.fits", checksum=True)
    raw = path.read_bytes().replace(b"'DSA110_MOSAIC'", b"'DSA110_MOSAIX'")
    path.write_bytes(raw)
    reason = scan_error(path, open_fd)
    assert reason.startswith("HDU 0 CHECKSUM mismatch: header and data sum to 0x")
    assert reason.endswith("the header changed after CHECKSUM was written")


def test_wrong_checksum_in_an_extension(tmp_path: Path, open_fd) -> None:
    path = write_multi(tmp_path / "m.fits", checksum=True)
    with afits.open(path) as hdul:
        in_heap = hdul.fileinfo(2)["datLoc"] + hdul[2].header["NAXIS1"] * 3 + 40
    raw = bytearray(path.read_bytes())
    raw[in_heap] ^= 0x80
    path.write_bytes(raw)
    assert scan_error(path, open_fd).startswith("HDU 2 DATASUM mismatch: header says ")


# --- foreign files ----------------------------------------------------------------------------

def test_not_fits(tmp_path: Path, open_fd) -> None:
    png = tmp_path / "preview.fits"
    png.write_bytes(PNG * 100)
    assert scan_error(png, open_fd) == (
        "not a FITS file: it does not start with the card 'SIMPLE  ='")
    empty = tmp_path / "empty.fits"
    empty.write_bytes(b"")
    assert scan_error(empty, open_fd) == "empty file (0 bytes)"
    zeros = tmp_path / "zeros.fits"
    zeros.write_bytes(bytes(BLOCK))
    assert scan_error(zeros, open_fd).startswith("not a FITS file")
    false = tmp_path / "false.fits"
    false.write_bytes(raw_header("SIMPLE  =                    F", "BITPIX  =                    8",
                                 "NAXIS   =                    0"))
    assert scan_error(false, open_fd) == (
        "not a standard FITS file: the primary header has SIMPLE = F, not T")


def test_header_that_does_not_parse(tmp_path: Path, open_fd) -> None:
    path = tmp_path / "bad.fits"
    path.write_bytes(raw_header("SIMPLE  =                    T", "BITPIX  =                  -32",
                                "NAXIS   = two"))
    assert scan_error(path, open_fd) == (
        "HDU 0 header card 3 (NAXIS) cannot be parsed: 'NAXIS   = two'")
    path.write_bytes(raw_header("SIMPLE  =                    T", "BITPIX  =                   12",
                                "NAXIS   =                    0"))
    assert scan_error(path, open_fd) == (
        "HDU 0 header has BITPIX = 12, not one of 8, 16, 32, 64, -32, -64")
    path.write_bytes(raw_header("SIMPLE  =                    T", "BITPIX  =                    8",
                                "NAXIS   =                    2", "NAXIS1  =                   10"))
    assert scan_error(path, open_fd) == "HDU 0 header lacks the mandatory keyword NAXIS2"
    path.write_bytes(raw_header("SIMPLE  =                    T", "BITPIX  =                    8",
                                "NAXIS   =                    1", "NAXIS1  =                 -10"))
    assert scan_error(path, open_fd) == (
        "HDU 0 header has NAXIS1 = -10, not an integer >= 0")
    header = bytearray(raw_header("SIMPLE  =                    T",
                                  "BITPIX  =                    8",
                                  "NAXIS   =                    0", "COMMENT cafe"))
    header[80 * 3 + 11] = 0xE9  # Latin-1 in a header card
    path.write_bytes(header)
    assert scan_error(path, open_fd) == (
        "HDU 0 header has no END card: byte 251 is 0xe9, not header text")


def test_extra_bytes_after_the_last_hdu(tmp_path: Path, open_fd) -> None:
    path = write_mosaic(tmp_path / "m.fits", checksum=True)
    size = path.stat().st_size
    with path.open("ab") as f:
        f.write(b"garbage\n")
    assert scan_error(path, open_fd) == (
        f"8 unexpected bytes after the last HDU, from byte {size}; "
        "FITS allows only whole HDUs there")
    write_mosaic(path, checksum=True)
    with path.open("ab") as f:
        f.write(bytes(2 * BLOCK))
    assert scan_error(path, open_fd, chunk_size=BLOCK) == (
        f"{2 * BLOCK} unexpected bytes after the last HDU, from byte {size} (all zero bytes); "
        "FITS allows only whole HDUs there")
    write_mosaic(path, checksum=True)
    with path.open("ab") as f:
        f.write(raw_header("XTENSION= 'IMAGE   '", "BITPIX  =                  -32",
                           "NAXIS   =                    1", "NAXIS1  =                 1000",
                           "PCOUNT  =                    0", "GCOUNT  =                    1"))
    assert scan_error(path, open_fd) == (
        f"truncated: HDU 1 data needs {2 * BLOCK} bytes from byte {size + BLOCK}, "
        f"file ends after 0 of them (file size {size + BLOCK})")


def test_extension_header_that_is_not_text(tmp_path: Path, open_fd) -> None:
    path = write_mosaic(tmp_path / "m.fits", checksum=False)
    size = path.stat().st_size
    with path.open("ab") as f:
        f.write(b"XTENSION= 'IMAGE   '" + PNG + bytes(BLOCK))
    reason = scan_error(path, open_fd)
    assert reason == (f"HDU 1 header at byte {size} is not valid: byte {size + 20} is 0x89, "
                      "not header text")


# --- files that change ------------------------------------------------------------------------

def read_then(monkeypatch: pytest.MonkeyPatch, after_reads: int, action) -> list[int]:
    """Run `action` through its own descriptor right after the scan's n-th read."""
    real_pread = os.pread
    calls: list[int] = []

    def pread(fd: int, n: int, offset: int) -> bytes:
        data = real_pread(fd, n, offset)
        calls.append(offset)
        if len(calls) == after_reads:
            action()
        return data

    monkeypatch.setattr(os, "pread", pread)
    return calls


def test_file_that_grows_while_being_read(tmp_path: Path, open_fd,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_mosaic(tmp_path / "m.fits", checksum=True)
    writer = open_fd(path, os.O_WRONLY | os.O_APPEND)
    calls = read_then(monkeypatch, 2, lambda: os.write(writer, bytes(BLOCK)))
    assert scan_error(path, open_fd, chunk_size=BLOCK) == "file changed while being read"
    assert calls == [i * BLOCK for i in range(len(calls))] and len(calls) > 2


def test_file_that_shrinks_while_being_read(tmp_path: Path, open_fd,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_mosaic(tmp_path / "m.fits", checksum=True)
    writer = open_fd(path, os.O_WRONLY)
    calls = read_then(monkeypatch, 1, lambda: os.ftruncate(writer, 3 * BLOCK + 100))
    assert scan_error(path, open_fd, chunk_size=BLOCK) == "file changed while being read"
    assert calls[-1] == 3 * BLOCK


def test_file_rewritten_in_place_while_being_read(tmp_path: Path, open_fd,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_mosaic(tmp_path / "m.fits", checksum=True)
    writer = open_fd(path, os.O_WRONLY)
    before = path.stat().st_mtime_ns
    read_then(monkeypatch, 2, lambda: (os.pwrite(writer, b"\x7f", 3 * BLOCK),
                                       os.utime(writer, ns=(before + 10**9, before + 10**9))))
    # The flipped byte lies beyond what was read, so only the change itself can be reported.
    assert scan_error(path, open_fd, chunk_size=BLOCK) == "file changed while being read"


# --- I/O ---------------------------------------------------------------------------------------

def test_read_errors_pass_through(tmp_path: Path, open_fd) -> None:
    path = write_mosaic(tmp_path / "m.fits", checksum=False)
    with pytest.raises(OSError) as info:
        scan_fits(open_fd(path, os.O_WRONLY))
    assert not isinstance(info.value, FitsError)
    with pytest.raises(OSError):
        hash_fd(open_fd(path, os.O_WRONLY))


def test_hash_fd(tmp_path: Path, open_fd) -> None:
    path = tmp_path / "preview.png"
    payload = PNG + os.urandom(100_000)
    path.write_bytes(payload)
    fd = open_fd(path)
    os.lseek(fd, 500, os.SEEK_SET)
    assert hash_fd(fd) == (len(payload), "sha256:" + hashlib.sha256(payload).hexdigest())
    assert hash_fd(fd, algorithm="md5", chunk_size=7) == (
        len(payload), "md5:" + hashlib.md5(payload).hexdigest())
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert hash_fd(open_fd(empty)) == (0, "sha256:" + hashlib.sha256(b"").hexdigest())


# --- card parser ------------------------------------------------------------------------------

# Cards the fixed-format parser reads itself; each entry is one header's cards before END.
FIXED_CARDS: list[tuple[str, ...]] = [
    ("SIMPLE  =                    T / conforms to FITS standard",),
    ("FLAG    =                    F",),
    ("FLAG    = F/no space before the comment",),
    ("BITPIX  =                  -32 / array data type",),
    ("NAXIS   =                    2",),
    ("INT     = -42",),
    ("INT     = +7 / explicit plus",),
    ("INT     = 007",),
    ("NEGZERO =                   -0",),
    ("BIG     = 123456789012345678901234567890",),
    ("NEGBIG  = -98765432109876543210987654321 / longer than 64 bits",),
    ("ZERO    =                  0.0",),
    ("NEGZERO =                 -0.0",),
    ("FLOAT   = 1.",),
    ("FLOAT   = .5",),
    ("FLOAT   = -.5E-3",),
    ("FLOAT   = +2.5E+3",),
    ("FLOAT   = 1E5",),
    ("FLOAT   = 1.5E+300",),
    ("FLOAT   = 2.5E-320 / subnormal",),
    ("FLOAT   = 1E999 / overflows to infinity",),
    ("FLOAT   = 1.0000000000000002",),
    ("MJD-OBS =         61007.127836 / [d] MJD of observation",),
    ("MEDRMS  = 3.2E-05/no space",),
    ("STR     = 'DSA110_MOSAIC'",),
    ("STR     = ''",),
    ("STR     = '' / empty",),
    ("STR     = '        '",),
    ("STR     = '  leading spaces kept'",),
    ("STR     = 'trailing spaces dropped   '   / comment",),
    ("STR     = 'it''s'",),
    ("STR     = ''''",),
    ("STR     = 'a '''' b'",),
    ("STR     = 'a/b / c'",),
    ("STR     = 'x'/c",),
    ("STR     = 'x' / it's a comment with 'quotes'",),
    ("STR     = 'abc&'",),
    ("STR     = '12:34:56.7'",),
    ("BUNIT   = 'Jy/beam '",),
    ("DATE-OBS= '2026-11-28T03:04:05'",),
    ("A-B_C9  = 1",),
    ("_       = 2",),
    ("CHECKSUM= 'aBcDeFgHiJkLmNoP'   / HDU checksum updated 2026-11-28T03:04:05",),
    ("DATASUM = '1234567890'         / data unit checksum updated 2026-11-28T03:04:05",),
    ("LONG    = 'ABCDEFGHIJKLMNOPQRSTUVWXYZABCDEFGHIJKLMNOPQRSTUVWXYZABCDEFGHIJKLMNOP'",),
    ("COMMENT   plain commentary", "HISTORY = 'not a value'", "        blank keyword",
     "COMMENT = 5", "KEPT    = 1"),
    ("DUP     = 1", "DUP     = 'two'", "DUP     = T"),
    ("DUP     = 'first'", "OTHER   = 2.0", "DUP     = 'second'"),
]

# Cards the fixed-format parser leaves to astropy, for the whole header.
DECLINED_CARDS: list[tuple[str, ...]] = [
    ("HIERARCH ESO DET CHIP = 1",),
    ("STR     = 'long string&'", "CONTINUE  'continued'"),
    ("CONTINUE= 'x'",),
    ("FLOAT   = 1.5D3",),
    ("FLOAT   = 1.5e3",),
    ("CPLX    = (1, 2)",),
    ("UNDEF   =",),
    ("UNDEF   =                      / no value",),
    ("NOEQ     1",),
    ("NOEQ    =1",),
    ("lower   = 1",),
    (" LEAD   = 1",),
    ("BAD.KEY = 1",),
    ("A= '1234= '",),
    ("TOOLONGKEYWORD = 1",),
    ("RVKC    = 'AXIS.1: 1'",),
    ("STR     = 'ab''/ c'",),
    ("STR     = 'ab'' / c'",),
    ("STR     = '' / it's'",),
    ("STR     = 'a'b'",),
    ("STR     = 'unterminated",),
    ("NUM     = 1 2",),
    ("NUM     = 12abc",),
    ("NUM     = - 5",),
    ("NUM     = 1_000",),
    ("NUM     = NaN",),
    ("BOOL    = TRUE",),
    ("GOOD    = 1", "FLOAT   = 2.0D0"),  # one declined card sends the whole header to astropy
]


def header_text(*cards: str, end: str = "END") -> str:
    assert all(len(card) <= 80 for card in cards)
    return "".join(card.ljust(80) for card in (*cards, end))


def typed(values: dict) -> dict:
    """Values with their exact type and repr, so 0 != 0.0 != -0.0 != False."""
    return {key: (type(value), repr(value)) for key, value in values.items()}


def astropy_values(text: str) -> dict:
    """What astropy's header[keyword] gives for every valued keyword, read independently."""
    header = afits.Header.fromstring(text)
    return {key: header[key] for key in dict.fromkeys(header.keys())
            if key not in ("", "COMMENT", "HISTORY")}


@pytest.mark.filterwarnings("ignore::astropy.utils.exceptions.AstropyUserWarning")
def test_fixed_cards_read_exactly_as_astropy_reads_them() -> None:
    assert len(FIXED_CARDS) + len(DECLINED_CARDS) >= 40
    for cards in FIXED_CARDS:
        text = header_text(*cards)
        fast = fits._parse_fixed(text)
        assert fast is not None, cards
        assert typed(fast) == typed(astropy_values(text)), cards
        assert typed(fast) == typed(fits._parse_with_astropy(text, 0)), cards
    for cards in DECLINED_CARDS:
        assert fits._parse_fixed(header_text(*cards)) is None, cards


def test_declined_headers_get_astropy_values_or_errors() -> None:
    assert fits._parse_header(header_text("STR     = 'ab''/ c'"), 0) == {"STR": "ab'"}
    assert fits._parse_header(header_text("STR     = '' / it's'"), 0) == {"STR": "' / it's"}
    assert fits._parse_header(header_text("FLOAT   = 1.5D3", "UNDEF   ="), 0) == {
        "FLOAT": 1500.0, "UNDEF": None}
    assert fits._parse_header(header_text("CPLX    = (1, 2)"), 0) == {"CPLX": 1 + 2j}
    # A record-valued card answers to its full keyword and, with the raw string, to its base.
    assert fits._parse_header(header_text("DP1     = 'AXIS.1: 1'"), 0) == {
        "DP1.AXIS.1": 1.0, "DP1": "AXIS.1: 1"}
    assert fits._parse_header(header_text("STR     = 'long string&'",
                                          "CONTINUE  'continued'"), 0) == {
        "STR": "long stringcontinued"}
    with pytest.raises(FitsError) as info:
        fits._parse_header(header_text("NUM     = 12abc"), 3)
    assert info.value.reason == "HDU 3 header card 1 (NUM) cannot be parsed: 'NUM     = 12abc'"
    # Only the plain END card ends a header the fixed-format parser reads.
    assert fits._parse_fixed(header_text("A       = 1", end="END     x")) is None
    assert fits._parse_fixed(header_text("A       = 1")[:-80]) is None


def header_texts(path: Path) -> list[str]:
    """Each HDU's header text up to and including its END card, as written."""
    raw = path.read_bytes()
    texts = []
    with afits.open(path) as hdul:
        for index in range(len(hdul)):
            info = hdul.fileinfo(index)
            text = raw[info["hdrLoc"]:info["datLoc"]].decode("ascii")
            end = next(pos for pos in range(0, len(text), 80) if text[pos:pos + 8] == "END     ")
            texts.append(text[:end + 80])
    return texts


def test_written_headers_parse_the_same_both_ways(tmp_path: Path) -> None:
    data = afits.GroupData(np.arange(6 * 3 * 2, dtype=np.float32).reshape(6, 1, 3, 2),
                           parnames=["UU", "VV"], pardata=[np.arange(6.0), np.arange(6.0)],
                           bitpix=-32)
    afits.GroupsHDU(data).writeto(tmp_path / "uv.fits", checksum=True)
    hdu = mosaic_hdu()
    hdu.header.add_history("made from 10 images")
    hdu.header.add_comment("it's a test / with a slash")
    hdu.header["EMPTY"] = ""
    hdu.header["QUOTED"] = "it's"
    hdu.header["NEGZERO"] = -0.0
    hdu.header["FLAG"] = False
    hdu.writeto(tmp_path / "image.fits", checksum=True)
    paths = [tmp_path / "image.fits", write_multi(tmp_path / "multi.fits", checksum=True),
             tmp_path / "uv.fits"]
    texts = [text for path in paths for text in header_texts(path)]
    assert len(texts) == 5
    for text in texts:
        fast = fits._parse_fixed(text)
        assert fast is not None
        assert typed(fast) == typed(astropy_values(text))
        assert typed(fast) == typed(fits._parse_with_astropy(text, 0))
    groups = fits._parse_fixed(texts[-1])
    assert groups is not None and groups["GROUPS"] is True and groups["PTYPE1"] == "UU"


SCAN_IN_FRESH_INTERPRETER = """
import json, os, sys
from contimg_publisher.fits import FitsError, scan_fits
results = []
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    try:
        report = scan_fits(fd)
        results.append([report.hdus, report.metadata, report.fits_checksums])
    except FitsError as exc:
        results.append(exc.reason)
    finally:
        os.close(fd)
    results.append("astropy" in sys.modules)
print(json.dumps(results))
"""


def test_astropy_is_imported_only_for_cards_it_alone_reads(tmp_path: Path) -> None:
    mosaic = write_mosaic(tmp_path / "mosaic.fits", checksum=True)
    data = bytes(BLOCK)
    odd = tmp_path / "odd.fits"
    odd.write_bytes(raw_header("SIMPLE  =                    T", "BITPIX  =                  -32",
                               "NAXIS   =                    2", "NAXIS1  =                    3",
                               "NAXIS2  =                    2", "MEDRMS  =               1.1D-4",
                               "HIERARCH ESO DET CHIP = 1") + data)
    bad = tmp_path / "bad.fits"
    bad.write_bytes(raw_header("SIMPLE  =                    T", "BITPIX  =                  -32",
                               "NAXIS   =                    1", "NAXIS1  =                1.0D1")
                    + data)
    result = subprocess.run([sys.executable, "-c", SCAN_IN_FRESH_INTERPRETER, str(mosaic)],
                            capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == [[1, EXPECTED_METADATA, "verified"], False]
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", SCAN_IN_FRESH_INTERPRETER, str(odd), str(bad)],
        capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == [
        [1, {"NAXIS1": 3, "NAXIS2": 2, "MEDRMS": 1.1e-4}, "absent"], True,
        "HDU 0 header has NAXIS1 = 10.0, not an integer >= 0", True]


# --- the headers alone, and the checks fed by a copy ----------------------------------------

def rchar() -> int:
    """Bytes this process has read so far, by any read(2)/pread(2) (the kernel's count)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def chunked(raw: bytes, size: int) -> Iterator[bytes]:
    return (raw[i:i + size] for i in range(0, len(raw), size))


def test_read_headers_declares_what_scan_fits_finds(tmp_path: Path, open_fd) -> None:
    for path, checksums in ((write_multi(tmp_path / "g.fits", checksum=True), True),
                            (write_multi(tmp_path / "p.fits", checksum=False), False),
                            (write_mosaic(tmp_path / "m.fits", checksum=True), True)):
        fd = open_fd(path)
        headers, report = fits.read_headers(fd), scan_fits(fd)
        assert (headers.size, headers.hdus, headers.metadata) == (
            report.size, report.hdus, report.metadata)
        assert headers.declares_checksums is checksums
        assert report.fits_checksums == ("verified" if checksums else "absent")


def test_read_headers_reads_no_data(tmp_path: Path, open_fd) -> None:
    """A 48 MB mosaic: its headers are a few blocks, and that is all that is read (the
    kernel's count of bytes read says so); scan_fits of the same file reads all of it."""
    path = write_mosaic(tmp_path / "big.fits", checksum=True, pixels=3500)
    size = path.stat().st_size
    assert size > 48_000_000
    fd = open_fd(path)
    before = rchar()
    headers = fits.read_headers(fd)
    read = rchar() - before
    assert headers.size == size and headers.declares_checksums
    assert read < 5 * BLOCK, read  # four blocks where the header starts, and /proc/self/io
    before = rchar()
    scan_fits(fd)
    assert rchar() - before >= size


def test_read_headers_fails_as_scan_fits_does_except_for_checksums(tmp_path: Path,
                                                                   open_fd) -> None:
    raw = write_multi(tmp_path / "full.fits", checksum=True).read_bytes()
    with afits.open(tmp_path / "full.fits") as hdul:
        data_starts = [hdul.fileinfo(i)["datLoc"] for i in range(3)]
    bad = {
        "cut_header": raw[:data_starts[2] - 100],
        "cut_data": raw[:data_starts[1] + BLOCK],
        "extra": raw + b"garbage\n",
        "zeros": raw + bytes(2 * BLOCK),
        "not_fits": PNG * 100,
    }
    for name, data in bad.items():
        path = tmp_path / f"{name}.fits"
        path.write_bytes(data)
        with pytest.raises(FitsError) as info:
            fits.read_headers(open_fd(path))
        assert info.value.reason == scan_error(path, open_fd), name
    # A wrong DATASUM is the data's business: the headers alone cannot tell.
    corrupt = bytearray(raw)
    corrupt[data_starts[1] + 10] ^= 0x01
    path = tmp_path / "corrupt.fits"
    path.write_bytes(corrupt)
    assert fits.read_headers(open_fd(path)).declares_checksums
    assert scan_error(path, open_fd).startswith("HDU 1 DATASUM mismatch")


def test_check_chunks_is_scan_fits_over_any_chunks(tmp_path: Path, open_fd) -> None:
    for path in (write_multi(tmp_path / "g.fits", checksum=True),
                 write_multi(tmp_path / "p.fits", checksum=False),
                 write_mosaic(tmp_path / "m.fits", checksum=True)):
        raw = path.read_bytes()
        expected = scan_fits(open_fd(path), algorithm="blake2b")
        for size in (BLOCK, 5 * BLOCK, 1000, 7, 4 * 2880 * 1024, len(raw)):
            assert fits.check_chunks(chunked(raw, size), len(raw), "blake2b") == expected, size


def test_check_chunks_names_the_hdu_whose_data_fail(tmp_path: Path, open_fd) -> None:
    """A data byte changed behind intact headers: found in the copy's chunks, with the same
    reason scan_fits gives, naming the HDU."""
    path = write_multi(tmp_path / "g.fits", checksum=True)
    with afits.open(path) as hdul:
        start = hdul.fileinfo(1)["datLoc"]
    raw = bytearray(path.read_bytes())
    raw[start + 10] ^= 0x01
    path.write_bytes(raw)
    reason = scan_error(path, open_fd)
    assert reason.startswith("HDU 1 DATASUM mismatch: header says ")
    for size in (BLOCK, 1000, len(raw)):
        with pytest.raises(FitsError) as info:
            fits.check_chunks(chunked(bytes(raw), size), len(raw))
        assert info.value.reason == reason


def test_check_chunks_short_or_long_of_the_declared_size(tmp_path: Path) -> None:
    raw = write_mosaic(tmp_path / "m.fits", checksum=True).read_bytes()
    with pytest.raises(FitsError) as info:
        fits.check_chunks(chunked(raw[:-BLOCK - 100], BLOCK), len(raw))
    assert info.value.reason == (f"truncated: the file ends after {len(raw) - BLOCK - 100} "
                                 f"bytes; its headers declare {len(raw)}")
    with pytest.raises(FitsError) as info:
        fits.check_chunks(chunked(raw + b"x" * 10, 1000), len(raw))
    assert info.value.reason == (f"10 unexpected bytes after the last HDU, from byte "
                                 f"{len(raw)}; FITS allows only whole HDUs there")
    with pytest.raises(FitsError) as info:
        fits.check_chunks(iter(()), 0)
    assert info.value.reason == "empty file (0 bytes)"
