"""zstd for sections and the header: compress, and decompress with output bounded by a declared size.

`ZstdDecompressor.decompress(max_output_size=...)` does not bound the output when the frame
declares its content size, so the reader walks the frame's block headers first (exact frame
length, no reserved block types), checks the declared content size, and then streams at most the
declared number of bytes into a buffer it allocated itself.
"""
from __future__ import annotations

import zstandard

from d3codec.format.errors import InvalidFieldError, OutOfRangeError

_MAGIC = b"\x28\xb5\x2f\xfd"
_BLOCK_MAX = 128 * 1024


def compress(data: bytes, level: int) -> bytes:
    """One zstd frame with the content size in its header and no dictionary or checksum."""
    cctx = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
    return cctx.compress(data)


def _frame_length(buf: memoryview, where: str) -> int:
    """Byte length of the zstd frame at the start of `buf`, from its header and block headers."""
    if bytes(buf[:4]) != _MAGIC:
        raise InvalidFieldError(f"{where}: zstd data does not start with a zstd frame; the file is corrupted, re-create it")
    fhd = buf[4]
    if fhd & 0x08:
        raise InvalidFieldError(f"{where}: zstd frame header sets a reserved bit; the file is corrupted, re-create it")
    single = (fhd >> 5) & 1
    fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
    pos = 4 + 1 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
    n = len(buf)
    while True:
        if pos + 3 > n:
            raise OutOfRangeError(f"{where}: zstd frame runs past the end of its section; the file is corrupted, re-create it")
        head = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16)
        last, kind, size = head & 1, (head >> 1) & 3, head >> 3
        if kind == 3 or size > _BLOCK_MAX:
            raise InvalidFieldError(f"{where}: zstd frame has an invalid block header; the file is corrupted, re-create it")
        pos += 3 + (1 if kind == 1 else size)
        if last:
            break
    if fhd & 0x04:
        pos += 4
    if pos > n:
        raise OutOfRangeError(f"{where}: zstd frame runs past the end of its section; the file is corrupted, re-create it")
    return pos


def decompress_bounded(buf: memoryview, raw_length: int, where: str, max_window: int) -> bytearray:
    """Decompress the single zstd frame `buf` that must hold exactly `raw_length` bytes.

    Checks before allocating: one frame spanning all of `buf`, declared content size equal to
    `raw_length`, no dictionary, window within `max_window`. Then reads at most `raw_length` + 1
    bytes, so a frame that lies about its size cannot make the reader allocate more.
    """
    if len(buf) < 6:
        raise OutOfRangeError(f"{where}: zstd data is {len(buf)} bytes, too short for a frame; the file is corrupted, re-create it")
    if _frame_length(buf, where) != len(buf):
        raise InvalidFieldError(f"{where}: stored bytes are not exactly one zstd frame; the file is corrupted, re-create it")
    try:
        params = zstandard.get_frame_parameters(bytes(buf[:18]))
    except zstandard.ZstdError as exc:
        raise InvalidFieldError(f"{where}: unreadable zstd frame header ({exc}); the file is corrupted, re-create it") from None
    if params.content_size == zstandard.CONTENTSIZE_UNKNOWN:
        raise InvalidFieldError(f"{where}: zstd frame does not declare its content size, which .d3 requires; re-create the file")
    if params.content_size != raw_length:
        raise OutOfRangeError(
            f"{where}: zstd frame declares {params.content_size} bytes but the header declares {raw_length}; "
            "the file is corrupted or hostile, re-create it"
        )
    if params.dict_id != 0:
        raise InvalidFieldError(f"{where}: zstd frame needs dictionary {params.dict_id}, which .d3 files never use; re-create the file")
    if params.window_size > max_window:
        raise OutOfRangeError(
            f"{where}: zstd frame asks for a {params.window_size}-byte window, over the {max_window}-byte limit; "
            "re-create the file or raise ReaderLimits.max_window_bytes"
        )
    out = bytearray(raw_length)
    view = memoryview(out)
    got = 0
    try:
        dctx = zstandard.ZstdDecompressor(max_window_size=max_window)
        with dctx.stream_reader(buf, read_across_frames=False) as reader:
            while got < raw_length:
                step = reader.readinto(view[got:])
                if step == 0:
                    break
                got += step
            extra = reader.read(1) if got == raw_length else b""
    except zstandard.ZstdError as exc:
        raise InvalidFieldError(f"{where}: zstd data does not decompress ({exc}); the file is corrupted, re-create it") from None
    finally:
        view.release()
    if got != raw_length or extra:
        raise OutOfRangeError(
            f"{where}: zstd data decompresses to {'more' if extra else got} bytes, not the declared {raw_length}; "
            "the file is corrupted or hostile, re-create it"
        )
    return out
