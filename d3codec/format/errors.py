"""Errors for bad `.d3` bytes: one subclass per way a file can be wrong.

`load` raises only `D3FormatError` subclasses on bad bytes (anything safetensors, zstd or json
raise is wrapped), so callers can catch one type. Messages are one line: file, problem, fix.
"""
from __future__ import annotations

from d3codec.errors import BudgetError, D3Error


class D3FormatError(D3Error):
    """The bytes are not a valid `.d3` file (or not one this reader supports)."""


class BadMagicError(D3FormatError):
    """The file does not start with the `.d3` magic bytes: it is not a `.d3` file."""


class UnsupportedVersionError(D3FormatError):
    """The file's major format version is one this reader does not know."""


class TruncatedError(D3FormatError):
    """The file ends before the length it declares: it was cut short."""


class ChecksumError(D3FormatError):
    """The CRC-32 trailer does not match the bytes: the file is corrupted."""


class HeaderTooLargeError(D3FormatError):
    """The header is larger than the reader's limit (a hostile or broken file)."""


class InvalidFieldError(D3FormatError):
    """A header field or tensor is missing, of the wrong type, or inconsistent with another."""


class OutOfRangeError(D3FormatError):
    """A shape, offset, length or size lies outside the file or the reader's limits."""


class OverBudgetError(D3FormatError, BudgetError):
    """The writer refused: the encoded file would be larger than its byte budget."""


class FileAccessError(D3Error):
    """A `.d3` path cannot be read or written (missing, a directory, no permission)."""
