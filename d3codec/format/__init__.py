"""The `.d3` byte format: in-memory types, reader, writer, budgets and errors."""
from d3codec.format.budget import parse_budget
from d3codec.format.errors import (
    BadMagicError,
    ChecksumError,
    D3FormatError,
    FileAccessError,
    HeaderTooLargeError,
    InvalidFieldError,
    OutOfRangeError,
    OverBudgetError,
    TruncatedError,
    UnsupportedVersionError,
)
from d3codec.format.io import dumps, encoded_size, load, loads, save, size_upper_bound
from d3codec.format.limits import ReaderLimits
from d3codec.format.types import (
    Budget,
    D3File,
    DecoderEntry,
    Labels,
    Metadata,
    Priors,
    Stored,
)

__all__ = [
    "Budget", "D3File", "DecoderEntry", "Labels", "Metadata", "Priors", "Stored",
    "load", "loads", "save", "dumps", "encoded_size", "size_upper_bound", "parse_budget", "ReaderLimits",
    "D3FormatError", "BadMagicError", "UnsupportedVersionError", "TruncatedError", "ChecksumError",
    "HeaderTooLargeError", "InvalidFieldError", "OutOfRangeError", "OverBudgetError", "FileAccessError",
]
