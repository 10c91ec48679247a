"""Prove that a file is one complete FITS file, and describe it, in one streaming read.

The pipeline writes mosaics in place, in several writes, so a file that is still being
written looks like a FITS file whose data stop short. The headers say exactly how long the
file must be: every HDU is a header of 2880-byte blocks ending with an END card, followed by
data whose size follows from BITPIX, NAXISn, PCOUNT and GCOUNT, padded to whole blocks. A
file is complete only when it is exactly that long and every CHECKSUM/DATASUM it carries
matches. The same pass hashes every byte, so the digest that is registered is the digest of
the bytes that were checked.

The read is either this module's own (`scan_fits`: os.pread from explicit offsets, so the
caller's file position never matters, in chunks of a bounded size) or a copy's
(`check_chunks`: the chunks a copy reads, handed over as it goes, so a file that is copied is
read once for the copy, the digest and the checks together). Headers are small and parsed
card by card; data are only summed, with numpy, a chunk at a time, so checking costs little
more than hashing alone. `read_headers` walks the headers alone, seeking over the data, for
what they declare (the size, the metadata) before a copy reads the rest.

Header cards in the plain fixed format that FITS writers produce are parsed here, which is
fast and needs no astropy (importing it costs more than scanning a small file). A header with
any card beyond that format (HIERARCH, CONTINUE, D exponents, complex or undefined values, odd
layouts) goes to astropy whole, imported only then, so such a file gets astropy's verdict.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

BLOCK = 2880
CARD = 80
SIGNATURE = b"SIMPLE  ="
METADATA_KEYS = ("OBJECT", "DATE-OBS", "MJD-OBS", "CRVAL1", "CRVAL2", "NAXIS1", "NAXIS2",
                 "BUNIT", "NIMAGES", "MEDRMS", "EFFNOISE", "COVERAGE")
# A header without an END card within this many bytes is rejected instead of being held in
# memory: real headers are a few kilobytes.
MAX_HEADER_BYTES = 3600 * BLOCK
CHANGED = "file changed while being read"

_BITPIX = (8, 16, 32, 64, -32, -64)
_NOT_TEXT = re.compile(rb"[^\x20-\x7e]")
_END = b"END     "
_NEG_ZERO = 0xFFFFFFFF
# Bytes summed per numpy call: (1 << 30) / 4 words of at most 2**32 - 1 fit in a uint64.
_SUM_PIECE = 1 << 30
_END_CARD = "END".ljust(CARD)
# Bytes read_headers reads where a header starts: most headers fit in four blocks.
_HEADER_READ = 4 * BLOCK
# Keywords whose cards carry no value, as astropy treats them.
_COMMENTARY = frozenset(("", "COMMENT", "HISTORY", "END"))
# Keywords that change how astropy reads a card or its neighbours: left to astropy.
_SPECIAL = frozenset(("END", "CONTINUE", "HIERARCH"))
# Keyword fields of cards that carry no value: blank, COMMENT and HISTORY.
_COMMENTARY_FIELDS = frozenset(("        ", "COMMENT ", "HISTORY "))
# A card in the fixed format: keyword in columns 1-8, '= ' in columns 9-10 (the empty group
# "at" marks column 11), then one value, spaces and an optional comment.
_FIXED_CARD = re.compile(
    r"(?P<keyword>[A-Z0-9_-]{1,8}) *= (?P<at>) *"
    r"(?:'(?P<str>(?:[^']|'')*)'"
    r"|(?P<bool>[TF])"
    r"|(?P<int>[+-]?[0-9]+)"
    r"|(?P<float>[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:E[+-]?[0-9]+)?))"
    r" *(?P<comment>/.*)?")
# A quoted pair followed by a comment separator: astropy may end the string there.
_PAIR_THEN_SLASH = re.compile(r"'' */")


@dataclass(frozen=True)
class FitsReport:
    size: int                 # bytes read == file size
    hdus: int                 # number of HDUs found
    checksum: str             # "<algorithm>:<hex>" of the whole file's bytes
    metadata: dict[str, Any]  # METADATA_KEYS present in the primary header
    fits_checksums: str       # "verified" or "absent"


@dataclass(frozen=True)
class FitsHeaders:
    """What a file's headers declare, read without its data (read_headers)."""

    size: int                 # the size the headers declare, which is the file's size
    hdus: int
    metadata: dict[str, Any]
    declares_checksums: bool  # some HDU carries CHECKSUM or DATASUM, not yet checked


class FitsError(Exception):
    """A file that is not a complete, valid FITS file; str(e) is a reason an operator can act
    on, also kept as .reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_fits_signature(first_bytes: bytes) -> bool:
    """True when the bytes start with the FITS primary card 'SIMPLE  =' (content, not name)."""
    return bytes(first_bytes[:len(SIGNATURE)]) == SIGNATURE


def hash_fd(fd: int, algorithm: str = "sha256", chunk_size: int = 8 << 20) -> tuple[int, str]:
    """(size, "algorithm:hex") of any open file, read with os.pread from offset 0.

    Reads up to the size fstat reports at the start and stops early if the file ends sooner,
    so the size returned always counts exactly the bytes hashed; callers that must know the
    file did not change compare its identity before and after.
    """
    hasher = hashlib.new(algorithm)
    size = os.fstat(fd).st_size
    chunk = max(1, chunk_size)
    offset = 0
    while offset < size:
        data = os.pread(fd, min(chunk, size - offset), offset)
        if not data:
            break
        hasher.update(data)
        offset += len(data)
    return offset, f"{algorithm}:{hasher.hexdigest()}"


def hash_chunks(chunks: Iterable[bytes], algorithm: str = "sha256") -> tuple[int, str]:
    """(size, "algorithm:hex") of the bytes of `chunks`, for a copy of a file that is not
    checked as FITS."""
    hasher = hashlib.new(algorithm)
    size = 0
    for chunk in chunks:
        hasher.update(chunk)
        size += len(chunk)
    return size, f"{algorithm}:{hasher.hexdigest()}"


def scan_fits(fd: int, algorithm: str = "sha256", chunk_size: int = 8 << 20) -> FitsReport:
    """Check an open file's FITS structure and checksums and hash it, in one pass.

    Raises FitsError naming the reason for a file that is empty, does not start with
    SIMPLE = T, has a header without END or that does not parse, is shorter or longer than
    its headers say, fails a CHECKSUM/DATASUM, or changed size or mtime while being read.
    OSError from reading passes through unchanged. Memory stays within one chunk plus the
    headers.
    """
    hasher = hashlib.new(algorithm)
    before = os.fstat(fd)
    if before.st_size == 0:
        raise FitsError("empty file (0 bytes)")
    hdus, metadata, checked = _walk_unchanged(
        fd, before, _ReadStream(fd, before.st_size, hasher, chunk_size), verify=True)
    return FitsReport(size=before.st_size, hdus=hdus,
                      checksum=f"{algorithm}:{hasher.hexdigest()}", metadata=metadata,
                      fits_checksums="verified" if checked else "absent")


def check_chunks(chunks: Iterable[bytes], size: int, algorithm: str = "sha256") -> FitsReport:
    """scan_fits() over the chunks a copy reads (its single read of the file), for a file
    whose headers declared `size` bytes.

    The chunks may have any lengths; the same checks run with the same reasons, and the
    HDU whose CHECKSUM or DATASUM fails is named. Chunks that stop short of `size` are a
    truncated file, chunks that go on past it bytes after the last HDU. Whether the file
    changed while it was copied is the caller's to tell, from its identity before and
    after (scan_fits does that with its own read).
    """
    if size <= 0:
        raise FitsError("empty file (0 bytes)")
    hasher = hashlib.new(algorithm)
    stream = _FedStream(iter(chunks), size, hasher)
    hdus, metadata, checked = _walk(stream, verify=True)
    extra = stream.drain()
    if extra:
        raise FitsError(f"{extra} unexpected bytes after the last HDU, from byte {size}; "
                        "FITS allows only whole HDUs there")
    return FitsReport(size=size, hdus=hdus, checksum=f"{algorithm}:{hasher.hexdigest()}",
                      metadata=metadata, fits_checksums="verified" if checked else "absent")


def read_headers(fd: int) -> FitsHeaders:
    """What an open file's headers declare, reading only the headers: each HDU's data are
    skipped by the size its header announces, so the file must be exactly as long as the
    headers say. No data byte is read (unless, to name the problem, bytes found after the
    last HDU); CHECKSUM and DATASUM are not checked here (check_chunks does that).

    Raises FitsError as scan_fits does, for everything but the checksums.
    """
    before = os.fstat(fd)
    if before.st_size == 0:
        raise FitsError("empty file (0 bytes)")
    hdus, metadata, declared = _walk_unchanged(fd, before, _HeaderStream(fd, before.st_size),
                                               verify=False)
    return FitsHeaders(size=before.st_size, hdus=hdus, metadata=metadata,
                       declares_checksums=declared)


def _walk_unchanged(fd: int, before: os.stat_result, stream: _Stream, verify: bool
                    ) -> tuple[int, dict[str, Any], bool]:
    """_walk() over the open file's own read; any failure of a file that changed meanwhile
    is reported as that change."""
    try:
        result = _walk(stream, verify)
    except FitsError as exc:
        if exc.reason != CHANGED and _changed(fd, before):
            raise FitsError(CHANGED) from None
        raise
    if _changed(fd, before):
        raise FitsError(CHANGED)
    return result


def _changed(fd: int, before: os.stat_result) -> bool:
    after = os.fstat(fd)
    return (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns)


# --- reading ----------------------------------------------------------------------------------

class _Stream:
    """The file read once, front to back, in chunks of whole blocks, each hashed as it
    arrives. Chunks start at block offsets, so a 2880-byte block never spans two chunks.
    Where the chunks come from is the subclass's: _fetch."""

    def __init__(self, size: int, hasher: Any, chunk_size: int) -> None:
        self.size = size
        self.hasher = hasher
        self.chunk = max(BLOCK, chunk_size // BLOCK * BLOCK)
        self.offset = 0                   # the next byte not yet consumed
        self._buf = memoryview(b"")
        self._buf_start = 0               # file offset of _buf[0]

    @property
    def remaining(self) -> int:
        return self.size - self.offset

    def view(self, n: int) -> memoryview:
        """Up to n bytes from the current offset, without consuming them; shorter only at the
        end of the file or of a chunk (never for a block-aligned n <= BLOCK)."""
        start = self.offset - self._buf_start
        if start >= len(self._buf):
            self._next_chunk()
            start = 0
        return self._buf[start:start + n]

    def advance(self, n: int) -> None:
        self.offset += n

    def ones_sum(self, n: int) -> int:
        """Consume n bytes (a multiple of 4, at a multiple of 4) and return their sum as
        big-endian uint32 words, not yet folded."""
        total = 0
        end = self.offset + n
        while self.offset < end:
            piece = self.view(min(end - self.offset, _SUM_PIECE))
            total += _word_sum(piece)
            self.advance(len(piece))
        return total

    def _next_chunk(self) -> None:
        start = self._buf_start + len(self._buf)
        want = min(self.chunk, self.size - start)
        data = self._fetch(start, want) if want > 0 else b""
        if want > 0 and (not data or len(data) % BLOCK and start + len(data) != self.size):
            raise FitsError(CHANGED)
        self.hasher.update(data)
        self._buf = memoryview(data)
        self._buf_start = start

    def _fetch(self, start: int, want: int) -> bytes:
        """Whole blocks from `start`, at most `want` bytes (fewer only at the end of the
        chunks: the file ended early)."""
        raise NotImplementedError


class _ReadStream(_Stream):
    """The stream read from an open file with os.pread."""

    def __init__(self, fd: int, size: int, hasher: Any, chunk_size: int) -> None:
        super().__init__(size, hasher, chunk_size)
        self.fd = fd

    def _fetch(self, start: int, want: int) -> bytes:
        data = os.pread(self.fd, want, start)
        if len(data) != want:
            raise FitsError(CHANGED)
        return data


class _FedStream(_Stream):
    """The stream made of the chunks a copy read, in their order, cut at block boundaries:
    the few bytes of a chunk that end in the middle of a block wait for the next one (the
    copy's chunks are whole blocks, so in practice nothing waits and nothing is copied)."""

    def __init__(self, chunks: Iterator[bytes], size: int, hasher: Any) -> None:
        super().__init__(size, hasher, size)
        self.chunks = chunks
        self._carry = b""

    def _fetch(self, start: int, want: int) -> bytes:
        data = self._carry
        while True:
            if len(data) >= want:
                self._carry = data[want:]
                return data[:want]
            usable = len(data) - len(data) % BLOCK
            if usable:
                self._carry = data[usable:]
                return data[:usable]
            piece = next(self.chunks, None)
            if piece is None:
                raise FitsError(f"truncated: the file ends after {start + len(data)} bytes; "
                                f"its headers declare {self.size}")
            data = data + piece if data else piece

    def drain(self) -> int:
        """Hash what comes after the declared size; returns how many bytes did."""
        extra = len(self._carry)
        self.hasher.update(self._carry)
        self._carry = b""
        for piece in self.chunks:
            self.hasher.update(piece)
            extra += len(piece)
        return extra


class _HeaderStream(_ReadStream):
    """The headers alone: a few blocks read where a header starts, the data skipped
    (ones_sum consumes without reading), so what a file declares is known without reading
    it. Nothing is hashed."""

    def __init__(self, fd: int, size: int) -> None:
        super().__init__(fd, size, None, _HEADER_READ)

    def view(self, n: int) -> memoryview:
        start = self.offset - self._buf_start
        if not 0 <= start < len(self._buf):
            want = min(self.chunk, self.size - self.offset)
            self._buf = memoryview(self._fetch(self.offset, want) if want > 0 else b"")
            self._buf_start, start = self.offset, 0
        return self._buf[start:start + n]

    def ones_sum(self, n: int) -> int:
        self.advance(n)
        return 0


def _word_sum(data: memoryview | bytes) -> int:
    # numpy is imported at the first sum, not with this module: registration from the
    # headers alone never sums, and a copy's first chunks go on while its reader imports.
    import numpy as np

    return int(np.frombuffer(data, dtype=">u4").sum(dtype=np.uint64))


def _fold(total: int) -> int:
    """The 32-bit ones' complement value of a plain sum of words (end-around carries)."""
    while total >> 32:
        total = (total & 0xFFFFFFFF) + (total >> 32)
    return total


# --- structure --------------------------------------------------------------------------------

def _walk(stream: _Stream, verify: bool = True) -> tuple[int, dict[str, Any], bool]:
    """Walk every HDU; return (HDU count, primary metadata, whether any checksum was checked).
    With verify False the data are not summed (a _HeaderStream): the third value says
    whether any HDU declares a checksum, whose form alone is checked."""
    first = bytes(stream.view(BLOCK)[:len(SIGNATURE)])
    if not is_fits_signature(first):
        raise FitsError("not a FITS file: it does not start with the card 'SIMPLE  ='")
    index = 0
    metadata: dict[str, Any] = {}
    checked = False
    while True:
        header, header_sum = _read_header(stream, index, verify)
        if index == 0:
            if header.get("SIMPLE") is not True:
                raise FitsError("not a standard FITS file: the primary header has SIMPLE = "
                                f"{_show(header.get('SIMPLE'))}, not T")
            metadata = _metadata(header)
        data_bytes = _data_size(header, index)
        padded = -(-data_bytes // BLOCK) * BLOCK
        if padded > stream.remaining:
            raise FitsError(
                f"truncated: HDU {index} data needs {padded} bytes from byte {stream.offset}, "
                f"file ends after {stream.remaining} of them (file size {stream.size})")
        data_sum = stream.ones_sum(padded)
        if verify:
            checked |= _verify(header, index, header_sum, data_sum)
        else:
            _datasum(header, index)
            checked |= "CHECKSUM" in header or "DATASUM" in header
        index += 1
        if stream.remaining == 0:
            return index, metadata, checked
        if bytes(stream.view(9)) != b"XTENSION=":
            extra, at = stream.remaining, stream.offset
            kind = " (all zero bytes)" if _all_zero(stream) else ""
            raise FitsError(f"{extra} unexpected bytes after the last HDU, from byte {at}{kind}; "
                            "FITS allows only whole HDUs there")


def _all_zero(stream: _Stream) -> bool:
    """Whether every byte from the current offset to the end of the file is zero."""
    import numpy as np  # see _word_sum

    while stream.remaining:
        piece = stream.view(stream.remaining)
        if np.frombuffer(piece, dtype=np.uint8).any():
            return False
        stream.advance(len(piece))
    return True


def _read_header(stream: _Stream, index: int, summed: bool = True
                 ) -> tuple[dict[str, Any], int]:
    """Read one header up to its END card; return it parsed, with the sum of its blocks
    (0 unless `summed`)."""
    start = stream.offset
    blocks: list[bytes] = []
    while True:
        at = stream.offset
        block = bytes(stream.view(BLOCK))
        if len(block) < BLOCK:
            raise FitsError(f"truncated: HDU {index} header block at byte {at} has only "
                            f"{len(block)} of {BLOCK} bytes (file size {stream.size})")
        end = _end_card(block)
        text_end = BLOCK if end is None else end + CARD
        bad = _NOT_TEXT.search(block, 0, text_end)
        if bad:
            where = at + bad.start()
            what = f"byte {where} is 0x{block[bad.start()]:02x}, not header text"
            if not blocks and index > 0:
                raise FitsError(f"HDU {index} header at byte {at} is not valid: {what}")
            raise FitsError(f"HDU {index} header has no END card: {what}")
        blocks.append(block)
        stream.advance(BLOCK)
        if end is not None:
            break
        if stream.offset - start >= MAX_HEADER_BYTES:
            raise FitsError(f"HDU {index} header has no END card in its first "
                            f"{MAX_HEADER_BYTES} bytes (header starts at byte {start})")
        if stream.remaining == 0:
            raise FitsError(
                f"truncated: HDU {index} header has no END card and the file ends after "
                f"{stream.size - start} of its bytes (header starts at byte {start})")
    raw = b"".join(blocks)
    text = raw[:len(raw) - BLOCK + text_end].decode("ascii")
    return _parse_header(text, index), _word_sum(raw) if summed else 0


def _end_card(block: bytes) -> int | None:
    for pos in range(0, BLOCK, CARD):
        if block[pos:pos + 8] == _END:
            return pos
    return None


def _parse_header(text: str, index: int) -> dict[str, Any]:
    """Keyword -> value of one header (text up to and including its END card), as astropy's
    header[keyword] gives it: the first card of a repeated keyword, None for no value, and no
    commentary cards. Every card's value is parsed now, so a malformed card is found now."""
    values = _parse_fixed(text)
    if values is None:
        values = _parse_with_astropy(text, index)
    return values


def _parse_fixed(text: str) -> dict[str, Any] | None:
    """The header's values when every card is in the plain fixed format, read exactly as
    astropy reads it; None when any card is not, so astropy decides the whole header."""
    last = len(text) - CARD
    if last < 0 or text[last:] != _END_CARD:
        return None
    values: dict[str, Any] = {}
    for pos in range(0, last, CARD):
        match = _FIXED_CARD.fullmatch(text, pos, pos + CARD)
        if match is None or match.start("at") != pos + 10:
            if text[pos:pos + 8] in _COMMENTARY_FIELDS:
                continue
            return None
        keyword, _, inner, flag, integer, real, comment = match.groups()
        if keyword in _SPECIAL:
            return None
        if keyword in _COMMENTARY:
            continue
        value: Any
        if inner is not None:
            # astropy ends a string at the first quote after which only a comment can
            # follow and treats 'name: number' as a record-valued card; neither is guessed.
            if (not inner and comment and "'" in comment) or ": " in inner or (
                    "''" in inner and _PAIR_THEN_SLASH.search(inner)):
                return None
            value = inner.replace("''", "'").rstrip()
        elif flag is not None:
            value = flag == "T"
        elif integer is not None:
            value = int(integer)
        else:
            value = float(real)
        if keyword not in values:
            values[keyword] = value
    return values


def _parse_with_astropy(text: str, index: int) -> dict[str, Any]:
    """Parse with astropy and force every card's value, so a malformed card is found now."""
    from astropy.io import fits as afits  # imported only for headers _parse_fixed declines

    try:
        header = afits.Header.fromstring(text)
    except Exception as exc:  # astropy raises several kinds for malformed text
        raise FitsError(f"HDU {index} header cannot be parsed: {exc}") from None
    for card in header.cards:
        try:
            card.value  # noqa: B018 - parsing is lazy; reading the value forces it
        except Exception:
            number, image = _raw_card(text, card.keyword)
            raise FitsError(f"HDU {index} header card {number} ({card.keyword}) cannot be "
                            f"parsed: {image!r}") from None
    values: dict[str, Any] = {}
    for card in header.cards:
        # A record-valued card answers to its full keyword and to its base keyword.
        for keyword in (card.keyword, card.rawkeyword):
            key = keyword.upper()
            if key in values or key in _COMMENTARY:
                continue
            try:
                value = header[keyword]
            except Exception:  # a lookup astropy cannot answer is a keyword not present
                continue
            values[key] = None if isinstance(value, afits.card.Undefined) else value
    return values


def _raw_card(text: str, keyword: str) -> tuple[int, str]:
    """(1-based number, text) of the first card in the header text with this keyword."""
    for pos in range(0, len(text), CARD):
        if text[pos:pos + 8].rstrip() == keyword:
            return pos // CARD + 1, text[pos:pos + CARD].rstrip()
    return 0, keyword


def _mandatory_int(header: dict[str, Any], key: str, index: int, low: int) -> int:
    if key not in header:
        raise FitsError(f"HDU {index} header lacks the mandatory keyword {key}")
    value = header[key]
    if type(value) is not int or value < low:
        raise FitsError(f"HDU {index} header has {key} = {_show(value)}, "
                        f"not an integer >= {low}")
    return value


def _data_size(header: dict[str, Any], index: int) -> int:
    """Bytes of data (before padding) that the mandatory keywords announce."""
    if "BITPIX" not in header:
        raise FitsError(f"HDU {index} header lacks the mandatory keyword BITPIX")
    bitpix = header["BITPIX"]
    if type(bitpix) is not int or bitpix not in _BITPIX:
        raise FitsError(f"HDU {index} header has BITPIX = {_show(bitpix)}, "
                        f"not one of {', '.join(map(str, _BITPIX))}")
    naxis = _mandatory_int(header, "NAXIS", index, 0)
    if naxis > 999:
        raise FitsError(f"HDU {index} header has NAXIS = {naxis}, more than 999")
    axes = [_mandatory_int(header, f"NAXIS{n}", index, 0) for n in range(1, naxis + 1)]
    if naxis == 0:
        return 0
    groups = index == 0 and header.get("GROUPS") is True and axes[0] == 0
    if index == 0 and not groups:
        return abs(bitpix) // 8 * math.prod(axes)
    pcount = _mandatory_int(header, "PCOUNT", index, 0)
    gcount = _mandatory_int(header, "GCOUNT", index, 0)
    elements = math.prod(axes[1:]) if groups else math.prod(axes)
    return abs(bitpix) // 8 * gcount * (pcount + elements)


def _verify(header: dict[str, Any], index: int, header_sum: int, data_sum: int) -> bool:
    """Check DATASUM and CHECKSUM where present; True when at least one was checked."""
    datasum = _fold(data_sum)
    stated = _datasum(header, index)
    has_datasum = stated is not None
    if stated is not None and stated != datasum:
        raise FitsError(f"HDU {index} DATASUM mismatch: header says {stated}, "
                        f"data gives {datasum}")
    if "CHECKSUM" in header:
        total = _fold(header_sum + data_sum)
        if total != _NEG_ZERO:
            where = ("the header changed after CHECKSUM was written" if has_datasum
                     else "header or data changed after CHECKSUM was written")
            raise FitsError(f"HDU {index} CHECKSUM mismatch: header and data sum to "
                            f"{total:#010x}, not -0 (0xffffffff); {where}")
        return True
    return has_datasum


def _datasum(header: dict[str, Any], index: int) -> int | None:
    """The DATASUM a header states (None without one); FitsError when it is not a number."""
    if "DATASUM" not in header:
        return None
    stated = str(header["DATASUM"]).strip()
    if not stated.isdigit() or int(stated) > 0xFFFFFFFF:
        raise FitsError(f"HDU {index} DATASUM = {_show(header['DATASUM'])} is not "
                        "an unsigned 32-bit integer")
    return int(stated)


def _metadata(header: dict[str, Any]) -> dict[str, Any]:
    return {key: _json_value(header[key]) for key in METADATA_KEYS if key in header}


def _json_value(value: Any) -> str | int | float | bool | None:
    """A value JSON can carry exactly; None for undefined, NaN, infinite or complex values."""
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return None


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "T" if value else "F"
    if value is None:
        return "(no value)"
    return repr(value)

